"""The methods: each a pure function of tensors plus a thin class that declares it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.losses.base import DistillationLoss, LossInputs


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


def standardise(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each sample's logits (Sun et al., 2024, logit standardisation)."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao et al., 2022): target-class (TCKD) and non-target-class (NCKD)
    KL terms, each times T^2, averaged over the batch."""
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    t = teacher_logits.detach()
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    # Binary distributions (target, all others) for TCKD.
    b_s = torch.stack([(p_s * target).sum(1), (p_s * ~target).sum(1)], dim=1).clamp_min(1e-12)
    b_t = torch.stack([(p_t * target).sum(1), (p_t * ~target).sum(1)], dim=1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * temperature**2
    # Distributions over the non-target classes only, for NCKD: mask the target out.
    masked_s = F.log_softmax(student_logits / temperature - 1000.0 * target, dim=1)
    masked_t = F.log_softmax(t / temperature - 1000.0 * target, dim=1)
    nckd = F.kl_div(masked_s, masked_t, reduction="batchmean", log_target=True) * temperature**2
    return tckd, nckd


class CrossEntropy(DistillationLoss):
    """Plain cross-entropy on the labels."""

    name = "ce"

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(inputs.student_logits, inputs.labels)
        return {"loss": ce, "ce": ce}


class HintonKD(DistillationLoss):
    """Hinton et al. (2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    name = "kd"
    needs_teacher = True
    hparam_names = ("temperature", "alpha")

    def __init__(self, temperature: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def soft_target(self, inputs: LossInputs) -> torch.Tensor:
        return distillation_divergence(inputs.student_logits, inputs.teacher_logits, self.temperature)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(inputs.student_logits, inputs.labels)
        if self.alpha == 0.0:  # skip the KL term entirely: alpha=0 is exactly CE
            return {"loss": ce, "ce": ce}
        kl = self.soft_target(inputs)
        return {"loss": self.alpha * kl + (1.0 - self.alpha) * ce, "ce": ce, "kl": kl}


class StandardisedKD(HintonKD):
    """Hinton KD on z-score-standardised student and teacher logits (logit standardisation)."""

    name = "kd_std"

    def soft_target(self, inputs: LossInputs) -> torch.Tensor:
        return distillation_divergence(
            standardise(inputs.student_logits), standardise(inputs.teacher_logits), self.temperature
        )


class DKD(DistillationLoss):
    """Decoupled KD: CE + warm-up * (alpha * TCKD + beta * NCKD); the warm-up ramps
    linearly from 0 to 1 over ``warmup_epochs`` (by training progress, step by step)."""

    name = "dkd"
    needs_teacher = True
    hparam_names = ("alpha", "beta", "temperature", "warmup_epochs")

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: float = 1.0):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature, self.warmup_epochs = float(temperature), float(warmup_epochs)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(inputs.student_logits, inputs.labels)
        tckd, nckd = dkd_terms(inputs.student_logits, inputs.teacher_logits, inputs.labels, self.temperature)
        p = inputs.progress
        done = (p.epoch - 1) + p.step / p.steps_per_epoch  # epochs trained, fractional
        warmup = min(done / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0
        loss = ce + warmup * (self.alpha * tckd + self.beta * nckd)
        return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd}


class CosineHidden(DistillationLoss):
    """The tutorial's hidden-representation loss: 1 - cos(student, teacher) between the
    flattened conv features, the teacher's average-pooled to the student's width;
    weight * cosine + (1 - weight) * CE."""

    name = "cosine"
    needs_teacher = True
    student_features = ("conv",)
    teacher_features = ("conv",)
    hparam_names = ("weight",)

    def __init__(self, weight: float = 0.25) -> None:
        super().__init__()
        self.weight = float(weight)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student = torch.flatten(inputs.student_features["conv"], 1).float()
        teacher = torch.flatten(inputs.teacher_features["conv"], 1).float().detach()
        if teacher.shape[1] != student.shape[1]:
            teacher = F.adaptive_avg_pool1d(teacher.unsqueeze(1), student.shape[1]).squeeze(1)
        cosine = (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
        ce = F.cross_entropy(inputs.student_logits, inputs.labels)
        return {"loss": self.weight * cosine + (1.0 - self.weight) * ce, "ce": ce, "cosine": cosine}


class FeatureRegressor(DistillationLoss):
    """The tutorial's feature-map regressor: a 3x3 conv maps the student's conv feature
    map to the teacher's channels; weight * MSE + (1 - weight) * CE. The conv is trained
    with the student but is not part of it."""

    name = "regressor"
    needs_teacher = True
    student_features = ("conv",)
    teacher_features = ("conv",)
    hparam_names = ("weight",)

    def __init__(self, weight: float = 0.25, student_channels: int = 16, teacher_channels: int = 32) -> None:
        super().__init__()
        self.weight = float(weight)
        self.regressor = nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        mapped = self.regressor(inputs.student_features["conv"])
        mse = F.mse_loss(mapped.float(), inputs.teacher_features["conv"].float().detach())
        ce = F.cross_entropy(inputs.student_logits, inputs.labels)
        return {"loss": self.weight * mse + (1.0 - self.weight) * ce, "ce": ce, "mse": mse}
