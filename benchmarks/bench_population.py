"""Trials per minute of a KD sweep on one GPU: one trial at a time vs populations.

    python benchmarks/bench_population.py --json out.json                  # synthetic 50k images
    python benchmarks/bench_population.py --data-root /tmp/cifar --json out.json
    python benchmarks/bench_population.py --smoke                          # tiny, on CPU: checks the script

GPU only (on CPU it prints why and exits 0, unless --smoke): grouped convolutions
make a population slower than sequential trials on CPU. Everything runs in this one
process on the same data, device and teacher logits:

1. one-at-a-time: ``--single`` KD trials (T x alpha grid points) through
   :func:`kd.pipeline.train_model`, plus one CE trial (the KD/CE step-time ratio);
2. populations of N = 8, 32, 64, 128 (``--sizes``) KD trials through
   :func:`kd.population.train_population`, with peak GPU memory;
3. trials per minute of each and the ratio to one-at-a-time.

``--pipeline`` also times, in subprocesses, the seed's three steps (teacher, CE
student, KD student) plus a 64-trial T x alpha grid launched with
``hydra/launcher=population``: the wall time a user waits.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.config import build  # noqa: E402
from kd.pipeline import make_context, prepare_teacher, run_recipe, train_model  # noqa: E402
from kd.population import Member, train_population  # noqa: E402
from kd.teacher import TeacherStore  # noqa: E402

TEMPERATURES = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]
ALPHAS = [0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]


def grid(n: int) -> list[tuple[float, float]]:
    points = [(t, a) for t in TEMPERATURES for a in ALPHAS]
    return [points[i % len(points)] for i in range(n)]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return compose("config", overrides=overrides)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pipeline(data: list[str], store: Path, out: Path) -> dict:
    """Seed steps 1a, 1b, 2 plus a 64-trial T x alpha grid on the population launcher."""
    data = [d for d in data if not d.startswith("data.val_size")]  # the seed experiments set it
    env_overrides = [*data, f"paths.store_dir={store}", "trainer.progress=false"]
    steps = {
        "teacher": ["experiment=seed_teacher"],
        "student": ["experiment=seed_student"],
        "kd": ["experiment=seed_kd"],
        "grid64": [
            "-m",
            "experiment=seed_kd",
            "hydra/launcher=population",
            "loss.temperature=" + ",".join(f"{t:g}" for t in TEMPERATURES),
            "loss.alpha=" + ",".join(f"{a:g}" for a in ALPHAS),
        ],
    }
    seconds = {}
    started = time.perf_counter()
    for name, args in steps.items():
        begin = time.perf_counter()
        where = [f"hydra.sweep.dir={out / name}"] if args[0] == "-m" else [f"hydra.run.dir={out / name}"]
        subprocess.run([sys.executable, str(ROOT / "run.py"), *args, *env_overrides, *where], check=True, cwd=ROOT)
        seconds[name] = time.perf_counter() - begin
        print(f"[pipeline] {name}: {seconds[name]:.1f} s", flush=True)
    seconds["total"] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="ImageFolder tree (default: synthetic 50,000 CIFAR-shaped images)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--single", type=int, default=4, help="KD trials timed one at a time")
    parser.add_argument("--sizes", default="8,32,64,128")
    parser.add_argument("--store", default="/tmp/kd_bench_store")
    parser.add_argument("--pipeline", action="store_true", help="also time the seed pipeline + a 64-trial grid")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_population: no CUDA GPU here; populations pay off on GPUs only (on CPU vmap-ed grouped")
        print("convolutions run slower than one trial at a time). Nothing measured.")
        return
    if args.data_root:
        data = ["data=folder", f"data.root={Path(args.data_root).resolve()}", "data.val_size=5000"]
    else:
        data = ["data=synthetic", "data.train_size=50000", "data.test_size=10000", "data.val_size=5000"]
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.smoke:
        data = ["data=synthetic", "data.train_size=512", "data.test_size=128", "data.val_size=64", "teacher.epochs=1"]
        args.epochs, args.single, sizes = 1, 2, [2, 4]
    common = [*data, f"trainer.epochs={args.epochs}", f"paths.store_dir={args.store}", "trainer.progress=false"]
    cfg = compose_cfg(["loss=kd", *common])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = make_context(cfg, device)
    started = time.perf_counter()
    teacher = prepare_teacher(ctx, TeacherStore(args.store))
    print(f"teacher ready in {time.perf_counter() - started:.1f} s ({teacher.info['teacher_source']})", flush=True)

    def kd_cfg(t: float, a: float, seed: int):
        return compose_cfg(["loss=kd", *common, f"loss.temperature={t}", f"loss.alpha={a}", f"seed={seed}"])

    # Warm-up (cuDNN autotuning, allocator) outside every timing.
    warm = kd_cfg(2.0, 0.5, 0)
    train_model(run_recipe(warm, 0), build(warm.loss, warm), ctx, teacher=teacher)

    single_seconds = []
    for i, (t, a) in enumerate(grid(args.single)):
        c = kd_cfg(t, a, i)
        synchronize(device)
        begin = time.perf_counter()
        train_model(run_recipe(c, i), build(c.loss, c), ctx, teacher=teacher)
        synchronize(device)
        single_seconds.append(time.perf_counter() - begin)
    ce = compose_cfg(["loss=ce", *common])
    synchronize(device)
    begin = time.perf_counter()
    ce_trained = train_model(run_recipe(ce, 0), build(ce.loss, ce), ctx)
    synchronize(device)
    ce_seconds = time.perf_counter() - begin
    single = sum(single_seconds) / len(single_seconds)
    results = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "data": "folder " + args.data_root if args.data_root else "synthetic",
        "epochs": args.epochs,
        "single": {
            "kd_seconds_per_trial": single,
            "kd_trials_per_minute": 60.0 / single,
            "ce_seconds_per_trial": ce_seconds,
            "kd_over_ce": single / ce_seconds,
            "ce_train_seconds": ce_trained.fit.train_seconds,
        },
        "populations": [],
    }
    print(f"one at a time: {single:.1f} s per KD trial ({60 / single:.2f}/min); KD/CE {single / ce_seconds:.2f}x")
    for n in sizes:
        members = []
        for i, (t, a) in enumerate(grid(n)):
            c = kd_cfg(t, a, 1000 + i)
            members.append(Member(run_recipe(c, 1000 + i), build(c.loss, c)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        begin = time.perf_counter()
        outcomes = train_population(members, ctx, teacher)
        synchronize(device)
        seconds = time.perf_counter() - begin
        finished = [o for o in outcomes if hasattr(o, "val_acc")]
        row = {
            "members": n,
            "seconds": seconds,
            "trials_per_minute": 60.0 * n / seconds,
            "speedup_vs_one_at_a_time": (60.0 * n / seconds) / (60.0 / single),
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "finished": len(finished),
            "best_val_acc": max(o.val_acc for o in finished) if finished else None,
        }
        results["populations"].append(row)
        print(
            f"population N={n}: {seconds:.1f} s, {row['trials_per_minute']:.1f} trials/min "
            f"({row['speedup_vs_one_at_a_time']:.1f}x one at a time)"
            + (f", peak {row['peak_gpu_memory_gib']:.2f} GiB" if row["peak_gpu_memory_gib"] is not None else ""),
            flush=True,
        )
    if args.pipeline:
        out = Path(args.store).parent / "kd_bench_pipeline"
        results["pipeline_seconds"] = time_pipeline(data, Path(args.store) / "pipeline", out)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
