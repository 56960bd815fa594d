"""Write the result tables of README.md and docs/ from the result JSON they report.

    python docs/readme_tables.py           # rewrite the tables
    python docs/readme_tables.py --check   # exit 1 if a document and the JSON disagree

Each table sits between ``<!-- table: NAME -->`` and ``<!-- end table -->`` in a
document; everything between the markers is generated, so a figure is never copied by
hand. ``tests/test_readme.py`` runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.markdown import si, table  # noqa: E402
from kd.stats import describe, fmt_difference, fmt_mean_se  # noqa: E402

RESULTS = ROOT / "docs" / "results"

# The study arms the README shows (every arm is in docs/study.md), each described.
STUDY_ARMS = {
    "seed-30-off": "30 epochs, no augmentation, seed-recipe teacher",
    "strong-10-off": "10 epochs, no augmentation",
    "strong-30-off": "30 epochs, no augmentation",
    "strong-30-off-T1.2942552502947942-a0.9118705903520428": (
        "30 epochs, no augmentation (`kd_strong_long`, T, α swept on seeds 42–44)"
    ),
    "strong-30-views16": "30 epochs, crop + flip, KD on 16 cached views",
    "resnet20-30-off-T4-a0.9": "30 epochs, no augmentation, ResNet-20 teacher (`kd_resnet_teacher data.augment=false`)",
    "resnet20-30-views16-T4-a0.9": "30 epochs, crop + flip, ResNet-20 teacher on 16 cached views (`kd_resnet_teacher`)",
    "resnet20-30-views16-swept": "the same, T, α swept on validation (seed 42), five fresh seeds",
}


def _load(path: Path):
    return json.loads(path.read_text())


def results_h200() -> str:
    """The original study's recipe on the H200: teacher, student, KD as published and as swept."""
    rows = _load(RESULTS / "h200" / "seed" / "summary.json")["rows"]
    order = {"Teacher": 0, "Student": 1}
    rows = sorted(rows, key=lambda r: (order.get(r["label"], 2), -(r["temperature"] or 0)))
    cells = [
        [r["label"], f"{r['params']:,}", fmt_mean_se(r["test_acc"]), _difference(r["kd_minus_ce"]["test_acc"])]
        for r in rows
    ]
    return table(["Model", "Parameters", "Test accuracy", "KD − CE, test [95 % CI]"], cells, align="lrrl")


def _difference(diff: dict | None) -> str:
    return fmt_difference(diff) if diff else "—"  # a model trained alone has no KD − CE


def _seeds(seeds: list[int]) -> str:
    return f"{seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))


def study_cpu() -> str:
    """Where distillation pays: the CPU study's arms, KD and its CE twin paired per seed."""
    study = RESULTS / "study_cpu"
    runs = [
        *_load(study / "study.json"),
        *_load(study / "retrain.json"),
        *_load(RESULTS / "study_resnet" / "study.json"),
    ]
    arms = {r["arm"]: r for r in runs}
    cells = []
    for name, description in STUDY_ARMS.items():
        r = arms[name]
        cells.append(
            [
                description,
                f"{r['teacher_val_acc']:.2f} %",
                f"{r['temperature']:.3g}, {r['alpha']:.2g}",
                _seeds(r["seeds"]),
                fmt_mean_se(r["kd"]["val_acc"]),
                fmt_mean_se(describe(r["ce"]["val_acc"])),
                fmt_difference(r["kd_minus_ce"]["val_acc"]),
                fmt_difference(r["kd_minus_ce"]["test_acc"]),
            ]
        )
    head = ["student", "teacher val", "T, α", "seeds", "KD val", "CE val", "KD − CE val [95 % CI]"]
    return table([*head, "KD − CE test [95 % CI]"], cells, align="lrrlrrll")


