"""Racing sweeps end to end: a plain Hydra app races a noisy objective, a killed race
resumes with no seed-run run twice, confirmation runs on fresh seeds, and kd runs each
seed-run as its replicate's seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml

from kd.report import report
from tests.conftest import FAST, run_py
from tests.test_any_app import sweep

pytestmark = pytest.mark.slow
RACE = ["noise=0.5", "hydra.sweeper.racing={max_seeds:4}", "hydra.sweeper.n_trials=8", "~hydra/sweeper/pruner"]

# A plain app that logs each seed-run it starts and can kill its own sweep (the basic
# launcher runs jobs in the sweeper's process) when the log reaches $NOISY_DIE_AT lines
# (an environment variable: a key on the command line would change the study's identity).
NOISY_APP = """
import os, random, signal
from pathlib import Path
import hydra
from hydra_plugins.kd_sweeper import job

@hydra.main(config_path="conf", config_name="noisy")
def main(cfg):
    runs = Path(cfg.log)
    with runs.open("a") as f:
        f.write(f"{cfg.x} {job.replicate()}\\n")
    if len(runs.read_text().splitlines()) == int(os.environ.get("NOISY_DIE_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return (cfg.x - 1) ** 2 + random.Random(f"{job.replicate()}:{cfg.x}").gauss(0, 0.3)

if __name__ == "__main__":
    main()
"""
NOISY_CONF = """
defaults:
  - override hydra/sweeper: kd_optuna
  - _self_
x: 0.0
log: runs.txt
hydra:
  sweep:
    dir: sweep
  sweeper:
    direction: minimize
    study_name: noisy
    storage: sqlite:///${hydra.sweep.dir}/optuna.db
    n_trials: 6
    heartbeat_interval: 1
    grace_period: 2
    sampler:
      seed: 3
    racing:
      max_seeds: 3
    params:
      x: interval(-3.0, 3.0)
"""


def _results(directory: Path) -> dict:
    return yaml.safe_load((directory / "optimization_results.yaml").read_text())


def test_a_plain_app_races_trials_end_with_different_seed_counts_and_the_incumbent_has_them_all(tmp_path):
    proc = sweep(tmp_path, *RACE, "hydra.sweeper.confirm_seeds=[100,101,102]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path / "s")["racing"]
    counts = [len([s for s in (tmp_path / "s" / str(n)).glob("seed_*") if int(s.name[5:]) < 100]) for n in range(8)]
    assert min(counts) >= 1 and len(set(counts)) > 1, counts  # different trials got different numbers of seeds
    incumbent = results["incumbent"]
    assert incumbent["n"] == 4 and incumbent["seeds"] == [0, 1, 2, 3]
    assert results["seed_runs"] == sum(counts)
    assert "tied" in results and all(t["trial"] != incumbent["trial"] for t in results["tied"])
    confirmation = results["confirmation"]
    assert confirmation["seeds"] == [100, 101, 102] and confirmation["incumbent"]["n"] == 3
    study = optuna.load_study(study_name="sphere", storage=f"sqlite:///{tmp_path / 's'}/optuna.db")
    recorded = {k for k in study.user_attrs if k.startswith("kd_optuna:race:")}
    assert len(recorded) == sum(counts)  # every seed-run's value is in the study
    assert study.best_trial.number in range(8) and _results(tmp_path / "s")["best_trial"] == incumbent["trial"]
    # kd.report tells the same answer from the study, and how many seeds each trial ran
    (race,) = report([tmp_path / "s"], tmp_path / "report")["sweeps"]
    assert race["racing"]["incumbent"]["trial"] == incumbent["trial"] and race["notes"] == []
    assert [t["trial"] for t in race["racing"]["tied"]] == [t["trial"] for t in results["tied"]]
    assert {r["trial"]: r["summary"]["n"] for r in race["rows"]} == {n: c for n, c in enumerate(counts)}
    assert (tmp_path / "report" / "seed_spread_sphere.png").stat().st_size > 0


def test_confirm_seeds_that_overlap_the_search_seeds_are_refused_in_one_line(tmp_path):
    proc = sweep(tmp_path, *RACE, "hydra.sweeper.confirm_seeds=[3,100]")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_optuna: error: hydra.sweeper.confirm_seeds [3, 100] overlap the search seeds"), last
    assert not (tmp_path / "s" / "optuna.db").exists()
    no_race = sweep(tmp_path, "hydra.sweeper.confirm_seeds=[100]", name="t")
    assert no_race.returncode == 2 and "needs hydra.sweeper.racing" in no_race.stderr.strip().splitlines()[-1]


def test_a_race_killed_mid_way_resumes_with_no_seed_run_run_twice(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "noisy.yaml").write_text(NOISY_CONF)
    (tmp_path / "noisy.py").write_text(NOISY_APP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(die_at: int = 0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "noisy.py", "-m"], cwd=tmp_path, env={**env, "NOISY_DIE_AT": str(die_at)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    killed = run(die_at=7)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len((tmp_path / "runs.txt").read_text().splitlines()) == 7
    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    started = Counter((tmp_path / "runs.txt").read_text().splitlines())
    repeated = [run for run, n in started.items() if n > 1]
    # Only the seed-run the kill interrupted ran again; every finished one was kept.
    assert len(repeated) == 1 and all(n <= 2 for n in started.values()), started
    results = _results(tmp_path / "sweep")["racing"]
    assert results["incumbent"]["n"] == 3 and results["seed_runs"] == sum(started.values()) - len(repeated)


def test_racing_with_two_parallel_workers_of_joblib(tmp_path):
    proc = sweep(tmp_path, *RACE, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path / "s")["racing"]
    assert results["incumbent"]["n"] == 4 and len(list((tmp_path / "s").glob("*/seed_0"))) == 8


def test_kd_runs_each_seed_run_with_its_replicates_seed_and_confirms_with_ce_pairs(workdir):
    args = [
        "-m",
        "hparams_search=kd_race",
        *FAST,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.racing.max_seeds=2",
        "hydra.sweeper.racing.seeds=[5,6]",
        "hydra.sweeper.confirm_seeds=[9]",
        "hydra.sweeper.study_name=race",
    ]
    proc = run_py(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = workdir / "multirun" / "race"
    runs = sorted(sweep_dir.glob("*/seed_*/metrics.json"))
    assert runs
    for path in runs:
        metrics = json.loads(path.read_text())
        assert metrics["seed"] == int(path.parent.name[5:])  # replicate r trains seed r
        assert "kd_minus_ce" in json.dumps(metrics)  # each paired with its CE twin
    results = _results(sweep_dir)["racing"]
    reference = results.get("reference")
    assert (sweep_dir / "0" / "seed_9").is_dir()  # the reference (trial 0) is confirmed too
    assert reference is None or reference["trial"] == 0
    study = optuna.load_study(study_name="race", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert study.trials[0].params == {"loss.temperature": 2.0, "loss.alpha": 0.25}
    (race,) = report([sweep_dir], workdir / "report")["sweeps"]
    incumbent = results["incumbent"]["trial"]
    test = json.loads((sweep_dir / str(incumbent) / "seed_9" / "metrics.json").read_text())["test_acc"]
    assert race["confirmed_test"]["seeds"] == [9] and race["confirmed_test"]["incumbent"]["mean"] == test


def test_trial_seeds_and_racing_together_are_refused_before_any_trial(workdir):
    args = ["-m", "hparams_search=kd_race", *FAST, "hydra.sweeper.n_trials=1", "trial.seeds=[1,2]"]
    proc = run_py([*args, "hydra.sweeper.study_name=both"], cwd=workdir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "kd_optuna: error: trial.seeds and hydra.sweeper.racing both choose the seeds; drop trial.seeds"
    assert not list((workdir / "multirun" / "both").glob("*/seed_*"))


def test_a_seed_run_budget_ends_the_search_where_it_is_spent(tmp_path):
    budget = ["noise=0.5", "hydra.sweeper.racing={max_seeds:4,budget:7}", "hydra.sweeper.n_trials=8"]
    proc = sweep(tmp_path, *budget, "~hydra/sweeper/pruner")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path / "s")["racing"]
    assert results["seed_runs"] == 7 == len(list((tmp_path / "s").glob("*/seed_*")))
    bad = sweep(tmp_path, "noise=0.5", "hydra.sweeper.racing={budget:0}", name="t")
    assert bad.returncode == 2 and "racing.budget must be a number of seed-runs >= 1" in bad.stderr
