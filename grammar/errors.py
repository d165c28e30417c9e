"""The one exception type for mistakes a user can make and fix."""
from __future__ import annotations


class PybuildError(Exception):
    """A user-caused failure: bad Dockerfile, missing file, bad flag, registry refusal.

    `place` is where it happened (``Dockerfile:12``), `source` the offending line
    as written, shown under the message so the user sees what to fix.
    """

    def __init__(self, message: str, place: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.place = place
        self.source = source

    def __str__(self) -> str:
        return f"{self.place}: {self.message}" if self.place else self.message

    def render(self) -> str:
        """The text the CLI prints, without the ``pybuild: error:`` prefix."""
        text = str(self)
        if self.source is not None:
            shown = self.source.rstrip("\r\n").splitlines() or [""]
            text += "".join(f"\n  | {line}" for line in shown[:5])
        return text
