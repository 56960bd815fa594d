"""Optuna glue shared by the sweeper and its jobs: storages, voided trials, reporting.

The sweeper (``hydra_plugins/kd_sweeper``) asks trials and launches jobs; a job that
knows its trial (``trial.number``) reports its validation accuracy after every epoch
to that trial through the study's storage and asks the pruner whether to stop.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from kd.errors import Pruned

log = logging.getLogger(__name__)

# Optuna's own handler colours its lines; send them through the run's handlers instead,
# in the one plain format of conf/hydra/*_logging/kd.yaml.
optuna.logging.disable_default_handler()
optuna.logging.enable_propagation()

VOID_PREFIX = "kd:void:"  # study user attribute per voided trial: kd:void:<number> -> reason
WORKER = "kd:worker"  # trial user attribute: host:pid of the sweeper that launched it
JOURNAL = "journal://"


def open_storage(url: Any) -> Any:
    """An Optuna storage for ``url``: RDB URLs as they are; ``journal:///path/study.log``
    is a journal file (workers on several machines sharing a file system, no server)."""
    if isinstance(url, str) and url.startswith(JOURNAL):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = url[len(JOURNAL) :]
        return JournalStorage(JournalFileBackend(path))
    return url


def voided(study: optuna.Study) -> dict[int, str]:
    """Trial number -> why it was voided (it counts for nothing)."""
    return {int(k[len(VOID_PREFIX) :]): v for k, v in study.user_attrs.items() if k.startswith(VOID_PREFIX)}


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials that count towards ``n_trials`` (all but voided ones)."""
    void = voided(study)
    return [t for t in study.get_trials(deepcopy=False) if t.number not in void]


class TrialReporter:
    """Reports one job's per-epoch validation accuracy to its trial; raises :class:`Pruned`
    when the study's pruner says stop."""

    def __init__(self, storage: Any, study_name: str, trial_number: int, pruner: Any = None) -> None:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage), pruner=pruner)
        frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == trial_number), None)
        if frozen is None:
            raise LookupError(f"trial {trial_number} is not in study {study_name}")
        # Optuna has no public lookup of a live trial by number; its id is the handle.
        self.trial = optuna.trial.Trial(study, frozen._trial_id)
        self.prunes = pruner is not None

    def __call__(self, step: int, value: float) -> None:
        self.trial.report(value, step)
        if self.prunes and self.trial.should_prune():
            raise Pruned(step, value)


def reporter_for(cfg: Any, sweeper_cfg: Any) -> TrialReporter | None:
    """The reporter of a job launched by ``kd_optuna`` (None for any other run)."""
    number = cfg.trial.get("number") if "trial" in cfg else None
    study_name = cfg.trial.get("study_name") if "trial" in cfg else None
    if number is None or study_name is None or sweeper_cfg is None or sweeper_cfg.get("storage") is None:
        return None
    return TrialReporter(sweeper_cfg.storage, str(study_name), int(number), build_pruner(sweeper_cfg.get("pruner")))


def build_pruner(pruner_cfg: Any) -> optuna.pruners.BasePruner | None:
    """The sweeper's ``pruner`` config as an Optuna pruner (only optuna.pruners.* may be
    named), built the same way by the sweeper and by each job; None when unset."""
    if not pruner_cfg:
        return None
    from hydra.utils import instantiate

    return instantiate(pruner_cfg, _execution_whitelist_="optuna.pruners.*")