def performance_cpu() -> str:
    """The CPU benchmark: this project against the tutorial-style loop, phase by phase."""
    bench = _load(ROOT / "docs" / "bench_cpu.json")
    cells = []
    for r in bench["rows"]:
        reference = f"{r['reference_s']:.1f}" if r["reference_s"] is not None else "—"
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] is not None else "—"
        cells.append([r["phase"], reference, f"{r['project_s']:.1f}", ratio, r["note"] or ""])
    trial_ratio = f"{bench['kd_trial_over_ce_trial']:.2f}x"
    cells.append(["KD trial / CE trial, wall time", "", "", trial_ratio, "one trial each"])
    return table(["phase", "tutorial loop (s)", "kd (s)", "speed-up", "note"], cells, align="lrrrl")


def _pareto() -> dict:
    return _load(RESULTS / "pareto" / "pareto.json")


def pareto_cpu() -> str:
    """KD against CE at the widths on the KD front, fresh seeds, paired per seed."""
    study = _pareto()
    cells = []
    for t in study["kd"]["front"]:
        r = t["rerun"]
        cells.append(
            [
                f"{t['params']['model.width']:.2f}",
                si(r["flops"]),
                f"{t['params']['loss.temperature']:.3g}, {t['params']['loss.alpha']:.2g}",
                fmt_mean_se(r["val_acc"]),
                fmt_mean_se(r["ce_val_acc"]),
                fmt_difference(r["kd_minus_ce_val"]),
                fmt_difference(r["kd_minus_ce_test"]),
            ]
        )
    head = ["width", "FLOPs", "T, α", "KD val", "CE val", "KD − CE val [95 % CI]", "KD − CE test [95 % CI]"]
    return table(head, cells, align="rrrrrll")


def pareto_fronts() -> str:
    """Both sweeps' front trials, re-run on fresh seeds: accuracy against cost."""
    study = _pareto()
    cells = []
    for arm in ("kd", "ce"):
        on_line = {p["trial"] for p in study[arm]["front_on_fresh_seeds"]}
        for t in study[arm]["front"]:
            r = t["rerun"]
            hparams = f"{t['params']['loss.temperature']:.3g}, {t['params']['loss.alpha']:.2g}" if arm == "kd" else ""
            cells.append(
                [
                    arm.upper(),
                    str(t["trial"]) + (" ◆" if t["trial"] in on_line else ""),
                    f"{t['params']['model.width']:.3f}",
                    hparams,
                    f"{r['params_count']:,}",
                    f"{r['flops']:,}",
                    f"{t['val_acc']:.2f} %",
                    fmt_mean_se(r["val_acc"]),
                    fmt_mean_se(r["test_acc"]),
                    f"{r['latency_ms']:.3f}",
                ]
            )
    head = ["arm", "trial", "width", "T, α", "params", "FLOPs", "sweep val (seed 42)", "val, fresh seeds"]
    return table([*head, "test, fresh seeds", "latency (ms)"], cells, align="llrrrrrrrr")


def epoch_cpu() -> str:
    """benchmarks/epoch.py: the project's epoch against a bare loop, and against the matmul peak."""
    bench = _load(RESULTS / "performance" / "epoch_cpu.json")
    cells = []
    for r in bench["rows"]:
        ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
        cells.append(
            [
                r["model"],
                r["dtype"],
                f"{statistics.median(r['project_seconds']):.2f}",
                f"{statistics.median(r['bare_seconds']):.2f}",
                f"{r['ratio_median']:.2f} ({ratios})",
                f"{r['train_flops_per_image'] / 1e6:.1f}",
                f"{r['project_gflops']:.0f}",
                f"{100 * r['project_fraction_of_peak']:.0f} %",
            ]
        )
    head = ["model", "dtype", "project (s)", "bare (s)", "project / bare (each repeat)", "MFLOP per image"]
    return table([*head, "GFLOP/s", "of the matmul peak"], cells, align="llrrlrrr")


def _interval(ci: list[float] | None) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""


STRATEGIES = (("tpe_1_seed", "TPE, 1 seed"), ("tpe_3_seeds", "TPE, 3 fixed seeds"), ("racing", "racing"))


