"""Where does distillation pay? KD against CE with the identical student recipe.

    python benchmarks/study_kd.py OUT --data-root ../shared/data/cifar10-jpeg
    python benchmarks/study_kd.py OUT --data-root ... --arms strong-30-views,seed-10-off
    python benchmarks/study_kd.py OUT2 --data-root ... --arms strong-30-off-T4-a0.9 --seeds '[45,46,47]'
    python benchmarks/study_kd.py OUT --summarise-only

Each arm is one ``run.py`` KD run over three seeds (``trial.seeds``) with its CE
baseline (``trial.baseline``: the same student recipe trained with cross-entropy,
from the store, trained once), so every arm reports KD - CE as a paired difference
with a 95 % t interval. The arms cross the teacher (the seed recipe: Adam, 10 epochs,
no augmentation; or ``experiment=teacher_strong``), the student's length (10 or 30
epochs of AdamW + one-cycle) and augmentation (off, or crop + flip on the teacher's
K cached views). Selection uses the 5,000 validation images only; test accuracy
is reported beside it.

Resumable: an arm whose ``metrics.json`` says completed is not run again, and teachers,
CE baselines and view caches come from the store (``KD_CACHE_DIR``). Finally
``study.json`` and ``study.md`` (one row per arm) are written into OUT.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import finished  # noqa: E402
from kd.markdown import table  # noqa: E402
from kd.stats import describe, fmt_difference, fmt_mean_se  # noqa: E402

SEEDS = "[42,43,44]"
# The student recipe every arm shares (KD and its CE baseline alike).
STUDENT = ["optim=adamw", "schedule=onecycle", "optim.lr=2e-3", "data.val_size=5000"]
TEACHERS = {
    "seed": [],  # teacher.* defaults: the seed README's recipe
    "strong": [
        "optim@teacher.optim=adamw",
        "schedule@teacher.schedule=onecycle",
        "teacher.optim.lr=2e-3",
        "teacher.epochs=16",
        "teacher.augment=true",
    ],  # = experiment=teacher_strong's teacher
}


def arm_overrides(name: str, seeds: str = SEEDS) -> list[str]:
    """``<teacher>-<epochs>-<off|views[K|all]>[-T<temperature>-a<alpha>]``, e.g.
    ``strong-30-views`` (teacher.views default), ``strong-30-viewsall`` or
    ``strong-30-views-T4-a0.9``; ``ce-<epochs>-<off|views>`` trains only the CE
    baselines (they are published to the store, where the KD arms find them)."""
    teacher, epochs, augment, *rest = name.split("-")
    loss = ["loss=ce"] if teacher == "ce" else ["loss=kd"]
    for token in rest:  # a second KD setting chosen a priori, e.g. T4-a0.9
        key = {"T": "loss.temperature", "a": "loss.alpha"}[token[0]]
        loss.append(f"{key}={float(token[1:])}")
    return [
        *loss,
        *STUDENT,
        *TEACHERS.get(teacher, []),
        f"trainer.epochs={int(epochs)}",
        f"data.augment={'true' if augment.startswith('views') else 'false'}",
        *([f"teacher.views={augment[5:]}"] if augment.startswith("views") and augment != "views" else []),
        f"trial.seeds={seeds}",
    ]


DEFAULT_ARMS = [
    "strong-30-views",
    "strong-30-off",
    "strong-10-off",
    "strong-10-views",
    "seed-10-off",
    "seed-30-off",
    "seed-30-views",
    "seed-10-views",
]


def run_arm(name: str, out: Path, common: list[str], seeds: str = SEEDS) -> None:
    run_dir = out / name
    if finished(run_dir):
        print(f"[study] {name}: done already", flush=True)
        return
    cmd = [sys.executable, str(ROOT / "run.py"), *arm_overrides(name, seeds), *common, f"hydra.run.dir={run_dir}"]
    print(f"[study] {name}: {' '.join(cmd[2:])}", flush=True)
    started = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"[study] {name}: {time.time() - started:.0f} s", flush=True)


def summarise(out: Path) -> list[dict]:
    rows = []
    for metrics_file in sorted(out.glob("*/metrics.json")):
        m = json.loads(metrics_file.read_text())
        if m.get("status") != "completed" or "kd_minus_ce" not in m:  # CE-only arms are in the KD rows
            continue
        rows.append(
            {
                "arm": metrics_file.parent.name,
                "teacher_val_acc": m.get("teacher_val_acc"),
                "teacher_test_acc": m.get("teacher_test_acc"),
                "epochs": m["epochs"],
                "augment": m["settings"].get("data.augment"),
                "teacher_signal": m.get("teacher_signal"),
                "teacher_views": m.get("teacher_views"),
                "temperature": m.get("temperature"),
                "alpha": m.get("alpha"),
                "seeds": m["seeds"],
                "kd": {s: {"mean": m[s], "se": m[f"{s}_se"]} for s in ("val_acc", "test_acc")},
                "ce": {s: [p["baseline"][s] for p in m["per_seed"]] for s in ("val_acc", "test_acc")},
                "kd_minus_ce": m["kd_minus_ce"],
                "kd_per_seed": {s: [p[s] for p in m["per_seed"]] for s in ("val_acc", "test_acc")},
                "kd_train_seconds_per_seed": m["train_seconds"],
                "wall_seconds": m["wall_seconds"],
                "device": m["device"],
                "host": m["host"],
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["arm", "teacher val / test", "student epochs", "augmentation", "T, α", "KD val", "CE val"]
    head += ["KD − CE val [95 % CI]", "KD test", "CE test", "KD − CE test [95 % CI]", "wall (s)"]
    cells = []
    for r in rows:
        aug = (
            f"views K={r['teacher_views']}" if r["teacher_signal"] == "views" else ("online" if r["augment"] else "off")
        )
        ce = {s: describe(r["ce"][s]) for s in ("val_acc", "test_acc")}
        cells.append(
            [
                r["arm"],
                f"{r['teacher_val_acc']:.2f} / {r['teacher_test_acc']:.2f}",
                str(r["epochs"]),
                aug,
                f"{r['temperature']:g}, {r['alpha']:g}",
                fmt_mean_se(r["kd"]["val_acc"]),
                fmt_mean_se(ce["val_acc"]),
                fmt_difference(r["kd_minus_ce"]["val_acc"]),
                fmt_mean_se(r["kd"]["test_acc"]),
                fmt_mean_se(ce["test_acc"]),
                fmt_difference(r["kd_minus_ce"]["test_acc"]),
                f"{r['wall_seconds']:.0f}",
            ]
        )
    return table(head, cells, align="lrrlrrrlrrlr") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-root", help="ImageFolder tree (e.g. ../shared/data/cifar10-jpeg)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated arm names")
    parser.add_argument(
        "--seeds", default=SEEDS, help="student seeds of every arm, e.g. '[45,46,47]' to retrain a chosen setting"
    )
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra run.py overrides for every arm (e.g. trainer.device=cuda)")
    args = parser.parse_intermixed_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarise_only:
        common = ["data=folder", f"data.root={Path(args.data_root).resolve()}", "trainer.progress=false"]
        for name in args.arms.split(","):
            run_arm(name, args.out, [*common, *args.overrides], args.seeds)
    rows = summarise(args.out)
    (args.out / "study.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "study.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
