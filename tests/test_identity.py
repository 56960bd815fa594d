"""Every key kd files things under, pinned: a change to any of them must be deliberate
(edit the pinned string here, and bump kd.identity.VERSION if old stores go stale)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd import identity
from kd.identity import StoreVersionError, check_store, key
from kd.plan import resolve
from kd.recipes import make_context, recipe_spec, run_model_key
from kd.teacher import TeacherStore

DATA = {
    "contents": "c0ffee",
    "held_out": "feed",
    "val_size": 5000,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
MODEL = {
    "model": {"_target_": "kd.models.DeepNN"},
    "model_source": "0123456789abcdef",
    "data": DATA,
    "optim": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001},
    "epochs": 10,
    "batch_size": 128,
    "seed": 42,
    "augment": False,
    "amp": False,
}
SCHEDULE = {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.002}
DATA_KEY = "c0ffee\0(0.485, 0.456, 0.406)\0(0.229, 0.224, 0.225)"


def test_each_kind_of_key_is_pinned():
    assert key("model", **MODEL) == "afaa3141d26718c5d86a"
    assert key("model", **MODEL, schedule=SCHEDULE) == "056c79c2fb687837db01"
    run = {"settings": {"loss.alpha": 0.25, "loss.temperature": 2.0}, "data": DATA, "seed": 42}
    assert key("run", **run) == "2fec2a4d137e77ff2179"
    assert key("logits", checkpoint="ab" * 32, data=DATA_KEY) == "ebced008ce45b306bd374787"
    assert key("views", checkpoint="ab" * 32, data="d", view_seed=0) == "e56def91965e0a30064a442b"
    assert key("study", settings={"loss.alpha": 0.25, "trainer.epochs": 10}) == "71eee23a"


def test_the_digests_that_feed_keys_are_pinned():
    assert identity.files_digest(["a\0b\n"]) == "6e89fee3cc3edf9e4841d848aefadf0d"
    assert identity.held_out_digest(torch.tensor([3, 1, 4])) == "0057aef4fe5ef616"
    assert identity.content_digest([torch.arange(6, dtype=torch.uint8)]) == "6b0657075841f014ecc188be63e45c62"
    assert identity.derived_seed("dropout", 42) == 6248882371480600555
    assert identity.derived_seed("dropout", 43) != identity.derived_seed("sampler", 42)


def test_every_field_changes_the_key_and_no_other_field_is_accepted():
    base = key("model", **MODEL)
    for field in MODEL:
        assert key("model", **{**MODEL, field: "other"}) != base, field
    with pytest.raises(ValueError, match=r"missing fields \['seed'\]"):
        key("model", **{k: v for k, v in MODEL.items() if k != "seed"})
    with pytest.raises(ValueError, match=r"unknown fields \['device'\]"):
        key("model", **MODEL, device="cpu")
    with pytest.raises(ValueError, match="missing fields"):
        key("views", checkpoint="x", data="d")


def test_a_run_uses_the_declared_fields(compose_cfg):
    """What the pipeline hands the key functions is exactly what KINDS declares."""
    cfg = compose_cfg("data=synthetic", "data.train_size=64", "data.val_size=8", "data.test_size=16")
    ctx = make_context(resolve(cfg), torch.device("cpu"))
    required, optional, _ = identity.KINDS["model"]
    assert set(recipe_spec(resolve(cfg).teacher.recipe, ctx)) == set(required)
    with_schedule = compose_cfg("data=synthetic", "schedule@teacher.schedule=onecycle")
    assert set(recipe_spec(resolve(with_schedule).teacher.recipe, ctx)) == set(required) | set(optional)
    assert len(run_model_key(ctx, 42)) == 20


def test_a_store_of_another_version_is_refused_in_one_line(tmp_path):
    store = tmp_path / "store"
    check_store(store)  # a new store is marked
    assert json.loads((store / "identity.json").read_text()) == {"version": identity.VERSION}
    check_store(store)  # and accepted again
    (store / "identity.json").write_text(json.dumps({"version": identity.VERSION + 1}))
    with pytest.raises(StoreVersionError) as err:
        TeacherStore(store).get_or_build("k", lambda: {"never": "built"})
    message = str(err.value)
    assert "\n" not in message and f"version {identity.VERSION + 1}" in message and "paths.store_dir" in message
    assert not (store / "models").exists()  # nothing built beside the old entries
    (store / "identity.json").write_text("{not json")
    with pytest.raises(StoreVersionError, match="damaged"):
        check_store(store)


def test_an_unmarked_store_from_before_the_mark_is_found_and_marked(tmp_path):
    store = TeacherStore(tmp_path)
    (tmp_path / "logits").mkdir()
    calls = []
    store.logits("d" * 64, "data", lambda: calls.append(1) or torch.ones(2))
    again, built = TeacherStore(tmp_path).logits("d" * 64, "data", lambda: calls.append(1) or torch.zeros(2))
    assert not built and calls == [1] and torch.equal(again, torch.ones(2))
    assert (tmp_path / "identity.json").exists()


def test_a_study_key_ignores_key_order_and_accepts_any_value():
    forward = key("study", settings={"a": 1, "b": Path("/x")})
    assert forward == key("study", settings={"b": Path("/x"), "a": 1}) == key("study", settings={"a": 1, "b": "/x"})


def test_marking_creates_missing_parents_and_a_store_that_cannot_be_marked_is_read_as_it_is(tmp_path):
    check_store(tmp_path / "deep" / "er" / "store")
    assert (tmp_path / "deep" / "er" / "store" / "identity.json").exists()
    (tmp_path / "a_file").write_text("x")
    check_store(tmp_path / "a_file" / "store")  # no mark can be written: no error here
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "identity.json").write_text("[]")
    with pytest.raises(StoreVersionError) as err:
        check_store(tmp_path / "store")
    assert str(err.value).endswith('write {"version": 1} into it if the store is kd\'s')


def test_a_factory_is_addressed_by_the_packages_it_builds_from_without_a_flag(tmp_path, monkeypatch):
    from kd.identity import builds_from
    from kd.models.wrn import wide_resnet
    from kd.models.zoo import timm_model, torchvision_model

    assert (builds_from(timm_model), builds_from(wide_resnet), builds_from(torchvision_model)) == (
        ("timm",),
        ("torchdistill",),
        (),
    )
    (tmp_path / "myzoo.py").write_text(
        "import json\nfrom yaml import safe_load\nimport torch\n\n"
        "def inside(n):\n    import numpy\n    return json.dumps(n)\n\n"
        "def outside(n):\n    return safe_load(str(n)), torch.zeros(n)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import myzoo

    assert builds_from(myzoo.inside) == ("numpy",) and builds_from(myzoo.outside) == ("yaml",)
