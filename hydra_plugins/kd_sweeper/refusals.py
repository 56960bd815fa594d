"""Why a sweep cannot start or go on, as one line: a refused configuration, a storage
that cannot be used as it is (left untouched), or a Ctrl-C that must not be lost."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from sqlalchemy.exc import DatabaseError, IntegrityError

from hydra_plugins.kd_sweeper.study import shown


class SweepRefused(Exception):
    """The sweep cannot start (or go on) as configured; ``str`` is the one line shown."""

    code = 2


class StorageRefused(SweepRefused):
    """The study's storage cannot be used as it is (left untouched)."""

    code = 4


def unreadable_storage(url: Any, err: Exception) -> StorageRefused:
    """A storage whose database refused to open or answer, as one line: where, why, and
    how to go on."""
    cause = str(getattr(err, "orig", None) or err).strip().splitlines()
    return StorageRefused(
        f"storage {shown(url)} cannot be used ({cause[0] if cause else type(err).__name__}); nothing was changed: "
        "check the URL and that its server is up, or if the file is damaged move it aside to start a new study "
        "(sqlite3's .recover may save its trials)"
    )


def refuse(message: str, code: int = 2) -> None:
    print(f"kd_optuna: error: {message}", file=sys.stderr)
    sys.exit(code)


# What a database says when retrying cannot help: a file that is no database, a damaged
# one, a server that is not there or refuses us. Anything else (workers racing to create
# one schema: "already exists", "locked", integrity errors) is retried first.
DAMAGE = (
    "not a database",
    "malformed",
    "unable to open",
    "connection refused",
    "could not connect",
    "connection failed",
    "could not translate host",
    "authentication failed",
    "does not exist",
)


def damaged_database(err: Exception) -> bool:
    """A database error that retrying cannot mend."""
    text = str(err).lower()
    return isinstance(err, DatabaseError) and not isinstance(err, IntegrityError) and any(m in text for m in DAMAGE)


class Interrupts:
    """Remembers a Ctrl-C that Python may drop. A SIGINT that lands while a finalizer
    runs raises its KeyboardInterrupt inside that finalizer, where Python prints it and
    goes on; the sweep would then run to its end. While installed (main thread only,
    chaining the handler there), :meth:`check` raises it again before the next trial."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def __enter__(self) -> Interrupts:
        previous = signal.getsignal(signal.SIGINT)
        if callable(previous) and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.seen = True
        self._previous(signum, frame)

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C came, whether or not its first one was dropped."""
        if self.seen:
            raise KeyboardInterrupt


def interrupted(error: BaseException | None) -> bool:
    """Whether a launcher's error is a Ctrl-C that reached its workers first. The SIGINT
    of the whole process group can land in a joblib worker while it unpickles its task;
    the pool then breaks ("a task has failed to un-serialize"), and only the worker's
    traceback, chained to the error, says KeyboardInterrupt."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt) or "KeyboardInterrupt" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
