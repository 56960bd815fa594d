"""Pruning, journal-file studies, the dashboard, run trackers and plugin discovery."""

import json
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper.study import open_readonly
from kd.errors import Diverged, Pruned
from tests.conftest import FAST, read_metrics, run_py, start_py

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("error", [Diverged(2, 17, float("nan"), "LightNN"), Pruned(3, 41.5)])
def test_job_errors_survive_pickling_across_processes(error):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)


def _study(path):
    storage = f"sqlite:///{path}"
    return optuna.load_study(study_name=optuna.get_all_study_summaries(storage)[0].study_name, storage=storage)


PRUNING = [
    "-m",
    "hparams_search=kd",
    *FAST,
    "trainer.epochs=3",
    "optim.lr=choice(0.001,0.0000001)",  # one learning rate that barely learns: easy to prune
    "hydra/sweeper/pruner=percentile",
    "hydra.sweeper.pruner.percentile=50",
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.pruner.n_warmup_steps=0",
    "hydra.sweeper.max_failure_rate=0",  # a pruned trial is no failure
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]]
)
def test_pruned_trials_stop_early_and_are_not_failures(workdir, launcher):
    proc = run_py([*PRUNING, "hydra.sweeper.n_trials=6", *launcher, "hydra.sweep.dir=sw"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(workdir / "sw" / "optuna.db")
    states = [t.state for t in study.trials]
    assert len(states) == 6 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    for t in study.trials:
        metrics = read_metrics(workdir / "sw" / str(t.number))
        # Every epoch's validation accuracy reached the trial, pruned or not.
        assert sorted(t.intermediate_values) == list(range(1, metrics["epochs_trained"] + 1))
        if t.state == TrialState.PRUNED:
            assert metrics["status"] == "pruned" and metrics["epochs_trained"] < 3
        else:
            assert metrics["status"] == "completed" and t.intermediate_values[3] == pytest.approx(t.value)


@pytest.mark.slow
def test_a_killed_pruning_sweep_resumes_without_losing_or_repeating_trials(workdir):
    args = [*PRUNING, "hydra.sweeper.n_trials=5", "hydra.sweeper.study_name=prune_resume"]
    args += ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    storage = f"sqlite:///{workdir}/multirun/prune_resume/optuna.db"
    proc = start_py(args, cwd=workdir)

    def finished() -> int:
        try:
            study = optuna.load_study(study_name="prune_resume", storage=open_readonly(storage))  # never races
            return sum(t.state.is_finished() for t in study.trials)
        except Exception:
            return 0

    deadline = time.time() + 240
    while finished() < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before the kill: nothing would be resumed"
    os.killpg(proc.pid, 9)
    proc.wait()
    before = {t.number: t.state for t in optuna.load_study(study_name="prune_resume", storage=storage).trials}
    # the kill landed mid-sweep: some trials had ended, not all five
    assert 2 <= sum(s.is_finished() for s in before.values()) < 5, before
    again = run_py(args, cwd=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    from hydra_plugins.kd_sweeper.study import counted_trials

    study = optuna.load_study(study_name="prune_resume", storage=storage)
    counted = counted_trials(study)
    states = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]
    assert len(counted) == 5 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted), states
    for number, state in before.items():
        if state.is_finished():
            assert study.trials[number].state == state  # kept as it was, not rerun
    drawn = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(drawn)) == 5  # the resumed sweep drew new settings, none twice


@pytest.mark.slow
def test_tensorboard_logger_writes_each_epoch(workdir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = run_py([*FAST, "trainer.epochs=3", "logger=tensorboard", "hydra.run.dir=out"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = EventAccumulator(str(workdir / "out" / "tensorboard"))
    events.Reload()
    history = read_metrics(workdir / "out")["history"]
    logged = [(e.step, e.value) for e in events.Scalars("val_acc")]
    assert logged == [(h["epoch"], pytest.approx(h["val_acc"])) for h in history]
    assert [e.value for e in events.Scalars("train_loss")] == pytest.approx([h["train_loss"] for h in history])
    assert events.Scalars("final/test_acc")[0].value == pytest.approx(read_metrics(workdir / "out")["test_acc"])
    for cost in ("params", "flops", "latency_ms", "throughput"):  # what the student costs, in the tracker too
        assert events.Scalars(f"final/{cost}")[0].value == pytest.approx(read_metrics(workdir / "out")[cost])


@pytest.mark.slow
def test_mlflow_logger_makes_one_experiment_per_sweep(workdir):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir}/mlflow.db"
    args = ["-m", "hparams_search=kd", *FAST, "trainer.epochs=2", "logger=mlflow", f"logger.tracking_uri={uri}"]
    proc = run_py([*args, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=tracked"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["trial_number"] for r in runs) == ["0", "1"]
    for run in runs:
        metrics = read_metrics(workdir / "multirun" / "tracked" / run.data.tags["trial_number"])
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [(m.step, m.value) for m in history] == [
            (h["epoch"], pytest.approx(h["val_acc"])) for h in metrics["history"]
        ]
        assert run.data.metrics["final_val_acc"] == pytest.approx(metrics["val_acc"])
        assert run.data.tags["study_name"] == "tracked" and run.info.status == "FINISHED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE = (
    "import sys, optuna_dashboard; optuna_dashboard.run_server(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]))"
)


@pytest.mark.slow
def test_the_dashboard_serves_a_finished_study(tmp_path):
    pytest.importorskip("optuna_dashboard")
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="finished", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, storage, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    body = json.loads(response.read())
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.3)
        assert body is not None, "the dashboard did not answer within 60 s"
        (entry,) = body["study_summaries"]
        assert entry["study_name"] == "finished"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{entry['study_id']}", timeout=10) as r:
            detail = json.loads(r.read())
        assert [t["values"] for t in detail["trials"]] == [[t.value] for t in study.trials]
    finally:
        server.terminate()
        server.wait(10)


def test_the_sweeper_is_found_by_an_app_outside_the_repository(tmp_path):
    (tmp_path / "app.py").write_text(
        "import hydra\n\n\n@hydra.main(config_path=None)\ndef main(cfg):\n    pass\n\n\nmain()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "app.py", "hydra/sweeper=kd_optuna", "--cfg", "hydra", "--package", "hydra.sweeper"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "KDOptunaSweeper" in proc.stdout
