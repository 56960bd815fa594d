"""kd.report on a racing sweep: the answer is the race's (per-seed values paired on common
seeds, judged with the settings the sweep recorded), and test accuracy is shown for the
confirmed setting only, paired with the reference on the confirmation seeds."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from hydra_plugins.kd_sweeper.race_loop import CONFIRM, INCUMBENT, REFERENCE, RUN, STOPPED, record_settings
from hydra_plugins.kd_sweeper.racing import RacingConfig
from kd.race_report import race_markdown, race_table
from kd.report import report

DIST = {"t": optuna.distributions.FloatDistribution(1.0, 10.0)}


def _study(values: dict[int, dict[int, float]], incumbent: int, stopped=(), confirm=None) -> optuna.Study:
    study = optuna.create_study(study_name="race", direction="maximize")
    for number in values:
        attrs = {REFERENCE: True} if number == 0 else {}
        study.add_trial(optuna.trial.create_trial(params={"t": 1.0 + number}, distributions=DIST, value=0.0,
                                                  user_attrs=attrs))  # fmt: skip
    for number, per_seed in values.items():
        for seed, value in per_seed.items():
            study.set_user_attr(f"{RUN}{number}:{seed}", value)
    for number, per_seed in (confirm or {}).items():
        for seed, value in per_seed.items():
            study.set_user_attr(f"{CONFIRM}{number}:{seed}", value)
    study.set_user_attr(INCUMBENT, incumbent)
    for number in stopped:
        study.set_user_attr(f"{STOPPED}{number}", True)
    return study


RACED = {
    0: {0: 70.0, 1: 70.2, 2: 69.9},  # the reference, clearly below
    1: {0: 71.0, 1: 71.3, 2: 70.9, 3: 71.1},  # the incumbent
    2: {0: 71.1, 1: 71.1, 2: 70.8},  # tied with it
    3: {0: 60.0},  # stopped after one seed
}


def _write_test_acc(sweep_dir: Path, trial: int, per_seed: dict[int, float]) -> None:
    for seed, test in per_seed.items():
        run = sweep_dir / str(trial) / f"seed_{seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"test_acc": test, "seed": seed}))


def test_the_race_table_states_the_incumbent_the_tied_set_and_each_trials_seeds(tmp_path):
    study = _study(RACED, incumbent=1, stopped=[3])
    record_settings(study, RacingConfig(max_seeds=4, tie_level=0.05), ())
    race = race_table(tmp_path, study)
    assert race is not None and race["notes"] == []
    rows = race["rows"]
    assert [r["trial"] for r in rows][0] == 1  # the incumbent first
    assert [r["trial"] for r in rows][1:] == [2, 0, 3]  # then by paired difference to it
    status = {r["trial"]: r["status"] for r in rows}
    assert status == {1: "incumbent", 2: "tied", 0: "not tied", 3: "stopped: worse"}
    assert {r["trial"]: r["summary"]["n"] for r in rows} == {0: 3, 1: 4, 2: 3, 3: 1}
    by_trial = {r["trial"]: r for r in rows}
    # trial 2 minus the incumbent on their common seeds 0-2: (0.1 - 0.2 - 0.1) / 3
    assert by_trial[2]["minus_incumbent"]["n"] == 3
    assert by_trial[2]["minus_incumbent"]["mean"] == pytest.approx(-0.2 / 3)
    assert by_trial[1]["minus_incumbent"] is None
    assert [t["trial"] for t in race["racing"]["tied"]] == [2]
    assert race["racing"]["reference"]["trial"] == 0 and race["racing"]["reference"]["distinguishable"]
    assert race["confirmed_test"] is None  # nothing confirmed: no test accuracy at all
    text = race_markdown(race)
    assert "Incumbent: trial 1 (t=2), 71.08" in text and "n=4 seeds" in text
    assert "trial 2 (n=3, -0.0667)" in text and "distinguishable." in text and "Test accuracy" not in text


def test_a_minimised_race_is_signed_so_that_plus_is_better(tmp_path):
    study = optuna.create_study(study_name="low", direction="minimize")
    for number in range(2):
        study.add_trial(optuna.trial.create_trial(params={"t": 1.0 + number}, distributions=DIST, value=0.0))
    for seed, (a, b) in enumerate([(1.0, 2.0), (1.2, 2.1), (0.9, 2.3)]):
        study.set_user_attr(f"{RUN}0:{seed}", a)
        study.set_user_attr(f"{RUN}1:{seed}", b)
    study.set_user_attr(INCUMBENT, 0)
    race = race_table(tmp_path, study)
    (other,) = [r for r in race["rows"] if r["trial"] == 1]
    assert other["minus_incumbent"]["mean"] == pytest.approx(-(1.0 + 0.9 + 1.4) / 3)  # higher loss: worse
    assert race["direction"] == "minimize" and race["rows"][0]["trial"] == 0


def test_test_accuracy_is_read_for_the_confirmed_setting_paired_with_the_reference(tmp_path):
    confirm = {1: {10: 71.0, 11: 71.4, 12: 70.8}, 0: {10: 70.0, 11: 70.6, 12: 70.1}}
    study = _study(RACED, incumbent=1, stopped=[3], confirm=confirm)
    record_settings(study, RacingConfig(max_seeds=4), (10, 11, 12))
    _write_test_acc(tmp_path, 1, {10: 70.5, 11: 70.9, 12: 70.4})
    _write_test_acc(tmp_path, 0, {10: 69.5, 11: 70.5, 12: 69.6})
    _write_test_acc(tmp_path, 2, {0: 99.0})  # a searched trial's test accuracy is never read
    race = race_table(tmp_path, study)
    test = race["confirmed_test"]
    assert test["seeds"] == [10, 11, 12]
    assert test["incumbent"]["mean"] == pytest.approx((70.5 + 70.9 + 70.4) / 3)
    assert test["reference"]["mean"] == pytest.approx((69.5 + 70.5 + 69.6) / 3)
    assert test["incumbent_minus_reference"]["diffs"] == pytest.approx([1.0, 0.4, 0.8])
    text = race_markdown(race)
    assert "Confirmed on fresh seeds [10, 11, 12]: 71.07 ± 0.18; minus reference +0.83 [" in text
    assert "Test accuracy of the confirmed setting (seeds [10, 11, 12]): 70.60 ± 0.15 %; minus reference +0.73" in text
    assert "99" not in text


def test_a_missing_confirmation_run_shows_no_test_accuracy(tmp_path):
    confirm = {1: {10: 71.0, 11: 71.4}}
    study = _study(RACED, incumbent=1, confirm=confirm)
    record_settings(study, RacingConfig(max_seeds=4), (10, 11))
    _write_test_acc(tmp_path, 1, {10: 70.5})  # seed 11's run has no metrics.json
    assert race_table(tmp_path, study)["confirmed_test"] is None


def test_a_study_raced_before_settings_were_recorded_says_defaults_are_assumed(tmp_path):
    race = race_table(tmp_path, _study(RACED, incumbent=1))
    assert race["notes"] == ["The race's settings were not recorded in this study: its default levels are assumed."]
    assert race["racing"]["settings"]["tie_level"] == RacingConfig.tie_level


def test_a_study_that_did_not_race_gets_the_ordinary_table(tmp_path):
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={"t": 2.0}, distributions=DIST, value=1.0))
    assert race_table(tmp_path, study) is None


def test_kd_report_writes_the_race_and_its_seed_spread_plot(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    study = _study(RACED, incumbent=1, stopped=[3])
    copied = optuna.copy_study(from_study_name="race", from_storage=study._storage, to_storage=storage)
    del copied
    summary = report([sweep_dir], tmp_path / "out")
    (race,) = summary["sweeps"]
    assert race["racing"]["incumbent"]["trial"] == 1
    assert summary["plots"] == ["seed_spread_race.png"]
    assert "Incumbent: trial 1" in (tmp_path / "out" / "report.md").read_text()
