"""kd: Hydra-configured knowledge distillation of a teacher CNN into a student CNN."""

__version__ = "0.1.0"
