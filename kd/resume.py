"""Exact resume of a killed training run.

While a model trains, :func:`kd.engine.fit` hands its whole state to a
:class:`ResumeFile` every ``trainer.checkpoint_every_s`` seconds and at each epoch's
end: weights, optimiser, schedule, the loss's own parameters, every random state
(python, numpy, torch, CUDA, the augmentation's generator), the epoch, the step within
it and the epoch's running sums. The file is written atomically with a checksum
(:func:`kd.storage.save_checked`), alternating between two slots so that a kill
mid-save still leaves the previous state. A rerun of the same training (same settings and
seed, in any run directory) loads it and continues from that step, and ends with the
same weights as a run that was never stopped (on the CPU, where kernels are
deterministic).

The file is addressed by what the training computes (the caller's key), in
``<store_dir>/resume/``, so a sweep trial that is run again under a new trial number,
or a job requeued on another machine sharing the store, picks it up too.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.storage import load_checked, move_aside, remove_checked, save_checked

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Every global random state a training step may draw from, in loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class ResumeFile:
    """Where one training run keeps its resumable state, and how often it writes it.

    Saves alternate between two slots, ``<key>.pt`` and ``<key>.b.pt``, and a load takes
    the newest whole one: a kill while one slot is being written (between the file and
    its checksum) leaves the other, one save older, to resume from."""

    path: Path
    every_s: float = 60.0
    enabled: bool = True  # trainer.resume=never: start over and keep nothing
    sequence: int = 0  # saves so far, over every process that continued this training

    @property
    def slots(self) -> tuple[Path, Path]:
        return self.path, self.path.with_name(f"{self.path.stem}.b{self.path.suffix}")

    def load(self) -> dict | None:
        """The newest whole saved state, or None (none saved, resuming off, or every slot
        damaged: then one warning line says so and the run starts over)."""
        if not self.enabled:
            return None
        states, damaged = [], []
        for slot in self.slots:
            if slot.exists():
                try:
                    states.append(_read(slot))
                except ValueError as err:
                    damaged.append(f"{slot} is damaged ({err})")
        if not states:
            if damaged:  # kept for inspection, out of the way of the new run
                asides = [move_aside(slot, "", say=False) for slot in self.slots if slot.exists()]
                kept = [aside.name for aside in asides if aside is not None]
                log.warning("resume checkpoint %s (kept as %s): starting over", "; ".join(damaged), ", ".join(kept))
            return None
        newest = max(states, key=lambda state: state.get("sequence", 0))
        self.sequence = int(newest.get("sequence", 0))
        return newest

    def save(self, state: dict) -> None:
        if not self.enabled:
            return
        self.sequence += 1
        try:
            save_checked({"format": 1, "sequence": self.sequence, **state}, self.slots[(self.sequence - 1) % 2])
        except OSError as err:  # an unwritable store costs the resume, never the run
            log.warning("cannot write resume checkpoint %s (%s): this run cannot resume if killed", self.path, err)
            self.enabled = False

    def remove(self) -> None:
        for slot in self.slots:
            remove_checked(slot)


def _read(slot: Path) -> dict:
    """One slot's state; ValueError says why it cannot be used."""
    try:
        state = load_checked(slot)
    except Exception as err:
        raise ValueError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    if state is None:
        raise ValueError("its checksum does not match")
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ValueError("it is not a kd resume file")
    return state
