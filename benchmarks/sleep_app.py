"""A plain Hydra app for benchmarks/async_sweep.py: a "training" of ``steps`` steps that
sleeps ``unit * length`` seconds a step (no CPU) and reports a loss per step, so trials
differ in length by the swept ``length`` and by pruning. Each job appends its start and
end times to ``$SLEEP_APP_LOG``: the benchmark measures worker idle time from them."""

import os
import time

import hydra
import optuna
from omegaconf import DictConfig

from hydra_plugins.kd_sweeper import job


@hydra.main(config_path="conf", config_name="sleep")
def main(cfg: DictConfig) -> float:
    start = time.time()
    loss = (cfg.x - 0.3) ** 2 + 0.2 * cfg.length  # long trials are not the best ones
    pruned = False
    try:
        for step in range(cfg.steps):
            time.sleep(cfg.unit * cfg.length)
            job.report(loss + 1.0 / (step + 1), step)
            if job.should_prune():
                pruned = True
                raise optuna.TrialPruned()
        return loss
    finally:
        with open(os.environ["SLEEP_APP_LOG"], "a") as log:
            log.write(f"{os.environ.get('KD_OPTUNA_TRIAL', '-1')} {start:.4f} {time.time():.4f} {int(pruned)}\n")


if __name__ == "__main__":
    main()
