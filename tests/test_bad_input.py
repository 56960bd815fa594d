"""Bad settings are refused before training: one line naming the key, non-zero exit, no results."""

from pathlib import Path

import pytest
import torch

from kd.models import LightNN
from kd.storage import save_checked
from kd.teacher import make_checkpoint
from tests.conftest import FAST, run_py

pytestmark = pytest.mark.slow


def _checkpoints(tmp: Path) -> dict[str, Path]:
    files = {}
    torch.manual_seed(0)
    files["student"] = tmp / "student.pt"
    save_checked(make_checkpoint(LightNN(), "kd.models.LightNN", 10), files["student"])
    files["truncated"] = tmp / "truncated.pt"
    data = files["student"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 3])  # cut short, checksum kept beside it
    (tmp / "truncated.pt.sha256").write_bytes((tmp / "student.pt.sha256").read_bytes())
    files["garbage"] = tmp / "garbage.pt"
    files["garbage"].write_text("not a checkpoint")
    files["five_classes"] = tmp / "five.pt"
    from kd.models import DeepNN

    save_checked(make_checkpoint(DeepNN(num_classes=5), "kd.models.DeepNN", 5), files["five_classes"])
    return files


CASES = [
    (["loss=kd", "loss.temperature=0"], "loss.temperature must be in (0, 1000]"),
    (["loss=kd", "loss.alpha=1.5"], r"loss.alpha must be in [0, 1]"),
    (["trainer.epochs=0"], "trainer.epochs must be >= 1"),
    (["trainer.batch_size=0"], "trainer.batch_size must be >= 1"),
    (["optim.lr=-0.1"], "optim.lr must be > 0"),
    (["data.val_size=-5"], "data.val_size must be >= 0"),
    (["data.val_size=256"], "data.val_size=256 must be >= 0 and smaller than the 256 training examples"),
    (["data=folder", "data.root=/no/such/dir"], "data.root=/no/such/dir does not exist"),
    (["data=folder", "data.root={tmp}"], "has no train/ folder"),
    (["data=folder", "data.root={tree}"], "holds no images"),
    (["loss=kd", "teacher.checkpoint=/no/such.pt"], "teacher.checkpoint=/no/such.pt does not exist"),
    (["loss=kd", "teacher.checkpoint={truncated}"], "truncated or corrupt"),
    (["loss=kd", "teacher.checkpoint={garbage}"], "truncated or not a checkpoint"),
    (["loss=kd", "teacher.checkpoint={student}"], "holds a kd.models.LightNN, but teacher.model is kd.models.DeepNN"),
    (["loss=kd", "teacher.checkpoint={five_classes}"], "trained for 5 classes, but the data has 10"),
]
CASES += [
    (["trainer.device=cpu:abc"], "trainer.device must be auto, cpu, cuda, cuda:N or mps, got 'cpu:abc'"),
    (["logger=mlflow", "logger.tracking_uri=nosuchscheme://x"], "logger.tracking_uri=nosuchscheme://x cannot be used"),
]
if not torch.cuda.is_available():
    CASES.append((["trainer.device=cuda"], "trainer.device=cuda but no CUDA device is available"))


@pytest.mark.parametrize(("overrides", "message"), CASES, ids=[c[1][:40] for c in CASES])
def test_bad_input_is_refused_in_one_line(workdir, overrides, message):
    files = _checkpoints(workdir)
    tree = workdir / "tree"
    for split in ("train", "test"):
        (tree / split / "cat").mkdir(parents=True)  # class folders with no images
    args = [o.format(tmp=workdir, tree=tree, **files) for o in overrides]
    other_data = any(a.startswith("data=") for a in args)
    fast = [a for a in FAST if not (other_data and a.startswith("data"))]
    proc = run_py([*fast, *args, "hydra.run.dir=out"], cwd=workdir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd: error: "), proc.stderr
    assert message.format(tmp=workdir) in lines[0]
    assert not (workdir / "out" / "metrics.json").exists() and not (workdir / "out" / "model.pt").exists()
    assert not (workdir / "cache" / "store" / "models").exists()  # no teacher was trained either


def test_unknown_group_option_is_refused_by_hydra(workdir):
    proc = run_py([*FAST, "model=resnet", "hydra.run.dir=out"], cwd=workdir)
    assert proc.returncode != 0 and "model" in proc.stderr and "resnet" in proc.stderr
    assert not (workdir / "out" / "metrics.json").exists()
