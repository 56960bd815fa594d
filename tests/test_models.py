import pytest
import torch

from kd.errors import CheckpointError, ConfigError
from kd.models import CifarResNet, DeepNN, LightNN, count_parameters, torchvision_model


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


def test_any_torchvision_model_by_name_with_a_small_input_stem():
    # 11,173,962: the CIFAR ResNet-18 of kuangliu/pytorch-cifar (3x3 stem, no max-pool).
    assert count_parameters(torchvision_model("resnet18", 10, small_input=True)) == 11_173_962
    assert count_parameters(torchvision_model("resnet18", 10)) == 11_181_642  # torchvision's own stem
    small = torchvision_model("resnet18", 7, small_input=True).eval()
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ConfigError, match="model.name='resnet19' is not a torchvision model; did you mean resnet1"):
        torchvision_model("resnet19")
    with pytest.raises(ConfigError, match="small_input=true adapts ResNet-style stems"):
        torchvision_model("vgg11", small_input=True)


def test_torchvision_weights_load_from_a_local_file_in_any_common_wrapping(tmp_path):
    torch.manual_seed(0)
    source = torchvision_model("resnet18", 10, small_input=True)
    for wrapping in ("plain", "state_dict", "model"):
        state = source.state_dict()
        path = tmp_path / f"{wrapping}.pt"
        torch.save(state if wrapping == "plain" else {wrapping: state}, path)
        loaded = torchvision_model("resnet18", 10, small_input=True, weights=path)
        pairs = zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(CheckpointError) as err:
        torchvision_model("resnet18", 10, weights=tmp_path / "plain.pt")  # weights of the 32-px stem
    assert "does not fit resnet18" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        torchvision_model("resnet18", weights=tmp_path / "absent.pt")


@pytest.mark.slow
def test_model_torchvision_resnet18_trains_a_one_epoch_run(workdir):
    from tests.conftest import FAST, read_metrics, run_py

    args = [*FAST, "model=torchvision", "model.name=resnet18", "model.small_input=true", "hydra.run.dir=out"]
    proc = run_py(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(workdir / "out")["params"] == 11_173_962
