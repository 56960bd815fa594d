"""Seed statistics: mean and standard error, and paired differences with a 95 % interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Two-sided 95 % quantiles of Student's t by degrees of freedom (standard tables).
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("need at least one degree of freedom")
    if df in _T975:
        return _T975[df]
    if df > 120:
        return 1.960
    lower = max(k for k in _T975 if k < df)
    upper = min(k for k in _T975 if k > df)
    # Interpolate linearly in 1/df, as printed tables advise.
    w = (1 / lower - 1 / df) / (1 / lower - 1 / upper)
    return _T975[lower] + w * (_T975[upper] - _T975[lower])


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
