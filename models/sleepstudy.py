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
The reference model gives the random effects a *diagonal* covariance: it is lme4's
``Reaction ~ Days + (Days || Subject)`` (uncorrelated intercept and slope).
``family(correlated=True)`` is lme4's default ``Reaction ~ Days + (Days | Subject)``:
:math:`(b_{i0}, b_{i1}) \sim N(0, \mathrm{diag}(\tau)\,\Omega\,\mathrm{diag}(\tau))` with an
``LKJCholesky(2, 2)`` prior on the correlation's Cholesky factor; lme4 estimates the
correlation at 0.066 (REML), so little is lost by the diagonal reference.
``family(slopes=False)`` is the random-intercept model ``Reaction ~ Days + (1 | Subject)``.

Published lme4 REML estimates (:data:`LME4`; reproduced by a direct REML computation on the
bundled file): fixed effects 251.405 (intercept) and 10.467 (Days) for all three models;
``(1 | Subject)``: subject sd 37.124, residual sd 30.991; ``(Days || Subject)``: intercept
sd 25.051, slope sd 5.988, residual sd 25.565; ``(Days | Subject)``: intercept sd 24.741,
slope sd 5.922, correlation 0.066, residual sd 25.592. The design is balanced (every subject
on the same ten days), so the generalized least-squares fixed effects equal ordinary least
squares whatever the variance components.

The pooling spectrum (:func:`spectrum`), on the reference (random slope) model:

* no pooling — ``tau`` fixed at :data:`NO_POOLING_TAU` for both effects: each subject keeps
  its own regression line;
* complete pooling — ``tau = 0``: one line for everyone (the FedAvg-like global model);
* partial pooling — ``tau`` learned.

Lifelong learning with forgetting (:func:`drift`): the subject's deviation from the population
line is a state per day that drifts as a stationary AR(1) with a learned forgetting rate
:math:`\rho` (:class:`hierfl.drift.DriftingNormal`, period = day, :math:`T = 10`),

.. math::
    \mathrm{Reaction}_{ij} = \beta_0 + \beta_1 \mathrm{Days}_{ij} + d_{i,\mathrm{Days}_{ij}}
        + \varepsilon_{ij},\quad
    d_{i,t} = \rho\, d_{i,t-1} + \sqrt{1-\rho^2}\,\tau\,\eta_{i,t},

and :func:`forecast` scores it against the random-slope model and complete pooling on each
subject's held-out last day (one step ahead).

Data: ``data/sleepstudy.csv`` (see ``data/PROVENANCE.md``).

