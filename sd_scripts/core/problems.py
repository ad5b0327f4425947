"""One collector for the problems a check finds: errors (user mistakes, one line each) and warnings.

Every check writes into a :class:`Problems` (``problems.error(setting, text)``, ``problems.warn(text)``,
``problems.add(user_error)``, or ``with problems.collecting():`` around code that raises a ``UserError``), and
whoever runs the checks (preflight, the front end, the tools, the wizard) raises them together at the end with
:meth:`Problems.raise_errors`: one :class:`~sd_scripts.core.errors.UserErrors` listing every error.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from .errors import ConfigError, UserError, UserErrors

__all__ = ["Problems"]


class Problems:
    """Errors and warnings found so far, in the order found."""

    def __init__(self) -> None:
        self.errors: list[UserError] = []
        self.warnings: list[str] = []

    def error(self, setting: str, text: str, kind: type[UserError] = ConfigError, *, named: str | None = None,
              where: str | None = None) -> None:
        """A mistake in ``setting``: the message reads ``<setting>: <text>`` (``named``: the name shown instead, such
        as a file's own key; ``where``: what comes first, such as the file's name)."""
        prefix = f"{where}: " if where else ""
        self.errors.append(kind(f"{prefix}{named or setting}: {text}", setting))

    def add(self, error: UserError) -> None:
        """An error raised elsewhere (several, for ``UserErrors``)."""
        self.errors.extend(error.errors if isinstance(error, UserErrors) else [error])

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def extend(self, errors: list[UserError] = (), warnings: list[str] = ()) -> None:
        for error in errors:
            self.add(error)
        self.warnings.extend(warnings)

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """Record a ``UserError`` raised inside the block instead of letting it out."""
        try:
            yield
        except UserError as error:
            self.add(error)

    def raise_errors(self, one_as_is: bool = False) -> None:
        """Raise every error found (each message once) as one ``UserErrors`` (``one_as_is``: a single error as
        itself); nothing when there is none."""
        if self.errors:
            seen: set[str] = set()
            unique = [e for e in self.errors if not (str(e) in seen or seen.add(str(e)))]
            if one_as_is and len(unique) == 1:
                raise unique[0]
            raise UserErrors(unique)
