"""Teacher provisioning: the teacher a KD run distils from, and the CE models it is
compared with.

The teacher comes from ``teacher.checkpoint`` or from the store; its logits (per cached
view with augmentation) and any features a loss reads are served from the store's
cache. A CE model, the teacher or a run's CE baseline, is looked up in the store by
:func:`kd.recipes.recipe_spec`, trained at most once, and published for other runs.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kd import identity
from kd.cost import count_parameters, flops_per_image
from kd.engine import predict_features, predict_logits
from kd.errors import CheckpointError
from kd.losses import CrossEntropy
from kd.models.features import TEACHER_LAYER, check_layers, with_features
from kd.recipes import (
    Context,
    Recipe,
    TeacherSource,
    Trained,
    data_identity,
    image_shape,
    model_target,
    recipe_spec,
    resume_file,
    train_model,
)
from kd.storage import dict_fits, file_digest, tensor_fits
from kd.teacher import TeacherStore, load_checkpoint, make_checkpoint, restore_model
from kd.views import view_orders

log = logging.getLogger(__name__)


def checkpoint_of(trained: Trained, recipe: Recipe, ctx: Context) -> dict:
    return make_checkpoint(
        trained.model,
        model_target(recipe.model),
        ctx.data.num_classes,
        params=count_parameters(trained.model),
        flops=flops_per_image(trained.model, image_shape(ctx)),
        val_acc=finite_or_none(trained.val_acc),
        test_acc=trained.test_acc,
        train_seconds=trained.fit.train_seconds,
        spec=recipe_spec(recipe, ctx),
    )


def stored_ce_model(recipe: Recipe, ctx: Context, store: TeacherStore, desc: str) -> tuple[dict, bool]:
    """The CE-trained model of ``recipe`` from the store, trained once if absent."""
    key = identity.key("model", **recipe_spec(recipe, ctx))

    resume = resume_file(ctx, f"store-{key}")

    def train_once() -> dict:
        log.info("%s %s is not in the store: training it once", desc, key)
        return checkpoint_of(train_model(recipe, CrossEntropy(), ctx, desc=desc, resume=resume), recipe, ctx)

    checkpoint, built = store.get_or_build(key, train_once)
    resume.remove()  # stored: nothing left to resume
    checkpoint["path"] = str(store.checkpoint_path(key))
    return checkpoint, built


def near_chance(val_acc: float | None, num_classes: int) -> str | None:
    """A warning when the teacher's validation accuracy is within 1.5x of guessing: its
    soft targets then carry little (a short teacher.epochs on hard data)."""
    chance = 100.0 / num_classes
    if val_acc is None or not math.isfinite(val_acc) or val_acc >= 1.5 * chance:
        return None
    return (
        f"the teacher's validation accuracy is {val_acc:.1f} %, near chance ({chance:.1f} %): distilling from it "
        "teaches little; train it longer (teacher.epochs) or give teacher.checkpoint"
    )


def check_teacher_split(checkpoint: dict, ctx: Context) -> str | None:
    """Refuse a teacher that trained on this run's validation images; return a warning
    when that cannot be checked (a checkpoint with no record, or other data)."""
    n_val = len(ctx.data.val_idx)
    if n_val == 0:
        return None
    where = checkpoint.get("path", "the teacher checkpoint")
    recorded = (checkpoint.get("spec") or {}).get("data")
    if not isinstance(recorded, dict):
        return (
            f"teacher.checkpoint={where} records no training split: if it saw the {n_val} validation "
            "images, val_acc is inflated"
        )
    ours = data_identity(ctx.data)
    if recorded.get("contents") != ours["contents"]:
        return f"teacher.checkpoint={where} was trained on other data: cannot check it never saw the validation images"
    if "held_out" in recorded:
        same_split = recorded["held_out"] == ours["held_out"]
    else:  # recorded before held_out existed
        same_split = recorded.get("val_size") == n_val and recorded.get("split_seed") == ctx.plan.split_seed
    if not same_split:
        raise CheckpointError(
            f"teacher.checkpoint={where} was trained on this run's validation images "
            f"(it held out {recorded.get('val_size')} images, not these {n_val}); use the store "
            "(teacher.checkpoint=null) or a teacher trained with the same data.val_size and data.split_seed"
        )
    return None


def _load_teacher(ctx: Context, store: TeacherStore) -> tuple[nn.Module, dict, dict]:
    """The teacher in eval mode on the device, its checkpoint, and what metrics.json
    records of it: from ``teacher.checkpoint``, else from the store (trained once)."""
    plan, data = ctx.plan.teacher, ctx.data
    recipe = plan.recipe
    info: dict[str, Any] = {}
    if plan.checkpoint:
        checkpoint = load_checkpoint(plan.checkpoint)
        warning = check_teacher_split(checkpoint, ctx)
        if warning:
            log.warning("%s", warning)
            info["teacher_warning"] = warning
        source = "checkpoint"
    else:
        checkpoint, built = stored_ce_model(recipe, ctx, store, desc="teacher")
        checkpoint["digest"] = file_digest(checkpoint["path"])
        source = "trained" if built else "store"
    teacher = ctx.plan.build(recipe.model, num_classes=data.num_classes)
    restore_model(checkpoint, teacher, model_target(recipe.model), data.num_classes)
    teacher = teacher.to(ctx.device, memory_format=ctx.memory_format).eval()
    info.update(
        teacher_checkpoint=checkpoint["path"],
        teacher_source=source,
        teacher_val_acc=checkpoint.get("val_acc"),
        teacher_test_acc=checkpoint.get("test_acc"),
        teacher_params=count_parameters(teacher),
        # Stored with kd's own teachers; counted here for one from elsewhere.
        teacher_flops=checkpoint.get("flops") or flops_per_image(teacher, image_shape(ctx)),
    )
    accs = ", ".join(f"{k} {checkpoint[k]:.2f}%" for k in ("val_acc", "test_acc") if checkpoint.get(k) is not None)
    log.info("teacher: %s (%s%s)", checkpoint["path"], source, f"; {accs}" if accs else "")
    warning = near_chance(checkpoint.get("val_acc"), data.num_classes)
    if warning:
        log.warning("%s", warning)
        info["teacher_warning"] = "; ".join(filter(None, [info.get("teacher_warning"), warning]))
    return teacher, checkpoint, info


def prepare_teacher(ctx: Context, store: TeacherStore, feature_names: tuple[str, ...] = ()) -> TeacherSource:
    """Load, find or train the teacher; serve its logits (and the named intermediate
    features a loss asks for) from the cache when exact: per view with augmentation."""
    plan, data, device = ctx.plan, ctx.data, ctx.device
    if feature_names:  # a wrong layer name is refused before a teacher is trained
        model = plan.build(plan.teacher.recipe.model, num_classes=data.num_classes)
        check_layers(model, feature_names, TEACHER_LAYER)
    teacher, checkpoint, info = _load_teacher(ctx, store)
    data_key = f"{data.fingerprint}\0{data.mean}\0{data.std}"

    if data.augment:
        k = plan.teacher.views
        if k is not None and not feature_names:
            return _cached_views(ctx, store, teacher, checkpoint["digest"], data_key, k, info)
        # Fresh random views every step, or features per view (too large to cache).
        why = "teacher.views=online" if k is None else f"loss {plan.loss._target_} reads teacher features"
        log.info("data.augment with %s: running the teacher online at every step", why)

        forward = with_features(teacher, feature_names, TEACHER_LAYER)

        @torch.no_grad()
        def online(idx: torch.Tensor, inputs: torch.Tensor, slots: torch.Tensor | None) -> tuple:
            return forward(inputs)

        info["teacher_signal"] = "online"
        return TeacherSource(online, info)

    examples, classes = len(ctx.train_images), data.num_classes
    bar = plan.trainer.progress
    logits, computed = store.logits(
        checkpoint["digest"],
        data_key,
        lambda: predict_logits(teacher, ctx.train_images, ctx.preprocess, desc="teacher logits", bar=bar).cpu(),
        tensor_fits((examples, classes), (torch.float32,)),
    )
    logits = logits.to(device)
    log.info("teacher logits: %s", "computed and cached" if computed else "read from cache")
    features: dict[str, torch.Tensor] = {}
    if feature_names:
        cached, computed = store.logits(
            checkpoint["digest"],
            f"{data_key}\0features:{','.join(feature_names)}",
            lambda: predict_features(
                teacher, ctx.train_images, ctx.preprocess, feature_names, desc="teacher features", bar=bar
            ),
            dict_fits(**{name: tensor_fits((examples, ...), (torch.float16,)) for name in feature_names}),
        )
        features = {name: cached[name].to(device) for name in feature_names}  # float16 on the device
        log.info("teacher features %s: %s", feature_names, "computed and cached" if computed else "read from cache")
    info["teacher_signal"] = "cache"

    def cached_signal(idx: torch.Tensor, inputs: torch.Tensor, slots: torch.Tensor | None) -> tuple:
        return logits[idx], {name: values[idx] for name, values in features.items()}

    return TeacherSource(cached_signal, info)


def _cached_views(
    ctx: Context, store: TeacherStore, teacher: nn.Module, digest: str, data_key: str, k: int, info: dict[str, Any]
) -> TeacherSource:
    """The teacher's logits for K fixed views of every training image, from the store
    (computed once, view by view, resumably)."""
    view_seed = ctx.plan.teacher.view_seed
    bar = tqdm(total=k, desc="teacher views", disable=not ctx.plan.trainer.progress, leave=False)
    started = time.perf_counter()

    def on_column(column: int, built: bool) -> None:
        bar.update(1)
        if built:
            log.info(
                "teacher view %d/%d computed and cached (%.0f s so far)", column + 1, k, time.perf_counter() - started
            )

    def column(views: torch.Tensor) -> torch.Tensor:
        return predict_logits(teacher, ctx.train_images, ctx.preprocess, views=views.to(ctx.device)).half().cpu()

    logits, orders = store.view_logits(
        digest,
        data_key,
        view_seed,
        k,
        lambda: view_orders(len(ctx.train_images), view_seed),
        column,
        (len(ctx.train_images), ctx.data.num_classes),
        on_column,
    )
    bar.close()
    logits, orders = logits.to(ctx.device), orders.to(ctx.device)
    log.info("teacher logits for %d view(s) per image ready (%.0f s)", k, time.perf_counter() - started)
    info.update(teacher_signal="views", teacher_views=k, teacher_view_seed=view_seed)

    def view_signal(idx: torch.Tensor, inputs: torch.Tensor, slots: torch.Tensor | None) -> tuple:
        return logits[idx, slots].float(), {}

    return TeacherSource(view_signal, info, views=orders)


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def publish(store: TeacherStore, checkpoint: dict) -> None:
    """A CE-trained model is exactly what the store would build from its recipe (as a
    teacher, or as a KD run's baseline): publish it, never losing the run for it."""
    key = identity.key("model", **checkpoint["spec"])
    try:
        if store.publish(key, checkpoint):
            log.info("published to the store as %s (a later KD run reuses it)", key)
    except OSError as err:
        log.warning("could not publish to the store %s (%s); the run's results are kept", store.root, err)


def ce_baseline(recipe: Recipe, ctx: Context, store: TeacherStore, seed: int) -> dict:
    """The CE student of the same seed and recipe (from the store, trained once)."""
    base, built = stored_ce_model(recipe, ctx, store, desc=f"CE baseline seed {seed}")
    return {
        "val_acc": base.get("val_acc"),
        "test_acc": base.get("test_acc"),
        "checkpoint": base["path"],
        "source": "trained" if built else "store",
    }
