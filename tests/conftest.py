"""Shared fixtures: Hydra compose API and ``run.py`` in a subprocess, on synthetic data."""

from __future__ import annotations

import atexit
import importlib
import json
import multiprocessing
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RUN_PY = REPO / "run.py"

# Small, fast settings every end-to-end run uses unless a test says otherwise.
FAST = [
    "data=synthetic",
    "data.train_size=256",
    "data.test_size=128",
    "data.val_size=64",
    "trainer.epochs=1",
    "trainer.batch_size=64",
    "teacher.epochs=1",
    "teacher.batch_size=64",
    "trainer.progress=false",
    "trainer.device=cpu",
    "cost.min_run_time=0.01",
]


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF)):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    """A randomly initialised teacher checkpoint (seed 1), for tests that distil from a file."""
    import torch

    from kd.models import DeepNN
    from kd.storage import save_checked
    from kd.teacher import make_checkpoint

    torch.manual_seed(1)
    path = tmp_path / "teacher.pt"
    save_checked(make_checkpoint(DeepNN(), "kd.models.DeepNN", 10), path)
    return path


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test its own cache and store (the default, ~/.cache/kd, is shared by design)."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / ".kd_cache"))
    monkeypatch.delenv("KD_STORE_DIR", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _one_core_per_worker() -> None:
    """Under pytest-xdist, each worker and every process it starts on a core of its own:
    runs then take one thread each instead of two workers' runs sharing both cores."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    cores = sorted(os.sched_getaffinity(0))
    if worker.startswith("gw") and 1 < count <= len(cores):
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
        import torch

        torch.set_num_threads(1)  # torch sized its pool for every core when it was imported


@pytest.fixture(autouse=True)
def _denormals_as_found() -> None:
    """A test that trains in this process sets torch's flush-denormal mode (kd.devices.use_cpu);
    put it back, so that a later test in the same worker (hypothesis draws subnormal
    floats) does not depend on which tests ran before it."""
    yield
    if "torch" in sys.modules:
        sys.modules["torch"].set_flush_denormal(False)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory to run in, with its own cache and teacher store."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KD_STORE_DIR", raising=False)
    return tmp_path


# run.py's imports (torch, torch._dynamo, which every optimizer loads, Hydra, Optuna, kd)
# take ~3 s, most of a small test run. A fork server imports them once per test worker;
# each run_py or start_py call is then a fresh process forked from it that runs run.py as __main__
# with its own argv, cwd, environment, output files and session (so os.killpg(pid) ends
# it and its workers, as for subprocess's start_new_session).
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["torch", "torch._dynamo", "run", "tests.conftest"])


def _run_script(argv: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """The forked process: run.py's command line, exit code and output as a new process's."""
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        with open(path, "wb") as file:
            os.dup2(file.fileno(), fd)
    sys.argv = [str(RUN_PY), *argv]
    # The script's directory, then PYTHONPATH, first on the path, as at a new interpreter's start.
    sys.path[:0] = [str(RUN_PY.parent), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    importlib.invalidate_caches()
    code = 0
    try:
        runpy.run_path(str(RUN_PY), run_name="__main__")
    except SystemExit as stop:  # as the interpreter ends: None is 0, an int is the code, else printed and 1
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    # End as the interpreter would (a forked process skips this): join threads, which lets
    # executors such as joblib's stop their workers, then run the exit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Script:
    """``python run.py ARGS`` started by start_py; waits and polls like subprocess.Popen."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None) -> None:
        self.args = [sys.executable, str(RUN_PY), *args]
        self._outputs = Path(tempfile.mkdtemp(prefix="run_py."))
        weakref.finalize(self, shutil.rmtree, self._outputs, True)  # also when killed, never finished
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        out, err = str(self._outputs / "stdout"), str(self._outputs / "stderr")
        self._process = _FORKS.Process(target=_run_script, args=(list(args), str(cwd), full_env, out, err))
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def finish(self, timeout: float) -> subprocess.CompletedProcess:
        """Its exit code and output, as subprocess.run(..., capture_output=True, text=True);
        past ``timeout`` it is killed with its workers and TimeoutExpired raised."""
        try:
            code = self.wait(timeout)
            stdout, stderr = ((self._outputs / name).read_text(errors="replace") for name in ("stdout", "stderr"))
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self._process.join()
            raise
        return subprocess.CompletedProcess(self.args, code, stdout, stderr)


def start_py(args: list[str], cwd: Path, env: dict | None = None) -> Script:
    """``python run.py ARGS`` in ``cwd``, started and left running."""
    return Script(args, cwd, env)


def run_py(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in ``cwd``, as subprocess.run(..., capture_output=True, text=True)."""
    return start_py(args, cwd, env).finish(timeout)


def postgres_url() -> str:
    """The test PostgreSQL server's URL; skips without one, fails in CI (which starts one)."""
    url = os.environ.get("KD_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must provide KD_TEST_POSTGRES_URL (.ci/run starts PostgreSQL)")
        pytest.skip("no PostgreSQL server: set KD_TEST_POSTGRES_URL (see .ci/postgres.sh)")
    return url


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())
