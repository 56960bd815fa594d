"""Errors that end a run with a one-line message instead of a traceback.

Each survives pickling (``__reduce__``): a launcher running jobs in other processes
(joblib, SLURM) sends a job's exception back to the sweeper that way.

Exit codes of ``run.py`` (also in docs/errors.md): 0 done; 1 any other expected stop;
2 bad input (a config value, a command line Hydra refuses, a dataset or checkpoint);
3 training diverged; 4 storage (a destination that cannot be written, a store of
another identity version); 130 interrupted. A traceback means a bug; ``KD_DEBUG=1``
shows one for the expected stops too.
"""

import optuna


class KDError(Exception):
    """Base class: ``str(error)`` is the one line shown to the user."""

    exit_code = 1


class ConfigError(KDError):
    """A config value is out of range or a referenced file cannot be used."""

    exit_code = 2


class DataError(ConfigError):
    """A dataset is missing or malformed."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, truncated or does not fit the configured model."""


class StorageError(KDError):
    """A destination cannot be written, or a store cannot be used."""

    exit_code = 4


class Diverged(KDError):
    """The training loss became NaN or infinite."""

    exit_code = 3

    def __init__(self, epoch: int, step: int, value: float, phase: str = "train") -> None:
        self.epoch, self.step, self.value, self.phase = epoch, step, value, phase
        super().__init__(
            f"training diverged: {phase} loss={value} at epoch {epoch}, step {step}; lower optim.lr or loss.temperature"
        )

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.epoch, self.step, self.value, self.phase))


class JobStopped(KDError):
    """A job of a multirun run in another process (joblib, SLURM) stopped with an expected
    error: its one line, prefixed with the job number, and its exit code, sent back to
    the process that ends the sweep."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def of(cls, job_num: int, err: KDError) -> "JobStopped":
        return cls(f"job {job_num}: {err}", err.exit_code)

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (str(self), self.exit_code))


class Pruned(KDError, optuna.TrialPruned):
    """The sweep's pruner stopped this trial early (not a failure)."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value
        super().__init__(f"pruned after step {step} (validation accuracy {value:.2f}%)")

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.step, self.value))


class ReportError(Exception):
    """A one-line problem with the directories given to the report."""
