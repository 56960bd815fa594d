"""What makes two stored artefacts the same: every key kd files things under.

Each kind of artefact is named in :data:`KINDS` with the fields its key is computed
from; :func:`key` refuses any other set of fields, so a field cannot be added or
dropped without changing this module (and its pinned test,
``tests/test_identity.py``). The recipe of every kind is :data:`VERSION`; a store
records the version it was written under (:func:`check_store`) and a store of
another version is refused in one line instead of being silently filled anew under
new keys beside its old entries.

The digests that feed these keys (a dataset's contents, its validation split, a
model class's source) are computed here too.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object

from kd.errors import StorageError

VERSION = 1

# kind -> (required fields, optional fields, hex digits of the key)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    # A CE-trained model (a teacher, or a KD run's CE baseline): what changes its weights.
    "model": (
        ("model", "model_source", "data", "optim", "epochs", "batch_size", "seed", "augment", "amp"),
        ("schedule",),  # absent for a constant lr, so constant-lr addresses predate schedules
        20,
    ),
    # A run's own training (its resume file): every result-deciding setting, data, seed.
    "run": (("settings", "data", "seed"), (), 20),
    # A teacher's logits over the training set, and its logits per augmented view.
    "logits": (("checkpoint", "data"), (), 24),
    "views": (("checkpoint", "data", "view_seed"), (), 24),
    # A sweep's study: the settings it does not vary (appended to the study's name).
    "study": (("settings",), (), 8),
}


class StoreVersionError(StorageError):
    """A store written under another identity version."""


def key(kind: str, **fields: Any) -> str:
    """The key of artefact ``kind`` with these ``fields`` (exactly those declared)."""
    required, optional, digits = KINDS[kind]
    missing = set(required) - set(fields)
    unknown = set(fields) - set(required) - set(optional)
    if missing or unknown:
        raise ValueError(f"{kind} key: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
    return _digest(kind, fields)[:digits]


def _digest(kind: str, fields: dict[str, Any]) -> str:
    # The byte recipes predate this module; they are kept so existing stores stay valid.
    if kind in ("model", "run"):
        text = json.dumps(fields, sort_keys=True)
    elif kind == "study":
        text = json.dumps(fields["settings"], sort_keys=True, default=str)
    elif kind == "logits":
        text = f"{fields['checkpoint']}\0{fields['data']}"
    else:  # views
        text = f"{fields['checkpoint']}\0{fields['data']}\0views:{fields['view_seed']}"
    return hashlib.sha256(text.encode()).hexdigest()


def check_store(root: str | Path) -> None:
    """Refuse a store written under another :data:`VERSION`; mark a new one.

    A store without a mark holds entries of version 1 (keys made before the mark)."""
    mark = Path(root) / "identity.json"
    try:
        found = int(json.loads(mark.read_text())["version"])
    except OSError:  # no mark yet, or a store that cannot be read: its own errors come later
        found = None
    except (ValueError, KeyError, TypeError):
        fix = f'write {{"version": {VERSION}}} into it if the store is kd\'s'
        raise StoreVersionError(f"{mark} is damaged; {fix}") from None
    if found is None:
        with contextlib.suppress(OSError):  # a read-only store is read as it is
            mark.parent.mkdir(parents=True, exist_ok=True)
            tmp = mark.with_name(f".{mark.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": VERSION}) + "\n")
            tmp.replace(mark)
    elif found != VERSION:
        raise StoreVersionError(
            f"the store {root} holds entries keyed by kd identity version {found}, this kd computes version "
            f"{VERSION}; set paths.store_dir to a new folder (or use the kd that wrote it)"
        )


def content_digest(tensors: Iterable[torch.Tensor]) -> str:
    """A dataset's contents: every pixel and label, hashed (blake2b-128)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(memoryview(tensor.contiguous().cpu().numpy()).cast("B"))
    return digest.hexdigest()


def files_digest(lines: Iterable[str]) -> str:
    """Source files as read (one line per file: path, size, mtime...), hashed
    (blake2b-128): the key of a decoded-data cache and of a dataset's manifest."""
    digest = hashlib.blake2b(digest_size=16)
    for line in lines:
        digest.update(line.encode())
    return digest.hexdigest()


def held_out_digest(val_idx: torch.Tensor) -> str:
    """Which training images a model must not see: a hash of the validation indices."""
    return hashlib.sha256(val_idx.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def source_digest(target: str) -> str:
    """SHA-256 of the source of a model class and its own base classes (not torch's):
    editing the network's code gives its teachers a new address. For a factory function
    (``kd.models.torchvision_model``), its own source and the versions of torch and
    torchvision, whose classes it builds, and of every other package it builds from
    (:func:`builds_from`: timm, torchdistill)."""
    built = get_object(target)
    if not inspect.isclass(built):
        parts = [_source(built), f"torch {torch.__version__}", f"torchvision {_version('torchvision')}"]
        parts += [f"{package} {_version(package)}" for package in builds_from(built)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    parts = [_source(cls) for cls in built.__mro__ if cls.__module__.split(".")[0] not in ("torch", "builtins")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


ALWAYS_COUNTED = ("torch", "torchvision", "kd")  # in every factory's address already (kd: by its source)


def builds_from(factory: Callable) -> tuple[str, ...]:
    """The third-party packages a model factory builds from, read from its code: those it
    imports in its body and those of the module-level names it uses (a wrapper needs no
    flag to say so). Standard-library modules, torch, torchvision and kd are left out."""
    found = set()
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(factory)))
    except (OSError, TypeError, SyntaxError):
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    for value in inspect.getclosurevars(factory).globals.values():
        found.add(value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None) or "")
    packages = {name.split(".")[0] for name in found if name}
    return tuple(sorted(p for p in packages if p not in ALWAYS_COUNTED and p not in sys.stdlib_module_names))


def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # defined interactively: its name stands in
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def derived_seed(purpose: str, seed: int) -> int:
    """A seed for ``purpose`` derived from a run's ``seed``: independent streams (the
    dropout masks, a trial's sampler) that never coincide with the seed's own."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:8], "big") >> 1
