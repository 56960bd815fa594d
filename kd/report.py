"""Tables and plots from run, multirun and sweep directories.

    python -m kd.report DIR [DIR ...] [--out OUT] [--title TITLE]

Finds every ``metrics.json`` under the directories, groups runs identical in every
resolved setting but the seed (each row says which settings tell it apart), and writes
``OUT/report.md`` and ``OUT/summary.json``: mean ± standard error over seeds, and for
KD the paired difference to the CE student of the same seeds and recipe with its 95 %
interval. An Optuna sweep directory (one holding ``optuna.db``) gets its own table,
read from the study (completed trials only, never voided or failed ones), ordered by
the objective it was optimised on, with the selected trial marked and its test
accuracy alone shown; and PNG plots: objective against each parameter, Optuna's
optimisation history and parameter importances. Runs that have not finished (no
``metrics.json`` yet) or that diverged are listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kd.errors import ReportError, StorageError
from kd.race_report import race_table
from kd.run_table import collect, runs_markdown, summarise
from kd.storage import check_writable
from kd.sweep_report import (
    load_study,
    race_plots,
    sweep_markdown,
    sweep_plots,
    sweep_storage,
    sweep_table,
    unreadable_trial_metrics,
)

# matplotlib is imported in the functions that draw: sweep_plots selects the Agg
# backend (files only) before pyplot is first imported.


def report(dirs: list[Path], out: Path, title: str = "Results", storage: str | None = None) -> dict[str, Any]:
    """Write ``out/report.md`` and ``out/summary.json`` for ``dirs``; ``storage`` is the
    Optuna storage of sweeps whose study is not in their own ``optuna.db`` and was not
    recorded in full (a database URL with its password)."""
    out.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    notes: list[str] = []
    sweeps, tabled = [], []
    for d in dirs:
        if sweep_storage(d, storage) is None:
            continue
        study = load_study(d, notes, storage)  # once per sweep, for its table and its plots
        if study is None:  # its trials are reported as runs
            continue
        race = race_table(d, study)
        if race is not None:  # trial values are means over different seeds: the race tells
            sweeps.append(race)
            plots += race_plots(race, out)
        else:
            sweeps.append(sweep_table(d, study))
            notes += unreadable_trial_metrics(d, study)
            plots += sweep_plots(d, study, out, notes)
        tabled.append(d)
    found = collect(dirs, tabled)
    rows = summarise(found.runs)
    lines = [f"# {title}", ""]
    if rows:
        lines += [runs_markdown(rows), ""]
    for sweep in sweeps:
        lines += [sweep_markdown(sweep), ""]
    duplicates = [(r["label"], d) for r in rows for d in r["duplicates"]]
    if duplicates:
        lines += [f"Counted once ({len(duplicates)} duplicate seed result(s) left out; the newer run is kept):", ""]
        lines += [f"- {name}, seed {d['seed']}: `{d['run_dir']}` (kept: `{d['kept']}`)" for name, d in duplicates]
        lines.append("")
    if found.skipped:
        lines += [f"Skipped {len(found.skipped)} run(s):", ""]
        lines += [f"- `{d}`: {why}" for d, why in found.skipped]
        lines.append("")
    lines += [f"{note}" for note in notes] + ([""] if notes else [])
    for p in plots:
        lines.append(f"![{Path(p).stem}]({Path(p).name})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {
        "rows": rows,
        "sweeps": sweeps,
        "skipped": [{"run_dir": d, "reason": w} for d, w in found.skipped],
        "plots": [Path(p).name for p in plots],
        "notes": notes,
        "runs": len(found.runs),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.report", description="Tables and plots from run directories.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run, multirun or sweep directories")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: DIR.report beside the first DIR)"
    )
    parser.add_argument("--title", default="Results")
    parser.add_argument(
        "--storage",
        default=None,
        help="the sweeps' Optuna storage when it is not their optuna.db and was recorded without its password "
        "(postgresql://user:password@host/db)",
    )
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"kd.report: error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        first = args.dirs[0].resolve()
        out = args.out or first.with_name(first.name + ".report")
        if out.exists() and not out.is_dir():
            raise ReportError(f"--out {out} is a file; name a folder (the report writes report.md and more into it)")
        check_writable(out, "--out")
        summary = report(args.dirs, out, args.title, args.storage)
    except ReportError as err:
        print(f"kd.report: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"kd.report: error: {err}", file=sys.stderr)
        return StorageError.exit_code
    if summary["rows"]:
        print(runs_markdown(summary["rows"]))
    for sweep in summary["sweeps"]:
        print(sweep_markdown(sweep))
    for item in summary["skipped"]:
        print(f"skipped {item['run_dir']}: {item['reason']}")
    for note in summary["notes"]:
        print(note)
    for plot in summary["plots"]:
        print(f"wrote {plot}")
    print(f"wrote {out / 'report.md'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
