"""No input makes kd delete or truncate a file it did not write: every path-valued key,
pointed at a file of the user's, ends in one line with its exit code, and the file and
its folder are exactly as they were."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF, FAST, REPO, run_py
from tests.test_data import make_folder

pytestmark = pytest.mark.slow

USER_BYTES = b"SQLite format 2 -- a user's own notes, not kd's\n" * 40
SWEEP = ["-m", "hparams_search=kd", "hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=mine"]

# Each path-valued key: the command that points it at the user's file {file}, and the
# exit code (2: bad input, 4: a destination or storage that cannot be used).
CASES: dict[str, tuple[list[str], int]] = {
    "paths.cache_dir": (["paths.cache_dir={file}"], 4),
    "paths.store_dir": (["paths.store_dir={file}"], 4),
    "paths.data_dir": (["data=cifar10", "data.download=false", "paths.data_dir={file}"], 2),
    "data.root": (["data=folder", "data.root={file}"], 2),
    "data.cache_dir": (["data=folder", "data.root={images}", "data.val_size=2", "data.cache_dir={file}"], 4),
    "teacher.checkpoint": (["loss=kd", "teacher.checkpoint={file}"], 2),
    "hydra.run.dir": (["hydra.run.dir={file}"], 4),
    "hydra.output_subdir": (["hydra.output_subdir={file}"], 4),
    "hydra.sweep.dir": (["-m", "seed=1,2", "hydra.sweep.dir={file}"], 4),
    "hydra.sweep.subdir": (["-m", "seed=1,2", "hydra.sweep.subdir={file}"], 4),
    "hydra.sweeper.storage": ([*SWEEP, "hydra.sweeper.storage=sqlite:///{file}"], 4),
    "hydra.sweeper.storage (journal)": ([*SWEEP, "hydra.sweeper.storage=journal://{file}"], 4),
    "logger.tracking_uri": (["logger=mlflow", "logger.tracking_uri=sqlite:///{file}"], 2),
    "logger.subdir": (["logger=tensorboard", "logger.subdir={file}"], 4),
    "logger.directory": (["logger=wandb", "logger.mode=offline", "logger.directory={file}"], 2),
}
# Keys Hydra sets itself or that hold no path.
NOT_USER_PATHS = {"hydra.runtime.output_dir", "hydra.job.chdir"}


def _leaves(node, prefix: str = ""):
    if OmegaConf.is_dict(node):
        for key in node:
            yield from _leaves(node._get_node(key), f"{prefix}{key}.")
    elif not OmegaConf.is_list(node):
        yield prefix[:-1]


def test_every_path_valued_key_is_covered():
    """A new path-valued key fails here until it has a case above."""
    found = set()
    for overrides in (
        ["data=folder", "data.root=/x", "logger=mlflow", "hparams_search=kd"],
        ["logger=tensorboard"],
        ["logger=wandb"],
    ):
        with initialize_config_dir(config_dir=str(CONF)):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        found |= {k for k in _leaves(cfg) if re.search(r"(dir|directory|root|checkpoint|storage|uri|path|file)$", k)}
    covered = {key.split(" ")[0] for key in CASES}
    assert found - NOT_USER_PATHS == covered, (found - NOT_USER_PATHS) ^ covered


def _user_file(tmp_path: Path) -> tuple[Path, dict]:
    mine = tmp_path / "mine"
    mine.mkdir()
    file = mine / "notes.db"
    file.write_bytes(USER_BYTES)
    return file, _state(mine)


def _state(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def _one_line(stderr: str) -> list[str]:
    """stderr's lines that are not log records (those start with a timestamp)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_path_key_pointed_at_a_users_file_stops_in_one_line_and_destroys_nothing(workdir, case):
    file, before = _user_file(workdir)
    images = make_folder(workdir / "images", per_class=3)
    args, code = CASES[case]
    args = [a.format(file=file, images=images) for a in args]
    other_data = any(a.startswith("data=") for a in args)  # FAST's data keys are synthetic's
    proc = run_py([*(a for a in FAST if not (other_data and a.startswith("data"))), *args], cwd=workdir)
    lines = _one_line(proc.stderr)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and re.match(r"kd(_optuna)?: error: ", lines[0]), proc.stderr[-3000:]
    assert _state(file.parent) == before  # the file, its bytes and its folder as they were


@pytest.mark.parametrize(
    ("module", "args", "code"),
    [
        ("kd.report", ["{workdir}", "--out", "{file}"], 2),
        ("kd.export", ["{file}"], 2),
    ],
)
def test_the_tools_pointed_at_a_users_file_stop_in_one_line_and_destroy_nothing(workdir, module, args, code):
    file, before = _user_file(workdir)
    args = [a.format(file=file, workdir=workdir) for a in args]
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(_one_line(proc.stderr)) == 1, proc.stderr[-2000:]
    assert _state(file.parent) == before
