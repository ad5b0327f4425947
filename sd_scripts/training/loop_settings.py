"""Checks of the settings only the training loop reads (logging), run by preflight."""

from __future__ import annotations

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, UserError
from sd_scripts.core.problems import Problems

__all__ = ["check_loop_settings"]


def check_loop_settings(config: TrainConfig, problems: Problems | None = None) -> list[UserError]:
    """Logging settings the loop needs (called by preflight); recorded in ``problems``, whose errors it returns."""
    problems = Problems() if problems is None else problems
    if config.log_with in ("tensorboard", "all") and not config.logging_dir:
        problems.add(ConfigError(f"log_with: {config.log_with} writes TensorBoard logs, which need logging_dir; set "
                                 "logging_dir to a folder for the logs", "logging_dir"))
    return problems.errors
