"""Train one model, or sweep many, from a Hydra config.

    python run.py                                   # student, CE, CIFAR-10
    python run.py model=teacher                     # the teacher alone
    python run.py loss=kd loss.temperature=4        # distil (teacher trained once, stored)
    python run.py -m loss=kd loss.temperature=1,2,4,8
    python run.py -m hparams_search=kd       # Optuna over temperature and alpha

Returns the sweep objective named by ``objective`` (validation accuracy; with
``trial.seeds`` its mean over the seeds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.kd_sweeper import job
from kd import pipeline, population_jobs
from kd.devices import available_cores
from kd.errors import ConfigError, Diverged, JobStopped, KDError, Pruned, StorageError
from kd.hints import override_hints, sweep_syntax_error
from kd.tuning import epoch_reporter, keep_run, record_measures, use_replicate

log = logging.getLogger("kd")
DIVERGED_JOBS: list[int] = []  # jobs of a plain multirun (all in this process) that diverged


def parallel_jobs(hydra_cfg: DictConfig) -> int:
    """How many jobs of this sweep run at once on this machine (joblib's n_jobs)."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=1) or 1
    return n_jobs if n_jobs > 0 else max(1, available_cores() + 1 + n_jobs)


def debug_traceback() -> None:
    """With ``KD_DEBUG=1``, the traceback behind an expected stop's one line."""
    if os.environ.get("KD_DEBUG"):
        traceback.print_exc()


# Launchers that run every job in the sweep's own process, one after another.
IN_PROCESS_LAUNCHERS = ("BasicLauncher", "PopulationLauncher")


def basic_multirun(hydra_cfg: DictConfig) -> bool:
    """A multirun of Hydra's basic sweeper (a grid), with any launcher."""
    sweeper = str(OmegaConf.select(hydra_cfg, "sweeper._target_", default=""))
    return hydra_cfg.mode == RunMode.MULTIRUN and sweeper.endswith("BasicSweeper")


def plain_multirun(hydra_cfg: DictConfig) -> bool:
    """A multirun of Hydra's basic sweeper whose jobs run one after another, here."""
    launcher = str(OmegaConf.select(hydra_cfg, "launcher._target_", default=""))
    return basic_multirun(hydra_cfg) and launcher.endswith(IN_PROCESS_LAUNCHERS)


def stops_like_a_single_run(err: KDError, hydra_cfg: DictConfig) -> bool:
    """A bad value in a plain multirun: end it with the same one line as a single run.
    Optuna sweeps record the trial as failed instead, and jobs in other processes report
    back to their sweeper."""
    return isinstance(err, ConfigError) and plain_multirun(hydra_cfg)


def unwritable(err: OSError) -> str:
    """An OS error on a destination as one line: what failed, where, and the fix."""
    where = err.filename or "a destination"
    return (
        f"cannot write {where} ({err.strerror or type(err).__name__}); choose a writable directory "
        "(hydra.run.dir, hydra.sweep.dir, paths.store_dir or KD_CACHE_DIR) with free space"
    )


def remove_if_empty(run_dir: Path) -> None:
    """Delete a run directory that holds only Hydra's config copy and a log (and the date
    folders above it that this leaves empty)."""
    for handler in logging.getLogger().handlers[:]:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            handler.close()
            logging.getLogger().removeHandler(handler)
    if not run_dir.is_dir() or any(p.name not in (".hydra",) and p.suffix != ".log" for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in (run_dir.parent, run_dir.parent.parent):
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty: outputs/<date>/, then outputs/


def run_tags(hydra_cfg: DictConfig) -> dict:
    """What ties a run to its sweep in a tracker: study name and trial number."""
    tags: dict = {}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        study = job.study_name() or OmegaConf.select(hydra_cfg, "sweeper.study_name", default=None)
        if study:
            tags["study_name"] = study
        if job.trial_number() is not None:
            tags["trial_number"] = job.trial_number()
    return tags


# The callbacks conf/config.yaml names (Hydra 1.4 asks for an allow-list of what it instantiates).
@hydra.main(
    config_path="conf",
    config_name="config",
    execution_whitelist=["kd.tuning.ReportHint", "kd.cluster.CheckSlurmLauncher", "kd.cluster.QuietAccountingPolls"],
)
def main(cfg: DictConfig, share: population_jobs.JobShare | None = None) -> float | list[float]:
    """One run; ``share`` is this job's part of a population when hydra/launcher=population
    trained it (the launcher passes it), else None."""
    hydra_cfg = HydraConfig.get()
    try:
        use_replicate(cfg)  # a racing sweep's seed-run: its seed is its replicate
        metrics = pipeline.run(
            cfg,
            output_dir=hydra_cfg.runtime.output_dir,
            job_num=OmegaConf.select(hydra_cfg, "job.num", default=0) or 0,
            parallel_jobs=parallel_jobs(hydra_cfg),
            report=epoch_reporter() if hydra_cfg.mode == RunMode.MULTIRUN else None,
            tags=run_tags(hydra_cfg),
            context=share.context if share else None,
            teacher_source=share.teacher if share else None,
            pretrained=share.outcomes if share else None,
        )
    except KDError as err:
        debug_traceback()
        if isinstance(err, Diverged) and plain_multirun(hydra_cfg):
            # One job of a grid diverged: say so in one line and let the others run
            # (its metrics.json records where); Hydra would end the grid with a traceback.
            print(f"kd: job {hydra_cfg.job.num}: {err}", file=sys.stderr)
            DIVERGED_JOBS.append(int(hydra_cfg.job.num))
            return float("nan")
        if basic_multirun(hydra_cfg) and not plain_multirun(hydra_cfg):
            # A grid's job in another process (joblib, SLURM): the sweep's process ends
            # the sweep with this job's one line and exit code (entry).
            raise JobStopped.of(hydra_cfg.job.num, err) from None
        if hydra_cfg.mode == RunMode.MULTIRUN and not stops_like_a_single_run(err, hydra_cfg):
            (log.info if isinstance(err, Pruned) else log.error)("%s", err)  # in the job's own log too
            raise  # the sweeper records this trial as failed (or pruned) and goes on
        print(f"kd: error: {err}", file=sys.stderr)
        if isinstance(err, ConfigError):
            remove_if_empty(Path(hydra_cfg.runtime.output_dir))  # a refused run leaves nothing
        sys.exit(err.exit_code)
    except OSError as err:  # a destination that cannot be written: what and where, in one line
        debug_traceback()
        if basic_multirun(hydra_cfg) and not plain_multirun(hydra_cfg):
            raise JobStopped(f"job {hydra_cfg.job.num}: {unwritable(err)}", StorageError.exit_code) from None
        print(f"kd: error: {unwritable(err)}", file=sys.stderr)
        sys.exit(StorageError.exit_code)
    except KeyboardInterrupt:
        print("kd: interrupted; rerun the same command to resume (finished work is kept)", file=sys.stderr)
        sys.exit(130)
    except Exception:
        log.exception("the run failed")  # the whole traceback, in the job's log file
        raise
    if hydra_cfg.mode == RunMode.MULTIRUN:
        record_measures(metrics)  # what the sweep's constraints may bound
        keep_run(hydra_cfg.runtime.output_dir, metrics)  # the student, kept in the study's artifact store
    value = metrics["objective_value"]
    if isinstance(value, list):  # objective=[val_acc,params]: one value per objective
        return [float("nan") if v is None else float(v) for v in value]
    return float("nan") if value is None else float(value)


def _notes(err: BaseException) -> str:
    return "\n".join(getattr(err, "__notes__", ()))


def plugin_refusal(err: Exception) -> str:
    """One line for a sweeper or launcher that refused its keys: the innermost cause,
    and the config node it came from (Hydra's ``full_key``)."""
    root: BaseException = err
    while root.__cause__ is not None:
        root = root.__cause__
    keys = re.findall(r"full_key: (\S+)", f"{err}\n{_notes(err)}")
    where = f"{keys[0]}: " if keys else ""
    return f"{where}{str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__}"


class HeldJobErrorLine:
    """``sys.stderr`` holding back the line Hydra's basic sweeper writes before re-raising
    a job's error ("Error executing job with overrides: ..."): an expected stop is shown
    as kd's one line instead; for a bug, :meth:`release` writes it back."""

    PREFIX = "Error executing job with overrides:"

    def __init__(self, stream: Any) -> None:
        self.stream, self.held = stream, []

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIX):
            self.held.append(text)
            return len(text)
        return self.stream.write(text)

    def release(self) -> None:
        for text in self.held:
            self.stream.write(text)
        self.held.clear()

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding ...
        return getattr(self.stream, name)


def entry() -> None:
    """``python run.py``: Hydra's errors re-raised here (``HYDRA_FULL_ERROR``) so that an
    expected stop is one line with its exit code, and only a bug shows a traceback."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    stderr = HeldJobErrorLine(sys.stderr)
    try:
        with contextlib.redirect_stderr(stderr):
            main()
    except KDError as err:  # a grid's job in another process, or a launcher, stopped as expected
        debug_traceback()
        print(f"kd: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except CompactHydraException as err:  # Hydra refused the command line: bad input
        debug_traceback()
        if syntax := sweep_syntax_error(str(err)):  # nothing was looked up yet: no key hints
            print(f"kd: error: {syntax}", file=sys.stderr)
            sys.exit(ConfigError.exit_code)
        print(f"kd: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        for hint in override_hints(sys.argv[1:], Path(__file__).parent / "conf"):
            print(f"kd: hint: {hint}", file=sys.stderr)
        sys.exit(ConfigError.exit_code)
    except OSError as err:  # Hydra could not create the run or sweep directory
        debug_traceback()
        print(f"kd: error: {unwritable(err)}", file=sys.stderr)
        sys.exit(StorageError.exit_code)
    except Exception as err:
        # A sweeper or launcher that refused its keys (Hydra re-raises the plugin's own
        # error with the node's full_key as a note): bad input. Anything else is a bug.
        if not isinstance(err, HydraException) and "full_key: hydra." not in _notes(err):
            stderr.release()
            raise
        debug_traceback()
        print(f"kd: error: {plugin_refusal(err)}", file=sys.stderr)
        sys.exit(ConfigError.exit_code)
    if DIVERGED_JOBS:
        jobs = ", ".join(map(str, DIVERGED_JOBS))
        print(f"kd: error: job(s) {jobs} diverged (each metrics.json says where); the others finished", file=sys.stderr)
        sys.exit(Diverged.exit_code)


if __name__ == "__main__":
    entry()
