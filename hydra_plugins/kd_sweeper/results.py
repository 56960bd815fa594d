"""A sweep's answer: ``optimization_results.yaml`` in its sweep dir, and the log lines
that say the same (the best trial, a Pareto front, a race's incumbent, how many trials
met the sweep's constraints)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper import constraints
from hydra_plugins.kd_sweeper.race_loop import log_race
from hydra_plugins.kd_sweeper.race_loop import summary as race_summary
from hydra_plugins.kd_sweeper.space import plain
from hydra_plugins.kd_sweeper.study import counted_trials, shown

log = logging.getLogger(__name__)


def _best(sweeper: Any, study: optuna.Study, directions: list[str], complete: list) -> dict[str, Any]:
    """The answer's fields: a race's incumbent, the best (feasible) trial, or the Pareto front."""
    if sweeper.racing is not None:
        racing = race_summary(study, sweeper.racing, sweeper.confirm_seeds)
        log_race(racing)
        incumbent = racing.get("incumbent")
        if not incumbent:
            return {"racing": racing}
        return {"racing": racing, "best_params": incumbent["params"], "best_value": incumbent["mean"],
                "best_trial": incumbent["trial"]}  # fmt: skip
    if not complete:
        return {}
    if len(directions) > 1:
        front = study.best_trials  # feasible trials only, in a constrained sweep
        log.info("Pareto front: %d trials", len(front))
        for t in front:
            log.info("    trial %d: values %s, params %s", t.number, t.values, t.params)
        return {"solutions": [{"number": t.number, "params": t.params, "values": t.values} for t in front]}
    try:
        best = study.best_trial  # the best feasible one, in a constrained sweep
    except ValueError:
        log.warning("no trial met every constraint %s: no best trial", [b.name for b in sweeper.bounds])
        return {}
    log.info("best trial %d: %s -> %s", best.number, best.params, best.value)
    return {"best_params": best.params, "best_value": best.value, "best_trial": best.number}


def write_results(sweeper: Any, study: optuna.Study, directions: list[str]) -> None:
    """Write ``sweeper``'s answer to ``<sweep dir>/optimization_results.yaml`` and log it."""
    trials = counted_trials(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "storage": shown(sweeper.storage),  # where kd.report finds the study (a password masked)
        "n_complete": len(complete),
        "n_pruned": sum(1 for t in trials if t.state == TrialState.PRUNED),
        "n_failed": sum(1 for t in trials if t.state == TrialState.FAIL),
    }
    if sweeper.bounds:
        results["constraints"] = constraints.summary(trials, sweeper.bounds)
        feasible = results["constraints"]
        log.info("constraints %s: %d of %d complete trials met them", feasible["bounds"], feasible["n_feasible"],
                 feasible["n_judged"])  # fmt: skip
    results.update(_best(sweeper, study, directions, complete))
    Path(sweeper.sweep_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(plain(results)), f"{sweeper.sweep_dir}/optimization_results.yaml")
    log.info("sweep results: %s (study %s in %s)", sweeper.sweep_dir, study.study_name, shown(sweeper.storage))
