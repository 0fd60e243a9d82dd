"""ArviZ import without its refactor announcement (hierfl targets the InferenceData API)."""

from __future__ import annotations

import functools
import warnings

__all__ = ["arviz"]


@functools.cache
def arviz():
    """The ``arviz`` module, imported once with its ``FutureWarning`` banner silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing a major refactor.*")
        import arviz as az
    return az
