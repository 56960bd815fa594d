"""Learning-rate schedules stepped once per optimiser step.

A schedule config is a partial: the pipeline calls it with the optimiser and the
run's total number of steps (epochs x batches per epoch), which only it knows.
torch's OneCycleLR takes exactly that; :func:`warmup_cosine` gives the same call to
a cosine decay.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.0, final_factor: float = 0.0
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay of the
    learning rate to ``final_factor`` times its configured value."""
    warmup = int(round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
