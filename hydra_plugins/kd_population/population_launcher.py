"""``hydra/launcher=population``: train a sweep's jobs together as populations.

A sweeper hands a launcher a batch of jobs (a basic multirun's grid, or ``kd_optuna``'s
``n_jobs`` trials at a time). This launcher groups the jobs that differ only in what
one population can vary (:data:`kd.population.MEMBER_KEYS`: seeds, temperature,
alpha, learning rate), trains each group of up to ``max_members`` members at once
(:func:`kd.population.train_population`), then runs every job through Hydra's own
``run_job`` with its share of the results, so each job gets its usual directory,
``.hydra`` record, log, checkpoints and metrics.json, and the sweeper gets ordinary
job returns (Optuna, resume, voiding and reports work unchanged). Jobs that cannot
join a population (another loss or optimiser, or alone in their group) run as usual.

With several GPUs the groups train concurrently, one thread per GPU.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class PopulationLauncherConf:
    _target_: str = "hydra_plugins.kd_population.population_launcher.PopulationLauncher"
    max_members: int = 64  # most students trained together in one population


ConfigStore.instance().store(group="hydra/launcher", name="population", node=PopulationLauncherConf, provider="kd")


def plan_groups(configs: Sequence[DictConfig], max_members: int) -> list[list[int]]:
    """Job indices grouped by :func:`kd.population.population_key`, each group holding
    at most ``max_members`` members (a job with ``trial.seeds`` brings one per seed);
    jobs that cannot share come back as groups of one."""
    # kd is imported when the launcher is used: Hydra imports every plugin module at
    # the start of every app, kd's or not.
    from kd.errors import KDError
    from kd.plan import resolve
    from kd.population import population_key

    by_key: dict[str, list[list[int]]] = {}
    groups: list[list[int]] = []
    seeds: dict[int, int] = {}  # members a job brings
    for index, cfg in enumerate(configs):
        try:
            plan = resolve(cfg)
        except KDError:  # it runs alone and says what is wrong
            groups.append([index])
            continue
        key, seeds[index] = population_key(plan), len(plan.seeds)
        if key is None:
            groups.append([index])
            continue
        chunks = by_key.setdefault(key, [[]])
        size = sum(seeds[i] for i in chunks[-1])
        if chunks[-1] and size + seeds[index] > max_members:
            chunks.append([])
        chunks[-1].append(index)
    for chunks in by_key.values():
        groups.extend(chunks)
    return sorted(groups)


class PopulationLauncher(Launcher):
    def __init__(self, max_members: int = 64) -> None:
        super().__init__()
        if int(max_members) < 1:
            raise ValueError(f"hydra.launcher.max_members must be >= 1, got {max_members}")
        self.max_members = int(max_members)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _configure_log(self) -> None:
        configure_log(
            self.config.hydra.hydra_logging,
            self.config.hydra.verbose,
            execution_whitelist=self.hydra_context.execution_whitelist,
        )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Train the jobs in populations, then run each job through Hydra (its own folder,
        config and log) with its share of the training handed in."""
        setup_globals()
        self._configure_log()
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for offset, overrides in enumerate(job_overrides):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = str(initial_job_idx + offset)
                cfg.hydra.job.num = initial_job_idx + offset
            configs.append(cfg)
        self._refuse_bad_jobs(configs)
        groups = plan_groups(configs, self.max_members)
        together = [g for g in groups if len(g) > 1]
        log.info(
            "Launching %d jobs: %d in %d population(s) of sizes %s, %d alone",
            len(configs),
            sum(len(g) for g in together),
            len(together),
            [len(g) for g in together],
            len(configs) - sum(len(g) for g in together),
        )
        gpus = torch.cuda.device_count()
        shares: dict[int, Any] = {}
        if together:
            with ThreadPoolExecutor(max_workers=max(1, min(gpus, len(together)))) as pool:
                futures = [
                    pool.submit(self._train_group, [configs[i] for i in group], n, gpus)
                    for n, group in enumerate(together)
                ]
                for group, future in zip(together, futures, strict=True):
                    for index, share in zip(group, future.result(), strict=True):
                        shares[index] = share
        results = []
        for index, (cfg, overrides) in enumerate(zip(configs, job_overrides, strict=True)):
            log.info("\t#%d : %s", initial_job_idx + index, " ".join(filter_overrides(overrides)))
            results.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=self._task_with(shares.get(index)),
                    config=cfg,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
            self._configure_log()
        return results

    def _refuse_bad_jobs(self, configs: list[DictConfig]) -> None:
        """In a grid (Hydra's basic sweeper), a job whose config kd refuses ends the grid in
        one line, as a single run would, before any job's teacher, view or logit work.
        (Under kd_optuna such a job runs alone and its trial is recorded as failed.)"""
        from kd.config import validate
        from kd.errors import ConfigError, JobStopped

        if not str(OmegaConf.select(self.config, "hydra.sweeper._target_", default="")).endswith("BasicSweeper"):
            return
        for cfg in configs:
            try:
                validate(cfg)
            except ConfigError as err:
                raise JobStopped.of(cfg.hydra.job.num, err) from None

    def _task_with(self, share: Any) -> Any:
        """The task function, handed this job's part of its population (``share=``) when
        it takes one (kd's run.py does); any other task runs as it is."""
        if share is None or "share" not in inspect.signature(self.task_function).parameters:
            return self.task_function
        return functools.partial(self.task_function, share=share)

    def _train_group(self, configs: list[DictConfig], number: int, gpus: int) -> list[Any]:
        """Train one group; returns per job what its run needs (see kd.population_jobs.JobShare)."""
        from kd import population_jobs

        device = None
        if gpus > 1 and str(configs[0].trainer.device) in ("auto", "cuda"):
            device = f"cuda:{number % gpus}"  # spread the groups over the GPUs
        try:
            return population_jobs.train_jobs(configs, device=device)
        except Exception:  # e.g. out of memory: lose nothing, run the group's jobs one by one
            log.exception("population of %d jobs failed; running them one at a time instead", len(configs))
            return [None] * len(configs)