def racing_replay() -> str:
    """benchmarks/racing_replay.py: each strategy at each budget of seed-runs, pooled over surfaces and noise."""
    cells = []
    for budget in (30, 100):
        replay = _load(RESULTS / "racing" / f"replay_b{budget}.json")
        for strategy, label in (
            ("tpe_1_seed", "TPE, 1 seed"),
            ("tpe_3_seeds", "TPE, 3 fixed seeds"),
            ("racing", "racing"),
        ):
            r = replay["pooled"][strategy]
            claims = (
                f"{100 * r['false_claim_rate']:.1f} % {_interval(r['false_claim_ci95'])} of {r['claims']:,}"
                if r["claims"]
                else "none made"
            )
            cells.append(
                [
                    str(budget),
                    label,
                    f"{100 * r['p_within']:.1f} % {_interval(r['p_within_ci95'])}",
                    f"{r['mean_regret']:.3f} ± {r['mean_regret_se']:.3f}",
                    claims,
                    f"{r['n']:,}",
                ]
            )
    head = ["seed-runs", "strategy", "within 0.25 of the best [95% CI]", "mean regret ± SE", "false claims [95% CI]"]
    return table([*head, "sweeps"], cells, align="rlrrrr")


def racing_cifar() -> str:
    """The racing sweep on the CIFAR-10 copy: the confirmed setting and the reference on fresh seeds."""
    run = _load(RESULTS / "racing" / "cifar_student_long.json")
    cells = []
    for key, label in (("confirmed", "incumbent (confirmed)"), ("reference", "reference")):
        arm = run[key]
        trial = run["racing"]["incumbent" if key == "confirmed" else "reference"]
        params = trial["params"]
        row = [label, f"{params['loss.temperature']:.3g}, {params['loss.alpha']:.3g}", _seeds(arm["seeds"])]
        for split in ("val_acc", "test_acc"):
            row += [fmt_mean_se(arm[split]["kd_summary"]), fmt_difference(arm[split]["kd_minus_ce"])]
        cells.append(row)
    head = ["setting", "T, α", "seeds", "val", "val KD − CE [95% CI]", "test", "test KD − CE [95% CI]"]
    return table(head, cells, align="lllrrrr")


