"""Errors that end a run with a one-line message instead of a traceback."""


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


class Diverged(KDError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, value: float, phase: str = "train") -> None:
        self.epoch, self.step, self.value, self.phase = epoch, step, value, phase
        super().__init__(
            f"training diverged: {phase} loss={value} at epoch {epoch}, step {step}; lower optim.lr or loss.temperature"
        )
