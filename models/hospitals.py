r"""Hospitals: one diagnostic score, many hospitals, each with its own decision threshold.

Each hospital is a client holding patients with a diagnostic score :math:`x` (standardized)
and a confirmed diagnosis :math:`y \in \{0, 1\}`. Hospitals differ in disease prevalence
(the intercept) and in how strongly the score relates to disease (the slope): a hierarchical
logistic regression, written non-centred,

.. math::
    \mu_\alpha \sim N(-2, 1.5^2),\ \mu_\beta \sim N(1, 1),\
    \sigma_\alpha \sim \mathrm{HalfNormal}(1),\ \sigma_\beta \sim \mathrm{HalfNormal}(0.5)

    \alpha_i = \mu_\alpha + \sigma_\alpha u_i,\ \beta_i = \mu_\beta + \sigma_\beta v_i,\
    u_i, v_i \sim N(0, 1),\qquad
    y_{ij} \sim \mathrm{Bernoulli}(\mathrm{logit}^{-1}(\alpha_i + \beta_i x_{ij}))

Calibrated per-hospital probabilities let each hospital pick its own threshold on its local
validation data (:func:`utility_threshold`, :func:`f1_threshold`); :func:`compare` sets the
four strategies side by side: global model + 0.5, global model + local threshold, local-only
model + local threshold, and hierfl partial pooling + local threshold.

The pooling spectrum (:func:`spectrum`): ``"complete"`` (one intercept and slope for all:
the FedAvg-like global model), ``"none"`` (hospital scales fixed at
:data:`NO_POOLING_SCALE`: every hospital essentially alone) and ``"partial"`` (scales
learned).

Data are generated (:func:`generate`) with known ground truth.

Examples
--------
>>> from models import hospitals
>>> sim = hospitals.generate(5, seed=0)
>>> sim.train.num_clients, sorted(sim.truth)
(5, ['alpha', 'beta', 'mu_alpha', 'mu_beta', 'sigma_alpha', 'sigma_beta'])
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd

import hierfl as hf

__all__ = [
    "TRUTH",
    "Simulation",
    "compare",
    "f1_threshold",
    "generate",
    "complete_pooling",
    "make_model",
    "model",
    "no_pooling",
    "partial_pooling",
    "predict_probability",
    "rates",
    "spectrum",
    "utility_threshold",
]

#: ground truth of the generator: population logit prevalence at score 0 (about 12%),
#: population slope, and the spread of both across hospitals
TRUTH = {"mu_alpha": -2.0, "mu_beta": 1.2, "sigma_alpha": 0.8, "sigma_beta": 0.4}
#: hospital sizes: log-normal with this median (training rows) and log-sd, clipped
MEDIAN_SIZE, SIZE_LOG_SD, MIN_SIZE, MAX_SIZE = 120, 1.0, 15, 2000
#: the local validation and test sets are this fraction of the training size (at least
#: :data:`MIN_HELD_OUT` rows each)
HELD_OUT_FRACTION, MIN_HELD_OUT = 0.5, 20
#: "no pooling": hospital-level scales fixed far above the truth (logit scale)
NO_POOLING_SCALE = 5.0
#: default costs: a missed case costs five false alarms
COST_FALSE_POSITIVE, COST_MISSED_CASE = 1.0, 5.0
#: candidate probability thresholds
THRESHOLDS = np.linspace(0.01, 0.99, 99)


def _hospitals_model(data: hf.ModelData, pooling: str):
    mu_alpha = numpyro.sample("mu_alpha", dist.Normal(-2.0, 1.5))
    mu_beta = numpyro.sample("mu_beta", dist.Normal(1.0, 1.0))
    if pooling == "partial":
        sigma_alpha = numpyro.sample("sigma_alpha", dist.HalfNormal(1.0))
        sigma_beta = numpyro.sample("sigma_beta", dist.HalfNormal(0.5))
    with numpyro.plate("client", data.num_clients):
        if pooling == "complete":
            alpha = numpyro.deterministic("alpha", jnp.broadcast_to(mu_alpha, (data.num_clients,)))
            beta = numpyro.deterministic("beta", jnp.broadcast_to(mu_beta, (data.num_clients,)))
        else:
            if pooling == "none":
                sigma_alpha = sigma_beta = NO_POOLING_SCALE
            u = numpyro.sample("u", dist.Normal(0.0, 1.0))
            v = numpyro.sample("v", dist.Normal(0.0, 1.0))
            alpha = numpyro.deterministic("alpha", mu_alpha + sigma_alpha * u)
            beta = numpyro.deterministic("beta", mu_beta + sigma_beta * v)
    logits = alpha[data.client] + beta[data.client] * data["score"]
    with numpyro.plate("obs", data.num_obs):
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=data.get("y"))


def make_model(pooling: str = "partial"):
    """The hospitals model at one point of the pooling spectrum (a NumPyro model function)."""
    if pooling not in ("partial", "complete", "none"):
        raise ValueError(f"pooling must be 'partial', 'complete' or 'none', got {pooling!r}")
    return {"partial": partial_pooling, "complete": complete_pooling, "none": no_pooling}[pooling]


def partial_pooling(data: hf.ModelData):
    """Partial pooling (the reference configuration): hospital spread learned."""
    _hospitals_model(data, "partial")


def complete_pooling(data: hf.ModelData):
    """Complete pooling: one set of parameters for every client (the global model)."""
    _hospitals_model(data, "complete")


def no_pooling(data: hf.ModelData):
    """No pooling: client spread fixed at ``NO_POOLING_SCALE`` (each client alone)."""
    _hospitals_model(data, "none")


#: the reference configuration: partial pooling
model = partial_pooling


def spectrum() -> dict:
    """No, complete and partial pooling as three NumPyro models."""
    return {
        "no pooling": make_model("none"),
        "complete pooling": make_model("complete"),
        "partial pooling": make_model("partial"),
    }


class Simulation(NamedTuple):
    """Generated hospitals: training, local validation and test data, and the truth."""

    train: hf.ClientData
    validation: hf.ClientData
    test: hf.ClientData
    truth: dict


def generate(
    num_hospitals: int, *, seed: int = 0, truth: dict | None = None, median_size: int = MEDIAN_SIZE
) -> Simulation:
    r"""Generate hospitals with known ground truth.

    Each hospital :math:`i` draws :math:`\alpha_i \sim N(\mu_\alpha, \sigma_\alpha^2)`,
    :math:`\beta_i \sim N(\mu_\beta, \sigma_\beta^2)` (:data:`TRUTH`), a training size from a
    log-normal (median ``median_size``, log-sd :data:`SIZE_LOG_SD`, clipped to
    [:data:`MIN_SIZE`, :data:`MAX_SIZE`]: a few large hospitals, many small ones), and
    validation and test sets of :data:`HELD_OUT_FRACTION` of that size. Every patient has a
    score :math:`x \sim N(0, 1)` and disease :math:`y \sim \mathrm{Bernoulli}(
    \mathrm{logit}^{-1}(\alpha_i + \beta_i x))`. Prevalences then range from about 2% to 40%.

    Parameters
    ----------
    num_hospitals : int
    seed : int
        Seed of the ``numpy.random.Generator``; the same seed gives the same hospitals.
    truth : dict, optional
        Overrides of :data:`TRUTH`.
    median_size : int

    Returns
    -------
    Simulation
        ``truth`` also holds every hospital's ``alpha`` and ``beta``.
    """
    rng = np.random.default_rng(seed)
    truth = dict(TRUTH, **(truth or {}))
    alpha = rng.normal(truth["mu_alpha"], truth["sigma_alpha"], num_hospitals)
    beta = rng.normal(truth["mu_beta"], truth["sigma_beta"], num_hospitals)
    sizes = np.clip(
        np.round(median_size * np.exp(rng.normal(0.0, SIZE_LOG_SD, num_hospitals))),
        MIN_SIZE,
        MAX_SIZE,
    ).astype(int)
    ids = [f"H{i:04d}" for i in range(num_hospitals)]

    def split(size_of):
        clients = {}
        for i, name in enumerate(ids):
            n = size_of(sizes[i])
            score = rng.normal(0.0, 1.0, n)
            p = 1.0 / (1.0 + np.exp(-(alpha[i] + beta[i] * score)))
            clients[name] = {"score": score, "y": (rng.uniform(size=n) < p).astype(np.int32)}
        return hf.ClientData.from_dict(clients)

    held_out = lambda n: max(MIN_HELD_OUT, int(round(HELD_OUT_FRACTION * n)))  # noqa: E731
    train = split(lambda n: n)
    validation = split(held_out)
    test = split(held_out)
    return Simulation(train, validation, test, dict(truth, alpha=alpha, beta=beta))


def predict_probability(fit: hf.Fit, hospital, score) -> np.ndarray:
    """Posterior predictive probability of disease, ``[rows]``, for one hospital's scores.

    Averages :math:`\\mathrm{logit}^{-1}(\\alpha_i + \\beta_i x)` over the posterior draws of
    the hospital's own ``alpha`` and ``beta`` (a calibrated probability).
    """
    draws = fit.posterior_samples([hospital])
    alpha = np.asarray(draws["alpha"]).reshape(-1)
    beta = np.asarray(draws["beta"]).reshape(-1)
    logits = alpha[:, None] + beta[:, None] * np.asarray(score)[None, :]
    return (1.0 / (1.0 + np.exp(-logits))).mean(axis=0)


def rates(y, flagged) -> dict:
    """Accuracy, false-positive rate (of the healthy) and missed-case rate (of the sick)."""
    y, flagged = np.asarray(y).astype(bool), np.asarray(flagged).astype(bool)
    negatives, positives = max((~y).sum(), 1), max(y.sum(), 1)
    return {
        "accuracy": float(np.mean(y == flagged)),
        "false_positive_rate": float((flagged & ~y).sum() / negatives),
        "missed_case_rate": float((~flagged & y).sum() / positives),
    }


def utility_threshold(
    probability,
    y,
    *,
    cost_false_positive: float = COST_FALSE_POSITIVE,
    cost_missed_case: float = COST_MISSED_CASE,
) -> float:
    r"""Threshold maximizing the realized utility on local validation data.

    Utility :math:`-c_{FP}\,\#FP - c_{FN}\,\#FN`; ties go to the threshold closest to the
    Bayes threshold :math:`c_{FP} / (c_{FP} + c_{FN})`, which is optimal for calibrated
    probabilities and which small hospitals therefore keep.
    """
    probability, y = np.asarray(probability), np.asarray(y).astype(bool)
    flagged = probability[None, :] > THRESHOLDS[:, None]
    utility = -(
        cost_false_positive * (flagged & ~y).sum(1) + cost_missed_case * (~flagged & y).sum(1)
    )
    bayes = cost_false_positive / (cost_false_positive + cost_missed_case)
    best = np.flatnonzero(utility == utility.max())
    return float(THRESHOLDS[best[np.argmin(np.abs(THRESHOLDS[best] - bayes))]])


def f1_threshold(probability, y) -> float:
    """Threshold maximizing F1 on local validation data (0.5 if the hospital saw no case)."""
    probability, y = np.asarray(probability), np.asarray(y).astype(bool)
    if not y.any():
        return 0.5
    flagged = probability[None, :] > THRESHOLDS[:, None]
    tp = (flagged & y).sum(1)
    f1 = 2 * tp / np.maximum(flagged.sum(1) + y.sum(), 1)
    return float(THRESHOLDS[np.argmax(f1)])


def compare(fits: dict, sim: Simulation, *, rule: str = "utility") -> pd.DataFrame:
    """The four strategies, per hospital, on the test data.

    Parameters
    ----------
    fits : dict
        ``{"complete pooling": Fit, "no pooling": Fit, "partial pooling": Fit}``.
    sim : Simulation
    rule : {"utility", "f1"}
        How each hospital picks its threshold on its validation data.

    Returns
    -------
    pandas.DataFrame
        One row per (strategy, hospital): ``threshold``, ``accuracy``,
        ``false_positive_rate``, ``missed_case_rate``, ``n_train``.
    """
    choose = utility_threshold if rule == "utility" else f1_threshold
    strategies = {
        "global + 0.5": ("complete pooling", False),
        "global + local threshold": ("complete pooling", True),
        "local only + local threshold": ("no pooling", True),
        "hierfl + local threshold": ("partial pooling", True),
    }
    rows = []
    for hospital in sim.train.client_ids:
        validation, test = sim.validation[hospital], sim.test[hospital]
        n_train = int(sim.train.sizes[sim.train.index_of(hospital)])
        probabilities = {}
        for strategy, (name, local) in strategies.items():
            if name not in probabilities:
                probabilities[name] = (
                    predict_probability(fits[name], hospital, validation["score"]),
                    predict_probability(fits[name], hospital, test["score"]),
                )
            p_validation, p_test = probabilities[name]
            threshold = choose(p_validation, validation["y"]) if local else 0.5
            rows.append(
                {
                    "strategy": strategy,
                    "hospital": hospital,
                    "n_train": n_train,
                    "threshold": threshold,
                    **rates(test["y"], p_test > threshold),
                }
            )
    return pd.DataFrame(rows)
