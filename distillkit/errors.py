"""The one error type for user mistakes.

Anything a user can fix (a config, a manifest, an image, a checkpoint path) raises
:class:`DistillkitError`. The CLI prints it as one paragraph and exits with status 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class DistillkitError(Exception):
    """A user mistake, reported without a traceback.

    ``where`` names the file (and, after a colon, the field or row) the mistake is in.
    """

    def __init__(self, message: str, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" {self.hint}"
        return text


def plural(noun: str) -> str:
    """``tasks``, ``losses``: the plural of a component kind, for messages."""
    return noun + ("es" if noun.endswith("s") else "s")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest known name, or ``""``."""
    match = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""
