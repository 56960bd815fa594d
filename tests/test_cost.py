"""kd.cost: parameters, FLOPs per image, timed latency and throughput; the width knob."""

import pytest
import torch

from kd.config import validate
from kd.cost import count_parameters, flops_per_image, measure, seconds_per_call
from kd.errors import ConfigError
from kd.models import CifarResNet, DeepNN, LightNN
from kd.models.tutorial import scaled


def test_flops_per_image_are_torchs_count_of_one_forward():
    # LightNN on 3x32x32: 1,296,896 multiply-adds (conv 442,368 + 589,824, linear 262,144 + 2,560).
    assert flops_per_image(LightNN(), (3, 32, 32)) == 2_593_792
    assert flops_per_image(DeepNN(), (3, 32, 32)) == 188_491_776
    assert flops_per_image(CifarResNet(20), (3, 32, 32)) == 81_102_080  # He et al.: ~41 M multiply-adds


def test_flop_count_leaves_the_model_in_its_mode():
    model = LightNN().train()
    flops_per_image(model, (3, 32, 32))
    assert model.training
    flops_per_image(model.eval(), (3, 32, 32))
    assert not model.training


@pytest.mark.parametrize(
    ("build", "params", "flops"),
    [
        (lambda: LightNN(width=1.0), 267_738, 2_593_792),
        (lambda: LightNN(width=0.5), 67_762, 870_912),  # 8 channels, 128 hidden units
        (lambda: LightNN(width=2), 1_064_362, 8_595_456),
        (lambda: CifarResNet(20, width=1.0), 269_722, 81_102_080),
        (lambda: CifarResNet(8, width=0.5), 19_218, 6_341_248),
    ],
)
def test_width_scales_channels(build, params, flops):
    model = build()
    assert (count_parameters(model), flops_per_image(model, (3, 32, 32))) == (params, flops)


def test_scaled_rounds_and_keeps_one_channel():
    assert [scaled(16, w) for w in (1.0, 0.5, 0.3, 0.01, 1.5)] == [16, 8, 5, 1, 24]
    with pytest.raises(ValueError, match="model.width must be > 0"):
        scaled(16, 0)


def test_measure_times_on_the_models_device_and_leaves_it_untouched():
    torch.manual_seed(0)
    model = LightNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost = measure(model, (3, 32, 32), batch_size=8, min_run_time=0.01)
    assert (cost["params"], cost["flops"]) == (267_738, 2_593_792)
    assert cost["latency_ms"] > 0 and cost["throughput"] > 0
    assert cost["cost"]["device"] == "cpu" and cost["cost"]["threads"] == torch.get_num_threads()
    assert (cost["cost"]["latency_batch_size"], cost["cost"]["throughput_batch_size"]) == (1, 8)
    assert cost["cost"]["dtype"] == "float32"
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_measure_without_timing_counts_only():
    assert measure(LightNN(), (3, 32, 32), timing=False) == {"params": 267_738, "flops": 2_593_792}


def test_seconds_per_call_times_what_it_is_given():
    calls = []

    def slow(x):
        calls.append(x.shape)
        return x.sum()

    seconds = seconds_per_call(slow, torch.ones(2, 3), min_run_time=0.01)
    assert seconds > 0 and len(calls) > 1 and calls[0] == (2, 3)


def test_width_and_cost_settings_are_checked(compose_cfg):
    for override, message in [
        ("model.width=0", "model.width must be > 0"),
        ("cost.batch_size=0", "cost.batch_size must be >= 1"),
        ("cost.min_run_time=-1", "cost.min_run_time must be > 0"),
        ("cost.timing=maybe", "cost.timing"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_cfg(override))
    with pytest.raises(ConfigError, match="objective latency_ms is timed, but cost.timing=false"):
        validate(compose_cfg("objective=[val_acc,latency_ms]", "cost.timing=false"))
    validate(compose_cfg("objective=[val_acc,flops]", "model=resnet8", "model.width=0.5"))
    validate(compose_cfg("objective=[val_acc,throughput]"))


def test_cost_settings_do_not_change_what_a_run_computes(compose_cfg):
    from kd.config import run_settings

    base = run_settings(compose_cfg())
    assert run_settings(compose_cfg("cost.timing=false", "cost.batch_size=8")) == base
    assert run_settings(compose_cfg("model.width=0.5")) != base


class _Sleepy(torch.nn.Module):
    """A model that takes 2 ms a call and records the batch sizes and autocast it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, 2)
        self.seen: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        self.seen.append((x.shape[0], torch.is_autocast_enabled("cpu")))
        time.sleep(0.002)
        return self.inner(x)


def test_latency_is_milliseconds_at_batch_one_on_a_copy():
    model = _Sleepy().train()
    cost = measure(model, (3,), batch_size=4, min_run_time=0.01)
    assert 2 <= cost["latency_ms"] < 200  # 2 ms a call: milliseconds, not seconds
    assert cost["throughput"] <= 4 / 0.002 * 1.01
    assert all(m.training for m in model.modules())  # the timed copy, not the model, went to eval
    assert {size for size, _ in model.seen} == {1}  # only the FLOP count ran on the model itself
    assert cost["cost"]["device_name"] and cost["cost"]["torch"] == torch.__version__


def test_timing_runs_batch_one_then_the_stated_batch_under_the_asked_autocast():
    model = _Sleepy()
    seconds_per_call(model, torch.ones(1, 3), min_run_time=0.005)
    seconds_per_call(model, torch.ones(5, 3), min_run_time=0.005, autocast_dtype=torch.bfloat16)
    assert {(1, False), (5, True)} == set(model.seen)


def test_throughput_batch_defaults_to_256():
    assert measure(LightNN(), (3, 32, 32), min_run_time=0.01)["cost"]["throughput_batch_size"] == 256
