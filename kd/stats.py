"""Seed statistics: mean and standard error, and paired differences with a 95 % interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy.stats import t as student_t


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (scipy's)."""
    if df < 1:
        raise ValueError("need at least one degree of freedom")
    return float(student_t.ppf(0.975, df))


def describe(values: Sequence[float]) -> dict:
    """n, mean, sample standard deviation and standard error (``None`` below two values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "se": None}
    std = statistics.stdev(values) if n > 1 else None
    return {"n": n, "mean": statistics.fmean(values), "std": std, "se": std / math.sqrt(n) if std is not None else None}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of ``a[i] - b[i]`` with its standard error and 95 % t interval.

    ``distinguishable`` is False when the interval contains zero (None with one pair).
    """
    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    out = describe(diffs)
    out["diffs"] = diffs
    if out["se"] is None:
        out.update(ci95=None, distinguishable=None)
        return out
    half = t975(out["n"] - 1) * out["se"]
    out["ci95"] = [out["mean"] - half, out["mean"] + half]
    out["distinguishable"] = not (out["ci95"][0] <= 0.0 <= out["ci95"][1])
    return out


def fmt_mean_se(summary: dict, unit: str = " %") -> str:
    if summary.get("mean") is None:
        return "n/a"
    if summary.get("se") is None:
        return f"{summary['mean']:.2f}{unit} (n=1)"
    return f"{summary['mean']:.2f} ± {summary['se']:.2f}{unit}"


def fmt_difference(diff: dict | None) -> str:
    """``+0.52 [-0.31, +1.35], not distinguishable from 0``."""
    if not diff or diff.get("mean") is None:
        return "n/a"
    if diff.get("ci95") is None:
        return f"{diff['mean']:+.2f} (n=1, no interval)"
    lo, hi = diff["ci95"]
    verdict = "" if diff["distinguishable"] else ", not distinguishable from 0"
    return f"{diff['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]{verdict}"
