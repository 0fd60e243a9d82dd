r"""Reaction times under sleep deprivation (lme4's ``sleepstudy``): subjects as clients.

18 subjects, each measured on 10 days (Belenky et al. 2003): ``Reaction`` (average reaction
time, ms) after ``Days`` (0..9) of sleep restricted to three hours a night. Each subject is a
client. A linear mixed model with a random intercept and, in the reference configuration, a
random slope on ``Days`` per subject:

.. math::
    \mathrm{Reaction}_{ij} = \beta_0 + \beta_1 \mathrm{Days}_{ij} + b_{i0}
        + b_{i1} \mathrm{Days}_{ij} + \varepsilon_{ij},\quad
    b_{ik} \sim N(0, \tau_k^2),\quad \varepsilon_{ij} \sim N(0, \sigma^2)

with weakly informative priors on the millisecond scale (:data:`PRIORS`).
:class:`hierfl.LinearMixed` gives the random effects a *diagonal* covariance, so the
reference model is lme4's ``Reaction ~ Days + (Days || Subject)`` (uncorrelated intercept
and slope), not ``(Days | Subject)``; lme4 estimates their correlation at 0.07 (REML), so
little is lost.
``family(slopes=False)`` is the random-intercept model ``Reaction ~ Days + (1 | Subject)``.

Published lme4 REML estimates (:data:`LME4`; reproduced by a direct REML computation on the
bundled file): fixed effects 251.405 (intercept) and 10.467 (Days) for both models;
``(1 | Subject)``: subject sd 37.124, residual sd 30.991; ``(Days || Subject)``: intercept
sd 25.051, slope sd 5.988, residual sd 25.565. The design is balanced (every subject on the
same ten days), so the generalized least-squares fixed effects equal ordinary least squares
whatever the variance components.

The pooling spectrum (:func:`spectrum`), on the reference (random slope) model:

* no pooling — ``tau`` fixed at :data:`NO_POOLING_TAU` for both effects: each subject keeps
  its own regression line;
* complete pooling — ``tau = 0``: one line for everyone (the FedAvg-like global model);
* partial pooling — ``tau`` learned.

Data: ``data/sleepstudy.csv`` (see ``data/PROVENANCE.md``).

Examples
--------
>>> from models import sleepstudy
>>> data = sleepstudy.load()
>>> data.num_clients, data.num_obs, sorted(set(data.sizes.tolist()))
(18, 180, [10])
>>> sleepstudy.family().effect_names
['intercept', 'Days']
"""

from __future__ import annotations

from importlib import resources

import numpyro.distributions as dist
import pandas as pd

import hierfl as hf

__all__ = ["FIELDS", "LME4", "NO_POOLING_TAU", "PRIORS", "family", "frame", "load", "spectrum"]

FIELDS = ("Reaction", "Days")
#: weakly informative priors in milliseconds (reaction times are about 300 ms, sd 56 ms)
PRIORS = {
    "beta": dist.Normal(0.0, 1000.0),
    "sigma": dist.HalfNormal(100.0),
    "tau": dist.HalfNormal(100.0),
}
#: "no pooling": tau far above the spread of subjects' intercepts (about 37 ms) and slopes
#: (about 6 ms per day)
NO_POOLING_TAU = 1000.0
#: lme4's REML estimates (``lmer(Reaction ~ Days + (1 | Subject))`` and ``(Days || Subject)``)
LME4 = {
    "intercept": 251.405,
    "Days": 10.467,
    "random intercept": {"tau": 37.124, "sigma": 30.991},
    "random slope": {"tau": (25.051, 5.988), "sigma": 25.565},
}


def frame() -> pd.DataFrame:
    """The 180 measurements: ``Reaction`` (ms), ``Days`` (float, 0..9), ``Subject``."""
    with resources.files("models").joinpath("data/sleepstudy.csv").open() as stream:
        df = pd.read_csv(stream)
    df["Days"] = df["Days"].astype(float)
    return df


def load(df: pd.DataFrame | None = None) -> hf.ClientData:
    """Client data: one client per ``Subject`` (its number), fields :data:`FIELDS`."""
    return hf.ClientData.from_frame(
        frame() if df is None else df, client="Subject", fields=list(FIELDS)
    )


def family(priors=None, *, slopes: bool = True) -> hf.LinearMixed:
    """Random intercept and (``slopes=True``, the reference) an uncorrelated random slope on
    ``Days`` per subject, with :data:`PRIORS` (or ``priors``)."""
    return hf.LinearMixed(
        response="Reaction",
        fixed=["Days"],
        random=["Days"] if slopes else [],
        priors=dict(PRIORS, **(priors or {})),
    )


def spectrum(*, slopes: bool = True) -> dict[str, hf.LinearMixed]:
    """No, complete and partial pooling of the subjects' lines.

    >>> list(spectrum())
    ['no pooling', 'complete pooling', 'partial pooling']
    """
    return {
        "no pooling": family({"tau": NO_POOLING_TAU}, slopes=slopes),
        "complete pooling": family({"tau": 0.0}, slopes=slopes),
        "partial pooling": family(slopes=slopes),
    }
