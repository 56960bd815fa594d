"""hydra.sweeper.constraints: bounds on what a trial measured, in any Hydra app and in kd."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import yaml
from conftest import FAST, run_py
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper import constraints, job
from hydra_plugins.kd_sweeper.constraints import Bound
from hydra_plugins.kd_sweeper.trials import TrialRunner
from tests.test_any_app import study, sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize(
    ("spec", "bounds"),
    [
        (None, ()),
        ([], ()),
        ("flops<=1e6", (Bound("flops", "<=", 1e6),)),
        (["flops <= 1e6", "val_acc>=70"], (Bound("flops", "<=", 1e6), Bound("val_acc", ">=", 70.0))),
        (["cost.total<=-2.5"], (Bound("cost.total", "<=", -2.5),)),
    ],
)
def test_bounds_are_read_from_metric_op_number(spec, bounds):
    assert constraints.parse(spec) == bounds


@pytest.mark.parametrize("spec", [["flops<1e6"], ["flops<=big"], ["flops<=inf"], ["<=3"], ["flops=<3"], 3, {"a": 1}])
def test_anything_else_is_refused_naming_it(spec):
    with pytest.raises(ValueError, match=r"^hydra.sweeper.constraints"):
        constraints.parse(spec)


def test_a_refused_bound_shows_the_forms_that_work():
    with pytest.raises(ValueError) as err:
        constraints.parse(["flops<1e6"])
    assert str(err.value) == (
        "hydra.sweeper.constraints: 'flops<1e6' is not metric<=number or metric>=number (e.g. 'flops<=1e6', "
        "'val_acc>=70')"
    )


def test_a_violation_is_how_far_past_its_bound():
    below, above = Bound("flops", "<=", 10.0), Bound("acc", ">=", 70.0)
    assert below.violation(7.0) == -3.0 and below.violation(10.0) == 0.0 and below.violation(12.5) == 2.5
    assert above.violation(75.0) == -5.0 and above.violation(70.0) == 0.0 and above.violation(60.0) == 10.0
    assert below.name == "flops<=10" and Bound("flops", "<=", 1e6).name == "flops<=1e+06"


@pytest.mark.parametrize(
    ("value", "objective", "metrics"),
    [
        (0.5, 0.5, {}),
        ([1.0, 2.0], [1.0, 2.0], {}),
        ({"objective": 0.9, "flops": 3.0}, 0.9, {"flops": 3.0}),
        ({"objective": [1, 2], "params": 7}, [1, 2], {"params": 7}),
        ({"flops": 3.0}, {"flops": 3.0}, {}),  # no objective: the whole return is the (bad) objective
    ],
)
def test_a_return_splits_into_its_objective_and_metrics(value, objective, metrics):
    assert constraints.returned_metrics(value) == (objective, metrics)


class _Return:
    def __init__(self, value):
        self.return_value, self._return_value, self.status = value, value, None


def test_a_job_returning_a_mapping_gives_its_objective_to_the_trial(monkeypatch):
    monkeypatch.setattr("hydra_plugins.kd_sweeper._compat.job_exception", lambda ret: None)
    assert TrialRunner.outcome(_Return({"objective": 0.25, "flops": 9}), 1) == (TrialState.COMPLETE, [0.25], "")
    state, _, reason = TrialRunner.outcome(_Return({"flops": 9}), 1)
    assert state == TrialState.FAIL and "not 1 number" in reason


def _trial_with(metrics: dict | None):
    study = optuna.create_study()
    trial = study.ask()
    if metrics is not None:
        trial.set_user_attr(constraints.METRICS, metrics)
    return study, trial


def test_each_bound_becomes_a_constraint_from_the_recorded_and_returned_metrics():
    bounds = constraints.parse(["flops<=10", "acc>=70"])
    study, trial = _trial_with({"flops": 12.0, "acc": 50.0})
    assert constraints.apply(bounds, study, trial, {"acc": 80.0}) is None  # returned beats recorded
    study.tell(trial, 1.0)
    frozen = study.trials[0]
    assert frozen.constraints == {"flops<=10": 2.0, "acc>=70": -10.0}
    assert frozen.user_attrs[constraints.METRICS] == {"flops": 12.0, "acc": 80.0}
    assert not constraints.feasible(frozen)


def test_a_bound_whose_metric_was_not_recorded_says_how_to_record_it():
    study, trial = _trial_with({"params": 3, "acc": 1})
    reason = constraints.apply(constraints.parse(["flops<=10"]), study, trial, {})
    assert reason == (
        "kd_optuna:constraint: the job recorded no number for flops (bound flops<=10; it recorded: acc, params): "
        "return it with the objective or call job.record(flops=...)"
    )
    study2, trial2 = _trial_with({"flops": float("nan")})
    assert "no number for flops" in constraints.apply(constraints.parse(["flops<=10"]), study2, trial2, {})
    study3, trial3 = _trial_with(None)
    assert "it recorded: none" in constraints.apply(constraints.parse(["flops<=1"]), study3, trial3, {})
    study4, trial4 = _trial_with(None)
    assert "no number for flops" in constraints.apply(constraints.parse(["flops<=1"]), study4, trial4, {"flops": True})


def test_the_summary_counts_complete_trials_that_met_every_bound():
    study = optuna.create_study()
    bounds = constraints.parse(["cost<=1"])
    for cost, state in ((0.5, TrialState.COMPLETE), (2.0, TrialState.COMPLETE), (0.1, TrialState.PRUNED)):
        trial = study.ask()
        trial.set_constraint("cost<=1", cost - 1)
        study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    study.tell(study.ask(), 2.0)  # no constraints recorded: not judged
    assert constraints.summary(study.trials, bounds) == {"bounds": ["cost<=1"], "n_judged": 2, "n_feasible": 1}
    assert [constraints.feasible(t) for t in study.trials] == [True, False, True, True]
    on_the_bound = optuna.create_study()
    trial = on_the_bound.ask()
    trial.set_constraint("cost<=1", 0.0)
    on_the_bound.tell(trial, 1.0)
    assert constraints.feasible(on_the_bound.trials[0])  # a bound that holds with equality holds


def test_job_record_adds_to_what_the_trial_holds(tmp_path):
    storage = f"sqlite:///{tmp_path}/r.db"
    made = optuna.create_study(study_name="r", storage=storage)
    made.ask()
    env = {job.STORAGE_ENV: storage, job.STUDY_ENV: "r", job.TRIAL_ENV: "0"}
    job.record(env, flops=5, latency_ms=0.5)
    job.record(env, flops=4)
    recorded = optuna.load_study(study_name="r", storage=storage).trials[0].user_attrs[constraints.METRICS]
    assert recorded == {"flops": 4.0, "latency_ms": 0.5}
    job.record({}, flops=1)  # outside a sweep: nothing, no error


@pytest.mark.slow
def test_a_plain_apps_constrained_sweep_returns_its_best_feasible_trial(tmp_path):
    proc = sweep(tmp_path, "hydra.sweeper.constraints=['cost<=1']", "~hydra/sweeper/pruner")
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = [t for t in study(tmp_path).trials if t.state == TrialState.COMPLETE]
    feasible = [t for t in trials if abs(t.params["x"]) <= 1]
    assert trials and all(t.constraints == {"cost<=1": pytest.approx(abs(t.params["x"]) - 1)} for t in trials)
    results = yaml.safe_load((tmp_path / "s" / "optimization_results.yaml").read_text())
    assert results["constraints"] == {"bounds": ["cost<=1"], "n_judged": len(trials), "n_feasible": len(feasible)}
    best = min(feasible, key=lambda t: t.value)
    assert results["best_trial"] == best.number and abs(results["best_params"]["x"]) <= 1
    unconstrained = min(trials, key=lambda t: t.value)
    assert unconstrained.value <= best.value  # the bound can only cost objective
    assert f"constraints ['cost<=1']: {len(feasible)} of {len(trials)} complete trials met them" in proc.stdout


@pytest.mark.slow
def test_constraints_a_sweep_cannot_check_are_refused_before_any_trial(tmp_path):
    proc = sweep(tmp_path, "hydra.sweeper.constraints=['cost<1']")
    assert proc.returncode != 0 and "hydra.sweeper.constraints: 'cost<1' is not metric<=number" in proc.stderr
    assert not (tmp_path / "s" / "optuna.db").exists()


@pytest.mark.slow
def test_a_kd_budget_sweep_answers_with_a_student_under_the_bound(workdir):
    bound = 1.2e6  # LightNN is 2.59 MFLOPs per image at width 1: narrower students only
    args = ["-m", "hparams_search=kd_budget", *FAST, "hydra.sweeper.n_trials=4", "hydra.sweep.dir=sw",
            f"hydra.sweeper.constraints=['flops<={bound:g}']", "hydra.sweeper.study_name=budget"]  # fmt: skip
    proc = run_py(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = yaml.safe_load((workdir / "sw" / "optimization_results.yaml").read_text())
    runs = {int(p.parent.name): json.loads(p.read_text()) for p in (workdir / "sw").glob("[0-9]*/metrics.json")}
    assert results["constraints"]["n_judged"] == len(runs) == 4
    assert results["constraints"]["n_feasible"] == sum(r["flops"] <= bound for r in runs.values())
    if results["constraints"]["n_feasible"]:
        best = runs[results["best_trial"]]
        assert best["flops"] <= bound and math.isclose(best["objective_value"], results["best_value"])
        feasible = [r["objective_value"] for r in runs.values() if r["flops"] <= bound]
        assert results["best_value"] == max(feasible)
    else:
        assert "best_trial" not in results and "no trial met every constraint" in proc.stdout + proc.stderr
    from kd.report import report

    report([workdir / "sw"], workdir / "report")
    text = (workdir / "report" / "report.md").read_text()
    n = results["constraints"]["n_feasible"]
    assert f"Constraints `flops<={bound:g}`: {n} of 4 trials met them" in text
    assert text.count(" ✗ |") == 4 - n and text.count(" ★ |") == (1 if n else 0)
