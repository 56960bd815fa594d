"""``hydra/launcher=population``: a sweep's compatible jobs trained as one population."""
