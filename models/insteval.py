r"""Lecture evaluations at ETH Zurich (lme4's ``InstEval``): instructors as clients.

73,421 ratings ``y`` (1 = poor .. 5 = very good) that 2,972 students gave to lectures of
1,128 instructors (``d``). Each instructor is a client holding the ratings of their
lectures, from 10 to 792 of them. A Normal model with a random intercept per instructor
(lme4's ``lmer(y ~ 1 + (1 | d))``):

.. math::
    \beta_0 \sim N(0, 10^2),\quad \sigma, \tau \sim \mathrm{HalfNormal}(2),\quad
    y_{ij} = \beta_0 + b_i + \varepsilon_{ij},\quad
    b_i \sim N(0, \tau^2),\quad \varepsilon_{ij} \sim N(0, \sigma^2)

written as :class:`hierfl.LinearMixed` (the residual sd is unknown, so not
:class:`hierfl.NormalNormal`); the exact engine integrates each :math:`b_i` out and, with
more than 1,000 clients, infers :math:`(\beta_0, \sigma, \tau)` by a Laplace approximation
corrected by importance sampling. Given them, an instructor's effect is the closed-form
shrinkage of their mean rating :math:`\bar y_i` toward :math:`\beta_0`:

.. math::
    E[b_i \mid \beta_0, \sigma, \tau, D_i]
        = \frac{n_i \tau^2}{\sigma^2 + n_i \tau^2}\,(\bar y_i - \beta_0)

Lecture-level covariates (``service``, ``lectage``, ``studage``, ``dept``) can enter as
fixed effects through ``family(fixed=...)``; the crossed student effect ``(1 | s)`` of
lme4's full model is left out (a student rates several instructors, so it is not inside one
client).

The pooling spectrum (:func:`spectrum`): ``tau`` fixed at :data:`NO_POOLING_TAU` (no
pooling: each instructor's own mean), ``tau = 0`` (complete pooling: the grand mean for
everyone) and ``tau`` learned (partial pooling).

Data: ``data/insteval.csv.gz`` (see ``data/PROVENANCE.md``).

Examples
--------
>>> from models import insteval
>>> data = insteval.load()
>>> data.num_clients, data.num_obs
(1128, 73421)
>>> insteval.family().coefficient_names
['intercept']
"""

from __future__ import annotations

from importlib import resources

import numpyro.distributions as dist
import pandas as pd

import hierfl as hf

__all__ = ["COLUMNS", "NO_POOLING_TAU", "PRIORS", "family", "frame", "load", "spectrum"]

#: every column of the file (``d`` is the instructor); all numeric codes
COLUMNS = ("s", "d", "studage", "lectage", "service", "dept", "y")
#: weakly informative priors on the 1..5 rating scale (ratings have sd 1.3)
PRIORS = {
    "beta": dist.Normal(0.0, 10.0),
    "sigma": dist.HalfNormal(2.0),
    "tau": dist.HalfNormal(2.0),
}
#: "no pooling": tau far above the spread of ratings, so an instructor with one rating keeps
#: all but ``sigma^2 / tau^2``, about 2e-4, of their own mean
NO_POOLING_TAU = 100.0


def frame() -> pd.DataFrame:
    """One row per rating: the columns :data:`COLUMNS`, ``y`` and ``service`` as floats."""
    with resources.files("models").joinpath("data/insteval.csv.gz").open("rb") as stream:
        df = pd.read_csv(stream, compression="gzip")
    df["y"] = df["y"].astype(float)
    df["service"] = df["service"].astype(float)
    return df


def load(df: pd.DataFrame | None = None, *, fields=("y",)) -> hf.ClientData:
    """Client data: one client per instructor ``d`` (in order of id), fields ``fields``
    (add covariates used as fixed effects, e.g. ``("y", "service")``)."""
    return hf.ClientData.from_frame(
        frame() if df is None else df, client="d", fields=list(fields), sort=True
    )


def family(priors=None, *, fixed=()) -> hf.LinearMixed:
    """Partial pooling (the reference configuration): a random intercept per instructor,
    with :data:`PRIORS` (or ``priors``) and the fixed effects ``fixed`` (none by default)."""
    return hf.LinearMixed(response="y", fixed=list(fixed), priors=dict(PRIORS, **(priors or {})))


def spectrum() -> dict[str, hf.LinearMixed]:
    """No, complete and partial pooling of the instructors' mean ratings.

    >>> list(spectrum())
    ['no pooling', 'complete pooling', 'partial pooling']
    """
    return {
        "no pooling": family({"tau": NO_POOLING_TAU}),
        "complete pooling": family({"tau": 0.0}),
        "partial pooling": family(),
    }
