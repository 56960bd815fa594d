"""Exact resume: a killed run continues from its last checkpoint and ends with the
weights of a run that was never stopped."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from kd.batches import BatchStream, Preprocess
from kd.engine import fit
from kd.losses import CrossEntropy
from kd.resume import ResumeFile, rng_state, set_rng_state
from kd.views import RandomViews
from tests.conftest import run_py, start_py

# A teacher (it has dropout, so its random state matters) on 5 batches per epoch.
RUN = [
    "model=teacher",
    "data=synthetic",
    "data.train_size=384",
    "data.test_size=128",
    "data.val_size=64",
    "trainer.epochs=4",
    "trainer.batch_size=64",
    "trainer.progress=false",
    "trainer.device=cpu",
    "trainer.num_threads=1",
    "trainer.checkpoint_every_s=0.2",
]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Stop(Exception):
    pass


def _train(resume: ResumeFile | None, stop_after_epoch: int | None = None) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 4, (96,))
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)

    def on_epoch(entry: dict) -> None:
        if stop_after_epoch is not None and entry["epoch"] == stop_after_epoch:
            raise Stop  # killed before the epoch's end was saved: the last save is mid-epoch

    result = fit(
        model, CrossEntropy(), optimizer, BatchStream(images, labels, torch.arange(96), batch_size=16, seed=3),
        Preprocess((0.5,) * 3, (0.25,) * 3, torch.device("cpu")), 3,
        scheduler=scheduler, augment=RandomViews(seed=5), progress=False, on_epoch=on_epoch, resume=resume,
    )  # fmt: skip
    return model, result.history


def test_fit_resumed_mid_epoch_ends_as_an_uninterrupted_fit(tmp_path, caplog):
    reference, history = _train(None)
    resume = ResumeFile(tmp_path / "r.pt", every_s=0.0)  # a save after every step
    with pytest.raises(Stop):
        _train(resume, stop_after_epoch=2)
    with caplog.at_level(logging.INFO, logger="kd.engine"):
        resumed, resumed_history = _train(resume)
    assert "resuming from epoch 2, step 5" in caplog.text  # 6 steps per epoch; the 6th was not saved
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in history]  # all but the wall time
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in resumed_history] == strip


def test_a_resume_file_round_trips_every_random_state(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    state = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    resume = ResumeFile(tmp_path / "s.pt")
    resume.save({"rng": state})
    set_rng_state(resume.load()["rng"])
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and (expected[2] == again[2]).all()


def test_a_damaged_or_foreign_resume_file_is_refused_and_moved_aside(tmp_path, caplog):
    resume = ResumeFile(tmp_path / "d.pt")
    resume.save({"epoch": 2})
    assert resume.load()["epoch"] == 2
    data = bytearray(resume.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    resume.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kd.resume"):
        assert resume.load() is None
    assert f"resume checkpoint {resume.path} is damaged (its checksum does not match) (kept as d.pt.bad-" in caplog.text
    assert caplog.text.rstrip().endswith("): starting over")
    assert not resume.path.exists()
    (aside,) = tmp_path.glob("d.pt.bad-*")  # moved aside, never deleted
    assert aside.read_bytes() == bytes(data)
    from kd.storage import save_checked

    save_checked({"weights": torch.zeros(1)}, resume.path)  # a checkpoint, but not a resume file
    assert resume.load() is None and "it is not a kd resume file" in caplog.text


def test_a_save_torn_by_a_kill_falls_back_to_the_previous_one(tmp_path, caplog):
    resume = ResumeFile(tmp_path / "t.pt")
    for epoch in (1, 2, 3):
        resume.save({"epoch": epoch})
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["t.b.pt", "t.pt"]
    assert ResumeFile(resume.path).load()["epoch"] == 3  # the newest of the two slots
    # Killed between writing save 4's bytes and its checksum: slot t.b.pt holds new bytes.
    (tmp_path / "t.b.pt").write_bytes(b"save 4, never finished")
    again = ResumeFile(resume.path)
    with caplog.at_level(logging.WARNING, logger="kd.resume"):
        assert again.load()["epoch"] == 3
    assert caplog.text == ""  # nothing lost worth a warning: the whole previous save is there
    again.save({"epoch": 4})  # continues the sequence into the torn slot
    assert ResumeFile(resume.path).load()["epoch"] == 4 and (tmp_path / "t.b.pt").stat().st_size > 100
    again.remove()
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_resume_file_costs_the_resume_not_the_run(tmp_path, caplog):
    (tmp_path / "ro").write_text("a file where a folder should be")
    resume = ResumeFile(tmp_path / "ro" / "r.pt")
    with caplog.at_level(logging.WARNING, logger="kd.resume"):
        resume.save({"epoch": 1})
        resume.save({"epoch": 2})
    assert caplog.text.count("cannot write resume checkpoint") == 1 and not resume.enabled


def test_removing_a_resume_file_removes_its_checksum_and_stamp_and_never_fails(tmp_path):
    resume = ResumeFile(tmp_path / "x.pt")
    resume.save({"epoch": 1})
    resume.load()  # verified: stamped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt", "x.pt.sha256", "x.pt.verified"]
    resume.remove()
    assert list(tmp_path.iterdir()) == []
    resume.remove()  # nothing there: fine
    (tmp_path / "blocker").write_text("")
    ResumeFile(tmp_path / "blocker" / "y.pt").remove()  # an unusable store: fine too


def test_resume_never_neither_reads_nor_writes(tmp_path):
    off = ResumeFile(tmp_path / "n.pt", enabled=False)
    off.save({"epoch": 3})
    assert not off.path.exists()
    ResumeFile(off.path).save({"epoch": 3})
    assert off.load() is None and ResumeFile(off.path).load()["epoch"] == 3


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def _save_times(slots: Path) -> dict[Path, int]:
    times = {}
    for path in slots.glob("*.pt") if slots.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # replaced between listing and stat
            times[path] = path.stat().st_mtime_ns
    return times


def _kill_after_epoch(workdir: Path, epoch: int) -> None:
    proc = start_py([*RUN, "hydra.run.dir=killed"], cwd=workdir)
    log, deadline = workdir / "killed" / "run.log", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and f"epoch {epoch}/4: loss" in log.read_text():
            break
        time.sleep(0.1)
    # Into the next epoch, past a mid-epoch save: wait for two saves after that line
    # (the epoch's own save may be the first), not for a guessed time.
    slots = workdir / "cache" / "store" / "resume"
    seen = _save_times(slots)
    saves = 0
    while saves < 2 and time.time() < deadline and proc.poll() is None:
        now = _save_times(slots)
        saves += sum(1 for p, t in now.items() if seen.get(p) != t)
        seen = now
        time.sleep(0.02)
    assert saves >= 2, "no save came after the epoch's end before the run ended"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (workdir / "killed" / "metrics.json").exists(), "the run finished before it was killed"


@pytest.mark.slow
@pytest.mark.parametrize("damaged", [False, True])
def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_weights(workdir, damaged):
    reference = run_py([*RUN, "trainer.resume=never", "hydra.run.dir=full"], cwd=workdir)
    assert reference.returncode == 0, reference.stderr[-2000:]
    _kill_after_epoch(workdir, epoch=2)
    slots = list((workdir / "cache" / "store" / "resume").glob("*.pt"))
    assert 1 <= len(slots) <= 2  # <key>.pt and <key>.b.pt: saves alternate
    if damaged:
        for saved in slots:
            saved.write_bytes(saved.read_bytes()[:100])
    again = run_py([*RUN, "hydra.run.dir=again"], cwd=workdir)  # another directory: found by what it trains
    assert again.returncode == 0, again.stderr[-2000:]
    log = (workdir / "again" / "run.log").read_text()
    if damaged:
        warnings = [line for line in log.splitlines() if "is damaged" in line]
        assert len(warnings) == 1 and warnings[0].endswith(": starting over") and "resuming" not in log
    else:
        assert "resuming from epoch" in log
    full, resumed = _weights(workdir / "full"), _weights(workdir / "again")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert not list((workdir / "cache" / "store" / "resume").glob("*.pt"))  # done: nothing left to resume


# A KD run that trains and publishes its teacher, caches its logits, trains the student
# with a CE baseline and writes its outputs: every kind of file kd writes.
KD_RUN = [
    "loss=kd",
    "data=synthetic",
    "data.train_size=256",
    "data.test_size=64",
    "data.val_size=64",
    "trainer.epochs=2",
    "teacher.epochs=2",
    "trainer.progress=false",
    "trainer.device=cpu",
    "trainer.num_threads=1",
    "trainer.checkpoint_every_s=0.1",
]


@pytest.mark.slow
def test_a_run_killed_at_any_point_leaves_nothing_that_blocks_the_next(workdir):
    """SIGKILL at spread-out moments of a KD run, each kill on the store the last one
    left behind; the next run then finishes with the uninterrupted run's metrics."""
    clean = run_py([*KD_RUN, "hydra.run.dir=clean"], workdir, env={"KD_CACHE_DIR": str(workdir / "clean_cache")})
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed, landed = 0, []
    # Kill each run once its log has this many lines: moments spread over its phases
    # (the teacher, its logits, the student, the CE baseline), each on the store the
    # last kill left, read from the log rather than guessed from a clock.
    for i, lines in enumerate((1, 2, 3, 4, 5, 6)):
        proc = start_py([*KD_RUN, f"hydra.run.dir=killed{i}"], cwd=workdir)
        log = workdir / f"killed{i}" / "run.log"
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= lines:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it may end between poll and kill
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.wait() == -signal.SIGKILL:
            killed += 1
            landed.append(log.read_text().splitlines()[-1].split("] ", 1)[-1][:40] if log.exists() else "")
    assert killed >= 4, f"only {killed} of 6 runs were killed before they finished"
    assert len(set(landed)) >= 3, f"the kills landed in too few places: {landed}"
    final = run_py([*KD_RUN, "hydra.run.dir=final"], cwd=workdir)
    assert final.returncode == 0, final.stderr[-2000:]
    expected = json.loads((workdir / "clean" / "metrics.json").read_text())
    got = json.loads((workdir / "final" / "metrics.json").read_text())
    for key in ("test_acc", "val_acc", "teacher_test_acc"):
        assert got[key] == expected[key], key
