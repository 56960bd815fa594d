"""flight.py's scheduling in one process: a launcher whose jobs end when the test says
so, a real in-memory study, and a stand-in for the sweeper's ask/tell methods."""

from __future__ import annotations

import threading
from typing import Any

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.kd_sweeper import flight
from hydra_plugins.kd_sweeper.flight import Flight, joblib_in_process, runs_in_flight
from hydra_plugins.kd_sweeper.refusals import interrupted
from hydra_plugins.kd_sweeper.study import FAIL_REASON, counted_trials


class GatedLauncher:
    """Each job blocks until the test releases its trial; records the order of launches."""

    def __init__(self) -> None:
        self.gates: dict[int, threading.Event] = {}
        self.outcomes: dict[int, Any] = {}
        self.launched: list[int] = []
        self.threads: list[str] = []
        self.running = self.most_running = 0
        self.lock = threading.Condition()

    def launch(self, overrides: list, initial_job_idx: int) -> list[JobReturn]:
        assert len(overrides) == 1  # one trial a call
        with self.lock:
            self.launched.append(initial_job_idx)
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            gate = self.gates.setdefault(initial_job_idx, threading.Event())
            self.lock.notify_all()
        gate.wait(30)
        with self.lock:
            self.running -= 1
        outcome = self.outcomes.get(initial_job_idx, float(initial_job_idx))
        if isinstance(outcome, BaseException):
            raise outcome
        ret = JobReturn(overrides=overrides[0])
        if isinstance(outcome, tuple):  # ("ran as job", n): what hydra.job.num the job says it ran as
            ret.hydra_cfg = OmegaConf.create({"hydra": {"job": {"num": outcome[1]}}})
            outcome = 1.0
        ret.status, ret.return_value = JobStatus.COMPLETED, outcome
        if outcome == "fail":
            ret.status, ret.return_value = JobStatus.FAILED, RuntimeError("on purpose")
        return [ret]

    def release(self, number: int, outcome: Any = None) -> None:
        if outcome is not None:
            self.outcomes[number] = outcome
        with self.lock:
            self.gates.setdefault(number, threading.Event()).set()

    def wait_launched(self, count: int) -> list[int]:
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.launched) >= count, timeout=30), self.launched
            return list(self.launched)


class Beat:
    interval = None


SPACE = ({"x": "its distribution"}, {"fixed": 1}, ["~deleted"])


class Sweeper:
    """The methods of KDOptunaSweeperImpl that Flight calls, on an in-memory study; each
    checks it is handed the study, the heartbeat and the space it expects."""

    def __init__(self, n_trials: int, n_jobs: int) -> None:
        self.n_trials, self.n_jobs, self.launcher = n_trials, n_jobs, GatedLauncher()
        self.study: optuna.Study | None = None
        self.beat = Beat()
        self.told: list[tuple[int, TrialState]] = []
        self.told_changed = threading.Condition()

    def _record(self, number: int, state: TrialState) -> None:
        with self.told_changed:
            self.told.append((number, state))
            self.told_changed.notify_all()

    def wait_told(self, count: int) -> None:
        with self.told_changed:
            assert self.told_changed.wait_for(lambda: len(self.told) >= count, timeout=30), self.told

    def _waiting_count(self, study: optuna.Study) -> int:
        assert study is self.study
        return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def _ask_counted(self, study: optuna.Study, heartbeat: Any) -> optuna.Trial:
        assert study is self.study and heartbeat is self.beat
        return study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})

    def _configure_trials(self, trials: list, *space: Any) -> list[tuple[str, ...]]:
        assert space == SPACE
        return [(f"x={t.params['x']}",) for t in trials]

    def _job_overrides(self, study: optuna.Study, trial: Any) -> tuple[str, ...]:
        assert study is self.study
        return (f"hydra.sweep.subdir={trial.number}",)

    def _fail(self, study: optuna.Study, trial: Any, reason: str | None, heartbeat: Any) -> None:
        assert study is self.study and heartbeat is self.beat
        if reason is not None:
            trial.set_user_attr(FAIL_REASON, reason)
        study.tell(trial, state=TrialState.FAIL)
        self._record(trial.number, TrialState.FAIL)

    def settle(self, study: optuna.Study, trial: Any, ret: JobReturn, heartbeat: Any) -> str | None:
        assert study is self.study and heartbeat is self.beat
        if ret.status == JobStatus.FAILED:
            self._fail(study, trial, "kd_optuna:error: on purpose", heartbeat)
            return "kd_optuna:error: on purpose"
        study.tell(trial, ret.return_value)
        self._record(trial.number, TrialState.COMPLETE)
        return None

    def _wait_for_others(self, study: optuna.Study, heartbeat: Any) -> bool:
        return False


