"""The one error type a recipe raises for a problem found before training starts."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe (YAML + command-line flags) that cannot run; the message names the key, file or column at fault.

    Raised before any model weights are loaded and before any training step.
    """
