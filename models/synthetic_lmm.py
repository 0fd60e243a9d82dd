r"""Synthetic linear mixed data for scaling studies: any number of clients, known truth.

.. math::
    y_{ij} = \beta_0 + \beta_1 x_{ij} + b_i + \varepsilon_{ij},\quad
    b_i \sim N(0, \tau^2),\quad \varepsilon_{ij} \sim N(0, \sigma^2),\quad
    x_{ij} \sim N(0, 1)

Client sizes are ``1 + Poisson(mean_size - 1)``, so about ``mean_size`` observations each and
never an empty client. Generated from a seeded ``numpy.random.Generator``, flat (no per-client
Python loop), so a million clients take a second or two.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpyro.distributions as dist

import hierfl as hf

__all__ = ["NO_POOLING_TAU", "TRUTH", "Truth", "family", "generate", "spectrum"]


class Truth(NamedTuple):
    """Parameters that generated the data."""

    beta: tuple[float, float]
    sigma: float
    tau: float


TRUTH = Truth(beta=(1.0, -0.5), sigma=1.0, tau=0.5)
#: ``tau`` fixed this wide (against outcomes of sd about 1) lets every client keep its own
#: intercept: no pooling
NO_POOLING_TAU = 100.0


def generate(
    num_clients: int, *, mean_size: float = 10.0, seed: int = 0, truth: Truth = TRUTH
) -> tuple[hf.ClientData, np.ndarray]:
    """Client data with fields ``y`` and ``x``, and the true client effects ``b``.

    Examples
    --------
    >>> data, b = generate(1000, seed=1)
    >>> data.num_clients, b.shape, 9 < data.num_obs / 1000 < 11
    (1000, (1000,), True)
    """
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.poisson(mean_size - 1.0, num_clients)
    b = rng.normal(0.0, truth.tau, num_clients)
    client = np.repeat(np.arange(num_clients), sizes)
    x = rng.normal(size=client.shape[0])
    y = truth.beta[0] + truth.beta[1] * x + b[client] + rng.normal(0.0, truth.sigma, x.shape[0])
    return hf.ClientData(np.arange(num_clients), {"y": y, "x": x}, sizes), b


def family(priors=None) -> hf.LinearMixed:
    """Random-intercept model with one covariate, weakly informative priors."""
    base = {
        "beta": dist.Normal(0.0, 5.0),
        "sigma": dist.HalfNormal(2.0),
        "tau": dist.HalfNormal(2.0),
    }
    return hf.LinearMixed(response="y", fixed=["x"], priors=dict(base, **(priors or {})))


def spectrum() -> dict[str, hf.LinearMixed]:
    """No, complete and partial pooling of the client intercepts (``tau`` fixed wide, fixed
    at zero, or learned).

    >>> sorted(spectrum())
    ['complete pooling', 'no pooling', 'partial pooling']
    """
    return {
        "no pooling": family({"tau": NO_POOLING_TAU}),
        "complete pooling": family({"tau": 0.0}),
        "partial pooling": family(),
    }
