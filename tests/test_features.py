"""Features from named layers of any model, for the feature losses."""

from __future__ import annotations

import pytest
import torch

from kd.errors import ConfigError
from kd.losses import CosineHidden, FeatureRegressor, LossInputs
from kd.models import LightNN, torchvision_model
from kd.models.features import layer_names, with_features
from tests.conftest import FAST, read_metrics, run_py


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision_model("resnet18", 10, small_input=True).eval()


def test_a_named_layer_is_read_by_a_hook_without_changing_the_logits(resnet18):
    x = torch.randn(2, 3, 32, 32)
    logits, features = with_features(resnet18, ("layer3", "layer4.1.conv2"))(x)
    torch.testing.assert_close(logits, resnet18(x))
    assert features["layer3"].shape == (2, 256, 8, 8) and features["layer4.1.conv2"].shape == (2, 512, 4, 4)
    assert not resnet18.layer3._forward_hooks  # hooks live for one call only


def test_conv_is_the_built_in_networks_own_feature_map():
    model = LightNN().eval()
    x = torch.randn(2, 3, 32, 32)
    _, own = with_features(model, ("conv",))(x)
    _, hooked = with_features(model, ("features",))(x)
    torch.testing.assert_close(own["conv"], hooked["features"])
    assert layer_names(model)[:2] == ["conv", "features"]


def test_an_unknown_layer_is_refused_in_one_line_listing_the_models_layers(resnet18):
    with pytest.raises(ConfigError) as err:
        with_features(resnet18, ("layer5",), "loss.teacher_layer")
    message = str(err.value)
    assert message.startswith("loss.teacher_layer='layer5' is not a layer of ResNet; its layers: conv1, bn1")
    assert "layer3" in message and "\n" not in message


def test_no_names_is_the_plain_forward():
    model = LightNN().eval()
    x = torch.randn(1, 3, 32, 32)
    logits, features = with_features(model, ())(x)
    assert features == {} and torch.equal(logits, model(x))


def _inputs(student: torch.Tensor, teacher: torch.Tensor, s: str, t: str) -> LossInputs:
    logits = torch.randn(student.shape[0], 10)
    return LossInputs(logits, torch.zeros(student.shape[0], dtype=torch.long), torch.randn_like(logits),
                      {s: student}, {t: teacher})  # fmt: skip


def test_feature_losses_read_the_layers_they_are_given():
    cosine = CosineHidden(weight=1.0, student_layer="features", teacher_layer="layer3")
    assert cosine.student_features == ("features",) and cosine.teacher_features == ("layer3",)
    same = torch.randn(2, 16, 8, 8)
    assert cosine(_inputs(same, same, "features", "layer3"))["cosine"].abs().max() < 1e-6
    with pytest.raises(KeyError):
        cosine(_inputs(same, same, "conv", "layer3"))


def test_the_regressor_pools_a_larger_teacher_map_and_names_a_channel_mismatch():
    loss = FeatureRegressor(student_channels=16, teacher_channels=256, teacher_layer="layer2")
    student, teacher = torch.randn(2, 16, 8, 8), torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        loss.regressor.weight.zero_()
        loss.regressor.bias.zero_()
    pooled = torch.nn.functional.adaptive_avg_pool2d(teacher, (8, 8))
    out = loss(_inputs(student, teacher, "conv", "layer2"))
    assert out["mse"].item() == pytest.approx(pooled.pow(2).mean().item(), rel=1e-5)
    with pytest.raises(ConfigError, match=r"loss.teacher_channels=256 but the teacher's layer layer2 gives \(128, 16"):
        loss(_inputs(student, torch.randn(2, 128, 16, 16), "conv", "layer2"))


@pytest.mark.slow
def test_a_torchvision_teacher_distils_its_layer3_into_lightnn(workdir):
    teacher = ["model@teacher.model=torchvision", "teacher.model.name=resnet18", "teacher.model.small_input=true"]
    loss = ["loss=regressor", "loss.teacher_layer=layer3", "loss.teacher_channels=256"]
    proc = run_py([*FAST, *teacher, *loss, "data.train_size=128", "hydra.run.dir=out"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(workdir / "out")["params"] == 267_738
    wrong = run_py([*FAST, *teacher, *loss, "loss.teacher_layer=layer9", "hydra.run.dir=wrong"], cwd=workdir)
    assert wrong.returncode == 2 and "loss.teacher_layer='layer9' is not a layer of ResNet" in wrong.stderr
