"""The methods: each a pure function of tensors plus a thin class that declares it.

Every function takes logits shaped ``[..., B, C]`` (labels ``[..., B]``): one model's
batch, or N members' batches stacked in a leading dimension (a population, see
:mod:`kd.population`). Each returns one value per leading index, averaged over the
batch, and every hyperparameter may be a float or a tensor with one value per member."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import ConfigError
from kd.losses.base import NON_NEGATIVE, SOFT_TARGET_WARNINGS, TEMPERATURE, WEIGHT, DistillationLoss, LossInputs


def per_member(value: float | torch.Tensor, like: torch.Tensor, trailing: int = 0) -> float | torch.Tensor:
    """A hyperparameter ready to combine with ``like``: a float as it is, a per-member
    tensor ``[N]`` in ``like``'s dtype, shaped ``[N, 1, ...]`` with ``trailing`` ones.

    Do any arithmetic on the hyperparameter itself (``1 - alpha``, ``T ** 2``) before this
    cast: members hold float64 tensors and a single run Python floats, so both then round
    the same double to ``like``'s dtype and a member computes what its single run does."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).view(*value.shape, *([1] * trailing))
    return value


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the batch: logits ``[..., B, C]``, labels ``[..., B]``,
    one value per leading index (a scalar for one model, ``[N]`` for N members)."""
    per_example = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return per_example.view(labels.shape).mean(-1)


def kl_batchmean(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) summed over the last dimension, averaged over the batch
    (``batchmean``: the default ``mean`` would also divide by the number of classes)."""
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    return kl.sum(-1).mean(-1)


