"""Training losses. Each is called as ``loss(student_logits, labels, teacher_logits)``.

Losses know nothing of where teacher logits come from (an online teacher or the
logit cache); ``needs_teacher`` tells the pipeline whether to provide them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def distillation_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    ``batchmean`` is the mathematically correct reduction; the default ``mean`` would
    also divide by the number of classes.
    """
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


class CrossEntropy(nn.Module):
    """Plain cross-entropy on the labels."""

    name = "ce"
    needs_teacher = False
    temperature = None
    alpha = None

    def forward(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return F.cross_entropy(student_logits, labels)


class HintonKD(nn.Module):
    """Hinton et al. (2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    name = "kd"
    needs_teacher = True

    def __init__(self, temperature: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if teacher_logits is None:
            raise ValueError("HintonKD needs teacher_logits")
        hard = F.cross_entropy(student_logits, labels)
        if self.alpha == 0.0:  # skip the KL term entirely: alpha=0 is exactly CE
            return hard
        soft = distillation_divergence(student_logits, teacher_logits, self.temperature)
        return self.alpha * soft + (1.0 - self.alpha) * hard
