r"""Radon in Minnesota homes (Gelman & Hill 2007): 919 homes, 85 counties as clients.

Each county is a client with its homes' log radon, the floor of the measurement (0 basement,
1 first floor) and the county's log uranium. A linear mixed model with a county random
intercept; county-level predictors (log uranium, the county's share of first-floor
measurements) are fixed effects constant within a county:

.. math::
    y_{ij} = \beta_0 + \beta_f\,\mathrm{floor}_{ij} + \beta_u u_j + \beta_m \bar x_j + b_j
             + \varepsilon_{ij},\quad b_j \sim N(0, \tau^2),\quad
             \varepsilon_{ij} \sim N(0, \sigma^2)

The county intercept :math:`\alpha_j = \beta_0 + \beta_u u_j + \beta_m \bar x_j + b_j` (the
expected log radon of a basement measurement) is the county's personal effect.

The pooling spectrum (:func:`spectrum`):

* no pooling — each county alone: ``floor`` shared, ``tau`` fixed at a value far above the
  data's spread, so county intercepts are effectively unpenalized;
* complete pooling — one intercept for all (``tau = 0``), the FedAvg-like global model;
* partial pooling — ``tau`` learned from the data, with the county-level predictors.

Data: ``data/radon_mn.csv`` (see ``data/PROVENANCE.md``).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import numpyro.distributions as dist
import pandas as pd

import hierfl as hf

__all__ = ["FIELDS", "PRIORS", "county_intercepts", "family", "frame", "load", "spectrum"]

FIELDS = ("log_radon", "floor", "log_uranium", "floor_mean")
#: weakly informative priors on the log-radon scale (observed sd of log radon is 0.8)
PRIORS = {"beta": dist.Normal(0.0, 5.0), "sigma": dist.HalfNormal(2.0), "tau": dist.HalfNormal(2.0)}
#: tau standing in for "no pooling": ten times the sd of log radon
NO_POOLING_TAU = 10.0


def frame() -> pd.DataFrame:
    """One row per home: ``county``, ``county_id``, ``log_radon``, ``floor``,
    ``log_uranium`` and ``floor_mean`` (the county's share of first-floor measurements)."""
    with resources.files("models").joinpath("data/radon_mn.csv").open() as stream:
        df = pd.read_csv(stream)
    df["floor"] = df["floor"].astype(float)
    df["floor_mean"] = df.groupby("county")["floor"].transform("mean")
    return df


def load(df: pd.DataFrame | None = None) -> hf.ClientData:
    """Client data: one client per county (its name), fields :data:`FIELDS`."""
    return hf.ClientData.from_frame(
        frame() if df is None else df, client="county", fields=list(FIELDS)
    )


def family(priors=None, *, fixed=("floor", "log_uranium", "floor_mean")) -> hf.LinearMixed:
    """Partial pooling (the reference configuration): random county intercept."""
    return hf.LinearMixed(
        response="log_radon", fixed=list(fixed), priors=dict(PRIORS, **(priors or {}))
    )


def spectrum() -> dict[str, hf.LinearMixed]:
    """No, complete and partial pooling."""
    return {
        "no pooling": family({"tau": NO_POOLING_TAU}, fixed=("floor",)),
        "complete pooling": family({"tau": 0.0}, fixed=("floor",)),
        "partial pooling": family(),
    }


def county_intercepts(fit: hf.Fit) -> np.ndarray:
    """Draws of every county's intercept :math:`\\alpha_j` (basement), ``[chain, draw, county]``.

    The fixed part is evaluated at each county's own county-level predictors and floor = 0.
    """
    names = fit.coords["coef"]
    beta = fit.global_samples["beta"]
    data = fit.data
    per_county = {}
    for name in names:
        if name == "intercept":
            per_county[name] = np.ones(data.num_clients)
        elif name == "floor":
            per_county[name] = np.zeros(data.num_clients)
        else:
            first = np.concatenate([[0], np.cumsum(data.sizes)[:-1]])
            per_county[name] = data.fields[name][first]
    design = np.stack([per_county[n] for n in names], axis=-1)  # [county, coef]
    b = fit.posterior_samples()[fit.sites.client_sites[0]]
    return np.einsum("cdk,jk->cdj", beta, design) + b
