"""Every config key has a declared type (kd.schema): every shipped option passes, a
wrong type or an undeclared key is one line naming the key, the value and the type."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from kd import schema
from kd.config import TRUSTED_TARGETS, flatten, validate
from kd.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=list(overrides))


SHIPPED = [
    *(f"{group}={name}" for group in ("model", "loss", "optim", "schedule", "experiment") for name in options(group)),
    *(f"logger={name}" for name in options("logger")),
    "data=synthetic",
    "data=cifar10",
]


@pytest.mark.parametrize("choice", SHIPPED)
def test_every_shipped_option_declares_the_type_of_every_key(choice):
    teacher = (
        () if choice.startswith("experiment=") else ("optim@teacher.optim=sgd", "schedule@teacher.schedule=onecycle")
    )
    cfg = compose_with(choice, *teacher)
    schema.check(cfg, TRUSTED_TARGETS)  # raises on an undeclared key or a wrong type


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("trainer.epochs=ten", "trainer.epochs must be an integer, got 'ten'"),
        ("trainer.num_threads=1.5", "trainer.num_threads must be an integer or null, got 1.5"),
        ("trainer.progress=maybe", "trainer.progress must be true or false or auto, got 'maybe'"),
        ("teacher.views=some", "teacher.views must be an integer or all or online, got 'some'"),
        ("loss.temperature=hot", "loss.temperature must be a number (kd.losses.HintonKD), got 'hot'"),
        ("+trainer.epoch=3", "trainer.epoch is not a kd setting"),
        (
            "+loss.temprature=3",
            "loss.temprature is not a parameter of kd.losses.HintonKD (it takes temperature, alpha)",
        ),
        ("+optim.amsgrad=1", "optim.amsgrad must be true or false (torch.optim.Adam), got 1"),
        ("seed=[1]", "seed must be an integer, got [1]"),
    ],
)
def test_a_wrong_type_or_unknown_key_is_one_line_naming_it(override, words):
    cfg = compose_with("loss=kd", override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(words) and "\n" not in str(err.value), str(err.value)


def test_targets_are_typed_by_their_signature_followed_up_their_bases():
    params, open_ended = schema.signature_types(__import__("kd.data", fromlist=["x"]).SyntheticData)
    assert {"train_size", "noise", "val_size", "mean"} <= set(params) and not open_ended
    assert params["train_size"] is int and params["noise"] is float
    assert schema.signature_types(lambda a, **kw: None) == ({"a": Any}, True)


def test_an_untrusted_target_is_not_imported_to_read_its_signature():
    cfg = compose_with("model=torchvision", "model.small_input=yes")
    schema.check(cfg, trusted=("torch.optim.*", "kd.data.*", "kd.losses.*"))  # kd.models not trusted: not read
    with pytest.raises(ConfigError, match="model.small_input must be true or false"):
        schema.check(cfg, TRUSTED_TARGETS)


@pytest.mark.parametrize(
    ("hint", "good", "bad"),
    [
        (int, [0, -3], [True, 1.5, "1", None]),
        (float, [1, 2.5], [False, "2", None]),
        (bool, [True, False], [0, 1, "true"]),
        (str, ["x"], [1, None]),
        (int | None, [None, 3], [3.0]),
        (list[int], [[], [1, 2]], [[1.5], 1, "12"]),
        (tuple[float, float], [[0.9, 0.99]], [[0.9], [0.9, "x"]]),
        (Literal["auto", "never"], ["auto"], ["Auto", True]),
        (bool | Literal["auto"], [True, "auto"], [1, "yes"]),
    ],
)
def test_conforms_accepts_exactly_the_declared_values(hint, good, bad):
    assert all(schema.conforms(v, hint) for v in good)
    assert not any(schema.conforms(v, hint) for v in bad)


def test_describe_says_types_in_words():
    assert schema.describe(int | None) == "an integer or null"
    assert schema.describe(tuple[float, float]) == "a list of 2 (a number, a number)"
    assert schema.describe(list[str]) == "a list of (a string)"
    assert schema.describe(Literal["cos", "linear"]) == "cos or linear"


WRONG = st.one_of(
    st.text(min_size=1, max_size=6).filter(lambda t: t not in ("auto", "all", "online", "never")),
    st.lists(st.integers(), min_size=1, max_size=2),
)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_declared_scalar_key_refuses_a_wrong_type_in_one_line(data):
    base = OmegaConf.to_container(compose_with("loss=kd", "data=synthetic", "optim=sgd"), resolve=False)
    scalars = sorted(
        k
        for k, v in flatten({k: v for k, v in base.items() if k != "hydra"}).items()
        if isinstance(v, (int, float, bool)) and "${" not in str(v) and "._" not in k
    )
    key = data.draw(st.sampled_from(scalars))
    value = data.draw(WRONG)
    cfg = OmegaConf.create(base)
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)
