"""Training losses: the protocol (:mod:`kd.losses.base`) and the methods.

A new method is one class (here, or in a module of your own listed in
``extra_targets``) plus one ``conf/loss/<name>.yaml`` naming it in ``_target_``.
"""

from kd.losses.base import DistillationLoss, LossInputs, Progress, for_members, method_named
from kd.losses.methods import (
    DKD,
    CosineHidden,
    CrossEntropy,
    FeatureRegressor,
    HintonKD,
    StandardisedKD,
    blend,
    cross_entropy,
    distillation_divergence,
    dkd_terms,
    kl_batchmean,
    per_member,
    standardise,
)

__all__ = [
    "DKD",
    "CosineHidden",
    "CrossEntropy",
    "DistillationLoss",
    "FeatureRegressor",
    "HintonKD",
    "method_named",
    "LossInputs",
    "Progress",
    "StandardisedKD",
    "blend",
    "cross_entropy",
    "distillation_divergence",
    "dkd_terms",
    "for_members",
    "kl_batchmean",
    "per_member",
    "standardise",
]
