"""benchmarks/study_kd.py's arms are the named experiments they stand for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from kd.plan import resolve
from kd.recipes import make_context, recipe_spec

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study_kd.py"


def load_study():
    spec = importlib.util.spec_from_file_location("study_kd", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_arms_train_the_recipes_the_named_experiments_ship(compose_cfg):
    study = load_study()
    small = ["data=synthetic", "data.val_size=64"]
    shipped = compose_cfg("experiment=kd_strong_long", *small)
    chosen = f"strong-30-off-T{shipped.loss.temperature!r}-a{shipped.loss.alpha!r}"  # the retrained arm
    arm = compose_cfg(*study.arm_overrides(chosen), *small)
    ctx = make_context(resolve(shipped), torch.device("cpu"))
    # Same student recipe (so the same CE baseline), same teacher, same loss settings.
    assert recipe_spec(resolve(arm).recipe(42), ctx) == recipe_spec(resolve(shipped).recipe(42), ctx)
    assert recipe_spec(resolve(arm).teacher.recipe, ctx) == recipe_spec(resolve(shipped).teacher.recipe, ctx)
    assert (arm.loss.temperature, arm.loss.alpha) == (shipped.loss.temperature, shipped.loss.alpha)
    t4 = compose_cfg(*study.arm_overrides("strong-30-off-T4-a0.9"), *small)
    assert (t4.loss.temperature, t4.loss.alpha) == (4.0, 0.9)
    assert list(arm.trial.seeds) == [42, 43, 44]

    views = compose_cfg(*study.arm_overrides("strong-30-views8"), *small)
    aug = compose_cfg("experiment=kd_strong_aug", *small)
    assert recipe_spec(resolve(views).recipe(42), ctx) == recipe_spec(resolve(aug).recipe(42), ctx)
    assert views.teacher.views == aug.teacher.views == 8 and views.data.augment is True

    # The seed-recipe teacher is another teacher for the same student recipe.
    seed_arm = compose_cfg(*study.arm_overrides("seed-30-off"), *small)
    assert recipe_spec(resolve(seed_arm).recipe(42), ctx) == recipe_spec(resolve(arm).recipe(42), ctx)
    assert recipe_spec(resolve(seed_arm).teacher.recipe, ctx) != recipe_spec(resolve(arm).teacher.recipe, ctx)

    retrain = compose_cfg(*study.arm_overrides("strong-30-off", "[45,46,47]"), *small)
    assert list(retrain.trial.seeds) == [45, 46, 47]
    assert compose_cfg(*study.arm_overrides("ce-30-off"), *small).loss._target_ == "kd.losses.CrossEntropy"
