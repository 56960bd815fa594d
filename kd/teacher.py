"""The teacher store: trained teachers addressed by what made them, and their logits.

A teacher is a build artefact. Its address is a fingerprint of its recipe: what
changes the trained weights and nothing else (see :func:`kd.recipes.recipe_spec`),
so every KD run that needs the same teacher finds the same file, and a teacher is
trained at most once per store, even by parallel processes (see
:func:`kd.storage.build_once`). CE students trained as KD baselines are stored the
same way. Teacher logits over the training set are cached too (per augmented view
for KD with augmentation), keyed by the checkpoint's bytes and the dataset's
contents, so a changed teacher or dataset can never be served stale logits.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kd import identity
from kd.errors import CheckpointError
from kd.identity import check_store
from kd.storage import Fits, build_once, file_digest, load_fitting, locked, save_checked, sidecar_path, tensor_fits

log = logging.getLogger(__name__)


class TeacherStore:
    """Models, logits and view logits under ``root``, each at its :mod:`kd.identity` key."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._checked = False

    def _check(self) -> None:
        """Refuse a store of another identity version (once, before the first access)."""
        if not self._checked:
            check_store(self.root)
            self._checked = True

    def checkpoint_path(self, key: str) -> Path:
        return self.root / "models" / key / "model.pt"  # teachers and CE baselines

    def get_or_build(self, key: str, build: Callable[[], dict]) -> tuple[dict, bool]:
        """The checkpoint stored under ``key``, built (once) if absent; and whether built."""
        self._check()
        return build_once(self.checkpoint_path(key), build, checkpoint_fits)

    def publish(self, key: str, checkpoint: dict) -> bool:
        """Store a checkpoint trained elsewhere, unless one is already there."""
        self._check()
        path = self.checkpoint_path(key)
        with locked(path.with_name(path.name + ".lock")):
            if load_fitting(path, checkpoint_fits) is not None:
                return False
            save_checked(checkpoint, path)
            return True

    def logits(
        self, checkpoint_digest: str, data_key: str, compute: Callable[[], Any], fits: Fits | None = None
    ) -> tuple[Any, bool]:
        """Teacher logits (or features) for every training example, computed once per
        (teacher, data); a stored entry that does not ``fit`` is moved aside and rebuilt."""
        self._check()
        key = identity.key("logits", checkpoint=checkpoint_digest, data=data_key)
        return build_once(self.root / "logits" / f"{key}.pt", compute, fits)

    def view_logits(
        self,
        checkpoint_digest: str,
        data_key: str,
        view_seed: int,
        k: int,
        orders: Callable[[], torch.Tensor],
        compute: Callable[[torch.Tensor], torch.Tensor],
        shape: tuple[int, int],
        on_column: Callable[[int, bool], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits for the first ``k`` views of every training example.

        ``orders()`` gives each example's seeded order of views (``[N, views]``);
        ``compute(views)`` the teacher's logits ``[N, classes]`` (``shape``) for view
        ``views[i]`` of example ``i``. Each view column is one file, built once: an interrupted build
        resumes at the first missing column, and a smaller ``k`` reuses a larger one's.
        Returns logits ``[N, k, classes]`` (float16) and the view ids ``[N, k]``.
        """
        self._check()
        key = identity.key("views", checkpoint=checkpoint_digest, data=data_key, view_seed=view_seed)
        folder = self.root / "views" / key
        examples, classes = shape
        order, _ = build_once(folder / "orders.pt", orders, tensor_fits((examples, None), (torch.int16,)))
        if not 1 <= k <= order.shape[1]:
            raise ValueError(f"k={k} views requested; an image has {order.shape[1]}")
        column_fits = tensor_fits((examples, classes), (torch.float16,))
        columns = []
        for column in range(k):
            logits, built = build_once(
                folder / f"view{column:03d}.pt", lambda c=column: compute(order[:, c]), column_fits
            )
            columns.append(logits)
            if on_column is not None:
                on_column(column, built)
        return torch.stack(columns, dim=1), order[:, :k].to(torch.int64)


def load_checkpoint(path: str | os.PathLike, key: str = "teacher.checkpoint") -> dict:
    """Load a model checkpoint given by the user (``key`` names the setting in errors);
    one-line errors for every failure. kd's own checkpoints, a plain state_dict, or a
    dict holding one under ``state_dict`` or ``model`` (other tools' checkpoints).

    Only tensors and plain values are unpickled (``weights_only=True``): a checkpoint
    from an untrusted source cannot run code when it is loaded.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{key}={path} is a directory; give the model.pt file inside it")
    if not path.is_file():
        raise CheckpointError(f"{key}={path} does not exist; train a teacher or fix the path")
    _check_sidecar(path, key)
    try:
        checkpoint = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc) or "Unsupported global" in str(exc):  # an object torch will not rebuild
            raise CheckpointError(
                f"{key}={path} holds Python objects beyond tensors and plain values; refusing to "
                "unpickle it (weights_only). Save the model's state_dict instead"
            ) from None
        raise CheckpointError(
            f"{key}={path} cannot be read (UnpicklingError); it is truncated or not a checkpoint"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"{key}={path} cannot be read ({type(exc).__name__}); it is truncated or not a checkpoint"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{key}={path} holds a {type(checkpoint).__name__}, not a checkpoint")
    if isinstance(checkpoint.get("state_dict"), dict):
        pass
    elif isinstance(checkpoint.get("model"), dict):  # {"model": state_dict, "optimizer": ..., "epoch": ...}
        checkpoint = {"state_dict": checkpoint["model"]}
    else:  # a bare state_dict saved with torch.save(model.state_dict())
        checkpoint = {"state_dict": checkpoint}
    checkpoint["path"] = str(path)
    checkpoint["digest"] = file_digest(path)
    return checkpoint


def _check_sidecar(path: Path, key: str) -> None:
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return
    fields = sidecar.read_text(errors="replace").split()
    if len(fields) != 2 or not fields[1].isdigit() or len(fields[0]) != 64:
        raise CheckpointError(
            f"{sidecar} (the checksum beside {key}) is damaged; delete it to load {path.name} unchecked"
        )
    if fields[1] != str(path.stat().st_size) or fields[0] != file_digest(path):
        raise CheckpointError(f"{key}={path} is truncated or corrupt (checksum mismatch); retrain or restore it")


def restore_model(
    checkpoint: dict, model: torch.nn.Module, target: str, num_classes: int | None, key: str = "teacher.model"
) -> torch.nn.Module:
    """Load ``checkpoint`` into ``model``; explains a wrong architecture or class count,
    listing missing and unexpected keys. A ``module.`` prefix (DataParallel) is dropped."""
    where = checkpoint.get("path", "the teacher checkpoint")
    saved_target = checkpoint.get("model_target")
    if saved_target is not None and saved_target != target:
        raise CheckpointError(f"{where} holds a {saved_target}, but {key} is {target}")
    saved_classes = checkpoint.get("num_classes")
    if saved_classes is not None and num_classes is not None and saved_classes != num_classes:
        raise CheckpointError(f"{where} was trained for {saved_classes} classes, but the data has {num_classes}")
    state = checkpoint["state_dict"]
    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module.") :]: v for k, v in state.items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        differences = f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}"
        raise CheckpointError(f"{where} does not fit {key}={target}: {differences}")
    try:
        model.load_state_dict(state)
    except Exception as exc:  # the same keys with other shapes (another stem, another class count)
        lines = str(exc).splitlines()
        first = next((line.strip() for line in lines if "size mismatch" in line), lines[0] if lines else repr(exc))
        raise CheckpointError(f"{where} does not fit {key}={target}: {first}") from None
    return model


def _few(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:3]) + (f", ... {len(keys) - 3} more" if len(keys) > 3 else "") + "]"


def checkpoint_fits(entry: Any) -> str | None:
    """Why a stored entry is not a kd checkpoint (see :func:`make_checkpoint`), or None."""
    if not isinstance(entry, dict):
        return f"it holds a {type(entry).__name__}, not a checkpoint"
    state = entry.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "its state_dict is not a dict of tensors"
    if not isinstance(entry.get("model_target"), str) or not isinstance(entry.get("num_classes"), int):
        return "it names no model_target and num_classes"
    return None


def make_checkpoint(model: torch.nn.Module, target: str, num_classes: int, **info: Any) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"model_target": target, "num_classes": num_classes, "state_dict": state, **info}
