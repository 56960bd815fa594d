"""The best student under a budget: a constrained sweep against picking from an
unconstrained front, at the same number of trials, each choice re-run on fresh seeds.

    python benchmarks/budget_study.py OUT --data-root ../shared/data/cifar10-jpeg --trials 12
    python benchmarks/budget_study.py OUT ... --summarise-only

1. ``hparams_search=kd_budget`` (T, alpha, ``model.width``; ``hydra.sweeper.constraints``
   ``flops<=--bound``): its answer is its best trial under the bound.
2. ``hparams_search=kd_pareto`` (the same T, alpha and width, maximising validation
   accuracy and minimising FLOPs) with as many trials: the pick is its most accurate
   front trial under the bound, as a user picking by hand would.
3. Each choice again on ``--seeds`` (fresh: neither sweep saw them), each seed paired
   with the CE student of the same width, seed and recipe.

Both sweeps select on validation accuracy at seed 42 with ``trial.baseline=false``.
Resumable: rerunning the same command resumes each sweep (its study is in OUT) and skips
finished re-runs. Writes ``OUT/budget.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.runs import finished, run_logged  # noqa: E402
from kd.cost import device_name  # noqa: E402
from kd.run_table import paired, seed_records, values_of  # noqa: E402
from kd.stats import describe, paired_difference  # noqa: E402

SPACE_KEYS = ("loss.temperature", "loss.alpha", "model.width")


def sweep(out: Path, name: str, common: list[str], extra: list[str]) -> int:
    """Run (or resume) one sweep into ``out/name``; returns its exit code."""
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *common, *extra, f"hydra.sweep.dir={out / name}",
           f"hydra.sweeper.study_name=budget-{name}"]  # fmt: skip
    with open(out / f"{name}.log", "a") as log:
        return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode


def trials_of(sweep_dir: Path) -> list[dict]:
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    found = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        metrics = json.loads((sweep_dir / str(t.number) / "metrics.json").read_text())
        found.append({"trial": t.number, "params": t.params, "val_acc": metrics["val_acc"], "flops": metrics["flops"],
                      "on_front": False, "feasible": all(v <= 0 for v in t.constraints.values())})  # fmt: skip
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        for t in found:
            t["on_front"] = t["trial"] in front
    return found


def choices(out: Path, bound: float) -> dict[str, dict | None]:
    """The constrained sweep's answer, and the front pick under the bound."""
    results = yaml.safe_load((out / "budget" / "optimization_results.yaml").read_text())
    budget = next((t for t in trials_of(out / "budget") if t["trial"] == results.get("best_trial")), None)
    front = [t for t in trials_of(out / "front") if t["on_front"] and t["flops"] <= bound]
    return {"constrained": budget, "front_pick": max(front, key=lambda t: t["val_acc"]) if front else None}


def rerun(out: Path, name: str, choice: dict, common: list[str], seeds: str, run: bool) -> dict | None:
    """``choice`` on the fresh seeds, paired with CE (None when not run yet and ``run`` is off)."""
    digest = hashlib.sha1(json.dumps(choice["params"], sort_keys=True).encode()).hexdigest()[:8]
    run_dir = out / "fresh" / f"{name}-{digest}"  # a setting's own folder: a resumed study may choose anew
    overrides = [*common, f"trial.seeds={seeds}", "trial.baseline=true", "loss=kd",
                 *(f"{k}={v}" for k, v in choice["params"].items())]  # fmt: skip
    if run and not finished(run_dir):
        run_logged(run_dir, overrides)
    if not finished(run_dir):
        return None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    records = seed_records(metrics)
    return {
        "params": choice["params"],
        "sweep_val_acc": choice["val_acc"],
        "flops": metrics["flops"],
        "val_acc": describe(values_of(records, "val_acc")),
        "test_acc": describe(values_of(records, "test_acc")),
        "kd_minus_ce": {"val_acc": paired(records, "val_acc"), "test_acc": paired(records, "test_acc")},
        "per_seed": {str(r["seed"]): {k: r.get(k) for k in ("val_acc", "test_acc")} for r in records},
    }


def compare(fresh: dict) -> dict | None:
    """Constrained answer - front pick, paired on the fresh seeds (val and test)."""
    if fresh.get("constrained") is None or fresh.get("front_pick") is None:
        return None
    a, b = fresh["constrained"]["per_seed"], fresh["front_pick"]["per_seed"]
    seeds = sorted(set(a) & set(b))
    return {
        split: paired_difference([a[s][split] for s in seeds], [b[s][split] for s in seeds])
        for split in ("val_acc", "test_acc")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--bound", type=float, default=1e6, help="FLOPs per image")
    parser.add_argument("--seeds", default="[101,102,103]")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["data=folder", f"data.root={args.data_root}", "model=student"]
    swept = [*common, "trial.baseline=false", f"hydra.sweeper.n_trials={args.trials}"]
    if not args.summarise_only:
        bound = f"hydra.sweeper.constraints=['flops<={args.bound:g}']"
        for name, extra in (("budget", ["hparams_search=kd_budget", bound]), ("front", ["hparams_search=kd_pareto"])):
            code = sweep(args.out, name, swept, extra)
            print(f"sweep {name}: exit {code}", flush=True)
    picked = choices(args.out, args.bound)
    fresh = {}
    for name, choice in picked.items():
        params = choice["params"] if choice is not None else None
        same = next((n for n in fresh if picked[n] is not None and picked[n]["params"] == params), None)
        if same is not None:  # both ways chose one setting: its fresh runs answer for both
            fresh[name] = fresh[same]
        elif choice is not None:
            fresh[name] = rerun(args.out, name, choice, common, args.seeds, run=not args.summarise_only)
        print(f"{name}: {json.dumps(fresh.get(name))}", flush=True)
    record = {
        "command": "python benchmarks/budget_study.py " + " ".join(sys.argv[1:]),
        "device": device_name(__import__("torch").device("cpu")),
        "bound": f"flops<={args.bound:g}",
        "trials_per_sweep": args.trials,
        "fresh_seeds": args.seeds,
        "sweeps": {name: trials_of(args.out / name) for name in ("budget", "front")},
        "choices": picked,
        "fresh": fresh,
        "same_choice": picked["constrained"] is not None
        and picked["front_pick"] is not None
        and picked["constrained"]["params"] == picked["front_pick"]["params"],
        "constrained_minus_front_pick": compare(fresh),
    }
    (args.out / "budget.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out / 'budget.json'}")


if __name__ == "__main__":
    main()
