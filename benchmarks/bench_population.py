"""Trials per hour of a KD sweep: one trial at a time vs populations, on CPU or GPU.

    python benchmarks/bench_population.py --json out.json                     # GPU: synthetic 50k images
    python benchmarks/bench_population.py --data-root DIR --json out.json     # an ImageFolder tree
    python benchmarks/bench_population.py --device cpu --sizes 8 --epochs 1   # CPU
    python benchmarks/bench_population.py --smoke                             # tiny: checks the script

Everything runs in this one process on the same data, device and teacher logits:

1. one at a time: ``--single`` KD trials (T x alpha grid points) through
   :func:`kd.recipes.train_model`, plus one CE trial (the KD/CE step-time ratio);
2. populations of N = ``--sizes`` KD trials through :func:`kd.population.train_population`
   (peak GPU memory on a GPU);
3. trials per hour of each and the ratio to one at a time.

``--repeats R`` measures both arms R times, alternating which goes first, and prints
each ratio and their mean ± SD (n = R). ``--pipeline`` also times, in subprocesses,
the seed's three steps plus a 64-trial T x alpha grid launched with
``hydra/launcher=population``: the wall time a user waits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.plan import resolve  # noqa: E402
from kd.population import Member, train_population  # noqa: E402
from kd.provision import prepare_teacher  # noqa: E402
from kd.recipes import make_context, train_model  # noqa: E402
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


def time_single(args, kd_cfg, ctx, teacher, device) -> list[float]:
    """Seconds of each of ``args.single`` KD trials trained one at a time."""
    seconds = []
    for i, (t, a) in enumerate(grid(args.single)):
        c = kd_cfg(t, a, i)
        synchronize(device)
        begin = time.perf_counter()
        train_model(resolve(c).recipe(i), resolve(c).new_loss(), ctx, teacher=teacher)
        synchronize(device)
        seconds.append(time.perf_counter() - begin)
    return seconds


def time_population(n: int, kd_cfg, ctx, teacher, device) -> dict:
    """One population of ``n`` KD trials: seconds, peak GPU memory, finished members."""
    members = []
    for i, (t, a) in enumerate(grid(n)):
        c = kd_cfg(t, a, 1000 + i)
        members.append(Member(resolve(c).recipe(1000 + i), resolve(c).new_loss()))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    begin = time.perf_counter()
    outcomes = train_population(members, ctx, teacher)
    synchronize(device)
    seconds = time.perf_counter() - begin
    finished = [o for o in outcomes if hasattr(o, "val_acc")]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "members": n,
        "seconds": seconds,
        "trials_per_hour": 3600.0 * n / seconds,
        "peak_gpu_memory_gib": peak,
        "finished": len(finished),
    }


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="ImageFolder tree (default: synthetic CIFAR-shaped images)")
    parser.add_argument("--train-size", type=int, default=50000, help="synthetic training images")
    parser.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--teacher-epochs", type=int, help="default: the teacher recipe's (10)")
    parser.add_argument("--single", type=int, default=4, help="KD trials timed one at a time, per repeat")
    parser.add_argument("--sizes", default="8,32,64,128")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--store", default="/tmp/kd_bench_store")
    parser.add_argument("--pipeline", action="store_true", help="also time the seed pipeline + a 64-trial grid")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device: checks the script runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.data_root:
        data = ["data=folder", f"data.root={Path(args.data_root).resolve()}", "data.val_size=5000"]
    else:
        data = ["data=synthetic", f"data.train_size={args.train_size}", "data.test_size=10000", "data.val_size=5000"]
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.smoke:
        data = ["data=synthetic", "data.train_size=512", "data.test_size=128", "data.val_size=64", "teacher.epochs=1"]
        args.epochs, args.single, sizes, args.repeats = 1, 2, [2, 4], 2
    common = [*data, f"trainer.epochs={args.epochs}", f"paths.store_dir={args.store}", "trainer.progress=false"]
    if args.teacher_epochs:
        common.append(f"teacher.epochs={args.teacher_epochs}")
    cfg = compose_cfg(["loss=kd", *common])
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    ctx = make_context(resolve(cfg), device)
    started = time.perf_counter()
    teacher = prepare_teacher(ctx, TeacherStore(args.store))
    print(f"teacher ready in {time.perf_counter() - started:.1f} s ({teacher.info['teacher_source']})", flush=True)

    def kd_cfg(t: float, a: float, seed: int):
        return compose_cfg(["loss=kd", *common, f"loss.temperature={t}", f"loss.alpha={a}", f"seed={seed}"])

    # Warm-up (cuDNN autotuning, allocator, first-call costs) outside every timing.
    warm = kd_cfg(2.0, 0.5, 0)
    train_model(resolve(warm).recipe(0), resolve(warm).new_loss(), ctx, teacher=teacher)
    ce = compose_cfg(["loss=ce", *common])
    synchronize(device)
    begin = time.perf_counter()
    train_model(resolve(ce).recipe(0), resolve(ce).new_loss(), ctx)
    synchronize(device)
    ce_seconds = time.perf_counter() - begin
    repeats = []
    for repeat in range(args.repeats):
        row: dict = {"repeat": repeat, "populations": []}
        arms = ["single", "population"] if repeat % 2 == 0 else ["population", "single"]
        for arm in arms:
            if arm == "single":
                row["single_seconds"] = time_single(args, kd_cfg, ctx, teacher, device)
            else:
                row["populations"] = [time_population(n, kd_cfg, ctx, teacher, device) for n in sizes]
        single = sum(row["single_seconds"]) / len(row["single_seconds"])
        row["single_trials_per_hour"] = 3600.0 / single
        for pop in row["populations"]:
            pop["speedup"] = pop["trials_per_hour"] / row["single_trials_per_hour"]
            print(
                f"repeat {repeat}: one at a time {row['single_trials_per_hour']:.0f} trials/h; population "
                f"N={pop['members']} {pop['trials_per_hour']:.0f} trials/h ({pop['speedup']:.2f}x)"
                + (f", peak {pop['peak_gpu_memory_gib']:.2f} GiB" if pop["peak_gpu_memory_gib"] is not None else ""),
                flush=True,
            )
        repeats.append(row)
    summary = {}
    for index, n in enumerate(sizes):
        mean, sd = mean_sd([r["populations"][index]["speedup"] for r in repeats])
        summary[str(n)] = {"speedup_mean": mean, "speedup_sd": sd, "n": len(repeats)}
        spread = f" ± {sd:.2f} (SD)" if sd is not None else ""
        print(f"population N={n}: {mean:.2f}x{spread} the trials/hour of one at a time, n={len(repeats)}")
    single_all = [s for r in repeats for s in r["single_seconds"]]
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "data": "folder " + args.data_root if args.data_root else f"synthetic {args.train_size}",
        "epochs": args.epochs,
        "kd_over_ce_one_trial": (sum(single_all) / len(single_all)) / ce_seconds,
        "repeats": repeats,
        "speedup": summary,
    }
    if args.pipeline:
        out = Path(args.store).parent / "kd_bench_pipeline"
        results["pipeline_seconds"] = time_pipeline(data, Path(args.store) / "pipeline", out)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
