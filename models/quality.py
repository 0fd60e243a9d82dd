r"""Systemic heterogeneity: clients report their data quality, and the likelihood models it.

Each client measures a covariate with its own instrument. It knows (and reports, per row)
the measurement-noise sd :math:`s_{ij}` of that instrument, and some of its rows lack the
covariate altogether (``x_observed = 0``; missing at random). The outcome :math:`y` is always
observed. The true covariate :math:`\xi` is never seen:

.. math::
    \xi_{ij} \sim N(\mu_x, \sigma_x^2),\quad
    x_{ij} \mid \xi_{ij} \sim N(\xi_{ij}, s_{ij}^2)\ \text{(if observed)},\quad
    y_{ij} \mid \xi_{ij} \sim N(a_i + \beta \xi_{ij}, \sigma^2),

    a_i = \mu_a + \tau u_i,\ u_i \sim N(0, 1),\quad
    \beta \sim N(0, 2.5^2),\ \mu_x, \mu_a \sim N(0, 5^2),\
    \sigma_x, \sigma \sim \mathrm{HalfNormal}(2.5),\ \tau \sim \mathrm{HalfNormal}(1).

The likelihood integrates :math:`\xi` out in closed form, so no per-row latent variable enters
the model (EP's tilted problems stay as small as the client's intercept). With the
reliability :math:`\lambda_{ij} = \sigma_x^2 / (\sigma_x^2 + s_{ij}^2)` on an observed row
and :math:`\lambda_{ij} = 0` on a missing one (a missing covariate is one measured with
infinite noise),

.. math::
    x_{ij} \sim N(\mu_x, \sigma_x^2 + s_{ij}^2)\ \text{(observed rows only)},

    y_{ij} \mid x_{ij} \sim N\big(a_i + \beta\,[\mu_x + \lambda_{ij}(x_{ij} - \mu_x)],\
        \sigma^2 + \beta^2 (1 - \lambda_{ij})\,\sigma_x^2\big),

the usual normal-normal formulas: :math:`E[\xi \mid x] = \mu_x + \lambda (x - \mu_x)` and
:math:`\mathrm{Var}[\xi \mid x] = \lambda s^2 = (1 - \lambda)\sigma_x^2`. The observed/missing
split is a mask on the ``x`` site (:meth:`numpyro.distributions.Distribution.mask`), and
:math:`\lambda = 0` makes the filler in ``x`` on a missing row irrelevant.

**What it removes.** A regression of :math:`y` on the noisy :math:`x` estimates
:math:`\lambda\beta`, not :math:`\beta` (regression dilution, or attenuation; Fuller 1987,
*Measurement Error Models*, ch. 1; Carroll et al. 2006, *Measurement Error in Nonlinear
Models*, ch. 3): with one noise level the naive slope converges to
:math:`\beta\,\sigma_x^2 / (\sigma_x^2 + s^2)` (:func:`attenuation`). When clients differ in
quality, the pooled naive slope converges to about :math:`\beta\,\sigma_x^2 / (\sigma_x^2 +
\overline{s^2})`, with :math:`\overline{s^2}` the row average of the noise variances: the
noisiest instruments drag everyone's slope down (:math:`\beta / 1.75` for the generator's
:math:`s / \sigma_x \sim U(0, 1.5)`). The quality-aware likelihood weights each row by its
reliability and is consistent for :math:`\beta`. (Imputing the mean for a missing ``x`` adds
no bias to the slope of a one-covariate regression: the imputed rows sit at the mean and
inform only the intercept. It understates those rows' variance, and with several correlated
covariates it would bias the slopes too.)

Assumptions: missingness may depend on the client and on ``y`` but not on the unseen
:math:`\xi` (missing at random), the reported :math:`s` is right, and the true covariate has
one population distribution (clients whose covariates are distributed differently would need
a per-client :math:`\mu_{x,i}`, a second client parameter).

:func:`spectrum` ships the two naive treatments beside it, each with the same parameters:

* ``"naive"``: :math:`s` ignored (every ``x`` taken as exact) and a missing ``x`` imputed by
  the population mean :math:`\mu_x`, as if it had been measured:
  :math:`y \sim N(a_i + \beta \tilde x_{ij}, \sigma^2)`, :math:`x \sim N(\mu_x, \sigma_x^2)`
  on observed rows;
* ``"complete case"``: :math:`s` ignored and the rows with a missing ``x`` dropped.

Fields: ``y``, ``x`` (any finite filler where missing), ``s`` (:math:`\ge 0`; 0 is an exact
instrument) and ``x_observed`` (0 or 1). :func:`check` validates them, naming the client,
field and row at fault; :func:`generate` simulates clients of very different quality with
known ground truth; :func:`compare` measures the slope's bias and coverage under the three
treatments (``python -m models.quality``).

Examples
--------
>>> from models import quality
>>> sim = quality.generate(4, seed=0)
>>> sim.train.num_clients, sorted(sim.train.field_names)
(4, ['s', 'x', 'x_observed', 'y'])
>>> quality.check(sim.train) is sim.train
True
>>> round(quality.attenuation(sd_x=1.0, s=1.0), 3)  # the naive slope estimates half of beta
0.5
>>> list(quality.spectrum())
['naive', 'complete case', 'quality-aware']

Fit it federatedly with ``hf.fit(quality.model, sim.train, method="ep", tilted="laplace")``
or centrally with ``method="nuts"`` (tests/test_quality.py compares the two).
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
    "FIELDS",
    "GLOBALS",
    "TREATMENTS",
    "TRUTH",
    "Simulation",
    "attenuation",
    "check",
    "compare",
    "complete_case",
    "from_frame",
    "generate",
    "make_model",
    "model",
    "naive",
    "quality_aware",
    "spectrum",
]

#: the fields every treatment reads
FIELDS = ("y", "x", "s", "x_observed")
#: the global parameters, shared by every treatment
GLOBALS = ("beta", "mu_x", "sd_x", "sigma", "mu_a", "tau")
#: the likelihood treatments, from ignoring the reported quality to modelling it
TREATMENTS = ("naive", "complete case", "quality-aware")
#: ground truth of the generator: the slope, the true covariate's population mean and sd, the
#: residual sd, and the population of client intercepts
TRUTH = {"beta": 1.0, "mu_x": 1.0, "sd_x": 1.0, "sigma": 0.5, "mu_a": 0.0, "tau": 0.5}
#: client noise sd, as a fraction of ``sd_x``, is uniform on this range (reliability 1 to 0.31)
NOISE_RANGE = (0.0, 1.5)
#: client missing rate is uniform on this range
MISSING_RANGE = (0.0, 0.5)
#: client sizes: log-normal with this median (rows) and log-sd, clipped
MEDIAN_SIZE, SIZE_LOG_SD, MIN_SIZE, MAX_SIZE = 60, 0.7, 10, 1000
#: prior scales (weakly informative for covariates and outcomes of order one)
SLOPE_SCALE, LOCATION_SCALE, SD_SCALE, CLIENT_SD_SCALE = 2.5, 5.0, 2.5, 1.0


def attenuation(*, sd_x, s):
    r"""The reliability :math:`\lambda = \sigma_x^2 / (\sigma_x^2 + s^2)`: the factor by which
    a regression on a covariate measured with noise sd ``s`` shrinks the slope.

    >>> attenuation(sd_x=2.0, s=0.0), attenuation(sd_x=1.0, s=3.0)
    (1.0, 0.1)
    """
    sd_x, s = np.asarray(sd_x, np.float64), np.asarray(s, np.float64)
    out = sd_x**2 / (sd_x**2 + s**2)
    return float(out) if out.ndim == 0 else out


def check(data) -> hf.ClientData:
    """Validate the fields the models read and return the data (as :class:`hierfl.ClientData`).

    Raises :class:`hierfl.DataError` naming the client, field and row when a field is absent,
    ``s`` is negative, or ``x_observed`` is not 0 or 1. (Non-finite values are refused when
    the data are built.)

    >>> import hierfl as hf
    >>> data = hf.ClientData.from_dict({"lab": {"y": [1.0, 2.0], "x": [0.5, 0.0],
    ...                                         "s": [0.2, 0.2], "x_observed": [1, 2]}})
    >>> check(data)
    Traceback (most recent call last):
    ...
    hierfl.data.DataError: quality: client 'lab', field 'x_observed', row 1: must be 0 or 1 (got 2)
    """
    data = hf.as_client_data(data)
    data.require(*FIELDS, context="quality")
    fields = data.fields
    data.require_rows("s", fields["s"] >= 0, "must be >= 0 (a noise sd)", context="quality")
    observed = fields["x_observed"]
    data.require_rows(
        "x_observed", (observed == 0) | (observed == 1), "must be 0 or 1", context="quality"
    )
    return data


def from_frame(frame, *, client: str, y: str = "y", x: str = "x", s: str = "s") -> hf.ClientData:
    """Client data from a frame with one row per observation, a missing ``x`` as NaN.

    ``x_observed`` is 1 where column ``x`` is present and 0 where it is NaN (there ``x`` is
    set to 0, a filler the models never read); the result passes :func:`check`. A missing
    ``y`` or ``s`` is an error naming the client, field and row.

    >>> import numpy as np, pandas as pd
    >>> df = pd.DataFrame({"site": ["a", "a", "b"], "y": [0.1, 0.2, 0.3],
    ...                    "x": [1.0, np.nan, 2.0], "s": [0.5, 0.5, 0.1]})
    >>> data = from_frame(df, client="site")
    >>> data["a"]["x_observed"].tolist(), data["a"]["x"].tolist()
    ([1, 0], [1.0, 0.0])
    """
    missing = frame[x].isna().to_numpy()
    renamed = pd.DataFrame(
        {
            "client": frame[client].to_numpy(),
            "y": frame[y].to_numpy(),
            "x": np.where(missing, 0.0, frame[x].to_numpy(dtype=np.float64, na_value=0.0)),
            "s": frame[s].to_numpy(),
            "x_observed": (~missing).astype(np.int32),
        }
    )
    return check(hf.ClientData.from_frame(renamed, client="client", fields=FIELDS))


def _quality_model(data: hf.ModelData, treatment: str):
    beta = numpyro.sample("beta", dist.Normal(0.0, SLOPE_SCALE))
    mu_x = numpyro.sample("mu_x", dist.Normal(0.0, LOCATION_SCALE))
    sd_x = numpyro.sample("sd_x", dist.HalfNormal(SD_SCALE))
    sigma = numpyro.sample("sigma", dist.HalfNormal(SD_SCALE))
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, LOCATION_SCALE))
    tau = numpyro.sample("tau", dist.HalfNormal(CLIENT_SD_SCALE))
    with numpyro.plate("client", data.num_clients):
        u = numpyro.sample("u", dist.Normal(0.0, 1.0))
        a = numpyro.deterministic("a", mu_a + tau * u)
    observed = jnp.asarray(data["x_observed"]) == 1
    intercept = a[data.client]
    if treatment == "quality-aware":
        s2 = jnp.asarray(data["s"], dtype=beta.dtype) ** 2
        var_x = sd_x**2
        reliability = jnp.where(observed, var_x / (var_x + s2), 0.0)
        x_scale = jnp.sqrt(var_x + s2)
    else:  # the reported s ignored: an observed x taken as exact
        x_scale = sd_x
    x, y = data.get("x"), data.get("y")
    with numpyro.plate("obs", data.num_obs):
        # without ``x`` in the data (a posterior predictive replicate) x is drawn as well
        x = numpyro.sample(
            "x",
            dist.Normal(mu_x, x_scale).mask(observed),
            obs=None if x is None else jnp.asarray(x, dtype=beta.dtype),
        )
        if treatment == "quality-aware":
            x_expected = mu_x + reliability * (x - mu_x)  # E[xi | x]; mu_x where missing
            y_scale = jnp.sqrt(sigma**2 + beta**2 * (1.0 - reliability) * var_x)
        else:  # a missing x imputed by the population mean mu_x, as if measured
            x_expected = jnp.where(observed, x, mu_x)
            y_scale = sigma
        y_distribution = dist.Normal(intercept + beta * x_expected, y_scale)
        if treatment == "complete case":
            y_distribution = y_distribution.mask(observed)
        numpyro.sample("y", y_distribution, obs=None if y is None else jnp.asarray(y))


def quality_aware(data: hf.ModelData):
    """The reference model: the reported noise sd and missingness in the likelihood."""
    _quality_model(data, "quality-aware")


def naive(data: hf.ModelData):
    """``s`` ignored, missing ``x`` imputed by the population mean ``mu_x``."""
    _quality_model(data, "naive")


def complete_case(data: hf.ModelData):
    """``s`` ignored, rows with a missing ``x`` dropped from the outcome likelihood."""
    _quality_model(data, "complete case")


#: the reference configuration: the quality-aware likelihood
model = quality_aware


def make_model(treatment: str = "quality-aware"):
    """The model under one of :data:`TREATMENTS` (a NumPyro model function)."""
    models = dict(zip(TREATMENTS, (naive, complete_case, quality_aware), strict=True))
    if treatment not in models:
        raise ValueError(f"treatment must be one of {TREATMENTS}, got {treatment!r}")
    return models[treatment]


def spectrum() -> dict:
    """The three likelihood treatments (:data:`TREATMENTS`) as NumPyro models; the pooling
    (partial, with ``tau`` learned) is the same in all three."""
    return {name: make_model(name) for name in TREATMENTS}


class Simulation(NamedTuple):
    """Generated clients: training data and the truth (globals and per-client values)."""

    train: hf.ClientData
    truth: dict


def generate(
    num_clients: int,
    *,
    seed: int = 0,
    truth: dict | None = None,
    median_size: int = MEDIAN_SIZE,
    noise_range: tuple[float, float] = NOISE_RANGE,
    missing_range: tuple[float, float] = MISSING_RANGE,
) -> Simulation:
    r"""Generate clients of heterogeneous data quality with known ground truth.

    Client :math:`i` draws an intercept :math:`a_i \sim N(\mu_a, \tau^2)`, a size (log-normal,
    median ``median_size``, log-sd :data:`SIZE_LOG_SD`, clipped to [:data:`MIN_SIZE`,
    :data:`MAX_SIZE`]), an instrument noise sd :math:`s_i = \sigma_x U(\text{noise_range})`
    and a missing rate :math:`p_i \sim U(\text{missing_range})`. Each row has
    :math:`\xi \sim N(\mu_x, \sigma_x^2)`, :math:`x = \xi + N(0, s_i^2)` (replaced by 0 and
    ``x_observed = 0`` with probability :math:`p_i`) and
    :math:`y = a_i + \beta\xi + N(0, \sigma^2)`.

    Parameters
    ----------
    num_clients : int
    seed : int
        Seed of the ``numpy.random.Generator``; the same seed gives the same clients.
    truth : dict, optional
        Overrides of :data:`TRUTH`.
    median_size : int
    noise_range : (float, float)
        Range of the clients' noise sd, as fractions of ``sd_x`` (:data:`NOISE_RANGE`).
    missing_range : (float, float)
        Range of the clients' missing rates (:data:`MISSING_RANGE`).

    Returns
    -------
    Simulation
        ``truth`` also holds each client's ``a``, ``s`` and ``missing_rate``, and the true
        covariate ``xi`` of every row (flat, in the data's row order).

    Examples
    --------
    >>> sim = generate(3, seed=1, noise_range=(0.5, 0.5), missing_range=(0.0, 0.0))
    >>> sim.truth["s"].tolist(), bool(sim.train.fields["x_observed"].all())
    ([0.5, 0.5, 0.5], True)
    """
    rng = np.random.default_rng(seed)
    truth = dict(TRUTH, **(truth or {}))
    a = rng.normal(truth["mu_a"], truth["tau"], num_clients)
    sizes = np.clip(
        np.round(median_size * np.exp(rng.normal(0.0, SIZE_LOG_SD, num_clients))),
        MIN_SIZE,
        MAX_SIZE,
    ).astype(int)
    s = truth["sd_x"] * rng.uniform(*noise_range, num_clients)
    missing_rate = rng.uniform(*missing_range, num_clients)
    client = np.repeat(np.arange(num_clients), sizes)
    xi = rng.normal(truth["mu_x"], truth["sd_x"], client.size)
    measured = xi + s[client] * rng.normal(size=client.size)
    observed = (rng.uniform(size=client.size) >= missing_rate[client]).astype(np.int32)
    y = a[client] + truth["beta"] * xi + rng.normal(0.0, truth["sigma"], client.size)
    fields = {
        "y": y,
        "x": np.where(observed == 1, measured, 0.0),
        "s": s[client],
        "x_observed": observed,
    }
    ids = [f"C{i:03d}" for i in range(num_clients)]
    train = hf.ClientData(ids, fields, sizes)
    return Simulation(train, dict(truth, a=a, s=s, missing_rate=missing_rate, xi=xi))


def compare(
    num_clients: int = 20,
    *,
    seeds=range(10),
    method: str = "nuts",
    interval: float = 0.9,
    **options,
) -> pd.DataFrame:
    """The slope under the three :data:`TREATMENTS`, fitted to datasets from :func:`generate`.

    Parameters
    ----------
    num_clients : int
    seeds : iterable of int
        One generated dataset per seed (replications).
    method : str
        ``hf.fit`` method (``"nuts"``: centralized; ``"ep"``: federated).
    interval : float
        Mass of the central posterior interval whose coverage of the true slope is recorded.
    **options
        Passed to :func:`hierfl.fit`.

    Returns
    -------
    pandas.DataFrame
        One row per (treatment, seed): ``seed``, ``treatment``, ``mean`` and ``sd`` of the
        slope's posterior, ``bias`` (``mean - beta``) and ``covered`` (the interval holds
        the true ``beta``).
    """
    rows = []
    tail = (1.0 - interval) / 2.0
    for seed in seeds:
        sim = generate(num_clients, seed=seed)
        for treatment, treatment_model in spectrum().items():
            fit = hf.fit(treatment_model, sim.train, method=method, seed=seed, **options)
            beta = np.asarray(fit.global_samples["beta"], np.float64).reshape(-1)
            low, high = np.quantile(beta, [tail, 1.0 - tail])
            truth = sim.truth["beta"]
            rows.append(
                {
                    "seed": seed,
                    "treatment": treatment,
                    "mean": beta.mean(),
                    "sd": beta.std(),
                    "bias": beta.mean() - truth,
                    "covered": bool(low <= truth <= high),
                }
            )
    return pd.DataFrame(rows)


def _summary(table: pd.DataFrame) -> pd.DataFrame:
    grouped = table.groupby("treatment", sort=False)
    return pd.DataFrame(
        {
            "mean bias": grouped["bias"].mean(),
            "se of bias": grouped["bias"].std() / np.sqrt(grouped.size()),
            "rmse": grouped["bias"].apply(lambda b: float(np.sqrt(np.mean(b**2)))),
            "mean posterior sd": grouped["sd"].mean(),
            "coverage": grouped["covered"].mean(),
        }
    )


if __name__ == "__main__":  # python -m models.quality [num_clients] [replications] [method]
    import sys
    import time

    num_clients = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    replications = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    method = sys.argv[3] if len(sys.argv) > 3 else "nuts"
    options = (
        {"num_warmup": 500, "num_samples": 1000, "num_chains": 2}
        if method == "nuts"
        else {"tilted": "laplace", "num_rounds": 10, "num_samples": 1000}
    )
    start = time.perf_counter()
    table = compare(num_clients, seeds=range(replications), method=method, **options)
    print(
        f"slope beta = {TRUTH['beta']}, {num_clients} clients, {replications} datasets, "
        f"method={method} {options}, 90% intervals, {time.perf_counter() - start:.0f} s"
    )
    print(_summary(table).to_string(float_format=lambda v: f"{v:.3f}"))
