"""The runs table of a report: completed runs found under the given directories,
grouped by every resolved setting but the seed, with mean ± standard error over seeds
and, for KD, the paired difference to the CE student of the same seeds and recipe."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd import models
from kd.losses import method_named
from kd.markdown import duration, short, si, table
from kd.stats import describe, fmt_difference, fmt_mean_se, paired_difference


@dataclass
class Collected:
    runs: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (directory, reason)


def collect(roots: list[Path], sweep_dirs: list[Path] = ()) -> Collected:
    """Completed runs under ``roots`` (outside ``sweep_dirs``, which the study reports),
    and the run directories skipped with why."""
    found = Collected()
    for root in roots:
        for hydra_dir in sorted(root.rglob(".hydra")):
            run_dir = hydra_dir.parent
            if any(run_dir.is_relative_to(d) for d in sweep_dirs):
                continue
            metrics_file = run_dir / "metrics.json"
            if not metrics_file.exists():
                found.skipped.append((str(run_dir), "no metrics.json: still running, or stopped before finishing"))
                continue
            try:
                metrics = json.loads(metrics_file.read_text())
            except (OSError, json.JSONDecodeError) as err:
                found.skipped.append((str(run_dir), f"unreadable metrics.json ({type(err).__name__})"))
                continue
            status = metrics.get("status", "completed")
            if status != "completed":
                where = f" at epoch {metrics.get('diverged_epoch')}, step {metrics.get('diverged_step')}"
                found.skipped.append((str(run_dir), status + (where if status == "diverged" else "")))
                continue
            metrics["run_dir"] = str(run_dir)
            metrics["finished_at"] = metrics_file.stat().st_mtime  # which of two copies is newer
            found.runs.append(metrics)
    return found


def label(run: dict) -> str:
    """``Student + KD (T=2, α=0.25)``: the model, and the method with its hyperparameters,
    named as their classes name themselves (``title``, ``symbols``): recorded in the run's
    metrics.json, or, for older runs, read from the classes kd knows."""
    model = getattr(models, str(run["model"]), None)
    name = getattr(model, "title", None) or run["model"]
    if run["loss"] == "ce":
        return name
    method = method_named(run["loss"])
    title = run.get("loss_title") or (method.display_name() if method else run["loss"])
    symbols = dict(run.get("loss_symbols") or (method.symbols if method else {}))
    hparams = run.get("loss_hparams") or {k: run[k] for k in ("temperature", "alpha") if run.get(k) is not None}
    order = list(symbols)  # metrics.json stores keys sorted; show them in the method's order
    ranked = sorted(hparams.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
    shown = ", ".join(f"{symbols.get(k, k)}={v:.3g}" for k, v in ranked)
    return f"{name} + {title}" + (f" ({shown})" if shown else "")


def settings_of(run: dict) -> dict:
    """Every result-deciding setting but the seed (older metrics.json: the fields they had)."""
    if "settings" in run:
        return run["settings"]
    keys = ("model", "loss", "temperature", "alpha", "epochs", "batch_size", "lr", "dataset", "train_examples")
    return {k: run.get(k) for k in keys}


def seed_records(run: dict) -> list[dict]:
    """One record per seed the run trained (older runs: one)."""
    if run.get("per_seed"):
        return run["per_seed"]
    keys = ("seed", "val_acc", "test_acc", "train_seconds")
    return [{k: run.get(k) for k in keys}]


def unique_seeds(group: list[dict]) -> tuple[list[dict], list[dict]]:
    """One record per seed of a setting: a result is (settings, seed), counted once however
    many directories hold it. The newest run's record is kept; the others are returned
    as duplicates (seed, where, and where the kept one is)."""
    kept: dict[Any, tuple[dict, str | None]] = {}
    duplicates = []
    for run in sorted(group, key=lambda r: r.get("finished_at", 0.0), reverse=True):
        for record in seed_records(run):
            seed = record.get("seed")
            if seed is not None and seed in kept:
                duplicates.append({"seed": seed, "run_dir": run.get("run_dir"), "kept": kept[seed][1]})
                continue
            kept[seed if seed is not None else id(record)] = (record, run.get("run_dir"))
    records = [record for record, _ in kept.values()]
    records.sort(key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
    return records, duplicates


def values_of(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if r.get(key) is not None]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def paired(records: list[dict], key: str) -> dict | None:
    pairs = [(r[key], r["baseline"][key]) for r in records if r.get("baseline") and r.get(key) is not None]
    pairs = [(a, b) for a, b in pairs if b is not None]
    return paired_difference([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None


def summarise(runs: list[dict]) -> list[dict]:
    """One row per setting: runs identical in every resolved setting but the seed."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        groups[json.dumps(settings_of(run), sort_keys=True, default=str)].append(run)
    rows = []
    for group in groups.values():
        first = group[0]
        records, duplicates = unique_seeds(group)
        rows.append(
            {
                "label": label(first),
                "model": first["model"],
                "params": first.get("params"),
                "flops": first.get("flops"),
                # Timed per run: the median over the group's runs (each on its own device and threads).
                "latency_ms": _median(values_of(group, "latency_ms")),
                "cost": first.get("cost"),
                "loss": first["loss"],
                "temperature": first.get("temperature"),
                "alpha": first.get("alpha"),
                "epochs": first.get("epochs"),
                "dataset": first.get("dataset"),
                "train_examples": first.get("train_examples"),
                "seeds": sorted(r["seed"] for r in records),
                "val_acc": describe(values_of(records, "val_acc")),
                "test_acc": describe(values_of(records, "test_acc")),
                "kd_minus_ce": {"val_acc": paired(records, "val_acc"), "test_acc": paired(records, "test_acc")},
                "train_seconds_mean": describe(values_of(records, "train_seconds"))["mean"],
                "device": first.get("device"),
                "settings": settings_of(first),
                "run_dirs": [r.get("run_dir") for r in group],
                "duplicates": duplicates,  # (seed, run_dir) counted once, from the newer run
            }
        )
    # Say what tells the rows apart: the settings whose values differ between them.
    all_keys = sorted({k for r in rows for k in r["settings"]})
    varying = [k for k in all_keys if len({json.dumps(r["settings"].get(k), default=str) for r in rows}) > 1]
    for r in rows:
        r["differs"] = {k: r["settings"].get(k) for k in varying if k not in ("loss._target_", "model._target_")}
    order = {"DeepNN": 0, "LightNN": 1}
    rows.sort(key=lambda r: (order.get(r["model"], 2), r["loss"] != "ce", r["label"], json.dumps(r["differs"])))
    return rows


