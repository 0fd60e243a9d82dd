r"""Verbal aggression (lme4's ``VerbAgg``): persons as clients, binary item responses.

316 persons each answered the same 24 items of a verbal-aggression questionnaire (De Boeck
& Wilson 2004): 7,584 responses. An item describes a frustrating situation (``situ``:
another person, or oneself, to blame), a behaviour (``btype``: curse, scold, shout) and a
mode (``mode``: wanting to, or doing it). The response is dichotomised (``r2``: ``Y`` if the
answer was "perhaps" or "yes"). Each person is a client. A logistic model with item
features, the person's trait anger and gender as fixed effects, and a random intercept per
person (the person's propensity to aggression; lme4's
``glmer(r2 ~ Anger + Gender + btype + situ + mode + (1 | id), family = binomial)``):

.. math::
    \beta_k \sim N(0, 5^2),\quad \sigma \sim \mathrm{HalfNormal}(2),\quad
    b_i = \sigma u_i,\ u_i \sim N(0, 1)

    \Pr(\mathrm{r2}_{ij} = Y) = \mathrm{logit}^{-1}\big(x_{ij}^\top \beta + b_i\big),\quad
    x_{ij} = (1, \mathrm{Anger}_i - 20, [\mathrm{male}_i], [\mathrm{scold}_j],
        [\mathrm{shout}_j], [\mathrm{self}_j], [\mathrm{do}_j])

Trait anger is centred at :data:`ANGER_CENTRE` (its mean over the 316 persons is 20.003),
so the intercept is the log-odds of "Y" for a woman of average anger wanting to curse at
someone else; the indicator columns are treatment contrasts against curse, other and want.
Items enter only through their features, not as a crossed random effect (a random item
effect would be a second, global set of parameters, outside the one client plate).

The pooling spectrum (:func:`spectrum`): ``"complete"`` (no person effect), ``"none"``
(person sd fixed at :data:`NO_POOLING_SCALE`) and ``"partial"`` (person sd learned). The
model is not conjugate: fit it with ``method="ep"`` (federated) or ``"nuts"`` (centralized).

Data: ``data/verbagg.csv.gz`` (see ``data/PROVENANCE.md``).

Examples
--------
>>> from models import verbagg
>>> data = verbagg.load()
>>> data.num_clients, data.num_obs, sorted(set(data.sizes.tolist()))
(316, 7584, [24])
>>> small = verbagg.load(verbagg.frame().query("id <= 40"))
>>> small.num_clients, small.num_obs
(40, 960)
"""

from __future__ import annotations

from importlib import resources

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

import hierfl as hf

__all__ = [
    "ANGER_CENTRE",
    "COEFFICIENTS",
    "DIMS",
    "FIELDS",
    "NO_POOLING_SCALE",
    "complete_pooling",
    "frame",
    "load",
    "make_model",
    "model",
    "no_pooling",
    "partial_pooling",
    "spectrum",
]

#: the covariate fields, in the order of :data:`COEFFICIENTS` after the intercept
COVARIATES = ("anger", "male", "scold", "shout", "self", "do")
#: the response (1 = "Y") and the covariates
FIELDS = ("y", *COVARIATES)
#: names of the fixed effects
COEFFICIENTS = ["intercept", *COVARIATES]
#: ArviZ dims and coordinates of the sites
DIMS = {"beta": ["coef"]}
COORDS = {"coef": COEFFICIENTS}
#: trait anger is centred here (its mean over the 316 persons is 20.003)
ANGER_CENTRE = 20.0
#: "no pooling": the person sd fixed far above the spread of persons on the logit scale
NO_POOLING_SCALE = 5.0


def frame() -> pd.DataFrame:
    """All nine original columns, and the model's numeric fields :data:`FIELDS`: ``y`` (1 if
    ``r2`` is ``Y``), ``anger`` (``Anger - 20``) and 0/1 indicators ``male``, ``scold``,
    ``shout``, ``self``, ``do``. One row per response, ``id`` the person."""
    with resources.files("models").joinpath("data/verbagg.csv.gz").open("rb") as stream:
        df = pd.read_csv(stream, compression="gzip")
    df["y"] = (df["r2"] == "Y").astype(np.int32)
    df["anger"] = df["Anger"].astype(float) - ANGER_CENTRE
    df["male"] = (df["Gender"] == "M").astype(float)
    df["scold"] = (df["btype"] == "scold").astype(float)
    df["shout"] = (df["btype"] == "shout").astype(float)
    df["self"] = (df["situ"] == "self").astype(float)
    df["do"] = (df["mode"] == "do").astype(float)
    return df


def load(df: pd.DataFrame | None = None) -> hf.ClientData:
    """Client data: one client per person (``id``), fields :data:`FIELDS`.

    Raises :class:`hierfl.DataError` naming the person and row when ``y`` is not 0 or 1.
    """
    data = hf.ClientData.from_frame(frame() if df is None else df, client="id", fields=FIELDS)
    y = data.fields["y"]
    data.require_rows("y", (y == 0) | (y == 1), "must be 0 or 1", context="verbagg")
    return data


def _verbagg_model(data: hf.ModelData, pooling: str):
    beta = numpyro.sample("beta", dist.Normal(0.0, 5.0).expand([len(COEFFICIENTS)]).to_event(1))
    if pooling == "partial":
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("client", data.num_clients):
        if pooling == "complete":
            person = numpyro.deterministic("b", jnp.zeros(data.num_clients))
        else:
            scale = NO_POOLING_SCALE if pooling == "none" else sigma
            u = numpyro.sample("u", dist.Normal(0.0, 1.0))
            person = numpyro.deterministic("b", scale * u)
    x = jnp.stack([jnp.asarray(data[name], dtype=beta.dtype) for name in COVARIATES], -1)
    logits = beta[0] + x @ beta[1:] + person[data.client]
    y = data.get("y")
    with numpyro.plate("obs", data.num_obs):
        numpyro.sample(
            "y", dist.Bernoulli(logits=logits), obs=None if y is None else jnp.asarray(y)
        )


def make_model(pooling: str = "partial"):
    """The VerbAgg model at one point of the pooling spectrum (a NumPyro model function)."""
    if pooling not in ("partial", "complete", "none"):
        raise ValueError(f"pooling must be 'partial', 'complete' or 'none', got {pooling!r}")
    return {"partial": partial_pooling, "complete": complete_pooling, "none": no_pooling}[pooling]


def partial_pooling(data: hf.ModelData):
    """Partial pooling (the reference configuration): the spread of persons learned."""
    _verbagg_model(data, "partial")


def complete_pooling(data: hf.ModelData):
    """Complete pooling: no person effect, one logistic regression for everyone."""
    _verbagg_model(data, "complete")


def no_pooling(data: hf.ModelData):
    """No pooling: person sd fixed at :data:`NO_POOLING_SCALE` (each person alone)."""
    _verbagg_model(data, "none")


#: the reference configuration: partial pooling
model = partial_pooling


def spectrum() -> dict:
    """No, complete and partial pooling as three NumPyro models.

    >>> list(spectrum())
    ['no pooling', 'complete pooling', 'partial pooling']
    """
    return {
        "no pooling": make_model("none"),
        "complete pooling": make_model("complete"),
        "partial pooling": make_model("partial"),
    }
