"""Crash-safe files: atomic writes, checksummed tensors, and build-once locks.

Every artefact is written to a temporary file in the same directory and renamed
into place, so a reader sees either the old file or the whole new one. Tensor files
get a ``.sha256`` sidecar written after them; a file without a matching sidecar is
treated as unfinished and never loaded as if whole. Hashing a large file on every load
is a fixed cost every job paid, so a file whose hash was checked once gets a
``.verified`` stamp (its digest, size, mtime and inode): while those are unchanged it
loads without being hashed again; any change sends it through the full check.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock

from kd.errors import StorageError

T = TypeVar("T")
log = logging.getLogger(__name__)
TRUST_STAMPS = True  # False: hash every file on every load (benchmarks/bench_job_overhead.py)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files are created by mkstemp (mode 0600); give them the mode any other tool's output
# gets, so a store shared between users or machines is readable by the others.
FILE_MODE = 0o666 & ~_current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_path(path: Path) -> Path:
    """The checksum file written beside ``path``."""
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_text(digest: str, st: os.stat_result) -> str:
    return f"{digest} {st.st_size} {st.st_mtime_ns} {st.st_ino}\n"


def save_checked(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` atomically, then record its checksum; returns the checksum."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    digest = sha256_bytes(data)
    atomic_write_bytes(path, data)
    atomic_write_bytes(sidecar_path(path), f"{digest} {len(data)}\n".encode())
    return digest


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in chunks (no second copy of a large file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checked(path: str | os.PathLike) -> Any | None:
    """Load a file written by :func:`save_checked`; ``None`` if absent or incomplete.

    The tensors are memory-mapped from the verified file rather than copied into
    memory, which keeps a decoded dataset's footprint to one copy.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    if not path.exists() or not sidecar.exists():
        return None
    expected = sidecar.read_text(errors="replace").split()
    st = path.stat()
    if len(expected) != 2 or expected[1] != str(st.st_size):
        return None  # unfinished or damaged: the caller rebuilds it
    stamp = _stamp(path)
    trusted = TRUST_STAMPS and stamp.exists() and stamp.read_text(errors="replace") == _stamp_text(expected[0], st)
    if not trusted:
        if expected[0] != file_digest(path):
            return None
        with contextlib.suppress(OSError):  # a read-only store: hashed again next time
            atomic_write_bytes(stamp, _stamp_text(expected[0], st).encode())
    # weights_only: a file in a shared store is never trusted to run code when loaded.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a checksum that matches unloadable bytes: never trusted, never blocking
        move_aside(path, f"it cannot be loaded ({type(err).__name__})")
        return None


def move_aside(path: str | os.PathLike, why: str, say: bool = True) -> Path | None:
    """Rename a damaged store file (and drop its sidecar and stamp) so that it is rebuilt;
    the bytes are kept beside it for inspection (``say``: a warning names where). Returns
    where they went."""
    path = Path(path)
    stem = f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside = next(a for n in range(10**6) if not (a := path.with_name(stem if n == 0 else f"{stem}-{n}")).exists())
    try:
        os.replace(path, aside)
    except OSError:
        return None  # gone already (another process moved it) or read-only: rebuilt beside it
    for extra in (sidecar_path(path), _stamp(path)):
        with contextlib.suppress(OSError):
            extra.unlink()
    if say:
        log.warning("%s is damaged (%s): moved aside to %s and rebuilt", path, why, aside.name)
    return aside