class Silent:
    """Counts the sweeper's calls to retire other workers' silent trials."""

    def __init__(self) -> None:
        self.study: optuna.Study | None = None
        self.calls = 0
        self.called = threading.Condition()

    def retire(self, study: optuna.Study) -> None:
        assert study is self.study
        with self.called:
            self.calls += 1
            self.called.notify_all()


def _flight(n_trials: int, n_jobs: int, interval: float | None = None) -> tuple[Flight, Sweeper, optuna.Study]:
    sweeper, silent = Sweeper(n_trials, n_jobs), Silent()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sweeper.study = silent.study = study
    sweeper.beat.interval = interval
    return Flight(sweeper, study, SPACE, sweeper.beat, silent), sweeper, study


def _run(f: Flight, allowed: int = 0) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["failures"] = f.run(allowed)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_the_next_trial_starts_when_any_ends_not_when_the_slowest_does():
    f, sweeper, study = _flight(n_trials=5, n_jobs=2)
    thread, result = _run(f)
    launcher = sweeper.launcher
    assert launcher.wait_launched(2) == [0, 1]
    launcher.release(1)  # trial 0 still runs
    assert launcher.wait_launched(3) == [0, 1, 2]
    launcher.release(2)
    assert launcher.wait_launched(4) == [0, 1, 2, 3]
    assert study.trials[0].state == TrialState.RUNNING  # the long one, still in flight
    for number in (0, 3, 4):
        launcher.release(number)
    thread.join(30)
    assert result == {"failures": []}
    assert launcher.launched == [0, 1, 2, 3, 4]
    assert launcher.threads == [f"kd_optuna-trial-{n}" for n in range(5)]  # named for a stack dump
    assert [state for _, state in sweeper.told] == [TrialState.COMPLETE] * 5
    assert [n for n, _ in sweeper.told][:2] == [1, 2]  # told as they ended
    assert len(counted_trials(study)) == 5


def test_no_more_than_n_jobs_trials_are_in_flight():
    f, sweeper, study = _flight(n_trials=6, n_jobs=3)
    thread, result = _run(f)
    launcher = sweeper.launcher
    assert launcher.wait_launched(3) == [0, 1, 2]
    for number in range(6):
        launcher.release(number)
    thread.join(30)
    assert result == {"failures": []} and len(study.trials) == 6
    assert launcher.most_running == 3


def test_past_the_allowance_nothing_starts_and_trials_in_flight_finish():
    f, sweeper, study = _flight(n_trials=6, n_jobs=2)
    thread, result = _run(f, allowed=0)
    launcher = sweeper.launcher
    launcher.wait_launched(2)
    launcher.release(1, "fail")  # one failure, none allowed: trial 0 finishes, nothing new
    sweeper.wait_told(1)
    launcher.release(0)
    thread.join(30)
    assert launcher.launched == [0, 1]
    assert result == {"failures": ["kd_optuna:error: on purpose"]}
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]


def test_failures_within_the_allowance_are_replaced():
    f, sweeper, study = _flight(n_trials=3, n_jobs=1)
    thread, result = _run(f, allowed=1)
    for number, outcome in enumerate(["fail", None, None]):
        sweeper.launcher.release(number, outcome)
        sweeper.wait_told(number + 1)
    thread.join(30)
    assert result == {"failures": ["kd_optuna:error: on purpose"]}
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


