"""Docstring Examples stay true: run the doctests of hierfl's modules."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import hierfl
import models

#: modules whose doctests another test runs (beside the checks that exercise them), so the
#: suite does not pay for them twice: ``hierfl.cli``'s example is the 3-client MNIST job of
#: ``test_cli``; the lme4 models' in ``test_lme4_models``; ``models.quality``'s in
#: ``test_quality``; ``hierfl.drift``'s in ``test_drift``; the tribes modules' in ``test_tribes``
RUN_ELSEWHERE = {
    "hierfl.cli",
    "hierfl.drift",
    "hierfl.tribes",
    "models.tribes",
    "models.sleepstudy",
    "models.verbagg",
    "models.insteval",
    "models.quality",
}


def _modules(package) -> list[str]:
    """The package and every module under it (discovered, so a new module is never missed)."""
    found = [package.__name__]
    found += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(found)


ALL_MODULES = _modules(hierfl) + _modules(models)
MODULES = [name for name in ALL_MODULES if name not in RUN_ELSEWHERE]


def test_modules_run_elsewhere_exist():
    assert RUN_ELSEWHERE <= set(ALL_MODULES)


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


@pytest.mark.parametrize("name", ALL_MODULES)
def test_every_module_declares_all(name):
    if name.startswith("hierfl.neural"):
        pytest.importorskip("flax")
    if name == "hierfl.flower":
        pytest.importorskip("flwr")
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list | tuple), name
    for item in module.__all__:
        present = hasattr(module, item) or (  # a package may list its submodules
            hasattr(module, "__path__") and importlib.util.find_spec(f"{name}.{item}") is not None
        )
        assert present, f"{name}.__all__ names {item!r}, which is missing"
