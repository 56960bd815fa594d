import pytest
import torch

from kd.models import CifarResNet, DeepNN, LightNN, count_parameters


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


# Option-A CIFAR ResNets: He et al. 2016 (section 4.2) give 0.27 M / 0.46 M / 0.85 M / 1.7 M
# for depths 20 / 32 / 56 / 110; the exact counts below are what this implementation has
# (the same as akamaster/pytorch_resnet_cifar10's resnet.py, which uses option A too).
@pytest.mark.parametrize(
    ("depth", "expected"),
    [(8, 75_290), (14, 172_506), (20, 269_722), (32, 464_154), (56, 853_018), (110, 1_727_962)],
)
def test_cifar_resnet_parameter_counts(depth, expected):
    assert count_parameters(CifarResNet(depth, num_classes=10)) == expected


def test_a_cifar_resnet_gives_logits_and_its_last_feature_map():
    model = CifarResNet(20, num_classes=7).eval()
    logits, features = model.forward_with_features(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 7) and features["conv"].shape == (2, 64, 8, 8)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)


@pytest.mark.slow
def test_model_resnet20_trains_a_one_epoch_run(workdir):
    from tests.conftest import FAST, read_metrics, run_py

    proc = run_py([*FAST, "model=resnet20", "hydra.run.dir=out"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(workdir / "out")["params"] == 269_722
