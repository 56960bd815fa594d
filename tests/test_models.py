import pytest
import torch

from kd.models import DeepNN, LightNN, count_parameters


@pytest.mark.parametrize(("cls", "expected"), [(DeepNN, 1_186_986), (LightNN, 267_738)])
def test_parameter_counts_match_the_seed(cls, expected):
    assert count_parameters(cls(num_classes=10)) == expected


@pytest.mark.parametrize("cls", [DeepNN, LightNN])
def test_class_count_sets_the_output_width(cls):
    model = cls(num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = DeepNN().eval()
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
