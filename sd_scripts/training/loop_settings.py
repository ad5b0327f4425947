"""Checks of the settings only the training loop reads (logging, state retention), run by preflight."""

from __future__ import annotations

from sd_scripts.core.errors import ConfigError, UserError

__all__ = ["check_loop_settings"]


def check_loop_settings(config) -> list[UserError]:
    """Logging and state-retention settings the loop needs (called by preflight)."""
    errors: list[UserError] = []
    if getattr(config, "log_with", None) in ("tensorboard", "all") and not getattr(config, "logging_dir", None):
        errors.append(ConfigError(f"log_with: {config.log_with} writes TensorBoard logs, which need logging_dir; set "
                                  "logging_dir to a folder for the logs", "logging_dir"))
    value = getattr(config, "save_last_n_steps_state", None)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        errors.append(ConfigError(f"save_last_n_steps_state: must be 1 or more when given, got {value}",
                                  "save_last_n_steps_state"))
    return errors
