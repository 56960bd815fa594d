"""Training losses: the protocol (:mod:`kd.losses.base`) and the methods.

A new method is one class (here, or in a module of your own listed in
``extra_targets``) plus one ``conf/loss/<name>.yaml`` naming it in ``_target_``.
"""

from kd.losses.base import DistillationLoss, LossInputs, Progress
from kd.losses.methods import (
    DKD,
    CosineHidden,
    CrossEntropy,
    FeatureRegressor,
    HintonKD,
    StandardisedKD,
    distillation_divergence,
    dkd_terms,
    standardise,
)

__all__ = [
    "DKD",
    "CosineHidden",
    "CrossEntropy",
    "DistillationLoss",
    "FeatureRegressor",
    "HintonKD",
    "LossInputs",
    "Progress",
    "StandardisedKD",
    "distillation_divergence",
    "dkd_terms",
    "standardise",
]