Examples
--------
>>> from models import sleepstudy
>>> data = sleepstudy.load()
>>> data.num_clients, data.num_obs, sorted(set(data.sizes.tolist()))
(18, 180, [10])
>>> sleepstudy.family().effect_names
['intercept', 'Days']
>>> sleepstudy.family(correlated=True).global_sites
('beta', 'sigma', 'tau', 'correlation_cholesky')
>>> sleepstudy.drift().num_periods
10
"""

from __future__ import annotations

from importlib import resources
from typing import Any, NamedTuple

import numpy as np
import numpyro.distributions as dist
import pandas as pd
from scipy import stats

import hierfl as hf
from hierfl.drift import DriftingNormal

__all__ = [
    "DRIFT_PRIORS",
    "FIELDS",
    "LME4",
    "NO_POOLING_TAU",
    "NUM_DAYS",
    "PRIORS",
    "Forecasts",
    "drift",
    "family",
    "forecast",
    "frame",
    "load",
    "spectrum",
]

FIELDS = ("Reaction", "Days")
#: weakly informative priors in milliseconds (reaction times are about 300 ms, sd 56 ms)
PRIORS = {
    "beta": dist.Normal(0.0, 1000.0),
    "sigma": dist.HalfNormal(100.0),
    "tau": dist.HalfNormal(100.0),
}
#: :data:`PRIORS` and a flat prior on the forgetting rate of the drift model
DRIFT_PRIORS = dict(PRIORS, rho=dist.Uniform(0.0, 1.0))
#: days 0..9: the drift model's periods
NUM_DAYS = 10
#: "no pooling": tau far above the spread of subjects' intercepts (about 37 ms) and slopes
#: (about 6 ms per day)
NO_POOLING_TAU = 1000.0
#: lme4's REML estimates (``lmer(Reaction ~ Days + (1 | Subject))``, ``(Days || Subject)`` and
#: ``(Days | Subject)``; the fixed effects are the same for all three, the design being
#: balanced)
LME4 = {
    "intercept": 251.405,
    "Days": 10.467,
    "random intercept": {"tau": 37.124, "sigma": 30.991},
    "random slope": {"tau": (25.051, 5.988), "sigma": 25.565},
    "correlated slope": {"tau": (24.741, 5.922), "correlation": 0.066, "sigma": 25.592},
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


def family(priors=None, *, slopes: bool = True, correlated: bool = False) -> hf.LinearMixed:
    """Random intercept and (``slopes=True``, the reference) an uncorrelated random slope on
    ``Days`` per subject, with :data:`PRIORS` (or ``priors``). ``correlated=True``: intercept
    and slope correlated (lme4's ``(Days | Subject)``), ``LKJCholesky(2, 2)`` prior on
    ``correlation_cholesky``; it needs the slope."""
    if correlated and not slopes:
        raise ValueError(
            "sleepstudy.family(correlated=True) correlates the random intercept with the "
            "random slope: it needs slopes=True"
        )
    return hf.LinearMixed(
        response="Reaction",
        fixed=["Days"],
        random=["Days"] if slopes else [],
        priors=dict(PRIORS, **(priors or {})),
        correlated=correlated,
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


def drift(priors=None) -> DriftingNormal:
    """The lifelong-learning model: each subject's deviation from the population line drifts
    from day to day as a stationary AR(1) (period = ``Days``, ``num_periods`` =
    :data:`NUM_DAYS`), with :data:`DRIFT_PRIORS` (or ``priors``). ``{"rho": 1.0}`` is the
    random-intercept model ``family(slopes=False)``.

    >>> drift({"rho": 1.0})
    DriftingNormal(beta~Independent, sigma~HalfNormal, tau~HalfNormal, rho=1.0)
    """
    return DriftingNormal(
        num_periods=NUM_DAYS,
        response="Reaction",
        fixed=["Days"],
        period="Days",
        priors=dict(DRIFT_PRIORS, **(priors or {})),
    )


class Forecasts(NamedTuple):
    r"""What :func:`forecast` measures.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per model: ``rmse`` (ms) of the posterior predictive mean, and
        ``log_predictive_density``, the mean over subjects of
        :math:`\log \frac1S \sum_s N(y_i; \mu_{is}, \sigma_s^2)` (nats per subject).
    rho : dict
        The drift model's forgetting rate: posterior ``mean`` and the 90% interval
        (``lower``, ``upper``: the 5% and 95% quantiles).
    per_subject : pandas.DataFrame
        ``error`` (observed minus forecast, ms) and ``log_density`` per model and subject
        (for paired comparisons: 18 held-out rows are a small sample).
    fits : dict of str to hierfl.Fit
    """

    table: Any
    rho: dict[str, float]
    per_subject: Any
    fits: dict[str, Any]


def forecast(*, day: int = NUM_DAYS - 1, seed: int = 0, **options) -> Forecasts:
    """One step ahead: fit on days ``0 .. day-1`` with the exact engine, forecast ``day``.

    Models: the drift model (:func:`drift`; ``day`` is a period with no rows, so the
    subject's state there is its forecast), the random-intercept and random-slope reference
    (:func:`family`) and complete pooling (``family({"tau": 0.0})``: one line for everyone).

    Parameters
    ----------
    day : int
        The held-out day (default the last, 9).
    seed : int
    **options
        Passed to :func:`hierfl.fit` (``num_samples``, ``num_chains``, ...).

    Returns
    -------
    Forecasts
    """
    df = frame()
    train = load(df[df["Days"] < day])
    held_out = df[df["Days"] == day].set_index("Subject")["Reaction"]
    models = {
        "drift (AR(1) states)": drift(),
        "random intercept + slope": family(),
        "complete pooling": family({"tau": 0.0}),
    }
    rows, fits, records = {}, {}, []
    for name, model in models.items():
        fit = hf.fit(model, train, method="exact", seed=seed, **options)
        sigma = fit.global_samples["sigma"].reshape(-1)
        errors, densities = [], []
        for subject in train.client_ids:
            mu = fit.predict(subject, Days=[float(day)])["mu"][:, 0]
            y = held_out[subject]
            errors.append(y - mu.mean())
            log_density = stats.norm.logpdf(y, mu, sigma)
            densities.append(np.logaddexp.reduce(log_density) - np.log(log_density.size))
            records.append((name, subject, errors[-1], densities[-1]))
        rows[name] = {
            "rmse": float(np.sqrt(np.mean(np.square(errors)))),
            "log_predictive_density": float(np.mean(densities)),
        }
        fits[name] = fit
    rho = fits["drift (AR(1) states)"].global_samples["rho"].reshape(-1)
    lower, upper = np.quantile(rho, [0.05, 0.95])
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    per_subject = pd.DataFrame(records, columns=["model", "Subject", "error", "log_density"])
    return Forecasts(
        table,
        {"mean": float(rho.mean()), "lower": float(lower), "upper": float(upper)},
        per_subject.set_index(["model", "Subject"]),
        fits,
    )
