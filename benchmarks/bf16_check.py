"""Does bf16 autocast cost accuracy? The teacher recipe and a KD student, bf16 against float32, paired per seed.

    python benchmarks/bf16_check.py OUT --data-root ../shared/data/cifar10-jpeg \\
        --teacher-checkpoint PATH/model.pt
    python benchmarks/bf16_check.py OUT --summarise-only

Four ``run.py`` runs, each over ``--seeds`` (``trial.seeds``, default 42, 43, 44), the
same in everything but ``trainer.amp``:

- **teacher**: the seed README's teacher recipe (``model=teacher``: DeepNN, Adam lr
  1e-3, batch 128, 10 epochs, no augmentation), ``trainer.amp=bf16`` and ``off``;
- **kd**: LightNN distilled from ``--teacher-checkpoint`` (the ``kd_resnet_teacher``
  recipe without augmentation, 10 epochs, T = 4, alpha = 0.9), bf16 and ``off``.

Written to OUT/bf16.json: per arm and dtype the validation and test accuracy (mean ±
SE), bf16 - float32 paired per seed with its 95 % t interval, and the training seconds
per epoch of each (bf16 / float32 ratio; the runs go one after another, alone on the
machine if you want the ratio to mean anything). Resumable: a run whose metrics.json
says completed is not run again, and a killed run continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import finished, run_logged  # noqa: E402
from kd.run_table import seed_records  # noqa: E402
from kd.stats import describe, paired_difference  # noqa: E402


def arms(data_root: str, teacher_checkpoint: str) -> dict[str, list[str]]:
    data = ["data=folder", f"data.root={data_root}"]
    return {
        "teacher": ["model=teacher", *data],
        "kd": [
            "experiment=kd_resnet_teacher",
            "data.augment=false",
            *data,
            f"teacher.checkpoint={teacher_checkpoint}",
            "trainer.epochs=10",
            "trial.baseline=false",
        ],
    }


def run(run_dir: Path, overrides: list[str]) -> None:
    if finished(run_dir):
        print(f"{run_dir}: done before", flush=True)
        return
    code = run_logged(run_dir, overrides)
    if code:
        raise SystemExit(f"{run_dir} failed (exit {code}): see {run_dir.with_suffix('.log')}")
    print(f"{run_dir}: finished", flush=True)


def summarise(out: Path, names: list[str]) -> dict:
    summary: dict = {}
    for arm in names:
        records, seconds = {}, {}
        for dtype in ("bf16", "off"):
            metrics_file = out / f"{arm}-{dtype}" / "metrics.json"
            if not metrics_file.exists():
                break
            metrics = json.loads(metrics_file.read_text())
            records[dtype] = {r["seed"]: r for r in seed_records(metrics)}
            epochs = [e["seconds"] for r in seed_records(metrics) for e in r.get("history", [])]
            seconds[dtype] = statistics.median(epochs) if epochs else None
        if len(records) < 2:
            continue
        seeds = sorted(set(records["bf16"]) & set(records["off"]))
        row: dict = {"seeds": seeds, "median_epoch_seconds": seconds}
        for key in ("val_acc", "test_acc"):
            bf16 = [records["bf16"][s][key] for s in seeds]
            fp32 = [records["off"][s][key] for s in seeds]
            row[key] = {
                "bf16": describe(bf16),
                "float32": describe(fp32),
                "bf16_minus_float32": paired_difference(bf16, fp32),
            }
        if seconds["bf16"] and seconds["off"]:
            row["epoch_speedup"] = seconds["off"] / seconds["bf16"]
        summary[arm] = row
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    parser.add_argument("--teacher-checkpoint", default=None, help="the KD arm's teacher (omit: teacher arm only)")
    parser.add_argument("--seeds", default="[42,43,44]")
    parser.add_argument("--arms", nargs="+", default=["teacher", "kd"], choices=["teacher", "kd"])
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()
    out = args.out.resolve()
    names = [a for a in args.arms if a != "kd" or args.teacher_checkpoint]
    if not args.summarise_only:
        for arm in names:
            for dtype in ("bf16", "off"):
                overrides = [*arms(args.data_root, args.teacher_checkpoint or "")[arm], f"trainer.amp={dtype}"]
                run(out / f"{arm}-{dtype}", [*overrides, f"trial.seeds={args.seeds}"])
    summary = summarise(out, names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({a: {k: v for k, v in r.items() if k in ("epoch_speedup", "seeds")} for a, r in summary.items()}))


if __name__ == "__main__":
    main()