def blend(weight: float | torch.Tensor, distill: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """``weight * distill + (1 - weight) * ce``, exactly ``ce`` (value and gradient)
    where the weight is 0, so a weight-0 run is a CE run. ``weight``: a float or a
    per-member float64 tensor (see :func:`per_member`)."""
    mixed = per_member(weight, ce) * distill + per_member(1.0 - weight, ce) * ce
    return torch.where(torch.as_tensor(weight, device=ce.device) == 0, ce, mixed)


def distillation_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    t = per_member(temperature, student_logits, 2)
    student_log_probs = F.log_softmax(student_logits / t, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return kl_batchmean(student_log_probs, teacher_log_probs) * per_member(temperature**2, student_logits)


def standardise(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each sample's logits (Sun et al., 2024, logit standardisation)."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def _log_target_and_rest(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[log p(target), log (1 - p(target))]`` per row, each a logsumexp over its classes."""
    on_target = log_probs.masked_fill(~target, float("-inf")).logsumexp(dim=-1)
    off_target = log_probs.masked_fill(target, float("-inf")).logsumexp(dim=-1)
    return torch.stack([on_target, off_target], dim=-1)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student, teacher)`` along the last dimension. A row that is all zeros (a
    dead ReLU feature map) has no direction: its distance is 1 and it passes no gradient,
    where ``F.cosine_similarity``'s eps gives it a gradient of about 1/eps."""
    live = (student.norm(dim=-1) > 0) & (teacher.norm(dim=-1) > 0)
    ones = torch.ones_like(student)
    safe_s = torch.where(live[..., None], student, ones)
    safe_t = torch.where(live[..., None], teacher, ones)
    cosine = (safe_s * safe_t).sum(-1) / (safe_s.norm(dim=-1) * safe_t.norm(dim=-1))
    return 1.0 - torch.where(live, cosine, torch.zeros_like(cosine))


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD (Zhao et al., 2022): target-class (TCKD) and non-target-class (NCKD)
    KL terms, each times T^2, averaged over the batch.

    TCKD's binary distributions (target, all others) are formed in log space. Summing
    probabilities and then taking the log (the published code's way) underflows to
    log(0) once the logit gap passes about 87 T in float32, and the 1e-12 clamp this
    replaced stopped the gradient past a gap of about 27.6 T; logsumexp stays exact."""
    target = F.one_hot(labels, student_logits.shape[-1]).bool()
    t, scale = per_member(temperature, student_logits, 2), per_member(temperature**2, student_logits)
    s_scaled, t_scaled = student_logits / t, teacher_logits.detach() / t
    log_b_s = _log_target_and_rest(F.log_softmax(s_scaled, dim=-1), target)
    log_b_t = _log_target_and_rest(F.log_softmax(t_scaled, dim=-1), target)
    tckd = kl_batchmean(log_b_s, log_b_t) * scale
    # Distributions over the non-target classes only, for NCKD: mask the target out.
    masked_s = F.log_softmax(s_scaled - 1000.0 * target, dim=-1)
    masked_t = F.log_softmax(t_scaled - 1000.0 * target, dim=-1)
    return tckd, kl_batchmean(masked_s, masked_t) * scale


def _flat_features(features: torch.Tensor, lead: int) -> torch.Tensor:
    """A feature map ``[..., B, *shape]`` as ``[..., B, F]`` (``lead`` member dimensions)."""
    return features.flatten(lead + 1).float()


class CrossEntropy(DistillationLoss):
    """Plain cross-entropy on the labels."""

    name = "ce"

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        ce = cross_entropy(inputs.student_logits, inputs.labels)
        return {"loss": ce, "ce": ce}


class HintonKD(DistillationLoss):
    """Hinton et al. (2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    name = "kd"
    title = "KD"
    needs_teacher = True
    hparam_names = ("temperature", "alpha")
    ranges = {"temperature": TEMPERATURE, "alpha": WEIGHT}
    warnings = (
        *SOFT_TARGET_WARNINGS,
        ("alpha", lambda v: v == 0, "plain cross-entropy: the teacher is built or loaded but not used"),
    )
    symbols = {"temperature": "T", "alpha": "α"}

    def __init__(self, temperature: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def soft_target(self, inputs: LossInputs) -> torch.Tensor:
        return distillation_divergence(inputs.student_logits, inputs.teacher_logits, self.temperature)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        ce = cross_entropy(inputs.student_logits, inputs.labels)
        kl = self.soft_target(inputs)
        return {"loss": blend(self.alpha, kl, ce), "ce": ce, "kl": kl}


class StandardisedKD(HintonKD):
    """Hinton KD on z-score-standardised student and teacher logits (logit standardisation)."""

    name = "kd_std"
    title = "KD (standardised logits)"

    def soft_target(self, inputs: LossInputs) -> torch.Tensor:
        return distillation_divergence(
            standardise(inputs.student_logits), standardise(inputs.teacher_logits), self.temperature
        )


class DKD(DistillationLoss):
    """Decoupled KD: CE + warm-up * (alpha * TCKD + beta * NCKD); the warm-up ramps
    linearly from 0 to 1 over ``warmup_epochs`` (by training progress, step by step)."""

    name = "dkd"
    title = "DKD"
    needs_teacher = True
    hparam_names = ("alpha", "beta", "temperature", "warmup_epochs")
    # alpha weights a KL term (TCKD) here, not a mix with CE: any size.
    ranges = {"alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "temperature": TEMPERATURE, "warmup_epochs": NON_NEGATIVE}
    warnings = SOFT_TARGET_WARNINGS
    symbols = {"temperature": "T", "alpha": "α", "beta": "β", "warmup_epochs": "warm-up"}

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: float = 1.0):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature, self.warmup_epochs = float(temperature), float(warmup_epochs)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        ce = cross_entropy(inputs.student_logits, inputs.labels)
        tckd, nckd = dkd_terms(inputs.student_logits, inputs.teacher_logits, inputs.labels, self.temperature)
        p = inputs.progress
        done = (p.epoch - 1) + p.step / p.steps_per_epoch  # epochs trained, fractional
        warmup_epochs = torch.as_tensor(per_member(self.warmup_epochs, ce), dtype=ce.dtype, device=ce.device)
        warmup = torch.where(warmup_epochs > 0, (done / warmup_epochs).clamp(max=1.0), 1.0)
        loss = ce + warmup * (per_member(self.alpha, ce) * tckd + per_member(self.beta, ce) * nckd)
        return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd}


class FeatureLoss(DistillationLoss):
    """A loss on one named layer of the student and one of the teacher (``conv``: the
    built-in networks' last feature map; any submodule name of any model otherwise)."""

    needs_teacher = True

    def __init__(self, student_layer: str = "conv", teacher_layer: str = "conv") -> None:
        super().__init__()
        self.student_layer, self.teacher_layer = str(student_layer), str(teacher_layer)
        self.student_features, self.teacher_features = (self.student_layer,), (self.teacher_layer,)


class CosineHidden(FeatureLoss):
    """The tutorial's hidden-representation loss: 1 - cos(student, teacher) between the
    flattened features, the teacher's average-pooled to the student's width;
    weight * cosine + (1 - weight) * CE."""

    name = "cosine"
    hparam_names = ("weight",)
    ranges = {"weight": WEIGHT}
    warnings = (("weight", lambda v: v == 0, "plain cross-entropy: the teacher's features are not used"),)
    symbols = {"weight": "w"}

    def __init__(self, weight: float = 0.25, student_layer: str = "conv", teacher_layer: str = "conv") -> None:
        super().__init__(student_layer, teacher_layer)
        self.weight = float(weight)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        lead = inputs.student_logits.dim() - 2  # member dimensions
        student = _flat_features(inputs.student_features[self.student_layer], lead)
        teacher = _flat_features(inputs.teacher_features[self.teacher_layer], lead).detach()
        if teacher.shape[-1] != student.shape[-1]:
            pooled = F.adaptive_avg_pool1d(teacher.reshape(-1, 1, teacher.shape[-1]), student.shape[-1])
            teacher = pooled.view(*teacher.shape[:-1], student.shape[-1])
        cosine = cosine_distance(student, teacher).mean(-1)
        ce = cross_entropy(inputs.student_logits, inputs.labels)
        return {"loss": blend(self.weight, cosine, ce), "ce": ce, "cosine": cosine}


class FeatureRegressor(FeatureLoss):
    """The tutorial's feature-map regressor: a 3x3 conv maps the student's feature map to
    the teacher's channels; weight * MSE + (1 - weight) * CE. The conv is trained with
    the student but is not part of it. A teacher map of another size is average-pooled
    to the student's."""

    name = "regressor"
    hparam_names = ("weight",)
    ranges = {"weight": WEIGHT}
    warnings = (("weight", lambda v: v == 0, "plain cross-entropy: the teacher's features are not used"),)
    symbols = {"weight": "w"}

    def __init__(
        self,
        weight: float = 0.25,
        student_channels: int = 16,
        teacher_channels: int = 32,
        student_layer: str = "conv",
        teacher_layer: str = "conv",
    ) -> None:
        super().__init__(student_layer, teacher_layer)
        self.weight = float(weight)
        self.channels = (int(student_channels), int(teacher_channels))
        self.regressor = nn.Conv2d(student_channels, teacher_channels, kernel_size=3, padding=1)

    def terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student = inputs.student_features[self.student_layer]
        teacher = inputs.teacher_features[self.teacher_layer].float().detach()
        for role, layer, found, declared in (
            ("student", self.student_layer, student, self.channels[0]),
            ("teacher", self.teacher_layer, teacher, self.channels[1]),
        ):
            if found.dim() != 4 or found.shape[1] != declared:
                raise ConfigError(
                    f"loss.{role}_channels={declared} but the {role}'s layer {layer} gives {tuple(found.shape[1:])}: "
                    f"set loss.{role}_channels to its channel count (a 4-d feature map is needed)"
                )
        if teacher.shape[-2:] != student.shape[-2:]:
            teacher = F.adaptive_avg_pool2d(teacher, student.shape[-2:])
        mapped = self.regressor(student)
        mse = F.mse_loss(mapped.float(), teacher)
        ce = cross_entropy(inputs.student_logits, inputs.labels)
        return {"loss": blend(self.weight, mse, ce), "ce": ce, "mse": mse}