def test_a_job_that_ran_as_another_trial_fails_its_trial_instead_of_scoring_it(caplog):
    f, sweeper, study = _flight(n_trials=2, n_jobs=2)
    thread, result = _run(f, allowed=2)
    sweeper.launcher.wait_launched(2)
    sweeper.launcher.release(0, ("ran as job", 0))  # its own job: scored
    sweeper.wait_told(1)
    sweeper.launcher.release(1, ("ran as job", 0))  # trial 0's job handed back for trial 1
    thread.join(30)
    reason = "kd_optuna:error: the launcher returned the job of trial 0 for trial 1"
    assert result == {"failures": [reason]}
    assert [(t.state, t.user_attrs.get(FAIL_REASON)) for t in study.trials] == [
        (TrialState.COMPLETE, None), (TrialState.FAIL, reason)]  # fmt: skip
    assert f"trial 1 failed: {reason}" in caplog.text


def test_an_interrupt_fails_every_trial_in_flight_and_stops_local_workers(monkeypatch, caplog):
    f, sweeper, study = _flight(n_trials=4, n_jobs=2)
    stopped = []
    monkeypatch.setattr(flight, "stop_local_workers", lambda: stopped.append(True))
    thread, result = _run(f)
    sweeper.launcher.wait_launched(2)
    sweeper.launcher.release(0, KeyboardInterrupt())  # as if Ctrl-C reached the sweeper's wait
    thread.join(30)
    assert isinstance(result["error"], KeyboardInterrupt)
    states = [(t.state, t.user_attrs.get(FAIL_REASON)) for t in study.trials]
    assert states == [(TrialState.FAIL, None), (TrialState.FAIL, "kd_optuna:interrupted")]
    assert stopped == [True] and not f.in_flight
    assert "stopped with trials [1] in flight: marked failed (interrupted)" in caplog.text
    sweeper.launcher.release(1)


def test_a_ctrl_c_that_broke_the_launchers_pool_stops_the_sweep_as_an_interrupt(monkeypatch):
    f, sweeper, study = _flight(n_trials=4, n_jobs=2)
    monkeypatch.setattr(flight, "stop_local_workers", lambda: None)
    thread, result = _run(f)
    sweeper.launcher.wait_launched(2)
    broken = RuntimeError("A task has failed to un-serialize.")
    broken.__cause__ = RuntimeError('Traceback (most recent call last):\n  ...\nKeyboardInterrupt\n"""')
    sweeper.launcher.release(0, broken)  # what joblib raises when the SIGINT lands in a worker
    thread.join(30)
    assert isinstance(result["error"], KeyboardInterrupt) and result["error"].__cause__ is broken
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL] and not f.in_flight
    sweeper.launcher.release(1)


def test_only_an_error_chained_to_a_keyboard_interrupt_counts_as_one():
    assert interrupted(KeyboardInterrupt()) and not interrupted(None)
    chained = OSError("pool broke")
    chained.__context__ = ValueError("worker: KeyboardInterrupt")
    assert interrupted(chained)
    loop = OSError("a")
    loop.__cause__ = OSError("b")
    loop.__cause__.__cause__ = loop  # a cycle ends the walk
    assert not interrupted(loop) and not interrupted(OSError("sbatch: command not found"))


def test_a_launcher_that_fails_fails_its_trial_and_the_sweep():
    f, sweeper, study = _flight(n_trials=2, n_jobs=1)
    thread, result = _run(f)
    sweeper.launcher.release(0, OSError("sbatch: command not found"))
    thread.join(30)
    assert isinstance(result["error"], OSError)
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert FAIL_REASON not in study.trials[0].user_attrs  # it never ran: it does not count
    assert counted_trials(study) == []


def test_stop_local_workers_shuts_joblibs_reusable_pool_down(monkeypatch):
    class Pool:
        def shutdown(self, wait: bool, kill_workers: bool) -> None:
            self.args = (wait, kill_workers)

    pool = Pool()
    module = type("M", (), {"_executor": pool})
    monkeypatch.setitem(flight.sys.modules, "joblib.externals.loky.reusable_executor", module)
    flight.stop_local_workers()
    assert pool.args == (False, True)
    monkeypatch.setitem(flight.sys.modules, "joblib.externals.loky.reusable_executor", None)
    flight.stop_local_workers()  # joblib never loaded: nothing to stop


@pytest.mark.parametrize("asynchronous", [True, False])
def test_only_out_of_process_launchers_fly(asynchronous):
    class SlurmLike:
        pass

    class BasicLauncher:  # named as Hydra's: its jobs run in the sweeper's process
        pass

    assert flight.runs_in_flight(SlurmLike(), asynchronous) is asynchronous
    assert flight.runs_in_flight(BasicLauncher(), asynchronous) is False


