"""Crash-safe files: atomic writes, checksummed tensors, and build-once locks.

Every artefact is written to a temporary file in the same directory and renamed
into place, so a reader sees either the old file or the whole new one. Tensor files
get a ``.sha256`` sidecar written after them; a file without a matching sidecar is
treated as unfinished and never loaded as if whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock

T = TypeVar("T")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checked(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` atomically, then record its checksum; returns the checksum."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    digest = sha256_bytes(data)
    atomic_write_bytes(path, data)
    atomic_write_bytes(_sidecar(path), f"{digest} {len(data)}\n".encode())
    return digest


def file_digest(path: str | os.PathLike) -> str:
    return sha256_bytes(Path(path).read_bytes())


def load_checked(path: str | os.PathLike) -> Any | None:
    """Load a file written by :func:`save_checked`; ``None`` if absent or incomplete."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not path.exists() or not sidecar.exists():
        return None
    data = path.read_bytes()
    expected = sidecar.read_text().split()
    if len(expected) != 2 or expected[0] != sha256_bytes(data) or int(expected[1]) != len(data):
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an inter-process file lock at ``path`` (created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def build_once(path: str | os.PathLike, build: Callable[[], Any]) -> tuple[Any, bool]:
    """Return the object stored at ``path``, building and storing it if absent.

    Concurrent callers (threads or processes) serialise on a lock next to the file,
    so the object is built exactly once; the others wait and load it. Returns the
    object and whether this call built it.
    """
    path = Path(path)
    cached = load_checked(path)
    if cached is not None:
        return cached, False
    with locked(path.with_name(path.name + ".lock")):
        cached = load_checked(path)  # another process may have finished meanwhile
        if cached is not None:
            return cached, False
        obj = build()
        save_checked(obj, path)
        return obj, True
