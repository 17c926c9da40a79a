"""The one error type a user sees: what went wrong, where, and what to do about it."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, reported as one line; the CLI exits with code 2.

    ``what`` says what is wrong, ``where`` names the file, line or key, ``fix`` says what to do.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(self.fix)
        return "; ".join(parts)
