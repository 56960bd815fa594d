"""hydra.sweeper.warm_start: a new study starts from an earlier one's answer."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper import warm
from hydra_plugins.kd_sweeper.study import find_study
from tests.test_any_app import study, sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "t": FloatDistribution(1.0, 8.0, log=True),
    "n": IntDistribution(1, 4),
    "opt": CategoricalDistribution(["adam", "sgd"]),
}


def test_parameters_are_fitted_to_the_new_space_and_each_change_is_named():
    fitted, notes = warm.fit({"t": 20.0, "n": 2, "opt": "adamw", "gone": 1}, SPACE)
    assert fitted == {"t": 8.0, "n": 2}
    assert notes == [
        "t=20.0 clipped to 8.0 ([1.0, 8.0])",
        "opt=adamw dropped (not one of ['adam', 'sgd'])",
        "gone=1 dropped (not in this search space)",
    ]
    assert warm.fit({"t": 0.5, "n": 9, "opt": "sgd"}, SPACE) == (
        {"t": 1.0, "n": 4, "opt": "sgd"},
        ["t=0.5 clipped to 1.0 ([1.0, 8.0])", "n=9 clipped to 4 ([1, 4])"],
    )
    assert warm.fit({"t": 2.0, "n": 3}, SPACE) == ({"t": 2.0, "n": 3}, [])  # inside: unchanged


def _finished(directions=("maximize",), values=((1.0,), (3.0,), (2.0,)), constraints=None) -> optuna.Study:
    source = optuna.create_study(directions=list(directions))
    for i, value in enumerate(values):
        trial = source.ask({"t": FloatDistribution(1, 8)})
        if constraints is not None:
            trial.set_constraint("c", constraints[i])
        source.tell(trial, list(value))
    return source


def test_the_answer_is_the_best_feasible_trial_or_the_front():
    assert [t.number for t in warm.answer(_finished())] == [1]
    assert [t.number for t in warm.answer(_finished(constraints=[-1, 1, -1]))] == [2]  # trial 1 broke its bound
    assert warm.answer(_finished(constraints=[1, 1, 1])) == []
    front = _finished(("maximize", "minimize"), ((1.0, 1.0), (3.0, 3.0), (2.0, 4.0)))
    assert [t.number for t in warm.answer(front)] == [0, 1]
    assert warm.answer(optuna.create_study()) == []
    tied = _finished(values=((3.0,), (3.0,), (1.0,)))
    assert [t.number for t in warm.answer(tied)] == [0]  # one best trial, even when another ties it


def test_a_study_is_found_from_a_sweep_folder_or_a_storage_url(tmp_path):
    folder = tmp_path / "sw"
    folder.mkdir()
    url = f"sqlite:///{folder / 'optuna.db'}"
    optuna.create_study(study_name="a", storage=url)
    assert find_study(str(folder)).study_name == "a"
    assert find_study(url).study_name == "a"
    optuna.create_study(study_name="b", storage=url)
    with pytest.raises(ValueError, match=r"no study \(none named\) there \(it holds \['a', 'b'\]\)"):
        find_study(url)
    assert find_study(f"{url}#b").study_name == "b"
    (folder / "optimization_results.yaml").write_text("study_name: b\n")
    assert find_study(str(folder)).study_name == "b"
    with pytest.raises(ValueError, match="neither a sweep folder nor a storage URL"):
        find_study(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no optuna.db and no recorded storage"):
        find_study(str(tmp_path / "empty"))


def test_the_answer_is_queued_first_once_with_its_origin(tmp_path):
    url = f"sqlite:///{tmp_path / 'src.db'}"
    source = optuna.create_study(study_name="src", storage=url, direction="maximize")
    for t in (2.0, 6.0):  # the better trial's t lies past the new space's range
        source.add_trial(
            optuna.trial.create_trial(params={"t": t}, distributions={"t": FloatDistribution(1, 8)}, value=t)
        )
    target = optuna.create_study(study_name="new", direction="maximize")
    space = {"t": FloatDistribution(1.0, 4.0)}
    warm.warm_start(target, url, space)
    warm.warm_start(target, url, space)  # a resumed sweep: nothing queued again
    queued = target.get_trials(states=(TrialState.WAITING,))
    assert len(queued) == 1 and queued[0].system_attrs["fixed_params"] == {"t": 4.0}  # 6.0 clipped into range
    assert queued[0].user_attrs[warm.WARM_START] == {"study": "src", "trial": 1}
    assert target.user_attrs[warm.WARM_START] == {"from": url, "study": "src", "trials": [1]}
    warm.warm_start(optuna.create_study(), None, space)  # no warm start: nothing to do


@pytest.mark.slow
def test_a_plain_app_starts_from_an_earlier_sweeps_best_trial(tmp_path):
    first = sweep(tmp_path, "hydra.sweeper.n_trials=6", "~hydra/sweeper/pruner", name="a")
    assert first.returncode == 0, first.stderr[-2000:]
    best = study(tmp_path, "a").best_trial
    second = sweep(tmp_path, "hydra.sweeper.n_trials=3", "~hydra/sweeper/pruner", "x=interval(3.0,5.0)",
                   f"hydra.sweeper.warm_start={tmp_path / 'a'}", name="b")  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    trials = study(tmp_path, "b").trials
    assert trials[0].params == {"x": min(max(best.params["x"], 3.0), 5.0), "y": best.params["y"]}
    assert trials[0].user_attrs[warm.WARM_START] == {"study": "sphere", "trial": best.number}
    assert f"warm start: trial {best.number} of sphere queued first" in second.stdout
    assert len(trials) == 3 and all(warm.WARM_START not in t.user_attrs for t in trials[1:])


@pytest.mark.slow
def test_a_warm_start_from_nowhere_is_refused_in_one_line(tmp_path):
    proc = sweep(tmp_path, f"hydra.sweeper.warm_start={tmp_path / 'missing'}")
    assert proc.returncode != 0
    assert "hydra.sweeper.warm_start=" in proc.stderr and "neither a sweep folder nor a storage URL" in proc.stderr


def _source(tmp_path, params: dict, name: str = "src") -> str:
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    source = optuna.create_study(study_name=name, storage=url, direction="maximize")
    dists = {k: FloatDistribution(0, 10) for k in params}
    source.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=1.0))
    return url


def test_the_log_says_what_was_queued_and_what_changed(tmp_path, caplog):
    url = _source(tmp_path, {"t": 6.0, "gone": 1.0})
    caplog.set_level("INFO", logger="hydra_plugins.kd_sweeper.warm")
    target = optuna.create_study(direction="maximize")
    warm.warm_start(target, url, {"t": FloatDistribution(1.0, 4.0)})
    assert caplog.messages == [
        "warm start: trial 0 of src queued first (t=6.0 clipped to 4.0 ([1.0, 4.0]); gone=1.0 dropped (not in this "
        "search space))"
    ]
    caplog.clear()
    wide = {"t": FloatDistribution(0.0, 10.0), "gone": FloatDistribution(0.0, 10.0)}
    warm.warm_start(optuna.create_study(direction="maximize"), url, wide)
    assert caplog.messages == ["warm start: trial 0 of src queued first"]
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=empty)
    caplog.clear()
    nothing = optuna.create_study()
    warm.warm_start(nothing, empty, {})
    assert caplog.messages == ["warm start: empty has no completed (feasible) trial to start from"]
    assert nothing.user_attrs[warm.WARM_START] == {"from": empty, "study": "empty", "trials": []}


def test_the_study_records_its_source_as_given(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    _source(folder, {"t": 2.0}, name="optuna")
    for spec, recorded in ((str(folder), str(folder)), (f"{folder}#optuna", f"{folder}#optuna")):
        target = optuna.create_study(direction="maximize")
        warm.warm_start(target, spec, {"t": FloatDistribution(0, 10)})
        assert target.user_attrs[warm.WARM_START]["from"] == recorded
    with pytest.raises(ValueError, match=r"^hydra.sweeper.warm_start=\S+nowhere is neither a sweep folder"):
        warm.warm_start(optuna.create_study(), str(tmp_path / "nowhere"), {})


def test_a_trial_queued_before_a_crash_is_not_queued_twice(tmp_path):
    url = _source(tmp_path, {"t": 2.0})
    target = optuna.create_study(direction="maximize")
    target.enqueue_trial({"t": 2.0})  # queued, then the sweeper died before recording its source
    warm.warm_start(target, url, {"t": FloatDistribution(0, 10)})
    assert len(target.get_trials(states=(TrialState.WAITING,))) == 1
