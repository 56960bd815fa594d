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
    with pytest.raises(ConfigError, match="small_input=true adapts ResNet, ShuffleNetV2 and MobileNetV2 stems"):
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
    assert "does not fit model.name=resnet18" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="model.weights=.*absent.pt does not exist"):
        torchvision_model("resnet18", weights=tmp_path / "absent.pt")


def test_a_checkpoint_from_another_tool_loads_or_names_its_key_differences(tmp_path):
    from kd.teacher import load_checkpoint, restore_model

    torch.manual_seed(0)
    source = CifarResNet(8, num_classes=10)
    state = source.state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 9}, tmp_path / "ddp.pt")
    loaded = restore_model(load_checkpoint(tmp_path / "ddp.pt"), CifarResNet(8), "kd.models.CifarResNet", 10)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), loaded.state_dict().values(), strict=True))
    torch.save({"state_dict": {**state, "head.weight": torch.zeros(1)}}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError) as err:
        restore_model(load_checkpoint(tmp_path / "extra.pt"), CifarResNet(20), "kd.models.CifarResNet", 10)
    message = str(err.value)
    assert "does not fit teacher.model=kd.models.CifarResNet: missing keys [" in message
    assert "more], unexpected keys [head.weight" in message and "\n" not in message


@pytest.mark.slow
def test_model_torchvision_resnet18_trains_a_one_epoch_run(workdir):
    from tests.conftest import FAST, read_metrics, run_py

    args = [*FAST, "model=torchvision", "model.name=resnet18", "model.small_input=true", "hydra.run.dir=out"]
    proc = run_py(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(workdir / "out")["params"] == 11_173_962


# Wide ResNets from torchdistill's CIFAR zoo. Published (Zagoruyko & Komodakis 2016;
# Tian et al. 2020, CRD, for 16-2 and 40-2): 0.7 M, 2.2 M, 36.5 M.
@pytest.mark.parametrize(("depth", "width", "expected"), [(16, 2, 691_674), (40, 2, 2_243_546), (28, 10, 36_479_194)])
def test_wide_resnet_parameter_counts(depth, width, expected):
    from kd.models.wrn import wide_resnet

    assert count_parameters(wide_resnet(depth, width, num_classes=10)) == expected


def test_a_wide_resnet_depth_that_is_not_6n_plus_4_is_refused():
    from kd.models.wrn import wide_resnet

    with pytest.raises(ConfigError, match="model.depth must be 6n \\+ 4"):
        wide_resnet(depth=20, width=2)


# torchvision's classes with the 32-px stems of kuangliu/pytorch-cifar; the counts are
# torchvision's for 10 classes (the stride changes add no parameters).
@pytest.mark.parametrize(
    ("name", "expected", "last_map"),
    [("mobilenet_v2", 2_236_682, (4, 4)), ("shufflenet_v2_x1_0", 1_263_854, (4, 4)), ("resnet18", 11_173_962, (4, 4))],
)
def test_small_input_stems_keep_32px_images_large_enough(name, expected, last_map):
    model = torchvision_model(name, 10, small_input=True).eval()
    assert count_parameters(model) == expected
    seen = {}
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last.register_forward_hook(lambda _m, _i, out: seen.update(map=out.shape[-2:]))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert tuple(seen["map"]) == last_map


def test_small_input_is_refused_for_a_family_it_does_not_know():
    with pytest.raises(ConfigError, match="model.small_input=true adapts ResNet, ShuffleNetV2 and MobileNetV2"):
        torchvision_model("vgg11", 10, small_input=True)


def test_any_timm_model_by_name_and_a_near_miss_refused():
    pytest.importorskip("timm")
    from kd.models import timm_model

    assert timm_model("resnet18", 7).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        timm_model("resnet1")


def test_model_timm_without_timm_says_which_extra_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    from kd.models import timm_model

    with pytest.raises(ConfigError, match=r"pip install -e '\.\[timm\]'"):
        timm_model("resnet18")


@pytest.mark.slow
@pytest.mark.parametrize(("model", "params"), [("wrn_16_2", 691_674), ("shufflenetv2", 1_263_854), ("timm", None)])
def test_zoo_models_train_a_one_epoch_run(workdir, model, params):
    from tests.conftest import FAST, read_metrics, run_py

    if model == "timm":
        pytest.importorskip("timm")
    proc = run_py([*FAST, f"model={model}", "hydra.run.dir=out"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert params is None or read_metrics(workdir / "out")["params"] == params
