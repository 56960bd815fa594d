"""``run.py`` end to end in a subprocess, on tiny synthetic data."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, read_metrics, run_py

pytestmark = pytest.mark.slow


def test_ce_run_writes_metrics_and_checkpoint(workdir):
    proc = run_py([*FAST, "hydra.run.dir=out/ce"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    metrics = read_metrics(workdir / "out/ce")
    assert metrics["status"] == "completed"
    assert (metrics["model"], metrics["loss"], metrics["params"]) == ("LightNN", "ce", 267_738)
    assert metrics["temperature"] is None and metrics["alpha"] is None
    assert metrics["epochs"] == 1 and metrics["seed"] == 42 and metrics["device"] == "cpu"
    assert 0 <= metrics["val_acc"] <= 100 and 0 <= metrics["test_acc"] <= 100
    assert metrics["objective"] == "val_acc" and metrics["train_seconds"] > 0
    # What the student costs: FLOPs pinned (1,296,896 multiply-adds), timing on this run's CPU.
    assert metrics["flops"] == 2_593_792 and metrics["input_shape"] == [3, 32, 32]
    assert metrics["latency_ms"] > 0 and metrics["throughput"] > 0
    assert metrics["cost"]["device"] == "cpu" and metrics["cost"]["throughput_batch_size"] == 256
    assert metrics["cost"]["threads"] == metrics["num_threads"]
    assert metrics["flush_denormal"] is True  # trainer.flush_denormal (default on): x86 supports it
    assert (workdir / "out/ce/model.pt").stat().st_size > 1_000_000  # 267,738 float32 weights


def test_bf16_autocast_trains_on_the_cpu_and_is_recorded(workdir):
    runs = {
        amp: run_py([*FAST, f"trainer.amp={amp}", f"hydra.run.dir=out/{amp}"], cwd=workdir) for amp in ("off", "bf16")
    }
    for amp, proc in runs.items():
        assert proc.returncode == 0, proc.stderr
        assert read_metrics(workdir / "out" / amp)["amp"] == amp
    assert "bf16 autocast (trainer.amp=bf16)" in runs["bf16"].stdout
    weights = {amp: torch.load(workdir / "out" / amp / "model.pt", weights_only=True)["state_dict"] for amp in runs}
    assert weights["bf16"].keys() == weights["off"].keys()
    # Same seed and batches: only the forward's precision differs, so the weights do too.
    assert any(not torch.equal(weights["bf16"][k], weights["off"][k]) for k in weights["off"])
    assert all(v.dtype == torch.float32 for v in weights["bf16"].values())  # master weights stay float32


def test_kd_trains_the_teacher_once_then_reuses_it(workdir):
    first = run_py([*FAST, "loss=kd", "loss.temperature=4", "loss.alpha=0.5", "hydra.run.dir=out/kd1"], cwd=workdir)
    assert first.returncode == 0, first.stderr
    m1 = read_metrics(workdir / "out/kd1")
    assert (m1["loss"], m1["temperature"], m1["alpha"]) == ("kd", 4.0, 0.5)
    assert m1["teacher_source"] == "trained" and m1["teacher_signal"] == "cache"
    assert Path(m1["teacher_checkpoint"]).is_file()
    assert (m1["teacher_params"], m1["teacher_flops"]) == (1_186_986, 188_491_776)  # DeepNN, forward
    assert torch.load(m1["teacher_checkpoint"], weights_only=True)["flops"] == 188_491_776  # stored with it

    second = run_py([*FAST, "loss=kd", "loss.temperature=8", "hydra.run.dir=out/kd2"], cwd=workdir)
    assert second.returncode == 0, second.stderr
    m2 = read_metrics(workdir / "out/kd2")
    assert m2["teacher_source"] == "store" and m2["teacher_checkpoint"] == m1["teacher_checkpoint"]
    assert "training it once" not in second.stdout + second.stderr


def test_seed_teacher_run_is_reused_by_seed_kd(workdir):
    teacher = run_py(["experiment=seed_teacher", *FAST, "data.val_size=0", "hydra.run.dir=out/t"], cwd=workdir)
    assert teacher.returncode == 0, teacher.stderr
    teacher_metrics = read_metrics(workdir / "out/t")
    assert teacher_metrics["objective"] == "val_acc" and teacher_metrics["objective_value"] is None  # no val split
    # The student's own seed, lr and epochs differ from the teacher recipe's: same teacher.
    kd = run_py(
        ["experiment=seed_kd", *FAST, "data.val_size=0", "seed=7", "optim.lr=3e-3", "trainer.epochs=2"], cwd=workdir
    )
    assert kd.returncode == 0, kd.stderr
    kd_metrics = read_metrics(next((workdir / "outputs").glob("*/*")))
    assert kd_metrics["teacher_source"] == "store"
    assert kd_metrics["teacher_test_acc"] == pytest.approx(teacher_metrics["test_acc"])


def test_basic_multirun_writes_one_metrics_file_per_job(workdir):
    proc = run_py(
        ["-m", *FAST, "loss=kd", "loss.temperature=1,4", "loss.alpha=0.25,0.75", "hydra.sweep.dir=sweep"], cwd=workdir
    )
    assert proc.returncode == 0, proc.stderr
    found = sorted((workdir / "sweep").glob("*/metrics.json"))
    assert len(found) == 4
    settings = {(m["temperature"], m["alpha"]) for m in (json.loads(f.read_text()) for f in found)}
    assert settings == {(1.0, 0.25), (1.0, 0.75), (4.0, 0.25), (4.0, 0.75)}


def test_diverging_run_stops_with_one_line_and_records_where(workdir):
    proc = run_py(
        [*FAST, "trainer.epochs=2", "optim.lr=1e30", "trainer.check_every=1", "hydra.run.dir=out/nan"], cwd=workdir
    )
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1].startswith("kd: error: training diverged")
    metrics = read_metrics(workdir / "out/nan")
    assert metrics["status"] == "diverged" and metrics["diverged_epoch"] == 1 and metrics["diverged_step"] >= 1
    assert not (workdir / "out/nan/model.pt").exists()


def test_parallel_kd_jobs_train_the_missing_teacher_once(workdir):
    proc = run_py(
        [
            "-m",
            *FAST,
            "loss=kd",
            "loss.temperature=2,4",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "hydra.sweep.dir=sweep",
        ],
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [read_metrics(workdir / "sweep" / str(i)) for i in (0, 1)]
    assert sorted(r["teacher_source"] for r in runs) == ["store", "trained"]
    assert runs[0]["teacher_checkpoint"] == runs[1]["teacher_checkpoint"]
    stored = [torch.load(p, weights_only=True)["spec"] for p in (workdir / "cache/store/models").glob("*/model.pt")]
    assert [s["model"]["_target_"] for s in stored].count("kd.models.DeepNN") == 1
