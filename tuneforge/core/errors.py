"""The one error type a user sees: what went wrong, where, and what to do about it."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, reported as one line; the CLI exits with code 2.

    ``what`` says what is wrong, ``where`` names the file, line or key, ``fix`` says what to do.
    """

    exit_code = 2

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(self.fix)
        return "; ".join(parts)


class TuneforgeWarning(UserWarning):
    """A warning of tuneforge's own: the command line prints it as one line, ``tuneforge: warning: ...``."""


class RunStopped(UserError):
    """A run that had to stop (its loss or weights became non-finite, the disk filled): one line, and
    the CLI exits with code 3. What was saved before it stays whole."""

    exit_code = 3


def at_least(cfg, key: str, low: float, section: str, above: bool = False) -> None:
    """``cfg.<key>`` (when not None) is at least ``low`` (``above``: more than), or a UserError naming
    ``<section>.<key>``."""
    value = getattr(cfg, key)
    if value is not None and (value <= low if above else value < low):
        raise UserError(f"{key} must be {'above' if above else 'at least'} {low:g}, got {value}", f"{section}.{key}",
                        fix="correct the value")


def fraction(cfg, key: str, section: str) -> None:
    """``cfg.<key>`` lies in [0, 1), or a UserError naming ``<section>.<key>``."""
    if not 0.0 <= getattr(cfg, key) < 1.0:
        raise UserError(f"{key} must be in [0, 1), got {getattr(cfg, key)}", f"{section}.{key}",
                        fix="correct the value")
