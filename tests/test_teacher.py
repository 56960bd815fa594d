"""The teacher store and the teacher-logit cache: exact, keyed, rebuilt when stale."""

import multiprocessing as mp

import pytest
import torch

from kd.engine import predict_logits
from kd.errors import CheckpointError
from kd.losses import HintonKD, LossInputs
from kd.models import DeepNN, LightNN
from kd.plan import resolve
from kd.provision import prepare_teacher
from kd.recipes import make_context
from kd.storage import build_once, save_checked
from kd.teacher import TeacherStore, load_checkpoint, make_checkpoint

SMALL = ["data=synthetic", "data.train_size=96", "data.test_size=32", "data.val_size=16", "trainer.device=cpu"]


def test_cached_logits_give_the_same_kd_loss_as_the_online_teacher(compose_cfg, tmp_path, teacher_file):
    cfg = compose_cfg("loss=kd", *SMALL, f"teacher.checkpoint={teacher_file}", f"paths.store_dir={tmp_path}/s")
    ctx = make_context(resolve(cfg), torch.device("cpu"))
    source = prepare_teacher(ctx, TeacherStore(cfg.paths.store_dir))
    assert source.info["teacher_signal"] == "cache" and source.info["teacher_source"] == "checkpoint"

    teacher = DeepNN().to(memory_format=torch.channels_last)
    teacher.load_state_dict(load_checkpoint(teacher_file)["state_dict"])
    teacher.eval()
    student, loss_fn = LightNN(), HintonKD(4.0, 0.5)
    from kd.batches import BatchStream

    stream = BatchStream(ctx.train_images, ctx.train_labels, ctx.data.train_idx, batch_size=32, seed=7)
    batches = 0
    for idx, images, labels in stream.epoch(1):  # shuffled: the cache must be indexed by example
        inputs = ctx.preprocess(images)
        with torch.no_grad():
            student_logits = student(inputs)
            online = loss_fn(LossInputs(student_logits, labels, teacher(inputs)))["loss"]
            cached = loss_fn(LossInputs(student_logits, labels, source.signal(idx, inputs, None)[0]))["loss"]
        torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-5)
        batches += 1
    assert batches == 3


def test_an_online_teacher_with_augmentation_caches_nothing(compose_cfg, tmp_path, teacher_file):
    cfg = compose_cfg(
        "loss=kd",
        *SMALL,
        "data.augment=true",
        "teacher.views=online",
        f"teacher.checkpoint={teacher_file}",
        f"paths.store_dir={tmp_path}/s",
    )
    ctx = make_context(resolve(cfg), torch.device("cpu"))
    source = prepare_teacher(ctx, TeacherStore(cfg.paths.store_dir))
    assert source.info["teacher_signal"] == "online" and source.views is None
    assert not (tmp_path / "s" / "logits").exists() and not (tmp_path / "s" / "views").exists()
    x = ctx.preprocess(ctx.train_images[:4])
    assert source.signal(torch.arange(4), x, None)[0].shape == (4, 10)


def test_a_different_teacher_or_dataset_gets_fresh_logits(tmp_path):
    store = TeacherStore(tmp_path)
    calls = []

    def compute(tag):
        def _compute():
            calls.append(tag)
            return torch.full((3, 2), float(len(calls)))

        return _compute

    first, built = store.logits("teacherA", "data1", compute("a1"))
    assert built
    again, built = store.logits("teacherA", "data1", compute("again"))
    assert not built and torch.equal(again, first)
    _, built_b = store.logits("teacherB", "data1", compute("b1"))
    _, built_d = store.logits("teacherA", "data2", compute("a2"))
    assert built_b and built_d and calls == ["a1", "b1", "a2"]


def test_teacher_checkpoint_contents_change_the_cache_key(compose_cfg, tmp_path, teacher_file):
    store_dir = tmp_path / "s"
    cfg = compose_cfg("loss=kd", *SMALL, f"teacher.checkpoint={teacher_file}", f"paths.store_dir={store_dir}")
    ctx = make_context(resolve(cfg), torch.device("cpu"))
    prepare_teacher(ctx, TeacherStore(store_dir))
    torch.manual_seed(2)  # same path, new weights: must not reuse the old logits
    save_checked(make_checkpoint(DeepNN(), "kd.models.DeepNN", 10), teacher_file)
    signal = prepare_teacher(ctx, TeacherStore(store_dir)).signal
    assert len(list((store_dir / "logits").glob("*.pt"))) == 2
    teacher = DeepNN()
    teacher.load_state_dict(load_checkpoint(teacher_file)["state_dict"])
    expected = predict_logits(teacher, ctx.train_images[:8], ctx.preprocess)
    torch.testing.assert_close(signal(torch.arange(8), None, None)[0], expected, rtol=1e-4, atol=1e-5)


def test_truncated_checkpoint_is_reported_not_loaded(tmp_path, teacher_file):
    data = teacher_file.read_bytes()
    teacher_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(teacher_file)
    (tmp_path / "teacher.pt.sha256").unlink()  # without the checksum: torch itself fails to read it
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(teacher_file)


def test_truncated_store_entry_is_rebuilt(tmp_path):
    path = tmp_path / "entry.pt"
    build_once(path, lambda: {"v": 1})
    path.write_bytes(path.read_bytes()[:10])
    value, built = build_once(path, lambda: {"v": 2})
    assert built and value == {"v": 2}


def _build_slowly(path: str, log: str) -> None:
    import time

    def build():
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        return {"weights": torch.ones(3)}

    value, _ = build_once(path, build)
    assert torch.equal(value["weights"], torch.ones(3))


def test_parallel_processes_build_a_missing_artefact_once(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(str(tmp_path / "t.pt"), str(tmp_path / "log"))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (tmp_path / "log").read_text() == "built\n"


def test_a_different_dataset_gets_fresh_logits_from_the_same_teacher(compose_cfg, tmp_path, teacher_file):
    store_dir = tmp_path / "s"
    for data_seed in (0, 1, 0):
        cfg = compose_cfg(
            "loss=kd",
            *SMALL,
            f"data.seed={data_seed}",
            f"teacher.checkpoint={teacher_file}",
            f"paths.store_dir={store_dir}",
        )
        ctx = make_context(resolve(cfg), torch.device("cpu"))
        signal = prepare_teacher(ctx, TeacherStore(store_dir)).signal
        teacher = DeepNN()
        teacher.load_state_dict(load_checkpoint(teacher_file)["state_dict"])
        expected = predict_logits(teacher, ctx.train_images[:8], ctx.preprocess)
        torch.testing.assert_close(signal(torch.arange(8), None, None)[0], expected, rtol=1e-4, atol=1e-5)
    assert len(list((store_dir / "logits").glob("*.pt"))) == 2


def test_a_teacher_near_chance_is_warned_about():
    from kd.provision import near_chance

    assert near_chance(14.9, 10).startswith("the teacher's validation accuracy is 14.9 %, near chance (10.0 %)")
    assert near_chance(15.0, 10) is None and near_chance(None, 10) is None and near_chance(float("nan"), 10) is None
    assert near_chance(1.4, 100) is not None and near_chance(1.6, 100) is None
