"""Generated hostile input: every numeric config key with out-of-range and wrong-typed
values, and damaged bytes for every kind of file kd reads back (store entries, resume
files, journal studies). Each must end in one line (or heal), never a traceback."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import optuna
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, get_object
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from hydra_plugins.kd_sweeper.study import heal_journal, open_storage
from kd.config import CHOICES, FLAGS, RANGES, validate
from kd.errors import ConfigError
from kd.resume import ResumeFile
from kd.schema import signature_types
from kd.storage import build_once

HOSTILE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=8),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PER_KEY = settings(FAST, max_examples=15)


# Configs that between them hold (or whose targets take) every checked key.
BASES = (
    ["loss=kd", "data=synthetic", "optim=sgd", "schedule=onecycle"],
    ["loss=dkd", "optim=adam", "optim@teacher.optim=sgd", "schedule=cosine", "schedule@teacher.schedule=onecycle"],
    ["loss=cosine", "data=folder", "data.root=/x", "schedule@teacher.schedule=cosine", "model@teacher.model=resnet20"],
)


@pytest.fixture(scope="module")
def bases() -> list[dict]:
    """Composed configs as plain containers (cheap to copy per drawn value)."""
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        return [OmegaConf.to_container(compose(config_name="config", overrides=b), resolve=False) for b in BASES]


@pytest.fixture
def base(bases, key) -> dict:
    """The first base that has ``key``, or whose target at its parent takes it."""
    parent, _, leaf = key.rpartition(".")
    for candidate in bases:
        cfg = OmegaConf.create(candidate)
        if OmegaConf.select(cfg, key, default="<absent>") != "<absent>":
            return candidate
        target = OmegaConf.select(cfg, f"{parent}._target_", default=None)
        if target and leaf in signature_types(get_object(target))[0]:
            return candidate
    pytest.fail(f"no config in BASES has or takes {key}")


@pytest.mark.parametrize("key", sorted({key for key, *_ in RANGES}))
def test_every_numeric_key_refuses_what_breaks_its_rule_in_one_line(base, key):
    rule = {k: (test, integer) for k, test, _, integer in RANGES}[key]

    @PER_KEY
    @given(value=HOSTILE)
    def check(value):
        cfg = OmegaConf.create(base)
        OmegaConf.update(cfg, key, value, force_add=True)
        test, integer = rule
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        fine = number and (not integer or isinstance(value, int)) and math.isfinite(value) and test(value)
        try:
            validate(cfg)
        except ConfigError as err:
            message = str(err)
            assert "\n" not in message
            if not fine:
                assert message.startswith(key), message  # the first refusal is this key's
            return
        assert fine, f"{key}={value!r} was accepted"

    check()


@FAST
@given(damage=st.binary(max_size=200), forge=st.booleans())
def test_a_damaged_store_entry_is_rebuilt_never_trusted_never_blocking(tmp_path_factory, damage, forge):
    folder = tmp_path_factory.mktemp("entry")
    path = folder / "entry.pt"
    build_once(path, lambda: {"v": torch.ones(3)})
    path.write_bytes(damage)
    if forge:  # a checksum that matches the damaged bytes
        (folder / "entry.pt.sha256").write_text(f"{hashlib.sha256(damage).hexdigest()} {len(damage)}\n")
    value, _ = build_once(path, lambda: {"v": torch.zeros(3)})
    assert isinstance(value, dict) and value["v"].shape == (3,)
    assert torch.equal(build_once(path, lambda: None)[0]["v"], value["v"])  # what is stored now loads


@FAST
@given(damage=st.binary(max_size=200))
def test_a_damaged_resume_file_is_refused_and_removed(tmp_path_factory, damage):
    folder = tmp_path_factory.mktemp("resume")
    resume = ResumeFile(folder / "r.pt")
    resume.save({"epoch": 1})
    (folder / "r.pt").write_bytes(damage)
    (folder / "r.pt.sha256").write_text(f"{hashlib.sha256(damage).hexdigest()} {len(damage)}\n")
    assert resume.load() is None and not (folder / "r.pt").exists()


@FAST
@given(tail=st.binary(min_size=1, max_size=120).filter(lambda b: b"\n" not in b))
def test_a_journal_torn_anywhere_in_its_last_record_resumes(tmp_path_factory, tail):
    folder = tmp_path_factory.mktemp("journal")
    url = f"journal://{folder}/s.log"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    log = folder / "s.log"
    log.write_bytes(log.read_bytes() + tail)
    assert heal_journal(str(log)) == len(tail)
    resumed = optuna.load_study(study_name="s", storage=open_storage(url))
    resumed.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(resumed.trials) == 3


@pytest.mark.parametrize("key", [*FLAGS, *(key for key, *_ in CHOICES)])
def test_every_flag_and_choice_refuses_other_values_in_one_line(base, key):
    allowed = dict((k, a) for k, a, _ in CHOICES).get(key, (True, False))

    @PER_KEY
    @given(value=HOSTILE)
    def check(value):
        cfg = OmegaConf.create(base)
        OmegaConf.update(cfg, key, value, force_add=True)
        fine = any(value == a and type(value) is type(a) for a in allowed)
        try:
            validate(cfg)
        except ConfigError as err:
            assert not fine and str(err).startswith(key) and "\n" not in str(err), str(err)
            return
        assert fine, f"{key}={value!r} was accepted"

    check()


LOSS_OPTIONS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "loss").glob("*.yaml"))


@pytest.mark.parametrize("option", LOSS_OPTIONS)
def test_every_loss_hyperparameter_refuses_what_breaks_its_class_rule_in_one_line(option):
    """The rules live on the loss class (``ranges``): config validation knows no method."""
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        base = compose(config_name="config", overrides=[f"loss={option}"])
    rules = get_class(str(base.loss._target_)).ranges
    assert set(rules) <= set(base.loss) and (rules or option == "ce"), option
    for name, (test, _) in rules.items():
        _refuses_what_breaks(base, f"loss.{name}", test)


def _refuses_what_breaks(base, key: str, test) -> None:
    @PER_KEY
    @given(value=HOSTILE)
    def check(value):
        cfg = base.copy()
        OmegaConf.update(cfg, key, value, force_add=True)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        fine = number and math.isfinite(value) and test(value)
        try:
            validate(cfg)
        except ConfigError as err:
            assert "\n" not in str(err) and (fine or str(err).startswith(key)), str(err)
            return
        assert fine, f"{key}={value!r} was accepted"

    check()
