"""Does torch.compile speed up the overhead-bound student on this CPU? Eager against compiled.

    python benchmarks/student_compile.py [--threads 2] [--images 4096] [--repeats 5]

In one process: LightNN (channels_last, Adam lr 1e-3, batch 128) on random images, one
model per arm built once; the first epoch of each (the compiled one includes its
compile time, or its load from the inductor cache) is printed apart, then ``--repeats``
epochs alternate between the arms. Printed per dtype (float32, bf16 autocast): both
first epochs, the median epoch of each and eager / compiled (above 1: compiling wins).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.epoch import bare_steps  # noqa: E402
from kd.models import LightNN  # noqa: E402


def make(compiled: bool) -> tuple:
    torch.manual_seed(0)
    model = LightNN().to(memory_format=torch.channels_last).train()
    return (torch.compile(model) if compiled else model), torch.optim.Adam(model.parameters(), lr=1e-3)


def epoch(run, optimizer, inputs: torch.Tensor, labels: torch.Tensor, amp: bool, batch: int) -> float:
    started = time.perf_counter()
    bare_steps(run, optimizer, inputs, labels, batch, amp)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    record: dict = {"command": "python benchmarks/student_compile.py " + " ".join(sys.argv[1:]), "arms": {}}
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    inputs = torch.randn(args.images, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.images,))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.images} images per epoch")
    for amp in (False, True):
        arms = {name: make(name == "compiled") for name in ("eager", "compiled")}
        first = {name: epoch(*arms[name], inputs, labels, amp, args.batch_size) for name in arms}
        times: dict[str, list[float]] = {name: [] for name in arms}
        for repeat in range(args.repeats):
            for name in ("eager", "compiled") if repeat % 2 == 0 else ("compiled", "eager"):
                times[name].append(epoch(*arms[name], inputs, labels, amp, args.batch_size))
        eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(
            f"{'bf16' if amp else 'float32':7s} first epoch: eager {first['eager']:.2f} s, compiled "
            f"{first['compiled']:.2f} s; then eager {eager:.3f} s, compiled {compiled:.3f} s (medians of "
            f"{args.repeats}); eager / compiled {eager / compiled:.2f}",
            flush=True,
        )
        record["arms"]["bf16" if amp else "float32"] = {
            "first_epoch_s": first, "epoch_s": times, "median_eager_s": eager, "median_compiled_s": compiled,
            "eager_over_compiled": eager / compiled,
        }  # fmt: skip
    record["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
