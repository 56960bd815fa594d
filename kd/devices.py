"""Which device and how many CPU threads a job uses, so parallel jobs share fairly."""

from __future__ import annotations

import logging
import os

import torch

from kd.errors import ConfigError

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, and inside a SLURM job no more
    than the job's ``--cpus-per-task`` (a scheduler without core binding leaves the
    affinity at the whole node)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    granted = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(granted)) if granted.isdigit() and int(granted) > 0 else cores


def threads_per_job(parallel_jobs: int, cores: int | None = None) -> int:
    """Torch threads for one of ``parallel_jobs`` concurrent jobs: an equal share, at least 1."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, parallel_jobs))


def use_cpu(threads: int, flush_denormal: bool) -> bool:
    """Set torch's CPU threads and subnormal flushing for this process; returns whether
    subnormals are flushed. Flushing keeps the CPU at full speed where values drift into
    the subnormal range (4x slower per operation on x86), as on learnable synthetic data;
    it changes only values below float32's normal range (~1.2e-38)."""
    torch.set_num_threads(int(threads))
    return bool(torch.set_flush_denormal(flush_denormal)) and flush_denormal


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU with bf16 support, or
    a CPU with AVX512-BF16 or AMX (the instructions oneDNN's bf16 kernels use; elsewhere
    bf16 is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast_requested(setting: bool | str) -> bool:
    """Whether ``trainer.amp`` / ``teacher.amp`` asks for bf16 autocast anywhere (auto,
    bf16, true), before a device decides (:func:`uses_bf16`)."""
    return not (setting is False or setting == "off")


def uses_bf16(setting: bool | str, device: torch.device, key: str = "trainer.amp") -> bool:
    """Whether training with ``key=setting`` (auto | bf16 | off, or true / false) on
    ``device`` runs its forward and loss under bf16 autocast. auto: where bf16 is native."""
    if not autocast_requested(setting):
        return False
    if setting == "auto":
        return bf16_is_native(device)
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"{key}={setting} but bf16 autocast runs on CUDA or CPU only, not {device.type}: set {key}=auto"
        )
    return True


def select_device(spec: str, job_num: int = 0, gpu_count: int | None = None) -> torch.device:
    """Resolve ``trainer.device``; with several GPUs, job ``i`` gets GPU ``i mod k``.

    The GPU is chosen here rather than through CUDA_VISIBLE_DEVICES because joblib
    reuses worker processes, and CUDA reads that variable once per process.
    """
    if gpu_count is None:
        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec in ("auto", "cuda"):
        if gpu_count > 0:
            return torch.device("cuda", job_num % gpu_count)
        if spec == "cuda":
            raise ConfigError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda:"):
        index = int(spec.split(":")[1]) if spec.split(":")[1].isdigit() else -1
        if index < 0:
            raise ConfigError(f"trainer.device={spec} is not cuda:N with a GPU number N")
        if index >= gpu_count:
            raise ConfigError(
                f"trainer.device={spec} but only {gpu_count} CUDA device(s) exist; use trainer.device=auto"
            )
        return torch.device(spec)
    if spec == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device=mps but MPS is not available; use trainer.device=cpu or auto")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"trainer.device={spec} is not a device torch knows; use auto, cpu, cuda, cuda:N or mps"
        ) from None
