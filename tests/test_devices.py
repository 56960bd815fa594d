import json

import pytest
import torch

from kd.devices import available_cores, bf16_is_native, select_device, threads_per_job, use_cpu, uses_bf16
from kd.errors import ConfigError
from tests.conftest import FAST, run_py


@pytest.mark.parametrize(("jobs", "cores", "expected"), [(1, 2, 2), (2, 2, 1), (3, 2, 1), (4, 16, 4), (3, 16, 5)])
def test_parallel_jobs_split_the_cores(jobs, cores, expected):
    assert threads_per_job(jobs, cores) == expected


def test_jobs_take_gpus_round_robin():
    assert [select_device("auto", job, gpu_count=3) for job in range(5)] == [
        torch.device("cuda", i) for i in (0, 1, 2, 0, 1)
    ]
    assert select_device("cuda", 5, gpu_count=2) == torch.device("cuda", 1)


def test_explicit_devices():
    assert select_device("cpu", 3, gpu_count=4) == torch.device("cpu")
    assert select_device("cuda:1", 0, gpu_count=2) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        select_device("cuda:1", 0, gpu_count=1)
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        select_device("cuda", 0, gpu_count=0)
    # What torch itself cannot parse is a one-line ConfigError too, not its RuntimeError.
    with pytest.raises(ConfigError, match=r"^trainer.device=cpu:abc is not a device torch knows"):
        select_device("cpu:abc", 0, gpu_count=0)


def test_auto_without_gpu_falls_back():
    assert select_device("auto", 0, gpu_count=0).type in ("cpu", "mps")


@pytest.mark.slow
def test_joblib_jobs_share_the_cores(workdir):
    proc = run_py(
        ["-m", *FAST, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", "hydra.sweep.dir=sweep"],
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [json.loads((workdir / "sweep" / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert sorted(r["seed"] for r in runs) == [1, 2]
    assert {r["num_threads"] for r in runs} == {threads_per_job(2, available_cores())}


def test_use_cpu_sets_threads_and_flushes_subnormals():
    threads = torch.get_num_threads()
    tiny = torch.tensor([1e-39])  # a float32 subnormal
    try:
        assert use_cpu(1, flush_denormal=True) is True and torch.get_num_threads() == 1
        assert (tiny * 1.0).item() == 0.0  # flushed to zero
        assert use_cpu(1, flush_denormal=False) is False
        assert (tiny * 1.0).item() > 0.0
    finally:
        use_cpu(threads, flush_denormal=False)


def test_amp_settings_resolve_per_device(monkeypatch):
    cpu = torch.device("cpu")
    assert not uses_bf16(False, cpu) and not uses_bf16("off", cpu)
    assert uses_bf16(True, cpu) and uses_bf16("bf16", cpu)
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert bf16_is_native(cpu) is (avx512_bf16 or amx)
        assert uses_bf16("auto", cpu) is (avx512_bf16 or amx)
    for supported in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda v=supported: v)
        assert uses_bf16("auto", torch.device("cuda", 0)) is supported
    assert not uses_bf16("auto", torch.device("mps"))
    with pytest.raises(ConfigError, match=r"^teacher.amp=bf16 but bf16 autocast runs on CUDA or CPU only, not mps"):
        uses_bf16("bf16", torch.device("mps"), key="teacher.amp")


def test_a_slurm_job_uses_no_more_cores_than_it_was_given(monkeypatch):
    all_cores = available_cores()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert available_cores() == 1 and threads_per_job(1) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(all_cores + 5))
    assert available_cores() == all_cores  # never more than the affinity allows
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")
    assert available_cores() == all_cores


def test_without_a_gpu_count_the_visible_gpus_are_counted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert select_device("auto", 4) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: pytest.fail("counted GPUs CUDA cannot use"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("auto", 4) == torch.device("cpu")


def test_mps_is_used_where_it_exists_and_refused_where_it_does_not(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("auto", 0, gpu_count=0) == torch.device("mps")
    assert select_device("auto", 0, gpu_count=1) == torch.device("cuda", 0)  # a GPU comes first
    assert select_device("mps", 0, gpu_count=0) == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("auto", 0, gpu_count=0) == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        select_device("mps", 0, gpu_count=0)
    assert str(err.value) == "trainer.device=mps but MPS is not available; use trainer.device=cpu or auto"


@pytest.mark.parametrize(
    ("spec", "gpus", "message"),
    [
        ("cuda", 0, "trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto"),
        ("cuda:x", 4, "trainer.device=cuda:x is not cuda:N with a GPU number N"),
        ("cuda:", 4, "trainer.device=cuda: is not cuda:N with a GPU number N"),
        ("cuda:2", 2, "trainer.device=cuda:2 but only 2 CUDA device(s) exist; use trainer.device=auto"),
        (
            "tpu",
            0,
            "trainer.device=tpu is not a device torch knows; use auto, cpu, cuda, cuda:N or mps",
        ),
    ],
)
def test_each_device_refusal_is_one_line_with_its_fix(monkeypatch, spec, gpus, message):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        select_device(spec, 0, gpu_count=gpus)
    assert str(err.value) == message


def test_a_single_run_takes_the_first_gpu():
    assert select_device("auto", gpu_count=3) == torch.device("cuda", 0)


def test_the_last_gpu_is_a_valid_choice():
    assert select_device("cuda:0", 7, gpu_count=1) == torch.device("cuda", 0)
    assert select_device("cuda:3", 0, gpu_count=4) == torch.device("cuda", 3)


def test_cores_without_affinity_are_the_machines_and_a_slurm_grant_must_be_a_count(monkeypatch):
    def no_affinity(pid):
        raise AttributeError("sched_getaffinity")

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", no_affinity)
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert available_cores() == 6
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert available_cores() == 1
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    for granted, cores in (("0", 6), ("abc", 6), ("-2", 6), ("2", 2), ("6", 6), ("7", 6)):
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", granted)
        assert available_cores() == cores, granted
