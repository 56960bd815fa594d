"""Sweeps on a real SLURM cluster: two nodes on this machine (``.ci/slurm.sh``).

The cluster tests share its two one-CPU nodes, so they run on one xdist worker
(``xdist_group``) one after another; the rest need no cluster."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from hydra_plugins.kd_sweeper.study import open_storage
from kd import pipeline
from kd.cluster import CheckSlurmLauncher, QuietAccountingPolls, ended_before, launcher_problem, partitions, slurm_job
from kd.errors import Diverged, Pruned
from kd.report import report
from tests.conftest import FAST, postgres_url, read_metrics, run_py, start_py

SLURM_CONF = os.environ.get("KD_TEST_SLURM_CONF")


def _cluster() -> dict[str, str]:
    if not SLURM_CONF:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must provide KD_TEST_SLURM_CONF (.ci/run starts a SLURM cluster)")
        pytest.skip("no SLURM cluster: set KD_TEST_SLURM_CONF (see .ci/slurm.sh)")
    return {**os.environ, "SLURM_CONF": SLURM_CONF}


ON_SLURM = ["hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=10"]


# -- no cluster needed ------------------------------------------------------------------


def test_a_job_records_its_slurm_node_and_restarts():
    assert slurm_job({}) == {}
    env = {"SLURM_JOB_ID": "17", "SLURMD_NODENAME": "n2", "SLURM_RESTART_COUNT": "1"}
    assert slurm_job(env) == {"slurm": {"job_id": "17", "node": "n2", "restart_count": 1}}
    assert slurm_job({"SLURM_JOB_ID": "3", "SLURMD_NODENAME": "n1"})["slurm"]["restart_count"] == 0


LAUNCHER = {"partition": "debug", "timeout_min": 120, "signal_delay_s": 120}


@pytest.mark.parametrize(
    "changes, known, problem",
    [
        ({}, ["debug*", "gpu"], None),
        ({"partition": None}, ["debug*", "gpu"], None),  # the cluster's default partition
        ({"partition": "gpu,debug"}, ["debug*", "gpu"], None),  # sbatch takes a list
        ({"partition": "cpu"}, ["debug*", "gpu"], "hydra.launcher.partition=cpu: no such partition"),
        ({"partition": "gpu,cpu"}, ["debug*", "gpu"], "no such partition on this cluster; sinfo lists: debug, gpu"),
        ({"partition": None}, ["debug", "gpu"], "not set and this cluster has no default partition"),
        ({"partition": "nope"}, None, None),  # sinfo could not tell: left to sbatch
        ({"timeout_min": 3}, ["debug*"], "timeout_min=3 leaves under 60 s to train"),  # 180 - 120 - 30 < 60
        ({"timeout_min": 4}, ["debug*"], None),  # 240 - 120 - 30 >= 60
        ({"timeout_min": 4, "signal_delay_s": 151}, ["debug*"], "signal_delay_s + 30 s (151 + 30 s)"),
        ({"timeout_min": 2, "signal_delay_s": 30}, ["debug*"], None),  # exactly 60 s left
        ({"timeout_min": 2, "signal_delay_s": 31}, ["debug*"], "leaves under 60 s"),
    ],
)
def test_a_slurm_launcher_that_cannot_work_is_named_in_one_line(changes, known, problem):
    found = launcher_problem({**LAUNCHER, **changes}, known)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "\n" not in found


def test_each_launcher_refusal_says_what_and_how_to_fix_it():
    assert launcher_problem({**LAUNCHER, "partition": None}, ["debug", "gpu"]) == (
        "hydra.launcher.partition is not set and this cluster has no default partition; set it to one of: debug, gpu"
    )
    assert launcher_problem({**LAUNCHER, "partition": "x"}, []) == (
        "hydra.launcher.partition=x: no such partition on this cluster; sinfo lists: none"
    )
    assert launcher_problem({**LAUNCHER, "timeout_min": 3}, None) == (
        "hydra.launcher.timeout_min=3 leaves under 60 s to train: SLURM signals a job up to signal_delay_s + 30 s "
        "(120 + 30 s) before its time limit, and a requeued job would be stopped again as it starts; raise "
        "timeout_min or lower signal_delay_s"
    )
    # No signal_delay_s: no warning signal, 90 - 30 s left.
    assert launcher_problem({**LAUNCHER, "timeout_min": 1.5, "signal_delay_s": None}, None) is None


def _fake_sinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    (tmp_path / "bin").mkdir()
    sinfo = tmp_path / "bin" / "sinfo"
    sinfo.write_text(f"#!/bin/sh\n{script}\n")
    sinfo.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))


def test_the_partitions_are_what_sinfo_lists(tmp_path, monkeypatch):
    _fake_sinfo(tmp_path, monkeypatch, 'test "$*" = "-h -o %P" && printf "gpu\\ndebug*\\ngpu\\n"')
    assert partitions() == ["debug*", "gpu"]


def test_no_partitions_when_sinfo_cannot_tell(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo at all
    assert partitions() is None
    _fake_sinfo(tmp_path, monkeypatch, "echo 'debug*'; exit 1")  # no controller answering
    assert partitions() is None


def test_a_slurm_launcher_is_checked_before_a_multirun_starts(tmp_path, monkeypatch, capsys):
    _fake_sinfo(tmp_path, monkeypatch, "echo 'debug*'")
    check = CheckSlurmLauncher()
    launcher = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", **LAUNCHER}
    check.on_multirun_start(OmegaConf.create({"hydra": {"launcher": launcher}}))  # debug exists: goes on
    local = {**launcher, "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"}
    check.on_multirun_start(OmegaConf.create({"hydra": {"launcher": {**local, "partition": "gpu"}}}))  # not SLURM
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as stop:
        check.on_multirun_start(OmegaConf.create({"hydra": {"launcher": {**launcher, "partition": "gpu"}}}))
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "kd: error: hydra.launcher.partition=gpu: no such partition on this cluster; sinfo lists: debug\n"
    )


def test_submitits_accounting_warning_is_said_once_per_sweep(caplog):
    submitit_log = logging.getLogger("submitit")
    polls = QuietAccountingPolls()
    for _ in range(2):  # a second sweep in the same process says it once again
        polls.on_multirun_start(OmegaConf.create({}))
        assert not [h for h in submitit_log.handlers if isinstance(h, logging.StreamHandler)]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="submitit"):
            for _ in range(3):
                submitit_log.warning("Bypassing sacct error Command '['sacct', ...]' returned non-zero exit status 1.")
            submitit_log.warning("Job 7 failed")
        messages = [r.getMessage() for r in caplog.records]
        assert messages[0].startswith("SLURM keeps no accounting here") and messages[1:] == ["Job 7 failed"]
    assert len([f for f in submitit_log.filters if type(f).__name__ == "_OncePerSweep"]) == 1


def _ended_run(tmp_path: Path, **fields) -> Path:
    metrics = {"status": "completed", "slurm": {"job_id": "7", "node": "n1", "restart_count": 0}, **fields}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    return tmp_path


RESTARTED = {"SLURM_JOB_ID": "7", "SLURMD_NODENAME": "n2", "SLURM_RESTART_COUNT": "1"}


@pytest.mark.parametrize("status", ["completed", "pruned", "diverged"])
def test_a_restarted_job_finds_what_it_ended_with(tmp_path, status):
    run_dir = _ended_run(tmp_path, status=status)
    assert ended_before(run_dir, RESTARTED)["status"] == status
    assert ended_before(run_dir, {**RESTARTED, "SLURM_RESTART_COUNT": "0"}) is None  # its first run
    assert ended_before(run_dir, {}) is None  # not a SLURM job


@pytest.mark.parametrize(
    "fields",
    [
        {"status": "running"},
        {"status": None},
        {"slurm": {"job_id": "8", "node": "n1", "restart_count": 0}},  # another job's (a reused directory)
        {"slurm": None},  # written outside SLURM
    ],
)
def test_a_restarted_job_trains_unless_its_own_run_ended(tmp_path, fields):
    assert ended_before(_ended_run(tmp_path, **fields), RESTARTED) is None


def test_a_restarted_job_without_readable_results_trains(tmp_path):
    assert ended_before(tmp_path, RESTARTED) is None  # no metrics.json
    (tmp_path / "metrics.json").write_text("{not json")
    assert ended_before(tmp_path, RESTARTED) is None
    (tmp_path / "metrics.json").write_text("[1, 2]")
    assert ended_before(tmp_path, RESTARTED) is None


def test_a_recorded_end_is_given_again_as_it_happened():
    done = {"status": "completed", "objective_value": 71.5}
    assert pipeline._recorded_outcome(done) is done
    with pytest.raises(Pruned) as pruned:
        pipeline._recorded_outcome({"status": "pruned", "pruned_step": 3, "pruned_val_acc": 41.0})
    assert (pruned.value.step, pruned.value.value) == (3, 41.0)
    recorded = {"status": "diverged", "diverged_epoch": 2, "diverged_step": 5, "diverged_phase": "train"}
    with pytest.raises(Diverged) as diverged:
        pipeline._recorded_outcome({**recorded, "diverged_loss": float("inf")})
    assert (diverged.value.epoch, diverged.value.step, diverged.value.phase) == (2, 5, "train")
    assert diverged.value.value == float("inf")


@pytest.mark.slow
def test_a_job_run_again_after_it_ended_keeps_its_results(workdir):
    """What a hard ``scontrol requeue`` of a finished trial does, without a cluster: the
    same run directory, the same job id, SLURM_RESTART_COUNT=1."""
    args = [*FAST, "hydra.run.dir=run"]
    first = run_py(args, cwd=workdir, env={"SLURM_JOB_ID": "7", "SLURMD_NODENAME": "n1"})
    assert first.returncode == 0, first.stderr[-2000:]
    written = {name: (workdir / "run" / name).read_bytes() for name in ("metrics.json", "model.pt")}
    again = run_py(args, cwd=workdir, env={**RESTARTED, "SLURMD_NODENAME": "n1"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "SLURM started this job again after it had ended (completed)" in (workdir / "run" / "run.log").read_text()
    assert {name: (workdir / "run" / name).read_bytes() for name in written} == written
    other = run_py(args, cwd=workdir, env={**RESTARTED, "SLURM_JOB_ID": "8"})  # not this job's results
    assert other.returncode == 0, other.stderr[-2000:]
    assert read_metrics(workdir / "run")["slurm"] == {"job_id": "8", "node": "n2", "restart_count": 1}


# -- on the two-node cluster -------------------------------------------------------------


def _sweep_args(study: str, storage: str, n_trials: int, *extra: str) -> list[str]:
    return [
        "-m",
        "hparams_search=kd",
        *FAST,
        *ON_SLURM,
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweep.dir=sweep",
        *extra,
    ]


@pytest.mark.parametrize("where", ["journal", "postgresql"])
@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_a_kd_optuna_sweep_runs_its_trials_on_both_nodes(workdir, where):
    env = _cluster()
    storage = f"journal:///{workdir}/shared_fs/study.log" if where == "journal" else postgres_url()
    study_name = f"cluster_{uuid.uuid4().hex[:8]}"
    proc = run_py(_sweep_args(study_name, storage, 4, "hydra.sweeper.n_jobs=2"), cwd=workdir, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 4  # no parameters proposed twice
    jobs = [read_metrics(workdir / "sweep" / str(t.number))["slurm"] for t in trials]
    assert {j["node"] for j in jobs} == {"n1", "n2"}  # one CPU per node: two jobs at a time use both
    assert len({j["job_id"] for j in jobs}) == 4
    output = proc.stdout + proc.stderr
    assert "Bypassing sacct error" not in output and output.count("SLURM keeps no accounting") == 1
    given = storage if where == "postgresql" else None  # the password is not recorded
    summary = report([workdir / "sweep"], workdir / "report", storage=given)
    assert summary["runs"] == 0 and not summary["skipped"]  # the trials are the sweep's table, not runs
    (sweep,) = summary["sweeps"]
    assert sweep["study_name"] == study_name and len(sweep["rows"]) == 4


def _job_state(job_id: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_a_preempted_trial_resumes_to_the_uninterrupted_weights_and_a_rerun_changes_nothing(workdir):
    env = _cluster()
    storage = f"journal:///{workdir}/study.log"
    # Train the teacher first, outside SLURM: the trial's job then spends its time on the student.
    small = ["data.train_size=1024", "trainer.epochs=12", "trial.baseline=false"]
    warm = [*FAST, "data.train_size=1024", "trial.baseline=false", "loss=kd", "hydra.run.dir=warm"]
    assert run_py(warm, cwd=workdir, env=env).returncode == 0
    sweep = start_py(_sweep_args("preempt", storage, 1, *small), workdir, env=env)
    log = workdir / "sweep" / "0" / "run.log"
    _wait_for(lambda: log.exists() and "LightNN epoch 1/12: loss" in log.read_text(), 240, "the first epoch")
    job_id = read_job_id(workdir)
    # How SLURM announces preemption (and, with --signal, a time limit): submitit
    # requeues the job, which starts again and resumes from its last epoch checkpoint.
    subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True)
    ended = sweep.finish(timeout=300)
    assert ended.returncode == 0, ended.stdout[-1500:] + ended.stderr[-1500:]
    text = log.read_text()
    assert "this job is timed-out" in text or "this job is preempted" in text
    assert "LightNN: resuming from epoch" in text and "epoch 12/12" in text
    run_dir = workdir / "sweep" / "0"
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed" and metrics["slurm"]["restart_count"] == 1
    assert metrics["slurm"]["job_id"] == job_id

    # The same trial trained without interruption, here (one thread, as its job had).
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    plain = [o for o in overrides if "hydra." not in o]
    reference = run_py([*plain, "trainer.num_threads=1", "hydra.run.dir=reference"], cwd=workdir, env=env)
    assert reference.returncode == 0, reference.stderr[-2000:]
    resumed = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(workdir / "reference" / "model.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    # A hard requeue of the finished job: SLURM runs it once more; it finds its results.
    written = {name: (run_dir / name).read_bytes() for name in ("metrics.json", "model.pt")}
    subprocess.run(["scontrol", "requeue", job_id], env=env, check=True)
    _wait_for(
        lambda: _job_state(job_id, env).get("Restarts") == "2" and _job_state(job_id, env)["JobState"] == "COMPLETED",
        120,
        "the requeued job to finish",
    )
    assert "SLURM started this job again after it had ended (completed)" in log.read_text()
    assert {name: (run_dir / name).read_bytes() for name in written} == written
    (trial,) = optuna.load_study(study_name="preempt", storage=open_storage(storage)).get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == metrics["objective_value"]


def read_job_id(workdir: Path) -> str:
    """The SLURM job id of the sweep's only job (submitit names its folder after it)."""
    folders = [p.name for p in (workdir / "sweep" / ".submitit").iterdir() if p.name.isdigit()]
    assert len(folders) == 1, folders
    return folders[0]


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_a_partition_the_cluster_lacks_is_refused_before_submitting(workdir):
    env = _cluster()
    args = _sweep_args("refused", f"journal:///{workdir}/study.log", 1, "hydra.launcher.partition=gpu")
    proc = run_py(args, cwd=workdir, env=env)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["kd: error: hydra.launcher.partition=gpu: no such partition on this cluster; sinfo lists: debug"]
    assert not (workdir / "sweep" / ".submitit").exists()  # nothing was submitted


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_on_slurm_a_short_trials_node_starts_the_next_while_a_long_trial_runs(tmp_path):
    # tests/test_flight.py's gated app: trial 0 runs until trial 3 has started, which only
    # happens if trials start on the other node while trial 0 is in flight.
    from tests.test_flight import GATED_APP, GATED_CONF

    env = _cluster()
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "gated.yaml").write_text(GATED_CONF)
    (tmp_path / "gated.py").write_text(GATED_APP)
    args = [
        sys.executable, "gated.py", "-m", f"dir={tmp_path}", "wait_s=240", "hydra.sweeper.n_trials=4",
        "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
    ]  # fmt: skip
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "released").exists() and not (tmp_path / "timed_out").exists()
    nodes = {(tmp_path / f"node_{n}").read_text() for n in range(4)}
    assert nodes == {"n1", "n2"}
