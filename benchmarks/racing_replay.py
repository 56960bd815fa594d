"""Replay benchmark: seed-paired racing against TPE with one seed and TPE with three fixed
seeds, at an equal budget of seed-runs, on noisy objectives whose truth is known. No
training: it runs in seconds.

    python benchmarks/racing_replay.py                 # docs/results/racing/replay.json
    python benchmarks/racing_replay.py --reps 50       # a quick look

The objective of trial c on seed s is ``f(c) + u_s + e_cs``: ``f`` a surface over the
kd_optuna space (T log-uniform in [1, 20], alpha in [0, 1]), ``u_s`` a seed effect every
trial shares on seed s, ``e_cs`` noise of its own. The total seed-to-seed SD is 0.3, 0.5
or 0.7 points (one setting's SD in the project's studies: 0.35-0.7), and the shared
share of its variance is ``--shared`` (0.3 by default). Surfaces:

* ``ridge``: one optimum inside the space (T = 4, alpha = 0.7), 1.5 points above its
  surroundings;
* ``corner``: the best settings on an edge (T = 20, alpha near 1), a gentle slope;
* ``plateau``: a broad top, many settings within 0.25 of the best;
* ``fitted``: a quadratic in (log T, alpha) fitted to the project's own 10-trial
  ResNet-20 sweep (docs/results/study_resnet/sweep_views16/summary.json), with the
  seed SD pooled from its per-seed KD runs (docs/results/study_resnet/study.json).

Every strategy starts from the reference setting (T = 2, alpha = 0.25, the seed's
default), enqueued as its first trial, then asks Optuna's TPE sampler (seeded per
repetition). Reported per cell and pooled, each with n and a 95% interval: the
probability that the chosen setting is within 0.25 points of the true best, the mean
regret (true best minus the chosen setting's true value), and the rate of false
"distinguishable" claims: a trial left out of the set tied with the chosen one
(paired, two-sided at the tie level, 0.05) whose true value is at least the chosen one's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra_plugins.kd_sweeper.racing import Race, RacingConfig, compare  # noqa: E402

OUT = ROOT / "docs" / "results" / "racing" / "replay.json"
REFERENCE = {"T": 2.0, "alpha": 0.25}
T_RANGE = (1.0, 20.0)
WITHIN = 0.25
Surface = Callable[[float, float], float]


def ridge(t: float, a: float) -> float:
    return 73.0 + 1.5 * math.exp(-((math.log(t / 4)) ** 2) / (2 * 0.5**2) - (a - 0.7) ** 2 / (2 * 0.25**2))


def corner(t: float, a: float) -> float:
    return 73.0 + 0.6 * math.log(t) / math.log(20) + 0.8 * a - 0.5 * (a - 0.9) ** 2 * (a > 0.9)


def plateau(t: float, a: float) -> float:
    return 73.0 + 1.0 / (1 + math.exp(-6 * (a - 0.35))) * (1 - 0.3 * (math.log(t) - math.log(5)) ** 2 / 4)


def fitted_surface() -> tuple[Surface, float, dict]:
    """A quadratic in (log T, alpha) fitted by least squares to the project's 10-trial
    sweep (one seed each), and the seed SD pooled over its per-seed KD arms."""
    sweep = json.loads((ROOT / "docs/results/study_resnet/sweep_views16/summary.json").read_text())
    rows = sweep["sweeps"][0]["rows"]
    x = np.array([[math.log(r["params"]["loss.temperature"]), r["params"]["loss.alpha"]] for r in rows])
    y = np.array([r["objective_value"] for r in rows])
    design = np.column_stack([np.ones(len(x)), x[:, 0], x[:, 1], x[:, 0] ** 2, x[:, 1] ** 2, x[:, 0] * x[:, 1]])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    arms = json.loads((ROOT / "docs/results/study_resnet/study.json").read_text())
    variances = [np.var(arm["kd_per_seed"]["val_acc"], ddof=1) for arm in arms]
    sd = float(math.sqrt(sum(variances) / len(variances)))

    def f(t: float, a: float) -> float:
        lt = math.log(t)
        return float(coef @ np.array([1, lt, a, lt * lt, a * a, lt * a]))

    return f, sd, {"coefficients": coef.tolist(), "trials": len(rows), "seed_sd": sd, "arms": len(arms)}


def true_best(f: Surface) -> float:
    ts = np.exp(np.linspace(math.log(T_RANGE[0]), math.log(T_RANGE[1]), 161))
    return max(f(float(t), float(a)) for t in ts for a in np.linspace(0, 1, 161))


class Objective:
    """Noisy observations of ``f``: a seed effect shared by every trial, and noise of each
    (trial, seed) of its own, both drawn once per repetition."""

    def __init__(self, f: Surface, sd: float, shared: float, rng: np.random.Generator) -> None:
        self.f, self.rng = f, rng
        self.sd_seed, self.sd_own = sd * math.sqrt(shared), sd * math.sqrt(1 - shared)
        self.seed_effect: dict[int, float] = {}
        self.runs = 0

    def __call__(self, params: dict, seed: int) -> float:
        self.runs += 1
        if seed not in self.seed_effect:
            self.seed_effect[seed] = float(self.rng.normal(0, self.sd_seed))
        return self.f(params["T"], params["alpha"]) + self.seed_effect[seed] + float(self.rng.normal(0, self.sd_own))


def _ask(study: optuna.Study) -> tuple[optuna.Trial, dict]:
    trial = study.ask()
    params = {"T": trial.suggest_float("T", *T_RANGE, log=True), "alpha": trial.suggest_float("alpha", 0.0, 1.0)}
    return trial, params


def _study(seed: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial(REFERENCE)
    return study


def fixed_seeds(objective: Objective, budget: int, seeds: int, rep: int, level: float) -> tuple[dict, list]:
    """TPE with every trial on the same ``seeds`` seeds; the best mean is chosen."""
    study = _study(rep)
    values: dict[int, dict[int, float]] = {}
    params_of = {}
    while objective.runs + seeds <= budget:
        trial, params = _ask(study)
        values[trial.number] = {s: objective(params, s) for s in range(seeds)}
        params_of[trial.number] = params
        study.tell(trial, float(np.mean(list(values[trial.number].values()))))
    chosen = study.best_trial.number
    return params_of[chosen], _claims(values, params_of, chosen, level)


def racing(objective: Objective, budget: int, config: RacingConfig, rep: int) -> tuple[dict, list]:
    """TPE proposes, :class:`Race` decides who gets seed-runs; the incumbent is chosen."""
    study, race, params_of = _study(rep), Race(config), {}

    def run(pairs: list[tuple[int, int]]) -> bool:
        for number, seed in pairs:
            if objective.runs >= budget:
                return False
            race.record(number, seed, objective(params_of[number], seed))
        return True

    while objective.runs < budget:
        trial, params = _ask(study)
        params_of[trial.number] = params
        while (pairs := race.step(trial.number)) and run(pairs):
            pass
        if trial.number in race.values:
            study.tell(trial, race.mean(trial.number))
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        run(race.challenge_incumbent())
    claims = [(params_of[t], params_of[race.incumbent]) for t, cmp in _left_out(race) if cmp.n >= 2]
    return params_of[race.incumbent], claims


def _left_out(race: Race) -> list:
    """The trials the race claims are distinguishable from its incumbent."""
    tied = {t for t, _ in race.tied_with_incumbent()}
    return [(t, race.compare_to_incumbent(t)) for t in race.values if t != race.incumbent and t not in tied]


def _claims(values: dict, params_of: dict, chosen: int, level: float) -> list[tuple[float, float]]:
    """(true value of a trial claimed distinguishable from the chosen one, of the chosen
    one) for every trial left out of the tied set on two or more common seeds."""
    claims = []
    for number, trial_values in values.items():
        if number == chosen:
            continue
        cmp = compare(trial_values, values[chosen])
        if cmp.n >= 2 and not cmp.tied(level):
            claims.append((params_of[number], params_of[chosen]))
    return claims


def one_cell(args: tuple) -> dict:
    name, sd, shared, reps, budget, config = args
    f = SURFACES[name] if name != "fitted" else fitted_surface()[0]
    best = true_best(f)
    out: dict[str, dict[str, list]] = {}
    strategies = {
        "tpe_1_seed": lambda o, r: fixed_seeds(o, budget, 1, r, config.tie_level),
        "tpe_3_seeds": lambda o, r: fixed_seeds(o, budget, 3, r, config.tie_level),
        "racing": lambda o, r: racing(o, budget, config, r),
    }
    for strategy, run in strategies.items():
        regrets, false_claims, claims = [], 0, 0
        for rep in range(reps):
            # Each strategy meets the same generator seed in repetition ``rep``.
            objective = Objective(f, sd, shared, np.random.default_rng([rep, int(sd * 100), zlib.crc32(name.encode())]))
            chosen, made = run(objective, rep)
            value = f(chosen["T"], chosen["alpha"])
            regrets.append(best - value)
            claims += len(made)
            false_claims += sum(f(p["T"], p["alpha"]) >= f(c["T"], c["alpha"]) for p, c in made)
        out[strategy] = {"regrets": regrets, "claims": claims, "false_claims": false_claims}
    return {"surface": name, "sd": sd, "shared": shared, "reps": reps, "budget": budget, "results": out}


SURFACES: dict[str, Surface] = {"ridge": ridge, "corner": corner, "plateau": plateau}


def wilson(k: int, n: int) -> list[float]:
    if n == 0:
        return [math.nan, math.nan]
    p, z = k / n, 1.959964
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [centre - half / (1 + z * z / n), centre + half / (1 + z * z / n)]


def summarise(regrets: list[float], claims: int, false_claims: int) -> dict:
    n = len(regrets)
    within = sum(r <= WITHIN for r in regrets)
    mean = float(np.mean(regrets))
    se = float(np.std(regrets, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "n": n,
        "p_within": within / n,
        "p_within_ci95": wilson(within, n),
        "mean_regret": mean,
        "mean_regret_se": se,
        "claims": claims,
        "false_claim_rate": false_claims / claims if claims else None,
        "false_claim_ci95": wilson(false_claims, claims) if claims else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--budget", type=int, default=30, help="seed-runs per sweep")
    parser.add_argument("--shared", type=float, default=0.3, help="share of the seed variance common to all trials")
    parser.add_argument("--min-seeds", type=int, default=1)
    parser.add_argument("--max-seeds", type=int, default=RacingConfig.max_seeds)
    parser.add_argument("--level", type=float, default=RacingConfig.level, help="racing's elimination level")
    parser.add_argument("--tie-level", type=float, default=RacingConfig.tie_level, help="level of the tied set")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = RacingConfig(
        min_seeds=args.min_seeds, max_seeds=args.max_seeds, level=args.level, tie_level=args.tie_level
    )
    _, fitted_sd, fitted_info = fitted_surface()
    cells = [(name, sd, args.shared, args.reps, args.budget, config) for name in SURFACES for sd in (0.3, 0.5, 0.7)]
    cells.append(("fitted", round(fitted_sd, 3), args.shared, args.reps, args.budget, config))
    started = time.time()
    with ProcessPoolExecutor() as pool:
        raw = list(pool.map(one_cell, cells))
    table = []
    pooled: dict[str, dict] = {}
    for cell in raw:
        row = {k: cell[k] for k in ("surface", "sd", "shared", "reps", "budget")}
        for strategy, res in cell["results"].items():
            row[strategy] = summarise(res["regrets"], res["claims"], res["false_claims"])
            into = pooled.setdefault(strategy, {"regrets": [], "claims": 0, "false_claims": 0})
            into["regrets"] += res["regrets"]
            into["claims"] += res["claims"]
            into["false_claims"] += res["false_claims"]
        table.append(row)
    record = {
        "command": "python benchmarks/racing_replay.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget_seed_runs": args.budget,
        "racing": {
            "min_seeds": config.min_seeds,
            "max_seeds": config.max_seeds,
            "level": config.level,
            "tie_level": config.tie_level,
        },
        "within": WITHIN,
        "reference": REFERENCE,
        "fitted": fitted_info,
        "cells": table,
        "pooled": {s: summarise(v["regrets"], v["claims"], v["false_claims"]) for s, v in pooled.items()},
        "seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    for strategy, res in record["pooled"].items():
        print(
            f"{strategy:12s} within {WITHIN}: {res['p_within']:.3f} {res['p_within_ci95']}, "
            f"regret {res['mean_regret']:.3f} ± {res['mean_regret_se']:.3f}, false claims {res['false_claim_rate']}"
        )
    print(f"wrote {args.out} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
