"""A student without dropout, for tests that compare a population with single runs
(dropout masks cannot match between the two)."""

from torch import nn

from kd.models import LightNN


class LightNoDropout(LightNN):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.classifier[2] = nn.Identity()
