"""logger=wandb, offline: the files it writes are read back and hold the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
from conftest import FAST, read_metrics, run_py

from kd.errors import ConfigError

BLOCK, HEADER = 32768, 7  # a .wandb file: LevelDB-log blocks of records, after a 7-byte file header


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file (wandb ships its
    reader in Go only): LevelDB log chunks, each ``crc32 | length | kind`` then its bytes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < HEADER or (length == 0 and kind == 0):  # the block's zero padding
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:  # a whole record
            records.append(chunk)
        elif kind in (2, 3):  # its first or a middle part
            pending += chunk
        elif kind == 4:  # its last part
            records.append(pending + chunk)
            pending = b""
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def _read_run(run_dir: Path) -> dict:
    """An offline run's name, group, config, history and summary, from its records."""
    (path,) = run_dir.parent.glob("run-*.wandb")
    run: dict = {"history": [], "config": {}, "summary": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group, project=record.run.project)
            run["tags"] = list(record.run.tags)
            run["config"].update(_items(record.run.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "history":
            run["history"].append(_items(record.history.item))
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
    return run


@pytest.mark.slow
def test_a_sweeps_trials_are_offline_wandb_runs_grouped_by_study_and_linked_both_ways(workdir):
    pytest.importorskip("wandb")
    args = ["-m", "hparams_search=kd", *FAST, "trainer.epochs=2", "logger=wandb", "logger.mode=offline",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=tracked"]  # fmt: skip
    proc = run_py(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = workdir / "multirun" / "tracked"
    study = optuna.load_study(study_name="tracked", storage=f"sqlite:///{sweep / 'optuna.db'}")
    for trial in study.trials:
        link = trial.user_attrs["wandb_run"]
        run = _read_run(Path(link["dir"]))
        metrics = read_metrics(sweep / str(trial.number))
        assert run["name"] == link["name"] == f"trial {trial.number}" and run["group"] == "tracked"
        assert run["project"] == "kd" and Path(link["dir"]).is_relative_to(sweep / str(trial.number))
        assert run["tags"] == ["study_name=tracked", f"trial_number={trial.number}"]
        val = [(h["_step"], h["val_acc"]) for h in run["history"] if "val_acc" in h]
        assert val == [(h["epoch"], pytest.approx(h["val_acc"])) for h in metrics["history"]]
        assert run["config"]["loss.temperature"] == pytest.approx(trial.params["loss.temperature"])
        assert run["summary"]["final_val_acc"] == pytest.approx(metrics["val_acc"])
        assert run["summary"]["final_flops"] == metrics["flops"] and run["summary"]["status"] == "completed"


def test_wandb_missing_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from kd.tracking import WandbLogger

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"^logger=wandb needs wandb: pip install 'kd\[wandb\]'$"):
        WandbLogger(tmp_path)


def test_a_folder_wandb_cannot_write_to_is_one_line(tmp_path):
    pytest.importorskip("wandb")
    from kd.tracking import WandbLogger

    taken = tmp_path / "a-file"
    taken.write_text("mine")
    logger = WandbLogger(tmp_path, mode="offline", directory=str(taken))
    with pytest.raises(ConfigError) as err:
        logger.start({"seed": 1}, {})
    assert str(err.value).startswith("logger=wandb cannot start (") and "logger.directory" in str(err.value)
    assert "\n" not in str(err.value) and taken.read_text() == "mine"
