"""Inference engines: exact (conjugate), nuts (centralized reference)."""

from .exact import exact_algorithm
from .globals_inference import GlobalsSettings
from .nuts import fit_nuts

__all__ = ["GlobalsSettings", "exact_algorithm", "fit_nuts"]
