"""Every config key has a declared type (kd.schema): every shipped option passes, a
wrong type or an undeclared key is one line naming the key, the value and the type."""

from __future__ import annotations

import collections.abc
import os
import typing
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import pytest
import torch
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
        (Any, [None, "x", [1]], []),
        (None, [None], [0, "None"]),
        (type(None), [None], [False]),
        (Path, ["a/b"], [None, 3]),
        (os.PathLike[str], ["a"], [1]),
        (collections.abc.Sequence[int], [[1], (2, 3)], [[1.0], "ab"]),
        (collections.abc.Iterable[str], [["a"]], [[1]]),
        (tuple[int, ...], [[], [1, 2, 3]], [[1, "x"]]),
        (tuple[int, str], [[1, "x"], (2, "y")], [[1], [1, "x", 2], ["x", 1]]),
        (list, [[1, "a"]], ["a", 1]),
        (torch.device, [torch.device("cpu")], ["cpu"]),
        (TypeVar("Anything"), [1, "x"], []),
        (typing.List, [[1, "a"]], ["a"]),  # noqa: UP006
        (tuple[int], [[1]], [[1, 2], ["1"]]),
    ],
)
def test_conforms_accepts_exactly_the_declared_values(hint, good, bad):
    assert all(schema.conforms(v, hint) for v in good)
    assert not any(schema.conforms(v, hint) for v in bad)


@pytest.mark.parametrize(
    ("hint", "words"),
    [
        (int | None, "an integer or null"),
        (Optional[int], "an integer or null"),  # noqa: UP045 (typing.Union, as older signatures spell it)
        (bool | None, "true or false or null"),
        (float, "a number"),
        (str, "a string"),
        (type(None), "null"),
        (Path, "a path"),
        (os.PathLike, "a path"),
        (os.PathLike[str], "a path"),
        (Path | os.PathLike, "a path"),  # one word once
        (str | Path, "a string or a path"),
        (int | torch.device, "an integer"),  # torch's own types are not config values
        (tuple[float, float], "a list of 2 (a number, a number)"),
        (tuple[int, ...], "a list of (an integer)"),
        (list[str], "a list of (a string)"),
        (collections.abc.Sequence[float], "a list of (a number)"),
        (collections.abc.Iterable[bool], "a list of (true or false)"),
        (tuple, "tuple"),
        (Literal["cos", "linear"], "cos or linear"),
        (Literal[True, "auto"], "true or auto"),
        (Literal[False, 1], "false or 1"),
        (torch.device, "device"),
        (TypeVar("Width"), "Width"),
        ("Width", "Width"),  # an annotation left as a string
        (typing.List, "a list of (values)"),  # noqa: UP006 (a bare typing alias has no element type)
        (tuple[int], "a list of 1 (an integer)"),
        (Literal["CE", "KD"], "CE or KD"),  # only true/false are lowered
    ],
)
def test_describe_says_types_in_words(hint, words):
    assert schema.describe(hint) == words


def test_a_refusal_names_the_type_in_words_and_the_fix():
    with pytest.raises(ConfigError) as err:
        schema._check_value("trainer.check_every", "often", int | None, " (somewhere)")
    assert str(err.value) == (
        "trainer.check_every must be an integer or null (somewhere), got 'often': "
        "set trainer.check_every=<an integer or null>"
    )
    schema._check_value("trainer.check_every", None, int | None, "")  # fits: no error


def test_only_resolvable_keys_outside_hydra_are_checked():
    cfg = OmegaConf.create(
        {
            "hydra": {"anything": "goes"},
            "missing": "???",
            "job_only": "${hydra:job.num}",
            "broken": "${nowhere}",
            "nested": {"a": 1, "b": "${nested.a}", "gone": "???", "items": ["${nested.a}", 2]},
            "pair": [1, "${nested.a}"],
        }
    )
    assert schema._resolved(cfg) == {"nested": {"a": 1, "b": 1, "items": [1, 2]}, "pair": [1, 1]}


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


class _Base:
    def __init__(self, a: int, **kwargs) -> None:
        pass


class _Child(_Base):
    def __init__(self, b: str, **kwargs) -> None:
        super().__init__(**kwargs)


class _Mapping(dict):
    def __init__(self, a: int, **kwargs) -> None:
        super().__init__(**kwargs)


def test_signatures_follow_kwargs_up_to_a_closed_init_or_stay_open_ended():
    assert schema.signature_types(_Child) == ({"b": str, "a": int}, False)  # object.__init__ takes nothing more
    assert schema.signature_types(_Mapping) == ({"a": int}, False)  # dict's (*args, **kwargs) lead on to object

    def unreadable(width: NoSuchType, depth: int = 2):  # noqa: F821 (an annotation this Python cannot evaluate)
        pass

    assert schema.signature_types(unreadable) == ({"width": Any, "depth": Any}, False)


def test_an_open_ended_target_still_checks_the_keys_it_declares(monkeypatch):
    def factory(depth: int, **kwargs):
        pass

    monkeypatch.setattr(schema, "get_object", lambda target: factory)
    node = {"_target_": "zoo.factory", "anything": 1, "depth": "deep"}
    with pytest.raises(ConfigError, match=r"^model.depth must be an integer \(zoo.factory\), got 'deep'"):
        schema._check_target(node, "model", trusted=("zoo.*",))
    schema._check_target({**node, "depth": 3}, "model", trusted=("zoo.*",))
    schema._check_target(node, "model", trusted=("other.*",))  # untrusted: not read at all


def test_a_target_taking_nothing_says_so(monkeypatch):
    monkeypatch.setattr(schema, "get_object", lambda target: lambda: None)
    with pytest.raises(ConfigError) as err:
        schema._check_target({"_target_": "zoo.blank", "size": 1}, "model", trusted=("zoo.*",))
    assert (
        str(err.value) == "model.size is not a parameter of zoo.blank (it takes no settings): remove it or fix its name"
    )


def test_a_declared_key_holds_its_type_even_when_given_a_node_to_build():
    cfg = compose_with("loss=kd")
    OmegaConf.update(cfg, "trainer.device", {"_target_": "torch.device", "type": "cpu"}, force_add=True)
    with pytest.raises(ConfigError, match=r"^trainer.device must be a string, got \{"):
        schema.check(cfg, TRUSTED_TARGETS)
