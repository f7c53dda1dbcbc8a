"""Experiment configs: each module's get_config() returns an lmflax.config.Config."""
