"""Journal files and SQLite files at a storage path: mend only what is provably a study's,
refuse anything else in one line, and never destroy a byte.

A worker killed mid-append leaves a torn last record, which the next append would glue
to a new record and make unreadable; :func:`heal_journal` cuts it off. It does so only
when every record before the tear is an Optuna journal record and the first creates a
study: a file that is not a journal (a mistyped path to someone's data, random bytes,
text) is refused untouched, and so is a journal damaged in its middle, where cutting
would drop good records after the damage. What is cut off is kept beside the journal
(``<name>.torn-<time>-<pid>``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from optuna.storages.journal import JournalFileSymlinkLock

log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"
CREATE_STUDY = 0  # optuna.storages.journal._storage.JournalOperation
OPERATIONS = range(11)  # CREATE_STUDY .. DISCARD_TRIALS


class DamagedStorage(Exception):
    """A storage that cannot be used as it is; ``str`` is the one line shown (exit 4)."""


def is_record(line: bytes) -> bool:
    """Whether ``line`` is one Optuna journal record: a JSON object with a known
    ``op_code`` and a ``worker_id``."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(record, dict):
        return False
    op_code = record.get("op_code")
    return (
        isinstance(op_code, int)
        and not isinstance(op_code, bool)
        and op_code in OPERATIONS
        and isinstance(record.get("worker_id"), str)
    )


def whole_records(data: bytes) -> tuple[int, int | None]:
    """How ``data`` (a journal file's bytes) splits: the length of its leading run of
    whole records, and the 1-based number of a damaged line that whole records follow
    (None when every line after the run is damaged or torn: a tail that may be cut).
    A first record that does not create a study makes the run empty."""
    keep, number, offset, bad = 0, 0, 0, None
    while offset < len(data):
        end = data.find(b"\n", offset)
        line_end = len(data) if end < 0 else end + 1
        number += 1
        line = data[offset:line_end]
        good = end >= 0 and is_record(line) and (number > 1 or json.loads(line)["op_code"] == CREATE_STUDY)
        if good and bad is not None:
            return keep, bad  # whole records after a damaged one: damage in the middle
        if good:
            keep = line_end
        elif bad is None:
            bad = number
        offset = line_end
    return keep, None


def check_journal(path: str | os.PathLike) -> tuple[int, int]:
    """Refuse a file at a journal path that is not a mendable journal (:class:`DamagedStorage`);
    returns (bytes to keep, file size). A missing or empty file is fine."""
    path = Path(path)
    if path.is_dir():
        raise DamagedStorage(f"journal storage {path} is a directory; name a file (journal:///path/study.log)")
    if not path.exists():
        return 0, 0
    data = path.read_bytes()
    if not data:
        return 0, 0
    keep, bad = whole_records(data)
    if keep == 0:
        raise DamagedStorage(
            f"{path} is not an Optuna journal (its first line is no study record); it was left untouched: "
            "check the journal:// path, or name a new file to start a new study"
        )
    if bad is not None:
        raise DamagedStorage(
            f"journal {path} is damaged at line {bad} (not an Optuna journal record, with records after it); "
            f"nothing was changed: move it aside to start a new study, or delete line {bad} to keep the others"
        )
    return keep, len(data)


def heal_journal(path: str | os.PathLike) -> int:
    """Cut a journal's torn tail back to its last whole record, under the journal's own
    lock, keeping the cut bytes beside it; returns the bytes removed. Anything that is
    not a mendable journal raises :class:`DamagedStorage` and is left as it was."""
    keep, size = check_journal(path)
    if keep == size:
        return 0
    lock = JournalFileSymlinkLock(str(path))
    while not lock.acquire():  # pragma: no cover - another worker holds it for a moment
        time.sleep(0.05)
    try:
        keep, size = check_journal(path)  # again, under the lock: a worker may have appended
        if keep == size:
            return 0
        with open(path, "rb+") as f:
            f.seek(keep)
            torn = f.read()
            aside = keep_aside(Path(path), torn)
            f.truncate(keep)
    finally:
        lock.release()
    log.warning(
        "%s: cut a torn last record (%d bytes, left by a killed worker) back to its last whole one; "
        "the cut bytes are in %s; the study resumes",
        path,
        len(torn),
        aside.name,
    )
    return len(torn)


def keep_aside(path: Path, data: bytes) -> Path:
    """Write ``data`` beside ``path`` as ``<name>.torn-<time>-<pid>[-n]`` (a new file,
    synced), before the caller removes it from ``path``."""
    stem = f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for n in range(1000):
        aside = path.with_name(stem if n == 0 else f"{stem}-{n}")
        try:
            with open(aside, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return aside
        except FileExistsError:
            continue
    raise DamagedStorage(f"cannot keep the torn tail of {path} aside: {stem}-* all exist; move them away and rerun")


def check_sqlite(path: str | os.PathLike) -> None:
    """Refuse a file at a SQLite storage path that is not a SQLite database (it is left
    untouched: SQLite would refuse it anyway, in a traceback). Missing or empty: fine."""
    path = Path(path)
    if path.is_dir():
        raise DamagedStorage(f"SQLite storage {path} is a directory; name a file (sqlite:///path/optuna.db)")
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise DamagedStorage(
            f"{path} is not a SQLite database; it was left untouched: check the sqlite:/// path, "
            "or name a new file to start a new study"
        )
