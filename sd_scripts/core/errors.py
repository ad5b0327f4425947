"""Exceptions for mistakes a user can fix.

Every user mistake (bad path, bad value, bad dataset, incompatible options) raises a
:class:`UserError` whose message is one line that names the setting and the fix.
Front ends (``main.py``, ``sd_scripts/train_network.py``, ``scripts/*``) print that line and
exit with code 2 without a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "DatasetError", "ModelLoadError", "UserErrors", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is one line naming the setting and the fix."""

    def __init__(self, message: str, setting: str | None = None):
        message = " ".join(str(message).split("\n"))
        super().__init__(message)
        self.setting = setting


class ConfigError(UserError):
    """A setting has a bad value or conflicts with another setting."""


class DatasetError(UserError):
    """The dataset folders, images or captions are not usable."""


class ModelLoadError(UserError):
    """The base model, VAE or tokenizer cannot be found or read."""


class UserErrors(UserError):
    """Several user errors found together (preflight collects them all)."""

    def __init__(self, errors: list[UserError]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            text = str(self.errors[0])
        else:
            text = f"{len(self.errors)} problems: " + " | ".join(str(e) for e in self.errors)
        super().__init__(text)
