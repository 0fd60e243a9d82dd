r"""Contagious bovine pleuropneumonia (lme4's ``cbpp``): herds as clients.

56 herd-periods from 15 Ethiopian herds (Lesnoff et al. 2004). Herd :math:`i` in period
:math:`j` had ``size`` animals of which ``incidence`` became seropositive. A binomial GLMM
with period effects and a herd random intercept (lme4's ``glmer(cbind(incidence, size -
incidence) ~ period + (1 | herd), family = binomial)``):

.. math::
    \beta_k \sim N(0, 5^2),\quad \sigma \sim \mathrm{HalfNormal}(2),\quad
    b_i = \sigma u_i,\ u_i \sim N(0, 1)

    \mathrm{incidence}_{ij} \sim \mathrm{Binomial}\big(\mathrm{size}_{ij},\
        \mathrm{logit}^{-1}(\beta_1 + \beta_{p(j)} [p(j) > 1] + b_i)\big)

lme4's maximum-likelihood estimates are intercept -1.40, periods 2..4 -0.99, -1.13, -1.58 and
herd sd 0.64 (Bates et al., lme4 documentation).

The pooling spectrum (:func:`spectrum`): ``"complete"`` (no herd effect), ``"none"`` (herd
sd fixed at :data:`NO_POOLING_SCALE`) and ``"partial"`` (herd sd learned).

Data: ``data/cbpp.csv`` (see ``data/PROVENANCE.md``).

Examples
--------
>>> from models import cbpp
>>> data = cbpp.load()
>>> data.num_clients, data.num_obs
(15, 56)
"""

from __future__ import annotations

from importlib import resources

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pandas as pd

import hierfl as hf

__all__ = [
    "COEFFICIENTS",
    "DIMS",
    "FIELDS",
    "frame",
    "load",
    "complete_pooling",
    "make_model",
    "model",
    "no_pooling",
    "partial_pooling",
    "spectrum",
]

FIELDS = ("incidence", "size", "period")
#: names of the fixed effects (treatment contrasts against period 1)
COEFFICIENTS = ["intercept", "period2", "period3", "period4"]
#: ArviZ dims and coordinates of the sites
DIMS = {"beta": ["coef"]}
COORDS = {"coef": COEFFICIENTS}
#: "no pooling": the herd sd fixed far above lme4's estimate (0.64)
NO_POOLING_SCALE = 5.0


def frame() -> pd.DataFrame:
    """The 56 herd-periods: ``herd``, ``incidence``, ``size``, ``period`` (1..4)."""
    with resources.files("models").joinpath("data/cbpp.csv").open() as stream:
        return pd.read_csv(stream)


def load(df: pd.DataFrame | None = None) -> hf.ClientData:
    """Client data: one client per herd, fields :data:`FIELDS` (integers)."""
    return hf.ClientData.from_frame(
        frame() if df is None else df, client="herd", fields=list(FIELDS)
    )


def _cbpp_model(data: hf.ModelData, pooling: str):
    beta = numpyro.sample("beta", dist.Normal(0.0, 5.0).expand([4]).to_event(1))
    if pooling == "partial":
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("client", data.num_clients):
        if pooling == "complete":
            herd = numpyro.deterministic("b", jnp.zeros(data.num_clients))
        else:
            scale = NO_POOLING_SCALE if pooling == "none" else sigma
            u = numpyro.sample("u", dist.Normal(0.0, 1.0))
            herd = numpyro.deterministic("b", scale * u)
    period = jnp.asarray(data["period"]).astype(jnp.int32)
    contrast = jnp.concatenate([jnp.zeros(1), beta[1:]])[period - 1]
    logits = beta[0] + contrast + herd[data.client]
    with numpyro.plate("obs", data.num_obs):
        numpyro.sample(
            "incidence",
            dist.Binomial(jnp.asarray(data["size"]).astype(jnp.int32), logits=logits),
            obs=None if data.get("incidence") is None else jnp.asarray(data["incidence"]),
        )


def make_model(pooling: str = "partial"):
    """The cbpp model at one point of the pooling spectrum (a NumPyro model function)."""
    if pooling not in ("partial", "complete", "none"):
        raise ValueError(f"pooling must be 'partial', 'complete' or 'none', got {pooling!r}")
    return {"partial": partial_pooling, "complete": complete_pooling, "none": no_pooling}[pooling]


def partial_pooling(data: hf.ModelData):
    """Partial pooling (the reference configuration): herd spread learned."""
    _cbpp_model(data, "partial")


def complete_pooling(data: hf.ModelData):
    """Complete pooling: one set of parameters for every client (the global model)."""
    _cbpp_model(data, "complete")


def no_pooling(data: hf.ModelData):
    """No pooling: client spread fixed at ``NO_POOLING_SCALE`` (each client alone)."""
    _cbpp_model(data, "none")


#: the reference configuration: partial pooling
model = partial_pooling


def spectrum() -> dict:
    """No, complete and partial pooling as three NumPyro models."""
    return {
        "no pooling": make_model("none"),
        "complete pooling": make_model("complete"),
        "partial pooling": make_model("partial"),
    }
