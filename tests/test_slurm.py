"""Sweeps on a real SLURM cluster: two nodes on this machine (``.ci/slurm.sh``)."""

from __future__ import annotations

import os

import optuna
import pytest

from hydra_plugins.kd_sweeper.study import open_storage
from kd.cluster import slurm_job
from kd.report import report
from tests.conftest import FAST, read_metrics, run_py

SLURM_CONF = os.environ.get("KD_TEST_SLURM_CONF")


def _cluster() -> str:
    if not SLURM_CONF:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must provide KD_TEST_SLURM_CONF (.ci/run starts a SLURM cluster)")
        pytest.skip("no SLURM cluster: set KD_TEST_SLURM_CONF (see .ci/slurm.sh)")
    return SLURM_CONF


def test_a_job_records_its_slurm_node_and_restarts():
    assert slurm_job({}) == {}
    env = {"SLURM_JOB_ID": "17", "SLURMD_NODENAME": "n2", "SLURM_RESTART_COUNT": "1"}
    assert slurm_job(env) == {"slurm": {"job_id": "17", "node": "n2", "restart_count": 1}}
    assert slurm_job({"SLURM_JOB_ID": "3", "SLURMD_NODENAME": "n1"})["slurm"]["restart_count"] == 0


@pytest.mark.slow
def test_a_kd_optuna_sweep_runs_its_trials_on_both_nodes(workdir):
    env = {**os.environ, "SLURM_CONF": _cluster()}
    storage = f"journal:///{workdir}/shared_fs/study.log"
    args = [
        "-m",
        "hparams_search=kd_optuna",
        *FAST,
        "hydra/launcher=slurm_cpu",
        "hydra.launcher.partition=debug",
        "hydra.launcher.timeout_min=10",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.study_name=cluster",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweep.dir=sweep",
    ]
    proc = run_py(args, cwd=workdir, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="cluster", storage=open_storage(storage))
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 4  # no parameters proposed twice
    jobs = [read_metrics(workdir / "sweep" / str(t.number))["slurm"] for t in trials]
    assert {j["node"] for j in jobs} == {"n1", "n2"}  # one CPU per node: two jobs at a time use both
    assert len({j["job_id"] for j in jobs}) == 4
    output = proc.stdout + proc.stderr
    assert "Bypassing sacct error" not in output and output.count("SLURM keeps no accounting") == 1
    summary = report([workdir / "sweep"], workdir / "report")  # the trials' runs (the study is in the journal)
    assert summary["runs"] == 4 and not summary["skipped"]
