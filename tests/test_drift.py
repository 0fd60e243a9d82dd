"""Lifelong learning with forgetting (``hierfl.drift.DriftingNormal``): its Kalman-filter
marginal and smoother against dense Gaussian algebra (float64), its ends (rho = 1 is the
random intercept, rho = 0 independent periods), its NumPyro model, its input checks, and the
exact engine against centralized NUTS."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import FAST, TINY, assert_posteriors_agree
from numpyro.infer.util import log_density
from scipy import stats

import hierfl as hf
import hierfl.drift
from hierfl.data import ModelData
from hierfl.drift import DriftingNormal
from hierfl.engines.exact import x64
from models import sleepstudy

#: float64 closed forms agree with dense linear algebra to this (absolute, in nats or units)
EXACT = 1e-9
NUM_PERIODS = 7
#: rows of one client: several rows per period, periods 2 and 6 empty (6 is a forecast)
PERIODS = np.array([0, 0, 0, 1, 3, 3, 4, 5, 5, 1, 0])
PHI = {"beta": [0.4, -0.7, 0.25], "sigma": 0.8, "tau": 1.3}
RHOS = [0.0, 0.35, 0.9, 0.999, 1.0]


def _client(seed=0, periods=PERIODS):
    rng = np.random.default_rng(seed)
    n = len(periods)
    x, w = rng.normal(size=n), rng.normal(size=n)
    return {"y": 1.0 + 2.0 * rng.normal(size=n), "x": x, "w": w, "period": periods}


def _family(**options):
    return DriftingNormal(num_periods=NUM_PERIODS, fixed=["x", "w"], **options)


def _jnp(record):
    return {k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in record.items()}


def _stats(family, client, mask=None):
    fields = _jnp(client)
    mask = jnp.ones(len(client["y"]), dtype=bool) if mask is None else jnp.asarray(mask)
    return family.statistics(fields, mask)


def _phi(rho, **changes):
    return _jnp(dict(PHI, rho=rho, **changes))


def _design(client):
    return np.column_stack([np.ones(len(client["y"])), client["x"], client["w"]])


def _prior_covariance(tau, rho, periods):
    lags = np.abs(np.subtract.outer(periods, periods)).astype(float)
    return tau**2 * np.power(rho, lags)  # 0.0 ** 0 == 1: independent periods at rho = 0


# ---------------------------------------------------------------------- module
def test_module_documents_its_model_and_runs_its_examples():
    assert "math" in hierfl.drift.__doc__ and "math" in DriftingNormal.__doc__
    assert hierfl.drift.__all__ == ["DriftingNormal"]
    result = doctest.testmod(
        hierfl.drift, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("rho", RHOS)
def test_log_marginal_is_the_dense_multivariate_normal(rho):
    family, client = _family(), _client()
    with x64():
        value = float(family.log_marginal(_phi(rho), _stats(family, client)))
    covariance = _prior_covariance(PHI["tau"], rho, PERIODS) + PHI["sigma"] ** 2 * np.eye(
        len(PERIODS)
    )
    mean = _design(client) @ np.asarray(PHI["beta"])
    expected = stats.multivariate_normal(mean, covariance).logpdf(client["y"])
    assert abs(value - expected) < EXACT


def test_rho_one_is_the_random_intercept_linear_mixed_model():
    family, client = _family(priors={"rho": 1.0}), _client(seed=3)
    reference = hf.LinearMixed(fixed=["x", "w"])
    with x64():
        phi = {"beta": _phi(1.0)["beta"], "sigma": _phi(1.0)["sigma"], "tau": _phi(1.0)["tau"]}
        expected = float(reference.log_marginal(phi, _stats(reference, client)))
        value = float(family.log_marginal(_phi(1.0), _stats(family, client)))
        # rho fixed at 1.0 through the priors' fixed-value form reaches the model as 1.0
        fixed = {r.parameter.name: r.value for r in family.priors if r.site is None}
    assert fixed == {"rho": 1.0}
    assert abs(value - expected) < EXACT


def test_rho_zero_is_the_product_of_per_period_marginals():
    family, client = _family(), _client(seed=4)
    reference = hf.LinearMixed(fixed=["x", "w"])
    with x64():
        value = float(family.log_marginal(_phi(0.0), _stats(family, client)))
        phi = {k: v for k, v in _phi(0.0).items() if k != "rho"}
        expected = 0.0
        for t in np.unique(PERIODS):
            rows = {k: v[PERIODS == t] for k, v in client.items()}
            expected += float(reference.log_marginal(phi, _stats(reference, rows)))
    assert abs(value - expected) < EXACT


@pytest.mark.parametrize("rho", [0.0, 0.6, 0.95, 1.0])
def test_conditional_is_dense_gaussian_conditioning_with_a_forecast_period(rho):
    """The states given the rows, periods 2 (a gap) and 6 (after the last row: the forecast)
    included: mean and covariance of the dense Gaussian conditional."""
    family, client = _family(), _client(seed=5)
    with x64():
        posterior = family.conditional(_phi(rho), _stats(family, client))
        mean, covariance = np.asarray(posterior.mean), np.asarray(posterior.covariance_matrix)
        variance = np.asarray(posterior.variance)
    periods = np.arange(NUM_PERIODS)
    prior = _prior_covariance(PHI["tau"], rho, periods)
    rows = np.eye(NUM_PERIODS)[PERIODS]  # [rows, T]: which state each row sees
    residual = client["y"] - _design(client) @ np.asarray(PHI["beta"])
    gain = prior @ rows.T @ np.linalg.inv(rows @ prior @ rows.T + PHI["sigma"] ** 2 * np.eye(11))
    np.testing.assert_allclose(mean, gain @ residual, rtol=0, atol=EXACT)
    expected = prior - gain @ rows @ prior
    np.testing.assert_allclose(covariance, expected, rtol=0, atol=EXACT)
    np.testing.assert_allclose(variance, np.diag(expected), rtol=0, atol=EXACT)
    # the forecast is the last observed period's state aged one step: rho times its mean
    np.testing.assert_allclose(mean[6], rho * mean[5], rtol=0, atol=EXACT)


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_prior_is_the_stationary_ar1_vector(rho):
    family = _family()
    with x64():
        prior = family.prior(_phi(rho))
        covariance = np.asarray(prior.covariance_matrix)
    np.testing.assert_allclose(prior.mean, 0.0)
    expected = _prior_covariance(PHI["tau"], rho, np.arange(NUM_PERIODS))
    np.testing.assert_allclose(covariance, expected, rtol=0, atol=EXACT)


def test_numpyro_model_and_log_marginal_are_one_hierarchy():
    """For any states d: log p(y, d | phi) - log p(d | y, phi) = log p(y | phi) (Gaussian),
    with log p(y, d | phi) from the NumPyro model that method='nuts' runs."""
    family = _family(priors=dict(PHI, rho=0.7))
    client = _client(seed=6)
    n = len(client["y"])
    rng = np.random.default_rng(7)
    with x64():
        data = ModelData(_jnp(client), np.zeros(n, np.int32), 1)
        expected = float(family.log_marginal(_phi(0.7), _stats(family, client)))
        posterior = family.conditional(_phi(0.7), _stats(family, client))
        for _ in range(3):
            states = jnp.asarray(rng.normal(size=NUM_PERIODS))
            joint = log_density(family.model, (data,), {}, {"state": states[None]})[0]
            value = float(joint - posterior.log_prob(states))
            assert abs(value - expected) < EXACT


def test_statistics_ignore_padding_and_vmap_over_clients():
    family = _family()
    clients = {"a": _client(seed=1), "b": _client(seed=2, periods=np.array([6, 2]))}
    data = hf.ClientData.from_dict(clients)
    padded, mask = data.padded()
    with x64():
        stacked = jax.vmap(family.statistics)(_jnp(padded), jnp.asarray(mask))
        for i, name in enumerate("ab"):
            single = _stats(family, clients[name])
            for key in single:
                np.testing.assert_allclose(stacked[key][i], single[key], rtol=1e-12, err_msg=key)
        # the server's pre-summed form is the sum of the clients' marginals (b not received)
        phi = _phi(0.8)
        received = jnp.asarray([True, False])
        server = family.server_statistics(stacked, received)
        total = float(family.total_log_marginal(phi, server))
        expected = float(family.log_marginal(phi, _stats(family, clients["a"])))
    assert abs(total - expected) < EXACT
    assert stacked["n"].shape == (2, NUM_PERIODS) and stacked["sum_x"].shape == (2, 7, 3)


def test_bad_predict_periods_give_nan_not_a_clamped_state():
    family = _family()
    fields = {"x": np.zeros(4), "w": np.zeros(4), "period": np.array([6.0, 7.0, -1.0, 2.5])}
    data = ModelData(fields, np.zeros(4, np.int32), 1)
    with x64():
        phi = _phi(0.5)
        mean = np.asarray(family.mean(phi, jnp.ones((1, NUM_PERIODS)), data))
    np.testing.assert_allclose(mean[0], 0.4 + 1.0)
    assert np.isnan(mean[1:]).all()


def test_sleepstudy_drift_at_rho_one_is_the_random_intercept_model():
    data = sleepstudy.load()
    drift, reference = sleepstudy.drift({"rho": 1.0}), sleepstudy.family(slopes=False)
    padded, mask = data.padded()
    phi = {"beta": [251.4, 10.47], "sigma": 31.0, "tau": 37.1}

    def per_subject(family, values):
        statistics = jax.vmap(family.statistics)(_jnp(padded), jnp.asarray(mask))
        return np.asarray(jax.vmap(family.log_marginal, in_axes=(None, 0))(values, statistics))

    with x64():
        value = per_subject(drift, _jnp(dict(phi, rho=1.0)))
        expected = per_subject(reference, _jnp(phi))
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    assert drift.dims()["state"] == ["client", "period"]
    assert drift.coords()["period"] == list(range(10))


# ---------------------------------------------------------------------- priors and data
@pytest.mark.parametrize(
    ("priors", "message"),
    [
        ({"rho": 1.5}, "fixed value of 'rho' must lie in [0, 1]"),
        ({"rho": -0.1}, "fixed value of 'rho' must lie in [0, 1]"),
        ({"rho": dist.Normal(0.0, 1.0)}, "prior for 'rho' has support"),
        ({"log_rho": dist.Normal(0.0, 1.0)}, "'log_rho': a log-scale prior"),
        ({"tau": -1.0}, "fixed value of 'tau' must be >= 0"),
    ],
)
def test_invalid_priors_name_the_parameter(priors, message):
    with pytest.raises(hf.PriorError) as error:
        _family(priors=priors)
    assert message in str(error.value)


@pytest.mark.parametrize("rho", [0.0, 1.0, 0.4])
def test_rho_may_be_fixed_anywhere_in_the_closed_unit_interval(rho):
    family = _family(priors={"rho": rho})
    assert "rho" not in family.global_sites
    assert f"rho={rho}" in repr(family)


def test_constructor_checks():
    with pytest.raises(ValueError, match="num_periods must be a whole number >= 1"):
        DriftingNormal(num_periods=0)
    with pytest.raises(ValueError, match="num_periods must be a whole number >= 1"):
        DriftingNormal(num_periods=2.5)
    with pytest.raises(TypeError):
        DriftingNormal(3)  # keyword-only
    with pytest.raises(ValueError, match="needs an intercept or at least one fixed field"):
        DriftingNormal(num_periods=3, intercept=False)


def _bad(period, *, drop=None):
    good = {"y": [1.0, 2.0], "x": [0.0, 1.0], "w": [0.0, 0.0], "period": [0, 1]}
    bad = {"y": [1.0, 2.0, 3.0], "x": [0.0, 1.0, 2.0], "w": [0.0, 0.0, 0.0], "period": period}
    clients = {"a": good, "b": bad}
    if drop:
        clients = {c: {k: v for k, v in r.items() if k != drop} for c, r in clients.items()}
    return hf.ClientData.from_dict(clients)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _bad([0, 7, 1]),
            "DriftingNormal: client 'b', field 'period', row 1: must lie in [0, 7)",
        ),
        (_bad([0, 1, -1]), "client 'b', field 'period', row 2: must lie in [0, 7)"),
        (
            _bad([0, 1.5, 1]),
            "client 'b', field 'period', row 1: must be a whole number (got 1.5)",
        ),
        (_bad([0, 1, 2], drop="period"), "DriftingNormal needs field 'period'"),
    ],
    ids=["past the end", "negative", "not whole", "missing"],
)
@pytest.mark.parametrize("method", ["exact", "nuts"])
def test_bad_data_is_refused_naming_client_field_and_row(data, message, method):
    with pytest.raises(hf.DataError) as error:
        hf.fit(_family(), data, method=method, **TINY)
    assert message in str(error.value)


# ---------------------------------------------------------------------- engines
def generate(*, num_clients=14, seed=0, beta=(1.0, 0.5), tau=1.0, rho=0.7, sigma=0.6):
    """Clients with 1..3 rows in some of the periods (others empty), drifting states."""
    rng = np.random.default_rng(seed)
    T = NUM_PERIODS
    lags = np.abs(np.subtract.outer(np.arange(T), np.arange(T)))
    chol = np.linalg.cholesky(tau**2 * rho**lags)
    clients = {}
    for i in range(num_clients):
        state = chol @ rng.normal(size=T)
        counts = rng.integers(0, 4, T - 1)  # the last period is held out: a forecast
        period = np.repeat(np.arange(T - 1), counts)
        if period.size == 0:
            period = np.array([0])
        x = rng.normal(size=period.size)
        y = beta[0] + beta[1] * x + state[period] + rng.normal(0.0, sigma, period.size)
        clients[f"c{i:02d}"] = {"y": y, "x": x, "period": period}
    return hf.ClientData.from_dict(clients)


@pytest.mark.slow
def test_exact_agrees_with_centralized_nuts():
    data = generate()
    family = DriftingNormal(num_periods=NUM_PERIODS, fixed=["x"])
    exact = hf.fit(family, data, method="exact", seed=1, **FAST)
    nuts = hf.fit(family, data, method="nuts", seed=2, **FAST)
    assert nuts.diagnostics["divergences"] == 0
    for name in ("beta", "sigma", "tau", "rho"):
        assert_posteriors_agree(exact.global_samples[name], nuts.global_samples[name], name)
    assert_posteriors_agree(
        exact.posterior_samples()["state"], nuts.posterior_samples()["state"], "state"
    )
    for fit in (exact, nuts):
        idata = fit.to_arviz()
        assert idata.posterior["state"].dims == ("chain", "draw", "client", "period")
        assert idata.log_likelihood["y"].shape[-1] == data.num_obs
        summary = fit.personal_summary()
        assert f"state[{NUM_PERIODS - 1}]_mean" in summary.columns
        forecast = fit.predict("c00", x=[0.0], period=[NUM_PERIODS - 1])
        assert forecast["y"].shape == (fit.num_draws, 1) and np.isfinite(forecast["y"]).all()


@pytest.mark.slow
def test_sleepstudy_forecast_runs_and_learns_rho():
    result = sleepstudy.forecast(num_warmup=300, num_samples=300, num_chains=1)
    assert list(result.table.index) == [
        "drift (AR(1) states)",
        "random intercept + slope",
        "complete pooling",
    ]
    assert np.isfinite(result.table.to_numpy()).all()
    assert 0.0 < result.rho["lower"] < result.rho["mean"] < result.rho["upper"] < 1.0


def test_predict_refuses_a_bad_period_naming_client_field_and_row():
    data = _bad([0, 1, 2])
    fit = hf.fit(_family(), data, method="exact", **TINY)
    assert fit.predict("b", x=[0.0], w=[0.0], period=[NUM_PERIODS - 1])["y"].shape[1] == 1
    with pytest.raises(hf.DataError, match="client 'b', field 'period', row 1: must lie in"):
        fit.predict("b", x=[0.0, 0.0], w=[0.0, 0.0], period=[1, NUM_PERIODS])
    with pytest.raises(hf.DataError, match="client 'new', field 'period', row 0: must be a whole"):
        fit.predict("new", x=[0.0], w=[0.0], period=[0.5])
    with pytest.raises(hf.DataError, match="needs field 'period'"):
        fit.predict("b", x=[0.0], w=[0.0])
