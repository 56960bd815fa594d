"""Each trial's files in Optuna's artifact store: ``hydra.sweeper.artifacts=<where>``.

``where`` is a folder (Optuna's ``FileSystemArtifactStore``), ``s3://<bucket>`` or
``gs://<bucket>`` (its boto3 and Google Cloud stores, with their packages installed).
The sweeper records it on the study (user attribute ``artifacts``) and tells each job
(``KD_OPTUNA_ARTIFACTS``); a job uploads what it wants kept with
:func:`hydra_plugins.kd_sweeper.job.upload`, linked from its trial. :func:`fetch` gets a
trial's files back by study and trial number, whatever happened to its run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

from hydra_plugins.kd_sweeper import _compat

ARTIFACTS = "artifacts"  # the study's user attribute: where its trials' files are


def where(spec: Any) -> str | None:
    """``hydra.sweeper.artifacts`` as jobs and readers see it: a bucket URL as given, a
    folder made absolute (jobs may run elsewhere); None when unset."""
    if not spec:
        return None
    text = str(spec)
    return text if text.startswith(("s3://", "gs://")) else str(Path(text).expanduser().resolve())


def store(location: str) -> Any:
    """The Optuna artifact store at ``location`` (see :func:`where`)."""
    scheme, _, bucket = location.partition("://")
    if scheme == "s3":
        return optuna.artifacts.Boto3ArtifactStore(bucket)
    if scheme == "gs":
        return optuna.artifacts.GCSArtifactStore(bucket)
    Path(location).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(location)


def fetch(study: optuna.Study, number: int, dest: Path) -> list[Path]:
    """Download trial ``number``'s files into ``dest``; a ValueError says why there are none."""
    location = study.user_attrs.get(ARTIFACTS)
    if not location:
        raise ValueError(f"study {study.study_name} kept no artifacts (its sweep ran without hydra.sweeper.artifacts)")
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials:
        raise ValueError(f"study {study.study_name} has no trial {number}")
    metas = get_all_artifact_meta(trials[0], storage=_compat.study_storage(study))
    if not metas:
        raise ValueError(f"trial {number} of {study.study_name} uploaded no files (state {trials[0].state.name})")
    dest.mkdir(parents=True, exist_ok=True)
    fetched = []
    for meta in metas:
        path = dest / Path(meta.filename).name
        if path.exists():
            path.unlink()  # download_artifact never overwrites
        download_artifact(artifact_store=store(location), file_path=str(path), artifact_id=meta.artifact_id)
        fetched.append(path)
    return fetched
