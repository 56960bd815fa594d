"""kd_optuna in a Hydra app that is not kd's: examples/sphere_app.py, and upstream's own tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper.study import FAIL_REASON, open_storage
from tests.conftest import REPO

APP = REPO / "examples" / "sphere_app.py"
PEER = REPO.parent / "shared" / "peer" / "hydra-optuna-sweeper-1.4.0rc3"
# The one upstream test the stock sweeper fails too (an upstream UserWarning about
# `_execution_whitelist_`, made an error by the suite's warnings-as-errors filter).
STOCK_FAILURES = {"test_optuna_custom_search_space_example"}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep(tmp: Path, *overrides: str, name: str = "s") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as an installed user has it
    return subprocess.run(
        [sys.executable, str(APP), "-m", f"hydra.sweep.dir={tmp / name}", *overrides],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def study(tmp: Path, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name="sphere", storage=f"sqlite:///{tmp / name}/optuna.db")


def test_tpe_with_pruning_through_the_job_api(tmp_path):
    proc = sweep(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = study(tmp_path).trials
    states = [t.state for t in trials]
    assert len(trials) == 12 and TrialState.PRUNED in states and TrialState.COMPLETE in states
    progress = re.findall(r"\] (\d+) of 12 trials done; ETA (\d+s|\?)", proc.stdout)
    assert [int(done) for done, _ in progress] == list(range(1, 13)) and progress[-1][1] == "0s"
    assert "#0 : x=" in proc.stdout and "env_set" not in proc.stdout  # the launch lines show what was swept
    for t in trials:  # every job reported its steps to its own trial
        reported = sorted(t.intermediate_values)
        assert reported == list(range(5)) if t.state == TrialState.COMPLETE else 1 <= len(reported) < 5
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx((t.params["x"] - 2) ** 2 + t.params["y"])
    results = yaml.safe_load((tmp_path / "s" / "optimization_results.yaml").read_text())
    assert results["best_value"] == study(tmp_path).best_value and results["n_pruned"] == states.count(
        TrialState.PRUNED
    )


def test_grid_enumerates_the_space_once(tmp_path):
    proc = sweep(tmp_path, "hydra/sweeper/sampler=grid", "x=choice(0,1,2)", "y=range(0,2)", "hydra.sweeper.n_trials=50")
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = [t for t in study(tmp_path).trials if t.state.is_finished()]
    assert sorted((t.params["x"], t.params["y"]) for t in done) == [(x, y) for x in (0, 1, 2) for y in (0, 1)]


def test_a_nan_trial_fails_with_a_reason_and_the_sweep_goes_on(tmp_path):
    proc = sweep(
        tmp_path, "hydra/sweeper/sampler=grid", "x=choice(1,3)", "y=choice(0)", "fail_at=3",
        "hydra.sweeper.max_failure_rate=0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_x = {t.params["x"]: t for t in study(tmp_path).trials}
    assert by_x[3].state == TrialState.FAIL and by_x[3].user_attrs[FAIL_REASON] == "kd_optuna:diverged: objective nan"
    assert by_x[1].state == TrialState.COMPLETE


def test_too_many_failures_end_the_sweep_in_one_line(tmp_path):
    rate = "hydra.sweeper.max_failure_rate=0.25"
    proc = sweep(tmp_path, "x=choice(3)", "fail_at=3", "hydra.sweeper.n_trials=4", rate)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_optuna: error: 2 of 4 trials failed") and "kd_optuna:diverged" in last
    assert [t.state for t in study(tmp_path).trials] == [TrialState.FAIL] * 2


def test_two_objectives_give_a_pareto_front_and_a_report(tmp_path):
    two = ["hydra.sweeper.direction=[minimize,minimize]", "objectives=2", "~hydra/sweeper/pruner"]
    proc = sweep(tmp_path, *two, "hydra.sweeper.n_trials=10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = yaml.safe_load((tmp_path / "s" / "optimization_results.yaml").read_text())
    front = {s["number"] for s in results["solutions"]}
    assert front == {t.number for t in study(tmp_path).best_trials} and front
    for s in results["solutions"]:
        assert s["values"] == pytest.approx([(s["params"]["x"] - 2) ** 2 + s["params"]["y"], abs(s["params"]["x"])])
    report = subprocess.run(
        [sys.executable, "-m", "kd.report", str(tmp_path / "s")], capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "Pareto front" in report.stdout and (tmp_path / "s.report" / "pareto_front.png").exists()


def test_pruning_with_two_objectives_is_refused_in_one_line(tmp_path):
    proc = sweep(tmp_path, "hydra.sweeper.direction=[minimize,minimize]", "objectives=2")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("kd_optuna: error: pruning needs one objective") and "pruner" in lines[-1]
    assert not (tmp_path / "s" / "optuna.db").exists() or not study(tmp_path).trials


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["x=interval(-1.0,1.0)"], "swept x"),  # another interval
        (["y=0.0"], "fixed y"),  # a swept key now fixed
        (["x=choice(1,2)"], "swept x"),  # another kind of distribution
    ],
)
def test_resuming_with_another_search_space_is_refused(tmp_path, change, needle):
    assert sweep(tmp_path, "hydra.sweeper.n_trials=2").returncode == 0
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=4", *change)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_optuna: error: study sphere was run with another search space") and needle in last
    assert "hydra.sweeper.study_name=NEW" in last
    trials = study(tmp_path).trials
    assert len(trials) == 2 and TrialState.RUNNING not in {t.state for t in trials}


def test_the_job_api_does_nothing_outside_a_sweep(monkeypatch):
    from hydra_plugins.kd_sweeper import job

    for name in (job.STORAGE_ENV, job.STUDY_ENV, job.TRIAL_ENV):
        monkeypatch.delenv(name, raising=False)
    job.report(1.0, step=0)
    assert job.should_prune() is False and job.trial_number() is None and job.current() is None


def test_the_job_api_reports_to_the_trial_named_by_its_environment(tmp_path):
    from hydra_plugins.kd_sweeper import job

    storage = f"sqlite:///{tmp_path}/j.db"
    made = optuna.create_study(study_name="j", storage=storage, pruner=optuna.pruners.NopPruner())
    made.ask(), made.ask()
    env = {job.STORAGE_ENV: storage, job.STUDY_ENV: "j", job.TRIAL_ENV: "1"}
    job.current(env, pruner=optuna.pruners.ThresholdPruner(upper=5.0))
    job.report(3.0, step=0, env=env)
    assert not job.should_prune(env=env)
    job.report(7.0, step=1, env=env)
    assert job.should_prune(env=env)
    trials = optuna.load_study(study_name="j", storage=storage).trials
    assert trials[0].intermediate_values == {} and trials[1].intermediate_values == {0: 3.0, 1: 7.0}


def junit_outcomes(junit: Path) -> dict[str, str]:
    """Each test case of a JUnit XML report: passed, failed or skipped. A ``<skipped>``
    element has no children, so it is falsy: test it against None, as ``failure`` is."""
    outcomes = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[case.get("name")] = "failed"
        elif case.find("skipped") is not None:
            outcomes[case.get("name")] = "skipped"
        else:
            outcomes[case.get("name")] = "passed"
    return outcomes


def test_a_skipped_upstream_case_does_not_count_as_passed(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="test_ok" />'
        '<testcase classname="t" name="test_skip"><skipped type="pytest.skip" message="no db" /></testcase>'
        '<testcase classname="t" name="test_bad"><failure message="boom" /></testcase>'
        '<testcase classname="t" name="test_err"><error message="setup" /></testcase>'
        "</testsuite></testsuites>"
    )
    assert junit_outcomes(junit) == {
        "test_ok": "passed", "test_skip": "skipped", "test_bad": "failed", "test_err": "failed",
    }  # fmt: skip


@pytest.mark.slow
def test_upstream_sweeper_suite_passes_with_kd_optuna(tmp_path):
    # Whatever the environment: a missing suite is a failure, never a silent skip.
    assert PEER.is_dir(), f"the upstream suite is missing at {PEER} (see ../shared/peer/README.md)"
    sys.path.insert(0, str(REPO / "tests" / "peer"))
    from swap_sweeper import swap

    suite = tmp_path / "peer"
    swap(PEER, suite)
    junit = tmp_path / "junit.xml"
    # The inner pytest must not think it is one of this run's xdist workers.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("PYTEST_", "COV_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "tests",
         f"--junitxml={junit}"],
        cwd=suite, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert junit.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes = junit_outcomes(junit)
    failed = {name.split("[")[0] for name, o in outcomes.items() if o == "failed"}
    passed = sum(o == "passed" for o in outcomes.values())
    assert failed <= STOCK_FAILURES, proc.stdout[-4000:]
    assert len(outcomes) == 93 and passed >= 92, (
        proc.stdout[-2000:],
        {n: o for n, o in outcomes.items() if o != "passed"},
    )


def test_a_queued_trial_is_run_even_when_the_target_counts_it(tmp_path):
    # A dead worker's trial, queued again by the heartbeat's retry, counts towards
    # n_trials but still has to run: the rerun must not stop with it WAITING.
    assert sweep(tmp_path, "hydra.sweeper.n_trials=2").returncode == 0
    study(tmp_path).enqueue_trial({"x": 1.0, "y": 0.0})
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    trials = study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[2].params == {"x": 1.0, "y": 0.0} and trials[2].value == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_a_trial_left_running_without_heartbeats_is_retried_and_the_sweep_ends(tmp_path, kind):
    """An older sweep (or one with heartbeats off) left trial 0 RUNNING: no heartbeat, no
    owner record. The resumed sweep waits the stated grace period, fails it, runs it again."""
    url = f"journal://{tmp_path / 'study.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url) if kind == "journal" else url
    left = optuna.create_study(study_name="sphere", storage=storage, direction="minimize")
    left.ask(
        {
            "x": optuna.distributions.FloatDistribution(-5, 5),
            "y": optuna.distributions.CategoricalDistribution((0.0, 1.0)),
        }
    )
    proc = sweep(
        tmp_path,
        f"hydra.sweeper.storage={url}",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=2",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trial 0 is RUNNING with no heartbeat" in proc.stdout + proc.stderr
    trials = optuna.load_study(study_name="sphere", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == trials[0].number


def _damage_middle(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"not a record\n"
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    ("storage", "damage", "needle"),
    [
        ("journal://{tmp}/study.log", _damage_middle, "is damaged at line 3"),
        ("sqlite:///{tmp}/study.db", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "malformed"),
        ("sqlite:///{tmp}/study.db", lambda p: p.write_text("two\nlines\n"), "is not a SQLite database"),
    ],
)
def test_a_damaged_storage_is_named_in_one_line_with_exit_4_and_left_as_it_was(tmp_path, storage, damage, needle):
    url = storage.format(tmp=tmp_path)
    assert sweep(tmp_path, f"hydra.sweeper.storage={url}", "hydra.sweeper.n_trials=3").returncode == 0
    path = Path(url.split(":///")[-1] if url.startswith("sqlite") else url[len("journal://") :])
    damage(path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    proc = sweep(tmp_path, f"hydra.sweeper.storage={url}", "hydra.sweeper.n_trials=4")
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_optuna: error: ") and needle in last and str(path) in last, last
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_an_unreachable_database_is_one_line_with_exit_4(tmp_path):
    proc = sweep(tmp_path, "hydra.sweeper.storage=postgresql://kd:secret@127.0.0.1:1/none", "hydra.sweeper.n_trials=1")
    assert proc.returncode == 4, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_optuna: error: storage postgresql://kd:***@127.0.0.1:1/none cannot be used"), last
    assert "secret" not in proc.stderr
