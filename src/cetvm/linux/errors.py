"""The one error class of the Linux guest recipe (download, extract, build)."""

from __future__ import annotations

from cetvm import CetvmError


class RecipeError(CetvmError):
    """The recipe cannot produce the guest: no apt, no network, a corrupt or unexpected package,
    a failed compile. The message says what and, where there is one, how to fix it."""