def test_a_queued_trial_runs_even_though_the_target_counts_it():
    # A dead worker's trial queued again (WAITING) counts toward n_trials, yet must run.
    f, sweeper, study = _flight(n_trials=1, n_jobs=1)
    study.enqueue_trial({"x": 0.5})
    thread, result = _run(f)
    sweeper.launcher.release(0)
    thread.join(30)
    assert result == {"failures": []} and [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_while_trials_run_the_sweeper_wakes_every_interval_to_retire_silent_ones():
    f, sweeper, study = _flight(n_trials=1, n_jobs=1, interval=0.01)
    thread, result = _run(f)
    sweeper.launcher.wait_launched(1)
    silent = f.silent
    with silent.called:  # no trial ends meanwhile: only the interval wakes it
        assert silent.called.wait_for(lambda: silent.calls >= 3, timeout=30)
    sweeper.launcher.release(0)
    thread.join(30)
    assert result == {"failures": []}


@pytest.mark.parametrize(
    ("settings", "in_process"),
    [
        ({"n_jobs": 2}, None),
        ({"n_jobs": 1}, "hydra.launcher.n_jobs=1 is one worker"),
        ({"n_jobs": 2, "backend": "threading"}, "hydra.launcher.backend=threading runs jobs in threads"),
        ({"n_jobs": 2, "prefer": "threads"}, "runs jobs in threads"),
        ({"n_jobs": 2, "require": "sharedmem"}, "runs jobs in threads"),
        ({"n_jobs": 1, "backend": "multiprocessing"}, None),  # Hydra keeps two worker processes
    ],
)  # fmt: skip
def test_a_joblib_launcher_that_would_run_jobs_in_this_process_keeps_batches(settings, in_process, caplog):
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

    launcher = JoblibLauncher(**{"backend": "loky", "prefer": "processes", "require": None, **settings})
    why = joblib_in_process(launcher)
    assert (why is None) == (in_process is None) and (in_process is None or in_process in why)
    assert runs_in_flight(launcher, asynchronous=True) == (in_process is None)
    warning = (
        f"trials run in batches, not in flight: {why}; set hydra.launcher.n_jobs to hydra.sweeper.n_jobs "
        "(at least 2) to run them in worker processes"
    )
    assert (warning in caplog.messages) == (in_process is not None)


def test_every_core_is_one_worker_on_a_one_core_machine(monkeypatch):
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

    monkeypatch.setattr(flight.joblib, "effective_n_jobs", lambda n_jobs: 1 if n_jobs == -1 else n_jobs)
    assert "hydra.launcher.n_jobs=-1 is one worker" in joblib_in_process(JoblibLauncher(n_jobs=-1))
    assert joblib_in_process(JoblibLauncher(n_jobs=2)) is None
    assert "hydra.launcher.n_jobs=-1 is one worker" in joblib_in_process(JoblibLauncher())  # joblib's default

    class NotJoblib:  # another launcher with a `joblib` attribute is not judged as joblib
        joblib = {"n_jobs": -1}

    assert joblib_in_process(NotJoblib()) is None


def test_a_job_number_is_read_only_where_the_launcher_gives_an_integer():
    assert flight.job_number(object()) is None  # a launcher whose returns carry no Hydra config
    assert flight.job_number(JobReturn()) is None
    assert flight.job_number(JobReturn(hydra_cfg=OmegaConf.create({"hydra": {"job": {"num": "7"}}}))) is None
    assert flight.job_number(JobReturn(hydra_cfg=OmegaConf.create({"hydra": {"job": {"num": 7}}}))) == 7


def test_a_search_space_that_raises_fails_its_trial_and_stops_the_sweep():
    f, sweeper, study = _flight(n_trials=2, n_jobs=1)

    def broken(trials: list, *space: Any) -> list:
        raise ValueError("no such distribution")

    sweeper._configure_trials = broken
    with pytest.raises(ValueError, match="no such distribution"):
        f.run(allowed=1)
    assert [(t.state, t.user_attrs.get(FAIL_REASON)) for t in study.trials] == [
        (TrialState.FAIL, "kd_optuna:error: no such distribution")]  # fmt: skip
    assert sweeper.launcher.launched == [] and not f.in_flight
