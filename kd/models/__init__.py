"""The networks: the tutorial's pair (:mod:`kd.models.tutorial`), CIFAR ResNets
(:mod:`kd.models.resnet`), Wide ResNets from torchdistill (:mod:`kd.models.wrn`, imported
only when a config names it), any torchvision or timm model (:mod:`kd.models.zoo`), and
the seeded dropout every model trains with (:mod:`kd.models.dropout`). A new model is one class
plus one ``conf/model/*.yaml``."""

from kd.cost import count_parameters
from kd.models.dropout import SeededDropout, dropout_generator, seed_dropout
from kd.models.resnet import CifarResNet
from kd.models.tutorial import DeepNN, FeatureNet, LightNN
from kd.models.zoo import timm_model, torchvision_model

__all__ = [
    "CifarResNet",
    "DeepNN",
    "FeatureNet",
    "LightNN",
    "SeededDropout",
    "count_parameters",
    "dropout_generator",
    "seed_dropout",
    "timm_model",
    "torchvision_model",
]