def runs_markdown(rows: list[dict]) -> str:
    """The runs table: one row per setting, accuracies over seeds, KD − CE paired."""
    head = ["Model", "Setting", "Parameters", "FLOPs", "Latency", "Seeds", "Val acc", "Test acc"]
    head += ["KD − CE, val [95% CI]", "KD − CE, test [95% CI]", "Training time"]
    cells = []
    for r in rows:
        # The label already names the method and its hyperparameters.
        setting = ", ".join(f"{k}={short(v)}" for k, v in r["differs"].items() if not k.startswith("loss."))
        cells.append(
            [
                r["label"],
                setting or "—",
                *cost_cells(r.get("params"), r.get("flops"), r.get("latency_ms")),
                ", ".join(str(s) for s in r["seeds"]),
                fmt_mean_se(r["val_acc"]),
                fmt_mean_se(r["test_acc"]),
                fmt_difference(r["kd_minus_ce"]["val_acc"]),
                fmt_difference(r["kd_minus_ce"]["test_acc"]),
                duration(r["train_seconds_mean"]),
            ]
        )
    note = (
        "Accuracies: mean ± standard error over seeds. KD − CE: the paired difference to the CE "
        "student trained with the same seeds and recipe, with its 95 % t interval."
    )
    note += (
        " FLOPs: one forward pass on one image. Latency: batch 1, timed on each run's device and "
        "threads (metrics.json `cost`); compare latencies only between runs on the same machine."
    )
    return table(head, cells, align="llrrrlrrllr") + "\n\n" + note


def cost_cells(params: int | None, flops: int | None, latency_ms: float | None) -> list[str]:
    """A model's Parameters, FLOPs and Latency cells, as every table shows them."""
    return [
        f"{params:,}" if params is not None else "n/a",
        si(flops),
        f"{latency_ms:.3g} ms" if latency_ms is not None else "n/a",
    ]
