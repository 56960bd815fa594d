"""A racing sweep in kd.report: every trial's seeds, the incumbent and the trials it
cannot be told apart from, the reference setting, and the confirmation on fresh seeds.

The numbers come from the study (the per-seed values the race recorded), judged with the
settings the sweep recorded, so a report of a sweep still racing agrees with the sweep.
Test accuracy is read for the confirmed setting (and the reference paired with it) on the
confirmation seeds only: it is reported, never raced on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna

from hydra_plugins.kd_sweeper.race_loop import CONFIRM, RUN, _key_value, load_race, recorded_settings, summary
from hydra_plugins.kd_sweeper.racing import RacingConfig
from kd.markdown import table
from kd.stats import describe, fmt_difference, fmt_mean_se, paired_difference


def _status(trial: int, answer: dict, stopped: set[int]) -> str:
    if trial == answer.get("incumbent", {}).get("trial"):
        return "incumbent"
    if any(t["trial"] == trial for t in answer.get("tied", [])):
        return "tied"
    return "stopped: worse" if trial in stopped else "not tied"


def _test_accuracy(sweep_dir: Path, trial: int, seeds: list[int]) -> list[float] | None:
    """A trial's test accuracy on ``seeds`` from its seed-runs' metrics.json (None if any is missing)."""
    values = []
    for seed in seeds:
        try:
            metrics = json.loads((sweep_dir / str(trial) / f"seed_{seed}" / "metrics.json").read_text())
            values.append(float(metrics["test_acc"]))
        except (OSError, ValueError, KeyError, TypeError):  # a plain app, or a run cut short
            return None
    return values


def _confirmed_test(sweep_dir: Path, answer: dict) -> dict | None:
    """Test accuracy of the confirmed setting, and its paired difference to the reference."""
    confirmation = answer.get("confirmation")
    if not confirmation:
        return None
    seeds = confirmation["incumbent"]["seeds"]
    incumbent = _test_accuracy(sweep_dir, answer["incumbent"]["trial"], seeds)
    if incumbent is None:
        return None
    out: dict[str, Any] = {"seeds": seeds, "incumbent": describe(incumbent)}
    reference = answer.get("reference", {}).get("trial")
    if reference is not None and confirmation.get("reference", {}).get("seeds") == seeds:
        values = _test_accuracy(sweep_dir, reference, seeds)
        if values is not None:
            out["reference"] = describe(values)
            out["incumbent_minus_reference"] = paired_difference(incumbent, values)
    return out


def race_table(sweep_dir: Path, study: optuna.Study) -> dict | None:
    """A racing sweep's answer and every raced trial, the incumbent first (None: the study did not race)."""
    if not _key_value(study.user_attrs, RUN):
        return None
    recorded = recorded_settings(study)
    notes = []
    if recorded is None:  # a study raced before the settings were recorded
        confirmed = _key_value(study.user_attrs, CONFIRM)
        recorded = RacingConfig(), tuple(sorted({s for seeds in confirmed.values() for s in seeds}))
        notes.append("The race's settings were not recorded in this study: its default levels are assumed.")
    config, confirm_seeds = recorded
    race = load_race(study, config)
    answer = summary(study, config, confirm_seeds)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    comparisons = {n: race.compare_to_incumbent(n) for n in race.values if race.incumbent not in (None, n)}
    # the incumbent first, then as the race judged them: paired with it, on common seeds
    order = sorted(race.values, key=lambda n: math.inf if n not in comparisons else _or_low(comparisons[n].difference))
    rows = []
    for number in reversed(order):
        cmp = comparisons.get(number)
        rows.append(
            {
                "trial": number,
                "params": trials[number].params if number in trials else {},
                "values": {str(s): v for s, v in sorted(race.values[number].items())},
                "summary": describe(list(race.values[number].values())),
                # signed so that + is better than the incumbent, on their common seeds
                "minus_incumbent": None if cmp is None else {"n": cmp.n, "mean": cmp.difference if cmp.n else None},
                "status": _status(number, answer, race.stopped),
            }
        )
    return {
        "dir": str(sweep_dir),
        "study_name": study.study_name,
        "direction": race.direction,
        "racing": {
            **answer,
            "settings": {
                "level": config.level,
                "tie_level": config.tie_level,
                "max_seeds": config.max_seeds,
                "min_seeds": config.min_seeds,
            },
        },
        "rows": rows,
        "confirmed_test": _confirmed_test(sweep_dir, answer),
        "notes": notes,
    }


