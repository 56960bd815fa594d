"""Why a sweep cannot start or go on, as one line: a refused configuration, or a
storage that cannot be used as it is (left untouched)."""

from __future__ import annotations

import sys
from typing import Any

from sqlalchemy.exc import DatabaseError, IntegrityError

from hydra_plugins.kd_sweeper.study import (
    shown,
)


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