def _ms(cell: dict, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    se = f" ± {scale * cell['se']:.{digits}f}" if cell.get("se") is not None else ""
    return f"{scale * cell['mean']:.{digits}f}{se}{unit}"


def async_sleep() -> str:
    """benchmarks/async_sweep.py: batches against trials in flight, per n_jobs and pruner."""
    bench = _load(RESULTS / "async" / "sleep.json")
    cells = []
    for c in bench["cells"]:
        for mode in ("batch", "async"):
            m = c[mode]
            cells.append(
                [
                    str(c["n_jobs"]),
                    c["pruner"],
                    "batches" if mode == "batch" else "in flight",
                    _ms(m["wall_s"], unit=" s"),
                    _ms(m["waiting"], 100, unit=" %"),
                    _ms(m["idle"], 100, unit=" %"),
                    _ms(m["trials_per_hour"], digits=0),
                    f"{_ms(c['speedup'], digits=2)}x" if mode == "async" else "",
                ]
            )
    head = ["n_jobs", "pruner", "mode", "wall", "waiting", "idle", "trials / hour", "batch ÷ in flight"]
    return table(head, cells, align="rllrrrrr")


def async_kd() -> str:
    """benchmarks/async_kd.py: one kd sweep with ASHA on the CIFAR-10 copy, batches against in flight."""
    bench = _load(RESULTS / "async" / "kd_cifar.json")
    cells = []
    for r in bench["runs"]:
        params = r["best_params"]
        best = f"{r['best_val_acc']:.2f} % (T {params['loss.temperature']:.3g}, α {params['loss.alpha']:.3g})"
        cells.append(
            [
                "batches" if r["mode"] == "batch" else "in flight",
                str(r["trials"]),
                str(r["pruned"]),
                f"{r['wall_s']:.0f} s",
                f"{r['trials_per_hour']:.0f}",
                best,
            ]
        )
    head = ["mode", "trials", "pruned", "wall", "trials / hour", "best validation (one seed)"]
    return table(head, cells, align="lrrrrl") + f"\n\nBatches ÷ in flight: {bench['speedup']:.2f}x (one pair)."


def quickstart() -> str:
    """The README's real-data Quick start run: wall time with an empty cache and again,
    and what it measured (benchmarks/quickstart.py)."""
    bench = _load(RESULTS / "quickstart" / "quickstart.json")
    cells = []
    for label, run in (("first (empty cache)", bench["first_run"]), ("again (all stored)", bench["rerun"])):
        val = {"mean": run["val_acc"], "se": run["val_acc_se"]}
        test = {"mean": run["test_acc"], "se": run["test_acc_se"]}
        cells.append([
            label, f"{run['wall_seconds']:.0f} s", f"{run['teacher_val_acc']:.2f} %", fmt_mean_se(val),
            fmt_difference(run["kd_minus_ce"]["val_acc"]), fmt_mean_se(test),
            fmt_difference(run["kd_minus_ce"]["test_acc"]),
        ])  # fmt: skip
    head = ["run", "wall", "teacher val", "KD val", "KD − CE val [95 % CI]", "KD test", "KD − CE test [95 % CI]"]
    return table(head, cells, align="lrrrlrl")


def quickstart_line() -> str:
    """The Quick start's measured run time, one sentence for the README."""
    bench = _load(RESULTS / "quickstart" / "quickstart.json")
    first, again = bench["first_run"], bench["rerun"]
    return (
        f"Measured ({bench['machine']}, the JPEG copy): {first['wall_seconds']:.0f} s with an empty cache, "
        f"{again['wall_seconds']:.0f} s again ([figures](docs/performance.md#the-quick-starts-real-data-run))."
    )


def job_overhead() -> str:
    """benchmarks/bench_job_overhead.py: what a job pays before its first step."""
    bench = _load(RESULTS / "performance" / "job_overhead.json")
    rows = [
        [name, f"{cell['mean']:.3f} ± {cell['sd']:.3f} s", str(len(cell["values"]))]
        for name, cell in bench["seconds_per_job"].items()
    ]
    rows.append(["first job: decodes the images, trains the 1-epoch teacher, caches its logits",
                 f"{bench['first_job_s']:.0f} s", "1"])  # fmt: skip
    body = table(["path", "seconds per job (mean ± SD)", "n"], rows, align="lrr")
    return f"{body}\n\nBaseline ÷ stamps and manifest: {bench['ratio']:.1f}x ({bench['machine']})."


def student_compile() -> str:
    """benchmarks/student_compile.py: eager against torch.compile for the student."""
    bench = _load(RESULTS / "performance" / "compile.json")
    rows = []
    for dtype, arm in bench["arms"].items():
        first = arm["first_epoch_s"]
        rows.append([dtype, f"{first['eager']:.1f} s", f"{first['compiled']:.1f} s", f"{arm['median_eager_s']:.3f} s",
                     f"{arm['median_compiled_s']:.3f} s", f"{arm['eager_over_compiled']:.2f}"])  # fmt: skip
    head = [
        "dtype",
        "first epoch, eager",
        "first epoch, compiled",
        "epoch, eager",
        "epoch, compiled",
        "eager ÷ compiled",
    ]
    repeats = len(arm["epoch_s"]["eager"])
    return f"{table(head, rows, align='lrrrrr')}\n\nLater epochs: medians of {repeats} ({bench['machine']})."


def population_kernels() -> str:
    """benchmarks/population_kernels.py: the population test under each kernel choice."""
    bench = _load(RESULTS / "performance" / "population_kernels.json")
    rows = [["on" if c["onednn"] else "off", str(c["threads"]), c["pytest"]] for c in bench["cases"]]
    return f"{table(['oneDNN', 'threads', 'pytest'], rows, align='llr')}\n\n{bench['device']}, {bench['cores']} cores."


def budget_study() -> str:
    """benchmarks/budget_study.py: a constrained sweep against picking from the front, fresh seeds."""
    bench = _load(RESULTS / "budget" / "budget.json")
    rows = []
    for name, label in (("constrained", "constrained sweep's answer"), ("front_pick", "pick from the front")):
        choice, fresh = bench["choices"].get(name), bench["fresh"].get(name)
        if choice is None or fresh is None:
            rows.append([label, "—", "—", "—", "—", "—", "—"])
            continue
        p = choice["params"]
        setting = f"T {p['loss.temperature']:.3g}, α {p['loss.alpha']:.3g}, width {p['model.width']:.3g}"
        rows.append([label, setting, si(fresh["flops"]), f"{choice['val_acc']:.2f} %", fmt_mean_se(fresh["val_acc"]),
                     fmt_mean_se(fresh["test_acc"]), fmt_difference(fresh["kd_minus_ce"]["val_acc"])])  # fmt: skip
    head = ["choice", "setting", "FLOPs", "sweep val (seed 42)", "fresh val", "fresh test", "KD − CE val [95 % CI]"]
    sweeps = bench["sweeps"]
    feasible = sum(t["feasible"] for t in sweeps["budget"])
    under = sum(t["flops"] <= float(bench["bound"].split("<=")[1]) for t in sweeps["front"])
    diff = bench.get("constrained_minus_front_pick") or {}
    line = (
        f"{bench['trials_per_sweep']} trials each; {feasible} of the constrained sweep's and {under} of the "
        f"front sweep's trials met `{bench['bound']}`. "
    )
    if bench.get("same_choice"):
        line += f"Both ways chose the same setting; its runs on the fresh seeds {bench['fresh_seeds']} answer for both."
    else:
        val, test = fmt_difference(diff.get("val_acc")), fmt_difference(diff.get("test_acc"))
        line += f"Constrained − front pick on the fresh seeds {bench['fresh_seeds']}: val {val}, test {test}."
    return f"{table(head, rows, align='llrrrrl')}\n\n{line}"


TABLES = {
    "budget-study": budget_study,
    "job-overhead": job_overhead,
    "student-compile": student_compile,
    "population-kernels": population_kernels,
    "quickstart": quickstart,
    "quickstart-line": quickstart_line,
    "async-kd": async_kd,
    "async-sleep": async_sleep,
    "racing-cifar": racing_cifar,
    "racing-replay": racing_replay,
    "results-h200": results_h200,
    "study-cpu": study_cpu,
    "performance-cpu": performance_cpu,
    "pareto-cpu": pareto_cpu,
    "pareto-fronts": pareto_fronts,
    "epoch-cpu": epoch_cpu,
}
# The documents whose marked tables this script writes (and test_readme checks): the
# README and every page of docs/.
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.DOTALL)


def render(readme: str) -> str:
    """``readme`` with every marked table regenerated; unknown names are an error."""

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"a document marks a table {name!r}; docs/readme_tables.py knows {sorted(TABLES)}")
        return f"{match.group(1)}{TABLES[name]()}\n{match.group(4)}"

    return BLOCK.sub(fill, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a document differs from the JSON")
    parser.add_argument("--readme", type=Path, default=None, help="only this document (default: README.md and docs/)")
    args = parser.parse_args(argv)
    differing = []
    for document in [args.readme] if args.readme else DOCUMENTS:
        current = document.read_text()
        wanted = render(current)
        if wanted == current:
            continue
        differing.append(document)
        if not args.check:
            document.write_text(wanted)
    if args.check and differing:
        names = ", ".join(str(d) for d in differing)
        print(f"{names} disagree(s) with the result JSON: run python docs/readme_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
