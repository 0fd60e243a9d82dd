"""Docstring Examples stay true: run the doctests of hierfl's modules."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "hierfl",
    "hierfl.api",
    "hierfl.data",
    "hierfl.families",
    "hierfl.fit",
    "hierfl.priors",
    "hierfl.protocol",
    "hierfl.drivers",
    "hierfl.flower",
    "hierfl.engines.exact",
    "hierfl.engines.globals_inference",
    "hierfl.engines.nuts",
    "hierfl.engines.ep",
    "hierfl.partition",
    "hierfl.neural.fit",
    "hierfl.neural.metrics",
    "hierfl.neural.svi",
    "models.eight_schools",
    "models.radon",
    "models.synthetic_lmm",
    "models.cbpp",
    "models.hospitals",
    "models.mnist_heads",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    if name.startswith("hierfl.neural"):
        pytest.importorskip("flax")  # the ``neural`` extra
    if name == "hierfl.flower":
        pytest.importorskip("flwr")  # the ``flower`` extra
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctests failed in {name}"


@pytest.mark.parametrize("name", ["hierfl.api", "hierfl.data", "hierfl.families", "hierfl.fit"])
def test_public_modules_have_examples(name):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module)
    assert sum(len(t.examples) for t in tests) > 0, f"{name} has no runnable Examples"


@pytest.mark.parametrize("name", [m if isinstance(m, str) else m.values[0] for m in MODULES])
def test_every_module_declares_all(name):
    if name.startswith("hierfl.neural"):
        pytest.importorskip("flax")
    if name == "hierfl.flower":
        pytest.importorskip("flwr")
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list | tuple), name
    for item in module.__all__:
        assert hasattr(module, item), f"{name}.__all__ names {item!r}, which is missing"
