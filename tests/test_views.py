"""Augmented KD from cached teacher views, lr schedules and the named recipes."""

from __future__ import annotations

import json

import pytest
import torch

from kd.config import validate
from kd.errors import ConfigError
from kd.models import DeepNN
from kd.pipeline import run
from kd.plan import resolve
from kd.provision import prepare_teacher
from kd.recipes import make_context, recipe_spec
from kd.teacher import TeacherStore, load_checkpoint
from kd.views import CachedViews, RandomViews, apply_views, view_count, view_orders

SMALL = ["data=synthetic", "data.train_size=96", "data.test_size=32", "data.val_size=16", "trainer.device=cpu"]


def test_views_are_every_crop_and_flip_exactly_once():
    images = torch.randint(1, 256, (1, 3, 6, 6), dtype=torch.uint8)
    padding = 2
    rendered = apply_views(images.expand(view_count(padding), -1, -1, -1), torch.arange(view_count(padding)), padding)
    padded = torch.nn.functional.pad(images[0], (padding,) * 4)
    expected = set()
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + 6, dx : dx + 6]
            expected |= {crop.numpy().tobytes(), crop.flip(-1).numpy().tobytes()}
    assert {view.numpy().tobytes() for view in rendered} == expected
    assert len(expected) == view_count(padding) == 50
    # view 2 * (p * (2p+1) + p) is the centre crop unflipped: the image itself; +1 flips it
    centre = 2 * (padding * (2 * padding + 1) + padding)
    assert torch.equal(rendered[centre], images[0]) and torch.equal(rendered[centre + 1], images[0].flip(-1))
    assert view_count() == 162


def test_view_orders_are_seeded_permutations_and_random_views_vary():
    orders = view_orders(5, seed=3)
    assert orders.shape == (5, 162) and torch.equal(orders, view_orders(5, seed=3))
    assert all(sorted(row.tolist()) == list(range(162)) for row in orders)
    assert not torch.equal(orders, view_orders(5, seed=4))
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out, slots = RandomViews(seed=0)(torch.arange(64), images)
    assert slots is None and out.shape == images.shape and not torch.equal(out, images)


def test_cached_view_logits_equal_the_online_teacher_on_the_same_augmented_batch(compose_cfg, tmp_path, teacher_file):
    cfg = compose_cfg(
        "loss=kd",
        *SMALL,
        "data.augment=true",
        "teacher.views=5",
        f"teacher.checkpoint={teacher_file}",
        f"paths.store_dir={tmp_path}/s",
    )
    ctx = make_context(resolve(cfg), torch.device("cpu"))
    source = prepare_teacher(ctx, TeacherStore(cfg.paths.store_dir))
    assert source.info["teacher_signal"] == "views" and source.info["teacher_views"] == 5
    assert source.views.shape == (len(ctx.train_images), 5)
    teacher = DeepNN().to(memory_format=torch.channels_last).eval()
    teacher.load_state_dict(load_checkpoint(teacher_file)["state_dict"])
    augment = CachedViews(source.views, seed=11)
    from kd.batches import BatchStream

    slots_seen = set()
    for idx, images, _ in BatchStream(ctx.train_images, ctx.train_labels, ctx.data.train_idx, 16, seed=2).epoch(1):
        augmented, slots = augment(idx, images)
        assert not torch.equal(augmented, images)  # the student sees augmented views
        inputs = ctx.preprocess(augmented)
        with torch.no_grad():
            online = teacher(inputs)
        cached = source.signal(idx, inputs, slots)[0]
        torch.testing.assert_close(cached, online, rtol=2e-3, atol=2e-3)  # float16 cache
        slots_seen |= set(slots.tolist())
    assert slots_seen == set(range(5))


def test_the_view_cache_resumes_after_an_interruption_and_serves_smaller_k(tmp_path):
    store = TeacherStore(tmp_path)
    computed: list[int] = []

    def compute_until(limit: int):
        def compute(views: torch.Tensor) -> torch.Tensor:
            if len(computed) == limit:
                raise KeyboardInterrupt  # the build is stopped part-way
            computed.append(len(computed))
            return views.float()[:, None].expand(-1, 3).half()

        return compute

    def orders() -> torch.Tensor:
        return view_orders(4, seed=0)

    with pytest.raises(KeyboardInterrupt):
        store.view_logits("t", "d", 0, 6, orders, compute_until(2), (4, 3))
    assert computed == [0, 1]
    logits, views = store.view_logits("t", "d", 0, 6, orders, compute_until(99), (4, 3))
    assert computed == [0, 1, 2, 3, 4, 5]  # only the four missing view columns were computed
    assert logits.shape == (4, 6, 3) and torch.equal(logits[:, :, 0].long(), views)
    smaller, smaller_views = store.view_logits("t", "d", 0, 3, orders, compute_until(0), (4, 3))
    assert torch.equal(smaller, logits[:, :3]) and torch.equal(smaller_views, views[:, :3])
    _, other_seed = store.view_logits("t", "d", 1, 1, lambda: view_orders(4, seed=1), compute_until(99), (4, 3))
    assert len(computed) == 7  # another view seed is another cache


def test_augmented_kd_run_trains_on_cached_views_and_records_them(compose_cfg, tmp_path, teacher_file):
    cfg = compose_cfg(
        "loss=kd",
        *SMALL,
        "data.augment=true",
        "teacher.views=3",
        "trainer.epochs=2",
        "trial.baseline=false",
        f"teacher.checkpoint={teacher_file}",
        f"paths.store_dir={tmp_path}/s",
    )
    metrics = run(cfg, tmp_path / "out")
    assert metrics["status"] == "completed" and metrics["teacher_signal"] == "views"
    assert metrics["teacher_views"] == 3 and metrics["teacher_view_seed"] == 0
    assert len(list((tmp_path / "s" / "views").glob("*/view*.pt"))) == 3
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["teacher_views"] == 3


