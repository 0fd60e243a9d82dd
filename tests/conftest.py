"""Shared fixtures: small seeded datasets, fast NUTS settings, and the expensive fits.

The fits that several test modules read (eight schools and radon, by the exact engine and by
centralized NUTS) are session-scoped, so each is run once per test session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HIERFL_FAST", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from numpyro.diagnostics import effective_sample_size  # noqa: E402

import hierfl as hf  # noqa: E402

#: NUTS settings for tests: enough draws for Monte-Carlo-aware comparisons, small enough to
#: keep the default suite within a few minutes on two cores
FAST = {"num_warmup": 300, "num_samples": 500, "num_chains": 2}
#: the smallest settings that still run every code path (schema and smoke tests)
TINY = {"num_warmup": 100, "num_samples": 100, "num_chains": 1}


#: test files whose tests take the longest (the notebooks, Flower's simulation engine), in
#: this order: run first, so that pytest-xdist's workers fill the end of the run with short
#: tests instead of one worker finishing a long notebook while the other idles
LONG_FIRST = ("tests/test_notebooks.py", "tests/test_flower.py")


def pytest_collection_modifyitems(config, items):
    """Put :data:`LONG_FIRST` first (a stable sort: the order within a file is kept; every
    xdist worker collects the same order)."""

    def rank(item):
        starts = [item.nodeid.startswith(prefix) for prefix in LONG_FIRST]
        return starts.index(True) if any(starts) else len(LONG_FIRST)

    items.sort(key=rank)


def x64():
    """Context in which JAX computes in float64 (for closed-form comparisons)."""
    return jax.enable_x64(True)


def mcse_of_mean(draws: np.ndarray) -> np.ndarray:
    """Monte Carlo standard error of the mean of ``draws`` ``[chain, draw, ...]``."""
    draws = np.asarray(draws, dtype=np.float64)
    ess = np.asarray(effective_sample_size(draws))
    return draws.std(axis=(0, 1)) / np.sqrt(ess)


def mcse_of_sd(draws: np.ndarray) -> np.ndarray:
    """Monte Carlo standard error of the sd of ``draws`` ``[chain, draw, ...]``.

    Delta method: ``Var(s) ~= (m4 - s^4) / (4 s^2 ess)``, with ``m4`` the fourth central
    moment, so heavy-tailed parameters (eight schools' ``tau``) get wider tolerances.
    """
    draws = np.asarray(draws, dtype=np.float64)
    ess = np.asarray(effective_sample_size(draws))
    centred = draws - draws.mean(axis=(0, 1))
    variance = np.mean(centred**2, axis=(0, 1))
    fourth = np.mean(centred**4, axis=(0, 1))
    return np.sqrt(np.maximum(fourth - variance**2, 0.0) / (4.0 * variance * ess))


#: standard errors allowed between two Monte Carlo estimates
Z = 4.0
#: allowed |sd ratio - 1| when Monte Carlo error is smaller than this
SD_RATIO = 0.15


def assert_posteriors_agree(a: np.ndarray, b: np.ndarray, name: str):
    """Draws ``[chain, draw, ...]`` of one quantity from two runs agree in mean and sd.

    Means agree when they differ by less than ``Z`` combined Monte Carlo standard errors (from
    each run's effective sample size); sds when their ratio is within ``SD_RATIO`` of one,
    widened to ``Z`` standard errors of the ratio for heavy-tailed quantities.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mean_a, mean_b = a.mean(axis=(0, 1)), b.mean(axis=(0, 1))
    sd_a, sd_b = a.std(axis=(0, 1)), b.std(axis=(0, 1))
    mean_tolerance = Z * np.hypot(mcse_of_mean(a), mcse_of_mean(b))
    bad = np.abs(mean_a - mean_b) > mean_tolerance
    assert not bad.any(), (
        f"{name}: means differ at {np.flatnonzero(bad)}: {mean_a[bad]} vs "
        f"{mean_b[bad]} (tolerance {mean_tolerance[bad]})"
    )
    ratio = sd_a / sd_b
    ratio_tolerance = np.maximum(
        SD_RATIO, Z * ratio * np.hypot(mcse_of_sd(a) / sd_a, mcse_of_sd(b) / sd_b)
    )
    bad = np.abs(ratio - 1) > ratio_tolerance
    assert not bad.any(), (
        f"{name}: sd ratios {ratio[bad]} at {np.flatnonzero(bad)} "
        f"(tolerance {ratio_tolerance[bad]})"
    )


def linear_mixed_designs(family, fields):
    """Dense fixed- and random-effects design matrices ``(X, Z)`` of a ``LinearMixed``'s rows
    (for closed-form checks against dense linear algebra)."""
    n = len(fields["y"])
    x = np.column_stack(
        ([np.ones(n)] if family.intercept else []) + [fields[f] for f in family.fixed]
    )
    z = np.column_stack(
        ([np.ones(n)] if family.random_intercept else []) + [fields[f] for f in family.random]
    )
    return x, z


def synthetic_linear_mixed(
    num_clients: int,
    *,
    seed: int = 0,
    tau: float = 0.5,
    sigma: float = 1.0,
    beta=(1.0, 0.7),
    min_size: int = 5,
    max_size: int = 15,
) -> hf.ClientData:
    """Ragged synthetic data from a linear mixed model with a random intercept.

    ``y = beta_0 + beta_1 x + b_i + eps``, ``b_i ~ N(0, tau^2)``, ``eps ~ N(0, sigma^2)``;
    each client holds between ``min_size`` and ``max_size`` rows.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(min_size, max_size + 1, num_clients)
    effects = rng.normal(0.0, tau, num_clients)
    clients = {}
    for i, n in enumerate(sizes):
        x = rng.normal(size=n)
        y = beta[0] + beta[1] * x + effects[i] + rng.normal(0.0, sigma, n)
        clients[f"c{i:05d}"] = {"y": y, "x": x}
    return hf.ClientData.from_dict(clients)


def ragged_normal(
    *, seed: int = 0, num_clients: int = 12, big: int = 200, tau: float = 2.0, mu: float = 1.0
) -> hf.ClientData:
    """Normal–Normal data: client ``"big"`` holds ``big`` rows, the rest 1 to 6 rows each."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(mu, tau, num_clients)
    sizes = [big] + list(rng.integers(1, 7, num_clients - 1))
    names = ["big"] + [f"small{i}" for i in range(1, num_clients)]
    clients = {}
    for name, t, n in zip(names, theta, sizes, strict=True):
        sigma = rng.uniform(0.5, 2.0, n)
        clients[name] = {"y": rng.normal(t, sigma), "sigma": sigma}
    return hf.ClientData.from_dict(clients)


# ---------------------------------------------------------------------- settings
@pytest.fixture(scope="session")
def fast():
    """NUTS settings for agreement tests."""
    return dict(FAST)


@pytest.fixture(scope="session")
def tiny():
    """NUTS settings for smoke and schema tests."""
    return dict(TINY)


# ---------------------------------------------------------------------- eight schools
@pytest.fixture(scope="session")
def eight_schools_data():
    from models import eight_schools

    return eight_schools.load()


@pytest.fixture(scope="session")
def eight_schools_family():
    from models import eight_schools

    return eight_schools.family()


@pytest.fixture(scope="session")
def eight_schools_exact(eight_schools_family, eight_schools_data):
    return hf.fit(eight_schools_family, eight_schools_data, method="exact", seed=1, **FAST)


@pytest.fixture(scope="session")
def eight_schools_nuts(eight_schools_family, eight_schools_data):
    return hf.fit(eight_schools_family, eight_schools_data, method="nuts", seed=2, **FAST)


# ---------------------------------------------------------------------- radon
@pytest.fixture(scope="session")
def radon_data():
    from models import radon

    return radon.load()


@pytest.fixture(scope="session")
def radon_family():
    from models import radon

    return radon.family()


@pytest.fixture(scope="session")
def radon_exact(radon_family, radon_data):
    return hf.fit(radon_family, radon_data, method="exact", seed=1, **FAST)


@pytest.fixture(scope="session")
def radon_nuts(radon_family, radon_data):
    return hf.fit(radon_family, radon_data, method="nuts", seed=2, **FAST)


# ---------------------------------------------------------------------- synthetic
@pytest.fixture(scope="session")
def ragged_normal_data():
    return ragged_normal()


@pytest.fixture(scope="session")
def ragged_normal_exact(ragged_normal_data):
    return hf.fit(hf.NormalNormal(), ragged_normal_data, method="exact", seed=0, **FAST)
