"""Seed statistics against values computed by hand, and results counted once per
(settings, seed) however many directories hold them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from kd.report import report
from kd.stats import describe, fmt_difference, fmt_mean_se, paired_difference, t975


@pytest.mark.parametrize(
    ("df", "quantile"),
    # printed tables (df <= 120), then rows they skip: 121 and 200 lie between 1.980 and 1.960
    [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042), (35, 2.030), (120, 1.980), (121, 1.980),
     (200, 1.972), (1000, 1.962), (10**6, 1.960)],
)  # fmt: skip
def test_t_quantiles_match_the_tables(df, quantile):
    assert t975(df) == pytest.approx(quantile, abs=5e-4)


def test_t_quantiles_fall_as_degrees_of_freedom_grow_and_need_one():
    quantiles = [t975(df) for df in (1, 2, 5, 30, 119, 120, 121, 150, 10**4)]
    assert quantiles == sorted(quantiles, reverse=True) and len(set(quantiles)) == len(quantiles)
    with pytest.raises(ValueError, match="at least one degree of freedom"):
        t975(0)


def test_describe_gives_mean_sample_sd_and_standard_error():
    d = describe([1.0, 2.0, 3.0, 4.0])
    assert d["n"] == 4 and d["mean"] == 2.5
    assert d["std"] == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, n - 1 = 3
    assert d["se"] == pytest.approx(math.sqrt(5 / 3) / 2)
    assert describe([7.0]) == {"n": 1, "mean": 7.0, "std": None, "se": None}
    assert describe([]) == {"n": 0, "mean": None, "std": None, "se": None}


def test_paired_difference_against_hand_computed_values():
    d = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 2.0])  # differences 2, 3, 2
    assert d["diffs"] == [2.0, 3.0, 2.0] and d["n"] == 3
    assert d["mean"] == pytest.approx(7 / 3)
    assert d["se"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))  # sd of (2, 3, 2) is sqrt(1/3)
    half = 4.302653 * (1 / 3)  # t(0.975, df 2)
    assert d["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    assert d["distinguishable"] is True
    straddling = paired_difference([1.0, 0.0], [0.0, 1.0])  # differences +1, -1
    assert straddling["ci95"] == pytest.approx([-12.706205, 12.706205]) and straddling["distinguishable"] is False
    with pytest.raises(ValueError, match="paired samples must have the same length"):
        paired_difference([1.0], [1.0, 2.0])


def test_one_seed_says_so_instead_of_an_interval():
    one = paired_difference([2.0], [1.5])
    assert one["ci95"] is None and one["distinguishable"] is None
    assert fmt_difference(one) == "+0.50 (n=1, no interval)"
    assert fmt_mean_se(describe([71.234])) == "71.23 % (n=1)"
    assert fmt_mean_se(describe([70.0, 72.0])) == "71.00 ± 1.00 %"
    assert fmt_difference(paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 2.0])) == "+2.33 [+0.90, +3.77]"
    assert fmt_difference(paired_difference([1.0, 0.0], [0.0, 1.0])).endswith(", not distinguishable from 0")
    assert fmt_difference(None) == "n/a" and fmt_mean_se(describe([])) == "n/a"


def _kd_run(run_dir: Path, seeds: dict[int, tuple[float, float]], finished_at: float) -> None:
    """A finished KD run's metrics.json: seed -> (KD val acc, CE baseline val acc)."""
    per_seed = [
        {"seed": s, "val_acc": kd, "test_acc": kd, "train_seconds": 1.0, "baseline": {"val_acc": ce, "test_acc": ce}}
        for s, (kd, ce) in seeds.items()
    ]
    metrics = {"status": "completed", "model": "LightNN", "loss": "kd", "temperature": 2.0, "alpha": 0.25}
    metrics.update(settings={"loss.temperature": 2.0, "data.root": "x"}, per_seed=per_seed, params=1)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    os.utime(run_dir / "metrics.json", (finished_at, finished_at))


def test_the_same_seeds_in_two_directories_count_once(tmp_path):
    # Two seeds whose KD - CE differences are 0.5 and 0.8: n=2, t(0.975, 1) = 12.706.
    seeds = {1: (70.5, 70.0), 2: (70.8, 70.0)}
    _kd_run(tmp_path / "A" / "run", seeds, finished_at=1_000.0)
    _kd_run(tmp_path / "B" / "run", {1: (70.5, 70.0), 2: (70.8, 70.0)}, finished_at=2_000.0)
    summary = report([tmp_path / "A", tmp_path / "B"], tmp_path / "out")
    (row,) = summary["rows"]
    diff = row["kd_minus_ce"]["val_acc"]
    assert row["seeds"] == [1, 2] and diff["n"] == 2 and row["val_acc"]["n"] == 2
    half = 12.706205 * 0.15  # t(0.975, df 1); se = |0.8 - 0.5| / 2
    assert diff["ci95"] == pytest.approx([0.65 - half, 0.65 + half])  # [-1.26, +2.56], not [+0.37, +0.93]
    assert diff["distinguishable"] is False
    kept = str(tmp_path / "B" / "run")  # the newer copy
    assert sorted((d["seed"], d["kept"]) for d in row["duplicates"]) == [(1, kept), (2, kept)]
    assert "Counted once (2 duplicate seed result(s)" in (tmp_path / "out" / "report.md").read_text()


def test_a_newer_copy_of_a_seed_replaces_the_older_one(tmp_path):
    _kd_run(tmp_path / "old", {1: (60.0, 50.0), 2: (61.0, 50.0)}, finished_at=1_000.0)
    _kd_run(tmp_path / "new", {2: (62.0, 50.0), 3: (63.0, 50.0)}, finished_at=2_000.0)
    (row,) = report([tmp_path], tmp_path / "out")["rows"]
    assert row["seeds"] == [1, 2, 3]
    assert row["kd_minus_ce"]["val_acc"]["diffs"] == [10.0, 12.0, 13.0]  # seed 2 from the newer run
    assert [(d["seed"], Path(d["run_dir"]).name) for d in row["duplicates"]] == [(2, "old")]
