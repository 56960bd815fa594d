"""What a model costs to run: parameters, FLOPs per image, latency and throughput.

Parameters and FLOPs are properties of the network (FLOPs counted by
``torch.utils.flop_counter`` on one image: a multiply-add is 2 FLOPs, as torch counts).
Latency and throughput are properties of the network *on a device with a thread
count*, timed with ``torch.utils.benchmark`` (which synchronises CUDA), so every timed
figure is recorded beside the device and threads it was measured with.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_image(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one ``image_shape`` image (eval mode, no grad)."""
    device = next(model.parameters()).device
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model.eval()(torch.zeros(1, *image_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def seconds_per_call(
    model: Callable[[torch.Tensor], Any],
    batch: torch.Tensor,
    min_run_time: float,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Median seconds of one inference call of ``model`` (a module, or any callable such
    as an onnxruntime session's) on ``batch`` (blocks of calls, timed until
    ``min_run_time`` seconds have run; torch.utils.benchmark warms up and syncs CUDA)."""

    def call() -> torch.Tensor:
        with torch.inference_mode(), _autocast(batch.device, autocast_dtype):
            return model(batch)

    call()  # first call: allocations, lazy initialisation
    timer = _benchmark().Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def _benchmark() -> Any:
    """torch.utils.benchmark, imported quietly: its import pulls in cpp_extension, which
    warns about a missing CUDA runtime on CPU-only machines (irrelevant to timing)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)
    return benchmark


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def measure(
    model: nn.Module,
    image_shape: tuple[int, ...],
    timing: bool = True,
    batch_size: int = 256,
    min_run_time: float = 0.2,
    memory_format: torch.memory_format = torch.contiguous_format,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """``params`` and ``flops`` (per image); with ``timing``, ``latency_ms`` (batch 1) and
    ``throughput`` (images/s at ``batch_size``) on the model's device and torch's current
    thread count, both recorded under ``cost``. The model itself is left untouched (a
    copy in eval mode is timed)."""
    cost: dict[str, Any] = {"params": count_parameters(model), "flops": flops_per_image(model, image_shape)}
    if not timing:
        return cost
    device = next(model.parameters()).device
    timed = copy.deepcopy(model).eval()
    one = torch.randn(1, *image_shape, device=device).contiguous(memory_format=memory_format)
    many = torch.randn(batch_size, *image_shape, device=device).contiguous(memory_format=memory_format)
    latency = seconds_per_call(timed, one, min_run_time, autocast_dtype)
    per_batch = seconds_per_call(timed, many, min_run_time, autocast_dtype)
    cost.update(
        latency_ms=latency * 1e3,
        throughput=batch_size / per_batch,
        cost=_conditions(device, batch_size, autocast_dtype),
    )
    return cost


def _conditions(device: torch.device, batch_size: int, autocast_dtype: torch.dtype | None) -> dict[str, Any]:
    """What a timed figure depends on besides the model: where and how it ran."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "latency_batch_size": 1,
        "throughput_batch_size": batch_size,
        "dtype": str(autocast_dtype or torch.float32).removeprefix("torch."),
        "torch": torch.__version__,
    }


def device_name(device: torch.device) -> str:
    """The model name of the GPU or CPU a figure was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
