"""Run tracking: each run's config, per-epoch losses and accuracies, and final metrics
written to the tracker a user already has (``logger=tensorboard``, ``mlflow`` or ``wandb``).

Trackers are built from ``conf/logger/*.yaml`` and see only plain values; a sweep's
trial number and study name arrive as tags, so a sweep shows up as one experiment.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from kd.errors import ConfigError


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class NullLogger:
    """No tracking (``logger: null``)."""

    def start(self, config: dict, tags: dict[str, str]) -> None:
        pass

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        pass

    def finish(self, metrics: dict) -> None:
        pass


def _optional(module: str, extra: str) -> Any:
    """Import an optional dependency, or refuse the logger in one line naming the extra
    (imported here, not at the top: kd runs without the trackers installed)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"logger={extra} needs {err.name or module}: pip install 'kd[{extra}]'") from None


class TensorBoardLogger(NullLogger):
    """Event files in ``<run dir>/tensorboard``: ``tensorboard --logdir`` a sweep's
    directory shows every trial as one run."""

    def __init__(self, output_dir: str | Path, subdir: str = "tensorboard") -> None:
        SummaryWriter = _optional("torch.utils.tensorboard", "tensorboard").SummaryWriter  # noqa: N806

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / subdir))

    def start(self, config: dict, tags: dict[str, str]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        for key, value in tags.items():
            self.writer.add_text(f"tags/{key}", str(value), 0)

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        for key, value in _scalars(values).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, metrics: dict) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(f"final/{key}", value, 0)
        self.writer.close()


class MLflowLogger(NullLogger):
    """One MLflow run per job in the experiment named after the sweep's study."""

    def __init__(
        self, output_dir: str | Path, tracking_uri: str | None = None, experiment_name: str | None = None
    ) -> None:
        mlflow = _optional("mlflow", "mlflow")
        self.mlflow = mlflow
        # MLflow 3 refuses its old file store by default; a local SQLite file is its successor.
        self.tracking_uri = tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        mlflow.set_tracking_uri(self.tracking_uri)
        self.experiment_name = experiment_name
        self.output_dir = Path(output_dir)

    def start(self, config: dict, tags: dict[str, str]) -> None:
        try:  # the first call that opens the tracking store: before any training
            self.mlflow.set_experiment(self.experiment_name or tags.get("study_name") or "kd")
        except Exception as err:  # an unknown scheme, an unreachable server, an unusable file
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"logger.tracking_uri={self.tracking_uri} cannot be used ({why[:200]}); give a folder, "
                "sqlite:///path/mlflow.db or http(s)://server"
            ) from None
        name = f"trial {tags['trial_number']}" if tags.get("trial_number") is not None else self.output_dir.name
        self.mlflow.start_run(run_name=name, tags={k: str(v) for k, v in tags.items()})
        flat = {k: v for k, v in config.items() if not isinstance(v, (dict, list))}
        self.mlflow.log_params({k: str(v)[:500] for k, v in list(flat.items())[:100]})
        self.mlflow.log_dict(config, "config.json")

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(_scalars(values), step=step)

    def finish(self, metrics: dict) -> None:
        self.mlflow.log_metrics({f"final_{k}": v for k, v in _scalars(metrics).items()})
        status = {"completed": "FINISHED", "pruned": "KILLED"}.get(metrics.get("status", ""), "FAILED")
        self.mlflow.end_run(status=status)


class WandbLogger(NullLogger):
    """One Weights & Biases run per job. A sweep's runs are grouped by study and named
    after their trials, and each trial records its run (user attribute ``wandb_run``),
    so trials and runs link both ways. ``mode=offline`` (or ``WANDB_MODE=offline``)
    writes under ``<directory>/wandb`` for a later ``wandb sync``."""

    def __init__(
        self,
        output_dir: str | Path,
        project: str = "kd",
        entity: str | None = None,
        mode: str | None = None,
        directory: str | None = None,
    ) -> None:
        self.wandb = _optional("wandb", "wandb")
        self.output_dir = Path(output_dir)
        self.options = {"project": project, "entity": entity, "mode": mode}
        self.directory = Path(directory) if directory else self.output_dir
        self.run: Any = None

    def start(self, config: dict, tags: dict[str, str]) -> None:
        trial = tags.get("trial_number")
        name = f"trial {trial}" if trial is not None else self.output_dir.name
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.run = self.wandb.init(
                **{k: v for k, v in self.options.items() if v is not None},
                dir=str(self.directory),
                name=name,
                group=tags.get("study_name"),
                config=config,
                notes=f"run dir: {tags.get('run_dir', self.output_dir)}",
                tags=[f"{k}={v}"[:64] for k, v in tags.items() if k != "run_dir"],  # W&B takes 64 characters
                reinit="create_new",
            )
        except Exception as err:  # an unwritable folder, a bad mode, no login for online mode
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            why = "; ".join(line for line in lines if not line.startswith("For further"))[:300] or type(err).__name__
            raise ConfigError(
                f"logger=wandb cannot start ({why}); set logger.directory to a writable folder, "
                "or logger.mode=offline to log without an account"
            ) from None
        _link_trial({"id": self.run.id, "project": self.run.project, "name": name, "dir": str(self.run.dir)})

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        self.run.log(_scalars(values), step=step)

    def finish(self, metrics: dict) -> None:
        self.run.summary.update({f"final_{k}": v for k, v in _scalars(metrics).items()})
        self.run.summary["status"] = metrics.get("status", "")
        self.run.finish(exit_code=0 if metrics.get("status") == "completed" else 1)


def _link_trial(run: dict[str, str]) -> None:
    """Record the tracker's run on this job's sweep trial (nothing outside a sweep)."""
    from hydra_plugins.kd_sweeper import job  # the job API: kd's one way into a sweep

    trial = job.current()
    if trial is not None:
        trial.set_user_attr("wandb_run", run)