@pytest.mark.parametrize("value", [0, 163, "some", True, 2.5])
def test_bad_view_settings_are_refused(compose_cfg, value):
    cfg = compose_cfg(*SMALL)
    cfg.teacher.views = value
    # 0 and 163 break the range; the others the declared type (kd.schema)
    in_range = isinstance(value, int) and not isinstance(value, bool)
    rule = r"a view count in \[1, 162\], all or online" if in_range else "an integer or all or online"
    with pytest.raises(ConfigError, match=rf"teacher.views must be {rule}, got"):
        validate(cfg)


@pytest.mark.parametrize("name", ["cosine", "onecycle"])
def test_schedules_step_per_batch_and_anneal(compose_cfg, tmp_path, name):
    cfg = compose_cfg(
        *SMALL,
        f"schedule={name}",
        "trainer.epochs=3",
        "trainer.batch_size=16",
        "optim.lr=0.004",
        f"paths.store_dir={tmp_path}/s",
    )
    metrics = run(cfg, tmp_path / "out")
    lrs = [entry["lr"] for entry in metrics["history"]]
    assert lrs[-1] < 0.02 * 0.004 and 0.5 * 0.004 < max(lrs) <= 0.004 + 1e-12  # annealed nearly to zero
    if name == "onecycle":
        assert lrs[0] > 0.004 / 25  # warmed up past its starting lr within the first epoch


def test_schedule_and_weight_decay_are_part_of_a_recipe(compose_cfg):
    base = compose_cfg(*SMALL)
    ctx = make_context(resolve(base), torch.device("cpu"))

    def spec(*overrides):
        return recipe_spec(resolve(compose_cfg(*SMALL, *overrides)).recipe(42), ctx)

    assert "schedule" not in spec()  # a constant lr keeps the addresses stored before schedules existed
    assert spec("schedule=cosine") != spec() != spec("optim=adamw") != spec("optim=adamw", "optim.weight_decay=0.1")
    strong = compose_cfg("experiment=teacher_strong", "data=synthetic", "trainer.device=cpu")
    assert strong.teacher.schedule.max_lr == strong.teacher.optim.lr == 2e-3
    # Run alone, the experiment trains exactly the teacher its KD runs look up.
    assert recipe_spec(resolve(strong).student, ctx) == recipe_spec(resolve(strong).teacher.recipe, ctx)
    resnet = compose_cfg("experiment=teacher_resnet", "data=synthetic", "trainer.device=cpu")
    assert recipe_spec(resolve(resnet).student, ctx) == recipe_spec(resolve(resnet).teacher.recipe, ctx)
    assert resnet.teacher.model.depth == 20 and resnet.teacher.optim.lr == 0.1 and resnet.teacher.augment
    with pytest.raises(ConfigError, match="optim.weight_decay must be >= 0"):
        validate(compose_cfg(*SMALL, "optim=adamw", "optim.weight_decay=-1"))
    with pytest.raises(ConfigError, match="teacher.schedule.pct_start must be in"):
        validate(compose_cfg(*SMALL, "schedule@teacher.schedule=onecycle", "teacher.schedule.pct_start=1.5"))


def test_named_student_recipes_share_everything_but_the_loss_and_the_teacher(compose_cfg):
    small = ["data=synthetic", "data.val_size=64"]
    kd = compose_cfg("experiment=kd_strong_aug", *small)
    ce = compose_cfg("experiment=student_long_aug", *small)
    strong = compose_cfg("experiment=teacher_strong", *small)
    assert kd.loss._target_ == "kd.losses.HintonKD" and ce.loss._target_ == "kd.losses.CrossEntropy"
    ctx = make_context(resolve(ce), torch.device("cpu"))
    # KD's CE baseline is exactly the student_long_aug run, and its teacher the teacher_strong run.
    assert recipe_spec(resolve(kd).recipe(42), ctx) == recipe_spec(resolve(ce).recipe(42), ctx)
    assert recipe_spec(resolve(kd).teacher.recipe, ctx) == recipe_spec(resolve(strong).student, ctx)
    assert kd.data.augment is True and kd.trainer.epochs == 30 and kd.teacher.views == 8
    long_kd = compose_cfg("experiment=kd_strong_long", *small)
    long_ce = compose_cfg("experiment=student_long", *small)
    assert long_kd.data.augment is False and long_kd.loss._target_ == "kd.losses.HintonKD"
    assert recipe_spec(resolve(long_kd).recipe(42), ctx) == recipe_spec(resolve(long_ce).recipe(42), ctx)
    assert recipe_spec(resolve(long_kd).teacher.recipe, ctx) == recipe_spec(resolve(kd).teacher.recipe, ctx)
    # kd_resnet_teacher: the same student recipe, the teacher_resnet run as its teacher.
    resnet_kd = compose_cfg("experiment=kd_resnet_teacher", *small)
    resnet = compose_cfg("experiment=teacher_resnet", *small)
    assert recipe_spec(resolve(resnet_kd).recipe(42), ctx) == recipe_spec(resolve(ce).recipe(42), ctx)
    assert recipe_spec(resolve(resnet_kd).teacher.recipe, ctx) == recipe_spec(resolve(resnet).student, ctx)
    assert resnet_kd.teacher.views == 16 and (resnet_kd.loss.temperature, resnet_kd.loss.alpha) == (4.0, 0.9)
