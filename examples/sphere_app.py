"""A plain Hydra app (not kd) swept by kd_optuna, pruning through the job-side API.

    python examples/sphere_app.py -m                       # TPE + median pruning, 12 trials
    python examples/sphere_app.py -m hydra/sweeper/sampler=grid 'x=choice(0,1,2)' 'y=choice(0,1)'
    python examples/sphere_app.py -m 'hydra.sweeper.direction=[minimize,minimize]' objectives=2 \\
        '~hydra/sweeper/pruner'                            # two objectives: a Pareto front
    python examples/sphere_app.py -m noise=0.5 'hydra.sweeper.racing={max_seeds:4}' \\
        'hydra.sweeper.confirm_seeds=[100,101,102]'        # a noisy objective, raced over seeds
    python examples/sphere_app.py -m "hydra.sweeper.constraints=['cost<=1']"  # the best with |x| <= 1
"""

import math
import random
import time

import hydra
import optuna
from omegaconf import DictConfig

from hydra_plugins.kd_sweeper import job


@hydra.main(config_path="conf", config_name="sphere")
def main(cfg: DictConfig) -> float | list[float]:
    if cfg.fail_at is not None and abs(cfg.x - cfg.fail_at) < 1e-9:
        return math.nan  # a diverged trial: FAIL with reason kd_optuna:diverged, the sweep goes on
    loss = (cfg.x - 2) ** 2 + cfg.y
    seed = job.replicate()  # in a racing sweep, the seed this run is replicate of; else None
    if cfg.noise and seed is not None:  # seed noise: part shared by every trial on this seed, part its own
        loss += random.Random(seed).gauss(0, 0.6 * cfg.noise) + random.Random(f"{seed}:{cfg.x}:{cfg.y}").gauss(
            0, 0.8 * cfg.noise
        )
    job.record(cost=abs(cfg.x))  # what hydra.sweeper.constraints may bound (a no-op outside a sweep)
    for step in range(cfg.steps):  # a "training loop" whose loss approaches the final one
        time.sleep(cfg.pause_s)
        job.report(loss + 1.0 / (step + 1), step)
        if job.should_prune():
            raise optuna.TrialPruned()
    return [loss, abs(cfg.x)] if cfg.objectives == 2 else loss


if __name__ == "__main__":
    main()
