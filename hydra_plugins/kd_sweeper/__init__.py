"""Hydra plugin: the Optuna sweeper made resumable and shareable (``hydra/sweeper=kd_optuna``)."""