def remove_checked(path: str | os.PathLike) -> None:
    """Delete a file written by :func:`save_checked`, with its sidecar and stamp (each
    may be gone already, or the store unusable: nothing is raised)."""
    path = Path(path)
    for file in (path, sidecar_path(path), _stamp(path)):
        with contextlib.suppress(OSError):
            file.unlink()


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an inter-process file lock at ``path`` (created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


# Why a loaded store entry does not have the form its reader needs (None: it does).
Fits = Callable[[Any], "str | None"]


def tensor_fits(shape: tuple[Any, ...], dtypes: tuple[torch.dtype, ...] = ()) -> Fits:
    """An entry that is one tensor of ``shape`` (None: any size on that axis; a last
    ``...``: any further axes), of one of ``dtypes`` (empty: any)."""
    open_ended = bool(shape) and shape[-1] is Ellipsis
    axes = shape[:-1] if open_ended else shape
    wanted = "x".join("*" if n is None else str(n) for n in axes) + ("x..." if open_ended else "")

    def fits(entry: Any) -> str | None:
        if not isinstance(entry, torch.Tensor):
            return f"it holds a {type(entry).__name__}, not a tensor"
        rank_fits = entry.dim() >= len(axes) if open_ended else entry.dim() == len(axes)
        if not rank_fits or any(n is not None and n != m for n, m in zip(axes, entry.shape, strict=False)):
            return f"its shape is {'x'.join(map(str, entry.shape))}, not {wanted}"
        if dtypes and entry.dtype not in dtypes:
            return f"its dtype is {entry.dtype}, not {' or '.join(map(str, dtypes))}"
        return None

    return fits


def dict_fits(**fields: Fits) -> Fits:
    """An entry that is a dict with exactly these keys, each value fitting its own check."""

    def fits(entry: Any) -> str | None:
        if not isinstance(entry, dict):
            return f"it holds a {type(entry).__name__}, not a dict"
        if set(entry) != set(fields):
            return f"its keys are {sorted(map(str, entry))}, not {sorted(fields)}"
        for name, check in fields.items():
            if (why := check(entry[name])) is not None:
                return f"{name}: {why}"
        return None

    return fits


def load_fitting(path: str | os.PathLike, fits: Fits | None = None) -> Any | None:
    """:func:`load_checked`, and an entry that loads but does not fit (``fits`` says why)
    is moved aside like damaged bytes: None, so that the caller rebuilds it."""
    entry = load_checked(path)
    if entry is None or fits is None:
        return entry
    why = fits(entry)
    if why is None:
        return entry
    move_aside(path, why)
    return None


def build_once(path: str | os.PathLike, build: Callable[[], Any], fits: Fits | None = None) -> tuple[Any, bool]:
    """Return the object stored at ``path``, building and storing it if absent (or if
    what is stored does not ``fit``: then it is moved aside, not deleted).

    Concurrent callers (threads or processes) serialise on a lock next to the file,
    so the object is built exactly once; the others wait and load it. Returns the
    object and whether this call built it.
    """
    path = Path(path)
    cached = load_fitting(path, fits)
    if cached is not None:
        return cached, False
    with locked(path.with_name(path.name + ".lock")):
        cached = load_fitting(path, fits)  # another process may have finished meanwhile
        if cached is not None:
            return cached, False
        if path.exists():  # under the lock no writer is midway: these bytes are damaged, kept aside
            move_aside(path, "its checksum does not match")
        obj = build()
        save_checked(obj, path)
        return obj, True


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Create ``folder`` and write a probe file into it, so that a destination that cannot
    be written (under a file, read-only, full) stops a run before its first step, in
    one line, instead of after training."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".kd-probe-")
        with os.fdopen(fd, "wb") as f:
            f.write(b"kd")
        os.unlink(probe)
    except OSError as err:
        raise StorageError(
            f"{folder} cannot be written ({err.strerror or type(err).__name__}); "
            f"point {key} at a writable folder with free space"
        ) from None


def decoded_fits(files: int) -> Fits:
    """A decoded image folder as :meth:`FolderDataset._decode` stores it: uint8 RGB images,
    one int64 label each, and the skipped files (absent in older entries), that together
    account for ``files`` files."""
    images, labels = tensor_fits((None, 3, None, None), (torch.uint8,)), tensor_fits((None,), (torch.int64,))

    def fits(entry: Any) -> str | None:
        if not isinstance(entry, dict) or not {"images", "labels"} <= set(entry):
            return "it is not a dict of images and labels"
        why = images(entry["images"]) or labels(entry["labels"])
        if why is not None:
            return why
        skipped = entry.get("skipped") or []
        if not isinstance(skipped, list) or not len(entry["images"]) == len(entry["labels"]) == files - len(skipped):
            return f"its images, labels and skipped files do not add up to the {files} files listed"
        return None

    return fits