def _or_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _params_text(params: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def race_markdown(sweep: dict) -> str:
    """The race's answer in words, then its trials."""
    lines = _answer_lines(sweep)
    if sweep["racing"].get("incumbent") is None:
        return "\n\n".join(lines)

    return "\n".join(lines + ["", table(*_trials_table(sweep["rows"]))] + [f"\n{n}" for n in sweep["notes"]])


def _answer_lines(sweep: dict) -> list[str]:
    """The incumbent, the tied set, the reference and the confirmation, one line each."""
    answer = sweep["racing"]
    lines = [
        f"Study `{sweep['study_name']}` raced trials on common seeds: {answer['seed_runs']} seed-runs "
        f"({sweep['direction']}; a trial stops when worse at one-sided p < {answer['settings']['level']:g}, "
        f"trials are tied with the incumbent when not distinguishable at {answer['settings']['tie_level']:g})."
    ]
    inc = answer.get("incumbent")
    if inc is None:
        return lines + ["No trial has finished a seed-run yet."]
    se = f" ± {inc['se']:.3g}" if inc.get("se") is not None else ""
    tied = ", ".join(f"trial {t['trial']} (n={t['n']}, {t['difference']:+.3g})" for t in answer["tied"]) or "none"
    lines += [
        "",
        f"- Incumbent: trial {inc['trial']} ({_params_text(inc['params'])}), "
        f"{inc['mean']:.4g}{se} over n={inc['n']} seeds.",
        f"- Not distinguishable from it (paired on common seeds, difference to it): {tied}.",
    ]
    ref = answer.get("reference")
    if ref:
        verdict = "distinguishable" if ref["distinguishable"] else "not distinguishable"
        diff = ref["incumbent_minus_reference"]
        lines.append(
            f"- Reference (trial {ref['trial']}, {_params_text(ref['params'])}): incumbent minus reference "
            f"{'n/a' if diff is None else f'{diff:+.3g}'} on n={ref['n']} common seeds, {verdict}."
        )
    confirmation = answer.get("confirmation")
    if confirmation:
        block = f"- Confirmed on fresh seeds {confirmation['seeds']}: {fmt_mean_se(confirmation['incumbent'], '')}"
        diff = confirmation.get("incumbent_minus_reference")
        if diff:
            block += f"; minus reference {fmt_difference({**diff, 'distinguishable': _excludes_zero(diff)})}"
        lines.append(block + ". This is the sweep's final word.")
    test = sweep.get("confirmed_test")
    if test:
        text = f"- Test accuracy of the confirmed setting (seeds {test['seeds']}): {fmt_mean_se(test['incumbent'])}"
        if "incumbent_minus_reference" in test:
            text += f"; minus reference {fmt_difference(test['incumbent_minus_reference'])}"
        lines.append(text + ".")
    return lines


def _trials_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    params = sorted({p for r in rows for p in r["params"]})
    head = ["Trial", *params, "Seeds", "Mean ± SE", "Vs incumbent, + better (n)", "Status"]
    body = []
    for r in rows:
        diff = r["minus_incumbent"]
        body.append(
            [
                str(r["trial"]),
                *(
                    f"{r['params'].get(p):.4g}" if isinstance(r["params"].get(p), float) else str(r["params"].get(p))
                    for p in params
                ),
                str(r["summary"]["n"]),
                fmt_mean_se(r["summary"], ""),
                "—" if not diff or diff["mean"] is None else f"{diff['mean']:+.3g} ({diff['n']})",
                r["status"],
            ]
        )
    return head, body


def _excludes_zero(diff: dict) -> bool | None:
    interval = diff.get("ci95")
    return None if interval is None else not interval[0] <= 0.0 <= interval[1]


def seed_spread_plot(sweep: dict) -> Any:
    """Each raced trial's value on every seed (dots) and its mean ± SE, in table order; the
    confirmation seeds of the incumbent and the reference beside them."""
    import matplotlib.pyplot as plt

    rows = sweep["rows"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(rows) + 2) + 2.4, 3.6))
    colours = {"incumbent": "tab:red", "tied": "tab:orange", "stopped: worse": "0.6", "not tied": "tab:blue"}
    for x, r in enumerate(rows):
        values = list(r["values"].values())
        colour = colours[r["status"]]
        ax.scatter([x] * len(values), values, s=14, color=colour, alpha=0.7, zorder=2)
        s = r["summary"]
        ax.errorbar([x + 0.18], [s["mean"]], yerr=[s["se"] or 0.0], fmt="_", color=colour, capsize=3, zorder=3)
    confirmation = sweep["racing"].get("confirmation") or {}
    for key, marker in (("incumbent", "*"), ("reference", "D")):
        if key in confirmation and key in sweep["racing"]:
            trial = sweep["racing"][key]["trial"]
            x = next(i for i, r in enumerate(rows) if r["trial"] == trial)
            c = confirmation[key]
            ax.errorbar(
                [x + 0.36],
                [c["mean"]],
                yerr=[c["se"] or 0.0],
                fmt=marker,
                color="k",
                ms=5,
                capsize=3,
                label=f"{key} on confirmation seeds",
            )
    for status, colour in colours.items():
        if any(r["status"] == status for r in rows):
            ax.scatter([], [], s=14, color=colour, label=status)
    ax.set_xticks(range(len(rows)), [str(r["trial"]) for r in rows])
    ax.set_xlabel("trial (incumbent first, then by paired difference)")
    ax.set_ylabel("objective per seed, mean ± SE")
    ax.set_title(f"{sweep['study_name']}: spread over seeds", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    return fig
