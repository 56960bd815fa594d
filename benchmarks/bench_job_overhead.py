"""Per-job fixed cost: what every run (every sweep trial) pays before its first step.

    python benchmarks/bench_job_overhead.py --root ../shared/data/cifar10-jpeg [--repeats 5]

Times, in this process after the imports, the work a job does to find its dataset
and its stored teacher and teacher logits (kd.recipes.make_context and
prepare_teacher), once to build the caches (not counted), then ``--repeats`` times
warm. It does so twice: with each store and cache file trusted by its verified
stamp and the dataset's fingerprint read from its manifest (what jobs do), and, as
the baseline in the same process, re-hashing every file and every pixel as jobs did
before. Prints mean ± SD per job for both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=None, help="an image-folder dataset (default: synthetic data)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=None, help="cache dir (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import torch

    from kd import data as data_module
    from kd import storage
    from kd.devices import select_device
    from kd.plan import resolve
    from kd.provision import prepare_teacher
    from kd.recipes import make_context
    from kd.teacher import TeacherStore

    cache = args.cache or tempfile.mkdtemp(prefix="kd-bench-")
    data = ["data=folder", f"data.root={Path(args.root).resolve()}"] if args.root else ["data=synthetic"]
    overrides = [*data, f"paths.cache_dir={cache}", "loss=kd", "teacher.epochs=1", "trainer.device=cpu"]
    overrides += ["trainer.progress=false", "teacher.views=1"]
    with initialize_config_dir(config_dir=str(REPO / "conf")):
        cfg = compose(config_name="config", overrides=overrides)
    torch.set_num_threads(2)

    def one_job() -> float:
        start = time.perf_counter()
        ctx = make_context(resolve(cfg), select_device("cpu"))
        prepare_teacher(ctx, TeacherStore(cfg.paths.store_dir))
        return time.perf_counter() - start

    print(f"building caches (teacher: 1 epoch) under {cache} ...", flush=True)
    build = one_job()
    print(f"first job (decodes, trains and stores the teacher, caches its logits where missing): {build:.1f} s")
    results = {}
    for name, trusted in (("baseline: re-hash files and pixels", False), ("stamps and manifest", True)):
        storage.TRUST_STAMPS = trusted
        data_module.TRUST_MANIFESTS = trusted
        times = [one_job() for _ in range(args.repeats)]
        results[name] = times
        print(f"{name}: {statistics.fmean(times):.3f} ± {statistics.stdev(times):.3f} s per job (n={len(times)})")
    base, new = (statistics.fmean(t) for t in results.values())
    print(f"ratio baseline / now: {base / new:.1f}x")
    if args.out:
        record = {
            "command": "python benchmarks/bench_job_overhead.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 2 threads",
            "data": args.root or "synthetic",
            "first_job_s": build,
            "seconds_per_job": {name: {"values": t, "mean": statistics.fmean(t), "sd": statistics.stdev(t)}
                                for name, t in results.items()},
            "ratio": base / new,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
