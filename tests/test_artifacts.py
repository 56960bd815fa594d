"""hydra.sweeper.artifacts: each trial's files in Optuna's artifact store, fetched back by
study and trial after its run folder is gone."""

from __future__ import annotations

import shutil
import subprocess
import sys

import optuna
import pytest
from conftest import FAST, run_py

from hydra_plugins.kd_sweeper import artifacts, job
from kd.errors import CheckpointError
from kd.export import fetch_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sweep_study(tmp_path, keep: bool = True) -> tuple[str, dict]:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    if keep:
        study.set_user_attr(artifacts.ARTIFACTS, artifacts.where(tmp_path / "store"))
    study.ask()
    env = {job.STORAGE_ENV: storage, job.STUDY_ENV: "s", job.TRIAL_ENV: "0"}
    return storage, env


def test_a_job_uploads_to_its_trial_and_the_files_come_back_by_trial(tmp_path):
    storage, env = _sweep_study(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"weights")
    (tmp_path / "metrics.json").write_text("{}")
    assert job.upload(tmp_path / "model.pt", env) is None  # the sweep keeps no artifacts: nothing
    env[job.ARTIFACTS_ENV] = artifacts.where(tmp_path / "store")
    first = job.upload(tmp_path / "model.pt", env)
    job.upload(tmp_path / "metrics.json", env)
    assert first and (tmp_path / "store" / first).read_bytes() == b"weights"
    study = optuna.load_study(study_name="s", storage=storage)
    fetched = artifacts.fetch(study, 0, tmp_path / "back")
    assert sorted(p.name for p in fetched) == ["metrics.json", "model.pt"]
    assert (tmp_path / "back" / "model.pt").read_bytes() == b"weights"
    artifacts.fetch(study, 0, tmp_path / "back")  # fetched again: replaced, not refused
    assert len(artifacts.fetch(study, 0, tmp_path / "new" / "deep")) == 2  # parents made
    with pytest.raises(ValueError, match="has no trial 5"):
        artifacts.fetch(study, 5, tmp_path / "x")


def test_fetching_says_why_there_is_nothing(tmp_path):
    storage, _ = _sweep_study(tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    with pytest.raises(ValueError, match=r"trial 0 of s uploaded no files \(state RUNNING\)"):
        artifacts.fetch(study, 0, tmp_path / "x")
    (tmp_path / "other").mkdir()
    storage2, _ = _sweep_study(tmp_path / "other", keep=False)
    with pytest.raises(ValueError, match="kept no artifacts"):
        artifacts.fetch(optuna.load_study(study_name="s", storage=storage2), 0, tmp_path / "y")
    with pytest.raises(CheckpointError, match=r"^--study .* is neither a sweep folder nor a storage URL"):
        fetch_trial(str(tmp_path / "nowhere"), 0, tmp_path / "z")


def test_buckets_map_to_optunas_cloud_stores_and_folders_are_made(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(optuna.artifacts, "Boto3ArtifactStore", lambda bucket: made.append(("s3", bucket)) or "s3")
    monkeypatch.setattr(optuna.artifacts, "GCSArtifactStore", lambda bucket: made.append(("gs", bucket)) or "gs")
    assert artifacts.store("s3://my-bucket") == "s3" and artifacts.store("gs://other") == "gs"
    assert made == [("s3", "my-bucket"), ("gs", "other")]
    deep = tmp_path / "a" / "b" / "store"
    assert isinstance(artifacts.store(str(deep)), optuna.artifacts.FileSystemArtifactStore) and deep.is_dir()


def test_where_makes_folders_absolute_and_leaves_buckets():
    assert artifacts.where(None) is None and artifacts.where("") is None
    assert artifacts.where("s3://bucket/kd") == "s3://bucket/kd" and artifacts.where("gs://b") == "gs://b"
    assert artifacts.where("rel/store").startswith("/") and artifacts.where("rel/store").endswith("rel/store")


@pytest.mark.slow
def test_a_trials_student_is_exported_from_the_study_after_its_run_folder_is_deleted(workdir):
    args = ["-m", "hparams_search=kd", *FAST, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=kept"]
    proc = run_py(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = workdir / "multirun" / "kept"
    study = optuna.load_study(study_name="kept", storage=f"sqlite:///{sweep / 'optuna.db'}")
    kept = optuna.artifacts.get_all_artifact_meta(study.trials[1], storage=study._storage)
    assert sorted(m.filename for m in kept) == ["config.yaml", "metrics.json", "model.pt"]
    shutil.rmtree(sweep / "1")
    export = subprocess.run(
        [sys.executable, "-m", "kd.export", "--study", str(sweep), "--trial", "1", "--format", "pt2", "back"],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    assert "fetched trial 1 of" in export.stdout and (workdir / "back" / "model.pt2").is_file()
    assert (workdir / "back" / ".hydra" / "config.yaml").is_file()
    missing = subprocess.run([sys.executable, "-m", "kd.export", "--study", str(sweep)], cwd=workdir,
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "--study and --trial" in missing.stderr
