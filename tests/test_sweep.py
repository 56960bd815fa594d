"""Optuna sweeps through ``run.py -m``: results, failures, kill and resume, shared studies."""

import json
import os
import signal
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper.study import FAIL_REASON, counted_trials, open_storage
from kd.report import report
from tests.conftest import FAST, postgres_url, read_metrics, run_py, start_py

pytestmark = pytest.mark.slow
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep_args(study: str, n_trials: int, *extra: str, storage: str | None = None) -> list[str]:
    args = [
        "-m",
        "hparams_search=kd",
        *FAST,
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.n_trials={n_trials}",
        *extra,
    ]
    if storage:
        args.append(f"hydra.sweeper.storage={storage}")
    return args


def load(study: str, storage: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=open_storage(storage))


def test_optuna_sweep_leaves_a_sqlite_study_and_the_best_parameters(workdir):
    proc = run_py(sweep_args("s3", 3), cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep_dir = workdir / "multirun" / "s3"
    study = load("s3", f"sqlite:///{sweep_dir}/optuna.db")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(1.0 <= t.params["loss.temperature"] <= 20.0 and 0.0 <= t.params["loss.alpha"] <= 1.0 for t in trials)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == study.best_value and results["best_params"] == study.best_params
    for t in trials:  # the objective is each job's validation accuracy, in the job's folder
        metrics = read_metrics(sweep_dir / str(t.number))
        assert metrics["val_acc"] == pytest.approx(t.value)
        assert metrics["temperature"] == pytest.approx(t.params["loss.temperature"])


def test_a_diverging_trial_fails_alone_and_the_sweep_goes_on(workdir):
    # optim.lr is swept too: trials drawing 1e30 diverge, the others must still finish.
    proc = run_py(
        sweep_args(
            "nan", 3, "optim.lr=choice(0.001,1e30)", "trainer.check_every=1", "hydra.sweeper.max_failure_rate=0.67"
        ),
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep_dir = workdir / "multirun" / "nan"
    trials = load("nan", f"sqlite:///{sweep_dir}/optuna.db").get_trials()
    assert len(trials) == 3
    states = {t.number: t.state for t in trials}
    diverging = {t.number for t in trials if t.params["optim.lr"] == 1e30}
    assert 0 < len(diverging) < 3, "the seeded sampler should draw both learning rates"
    assert {n for n, s in states.items() if s == TrialState.FAIL} == diverging
    for n in diverging:
        assert read_metrics(sweep_dir / str(n))["status"] == "diverged"


def test_too_many_failures_stop_the_sweep_with_a_message(workdir):
    proc = run_py(
        sweep_args("allnan", 4, "optim.lr=1e30", "trainer.check_every=1", "hydra.sweeper.max_failure_rate=0.25"),
        cwd=workdir,
    )
    assert proc.returncode != 0
    assert "2 of 4 trials failed, more than max_failure_rate=0.25 allows" in proc.stderr + proc.stdout
    trials = load("allnan", f"sqlite:///{workdir}/multirun/allnan/optuna.db").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2


def _killable(study: str, storage: str) -> bool:
    """At least two trials complete and one running with its parameters drawn (a trial
    killed between being asked and its parameters being set is retried with new ones)."""
    try:
        trials = load(study, storage).get_trials()
    except Exception:  # study not created yet, or the database is busy
        return False
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    return done >= 2 and any(t.state == TrialState.RUNNING and t.params for t in trials)


def test_killed_sweep_resumes_to_exactly_n_trials(workdir):
    # Beats every second, stale after 3 s: the rerun finds the killed trial stale soon.
    beat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    args = sweep_args("resume", 5, "trainer.epochs=3", *beat)
    storage = f"sqlite:///{workdir}/multirun/resume/optuna.db"
    proc = start_py(args, workdir)
    deadline = time.time() + 240
    # Kill while a trial runs, after at least two finished (under load, polling by time
    # alone once caught the sweep between two trials).
    while not _killable("resume", storage) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    trials = load("resume", storage).get_trials()
    before = {t.number: t for t in trials if t.state == TrialState.COMPLETE}
    killed = [t for t in trials if t.state == TrialState.RUNNING]
    assert 2 <= len(before) < 5 and len(killed) == 1
    stamps = {n: (workdir / "multirun/resume" / str(n) / "metrics.json").stat().st_mtime_ns for n in before}

    again = run_py(args, cwd=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    study = load("resume", storage)
    counted = counted_trials(study)
    states = [(t.number, t.state.name, t.user_attrs.get(FAIL_REASON)) for t in study.trials]
    assert len(counted) == 5 and all(t.state == TrialState.COMPLETE for t in counted), states
    for t in study.get_trials():
        assert t.state != TrialState.RUNNING
    # The killed trial went stale (its worker stopped beating): FAIL with no job outcome,
    # not counted, and run again once with the same parameters.
    stale = study.trials[killed[0].number]
    assert stale.state == TrialState.FAIL and FAIL_REASON not in stale.user_attrs
    retried = [t for t in counted if t.system_attrs.get("failed_trial") == stale.number]
    assert len(retried) == 1 and retried[0].params == killed[0].params
    for n, trial in before.items():  # finished work is kept, not redone or overwritten
        assert study.trials[n].value == trial.value
        assert (workdir / "multirun/resume" / str(n) / "metrics.json").stat().st_mtime_ns == stamps[n]
    drawn = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(drawn)) == len(drawn), "a resumed sweep must not redraw earlier parameters"
    assert {int(p.name) for p in (workdir / "multirun/resume").iterdir() if p.name.isdigit()} >= {
        t.number for t in counted
    }


def _shared_study(workdir: Path, storage: str) -> None:
    study = f"shared_{uuid.uuid4().hex[:8]}"
    # Train the teacher first so both workers spend their time on trials.
    assert run_py([*FAST, "loss=kd", "hydra.run.dir=warm"], cwd=workdir).returncode == 0
    args = sweep_args(study, 6, "trainer.epochs=2", storage=storage)
    workers = [start_py([*args, f"hydra.sweep.dir=multirun/w{i}"], workdir) for i in range(2)]
    ended = [w.finish(timeout=400) for w in workers]
    assert [e.returncode for e in ended] == [0, 0], ended[0].stderr[-1500:] + ended[1].stderr[-1500:]
    loaded = load(study, storage)
    counted = counted_trials(loaded)
    assert len(counted) == 6 and all(t.state == TrialState.COMPLETE for t in counted)
    assert len({t.number for t in counted}) == 6
    drawn = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(drawn)) == 6, "workers must not propose the same parameters"
    ran = [len(list(workdir.glob(f"multirun/w{i}/*/metrics.json"))) for i in range(2)]
    assert all(ran), f"both workers should have run trials, got {ran}"
    done = sorted(json.loads(p.read_text())["temperature"] for p in workdir.glob("multirun/w*/*/metrics.json"))
    assert done == sorted(t.params["loss.temperature"] for t in counted)
    # kd.report tables the whole study from either worker's sweep directory, found through
    # the storage the sweep recorded; a database password is not recorded and must be given.
    sweep = workdir / "multirun/w0"
    if storage.startswith("postgresql"):
        blind = report([sweep], workdir / "blind")
        assert not blind["sweeps"] and any("pass --storage" in note for note in blind["notes"])
        assert blind["runs"] == len(list(sweep.glob("*/metrics.json")))  # its trials, reported as runs
    summary = report([sweep], workdir / "report", storage=storage if storage.startswith("postgresql") else None)
    assert [sweep_["study_name"] for sweep_ in summary["sweeps"]] == [study]
    assert len(summary["sweeps"][0]["rows"]) == 6


def test_two_workers_share_one_sqlite_study(workdir):
    _shared_study(workdir, f"sqlite:///{workdir}/shared.db")


def test_two_workers_share_one_journal_file(workdir):
    # Optuna's journal file: workers on machines that share a file system, no server.
    _shared_study(workdir, f"journal:///{workdir}/shared_fs/study.log")


def test_two_workers_share_one_postgresql_study(workdir):
    _shared_study(workdir, postgres_url())


def test_paths_devices_and_threads_are_no_part_of_a_studys_identity(workdir):
    """docs/sweeps.md: settings that do not change results may change between invocations,
    from the command line as from the config; a result-deciding one still may not."""
    first = ["paths.cache_dir=" + str(workdir / "c1"), "trainer.num_threads=1", "trainer.device=cpu"]
    assert run_py(sweep_args("where", 1, *first), cwd=workdir).returncode == 0
    moved = [
        "paths.cache_dir=" + str(workdir / "c2"),
        "paths.store_dir=" + str(workdir / "s2"),
        "trainer.num_threads=2",
        "trainer.device=auto",
        "trainer.progress=true",
    ]
    again = run_py(sweep_args("where", 2, *moved), cwd=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(counted_trials(load("where", f"sqlite:///{workdir}/multirun/where/optuna.db"))) == 2
    other = run_py(sweep_args("where", 3, *moved, "trainer.epochs=2"), cwd=workdir)
    assert other.returncode == 2 and "fixed trainer.epochs: 1 -> 2" in other.stderr.strip().splitlines()[-1]


def test_a_search_space_past_the_methods_range_is_refused_before_any_trial(workdir):
    proc = run_py(sweep_args("past", 2, "loss.alpha=interval(0.0, 1.5)"), cwd=workdir)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "loss.alpha: the search space reaches 1.5" in last and "[0, 1]" in last, last
    assert not list(workdir.rglob("metrics.json"))  # no trial ran


def test_the_space_check_reads_interval_ends_and_choices_against_the_loss_class(compose_cfg):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from kd.errors import ConfigError
    from kd.tuning import check_space_ranges

    kd, dkd = compose_cfg("loss=kd"), compose_cfg("loss=dkd")
    check_space_ranges(kd, {"loss.alpha": FloatDistribution(0.0, 1.0), "loss.temperature": FloatDistribution(1, 20)})
    check_space_ranges(dkd, {"loss.alpha": FloatDistribution(0.0, 4.0)})  # DKD's alpha weights a KL term
    check_space_ranges(kd, {"optim.lr": FloatDistribution(-1.0, 1.0)})  # not a loss key: run.py checks it
    for space in ({"loss.alpha": FloatDistribution(-0.5, 1.0)}, {"loss.temperature": CategoricalDistribution([2, 0])}):
        with pytest.raises(ConfigError, match="narrow it"):
            check_space_ranges(kd, space)
