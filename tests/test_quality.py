"""The systemic-heterogeneity model (reported data quality): its closed-form likelihood, the
attenuation it removes, its agreement between federated EP and centralized NUTS, and its
input checks."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import FAST, Z, mcse_of_mean, x64
from numpyro import handlers
from numpyro.infer.util import log_likelihood, potential_energy
from scipy import integrate, stats

import hierfl as hf
from hierfl.engines import ep
from hierfl.fit import inspect_model
from models import quality

#: the posterior mean of a slope is a consistent estimator whose sampling sd is, for this
#: correctly specified linear-normal model (the naive model is one too, for its attenuated
#: estimand: measured x and y are jointly normal), the posterior sd (Bernstein-von Mises);
#: a fixed-seed dataset may put it this many posterior sds from its limit
DATA_SD = 3.0
#: EP against NUTS: means to a quarter of a posterior sd, sds to 25% (as in test_ep)
EP_MEAN_SD, EP_SD_RATIO = 0.25, 0.25


# ---------------------------------------------------------------------- module and data
def test_module_documents_its_model_and_runs_its_examples():
    assert "math" in quality.__doc__
    assert all(hasattr(quality, name) for name in quality.__all__)
    assert tuple(quality.spectrum()) == quality.TREATMENTS
    result = doctest.testmod(quality, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
    with pytest.raises(ValueError, match="treatment must be one of"):
        quality.make_model("imputed")


def test_generator_is_seeded_and_heterogeneous():
    a, b = quality.generate(40, seed=3), quality.generate(40, seed=3)
    for name in quality.FIELDS:
        np.testing.assert_array_equal(a.train.fields[name], b.train.fields[name])
    assert quality.check(a.train) is a.train
    s = a.truth["s"] / a.truth["sd_x"]
    assert 0 <= s.min() < 0.2 and 1.3 < s.max() <= 1.5  # exact to very noisy instruments
    rates = np.array([1 - a.train[c]["x_observed"].mean() for c in a.train.client_ids])
    assert rates.min() < 0.1 and rates.max() > 0.4
    assert np.all(a.train.fields["x"][a.train.fields["x_observed"] == 0] == 0.0)
    # the measured x is the true one plus noise of the client's reported sd
    observed = a.train.fields["x_observed"] == 1
    error = (a.train.fields["x"] - a.truth["xi"])[observed] / a.train.fields["s"][observed]
    assert abs(error.std() - 1) < 4 / np.sqrt(2 * error.size)


def test_from_frame_marks_missing_covariates():
    frame = pd.DataFrame(
        {
            "site": ["a", "a", "b", "b"],
            "y": [0.1, 0.2, 0.3, 0.4],
            "x": [1.0, np.nan, 2.0, 3.0],
            "s": [0.5, 0.5, 0.0, 0.0],
        }
    )
    data = quality.from_frame(frame, client="site")
    assert data["a"]["x_observed"].tolist() == [1, 0]
    assert data["a"]["x"].tolist() == [1.0, 0.0]
    frame.loc[3, "y"] = np.nan
    with pytest.raises(hf.DataError, match=r"client 'b', field 'y': NaN at row 1"):
        quality.from_frame(frame, client="site")


# ---------------------------------------------------------------------- bad input
def _one_client(**overrides):
    fields = {"y": [1.0, 2.0, 3.0], "x": [0.5, 0.0, 1.5], "s": [0.2, 0.2, 0.2]}
    fields["x_observed"] = [1, 0, 1]
    return {"good": fields, "lab 7": {**fields, **overrides}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"s": [0.2, -0.1, 0.2]}, r"client 'lab 7', field 's', row 1: must be >= 0"),
        ({"x_observed": [1, 0, 2]}, r"client 'lab 7', field 'x_observed', row 2: must be 0 or 1"),
        (
            {"x_observed": [1.0, 0.5, 1.0]},
            r"client 'lab 7', field 'x_observed', row 1: must be 0 or 1 \(got 0.5\)",
        ),
    ],
)
def test_bad_quality_fields_name_the_client_field_and_row(overrides, message):
    with pytest.raises(hf.DataError, match=message):
        quality.check(_one_client(**overrides))


def test_missing_field_and_non_finite_covariate_are_named():
    clients = _one_client()
    for record in clients.values():
        del record["s"]
    with pytest.raises(hf.DataError, match=r"quality needs field 's'"):
        quality.check(clients)
    with pytest.raises(hf.DataError, match=r"client 'lab 7', field 'x': NaN at row 1"):
        quality.check(_one_client(x=[0.5, np.nan, 1.5]))


# ---------------------------------------------------------------------- the likelihood
def _rows():
    """Observed rows with exact to very noisy instruments, and missing rows (filler 0)."""
    return hf.ClientData.from_dict(
        {
            "p": {
                "y": np.array([0.3, -1.2, 2.5, 0.9]),
                "x": np.array([1.4, -0.6, 0.0, 3.0]),
                "s": np.array([0.3, 1.7, 0.9, 0.05]),
                "x_observed": np.array([1, 1, 0, 1]),
            },
            "q": {
                "y": np.array([1.1, -0.4]),
                "x": np.array([0.0, 0.7]),
                "s": np.array([2.0, 0.6]),
                "x_observed": np.array([0, 1]),
            },
        }
    )


#: (beta, mu_x, sd_x, sigma, a_p, a_q): several parameter values, including a negative slope
PARAMETERS = [
    (1.0, 1.0, 1.0, 0.5, 0.2, -0.3),
    (-2.3, -0.4, 0.6, 1.3, 1.0, 0.0),
    (0.4, 2.0, 2.5, 0.2, -0.7, 0.9),
]


def _row_log_likelihood(model, data, parameters):
    """Per-row log-likelihood (the ``x`` and ``y`` sites summed) at one parameter value."""
    beta, mu_x, sd_x, sigma, a_p, a_q = parameters
    tau = 1.0
    draws = {
        "beta": [beta],
        "mu_x": [mu_x],
        "sd_x": [sd_x],
        "sigma": [sigma],
        "mu_a": [0.0],
        "tau": [tau],
        "u": [[a_p / tau, a_q / tau]],
    }
    draws = {k: jnp.asarray(v, jnp.float64) for k, v in draws.items()}
    batch = data.batch()
    sites = jax.jit(lambda d: log_likelihood(model, d, batch))(draws)  # one compile, not many
    return np.asarray(sites["x"][0] + sites["y"][0])


def _integral(x, s, observed, y, a, beta, mu_x, sd_x, sigma):
    """log of the integral over the true covariate xi, by adaptive quadrature."""

    def density(xi):
        value = stats.norm.pdf(xi, mu_x, sd_x) * stats.norm.pdf(y, a + beta * xi, sigma)
        return value * (stats.norm.pdf(x, xi, s) if observed else 1.0)

    # the integrand's mass lies within a few (posterior) sds of its peak: integrate over
    # mu_x +- 12 sd_x with the peak region as a break point
    centre = mu_x if not observed else mu_x + sd_x**2 / (sd_x**2 + s**2) * (x - mu_x)
    value, error = integrate.quad(
        density, mu_x - 12 * sd_x, mu_x + 12 * sd_x, points=[centre], epsabs=0, epsrel=1e-11
    )
    assert error < 1e-9 * value
    return np.log(value)


@pytest.mark.parametrize("parameters", PARAMETERS)
def test_marginal_likelihood_is_the_integral_over_the_true_covariate(parameters):
    """Per row, log p(x, y) (x observed) or log p(y) (x missing) with the true covariate
    integrated out in closed form equals the numerical integral."""
    data = _rows()
    beta, mu_x, sd_x, sigma, a_p, a_q = parameters
    a = np.where(data.client_index == 0, a_p, a_q)
    with x64():
        closed = _row_log_likelihood(quality.model, data, parameters)
    f = data.fields
    brute = [
        _integral(f["x"][i], f["s"][i], f["x_observed"][i], f["y"][i], a[i], *parameters[:4])
        for i in range(data.num_obs)
    ]
    np.testing.assert_allclose(closed, brute, rtol=0, atol=1e-7)


def test_naive_treatments_and_their_closed_forms():
    """The naive model is a regression on x taken as exact (missing x imputed by mu_x);
    complete case drops the rows with a missing x; with exact instruments and nothing
    missing the quality-aware model is the naive one."""
    data = _rows()
    parameters = PARAMETERS[1]
    beta, mu_x, sd_x, sigma, a_p, a_q = parameters
    f = data.fields
    a = np.where(data.client_index == 0, a_p, a_q)
    observed = f["x_observed"] == 1
    imputed = np.where(observed, f["x"], mu_x)
    with x64():
        naive = _row_log_likelihood(quality.naive, data, parameters)
        complete = _row_log_likelihood(quality.complete_case, data, parameters)
    x_part = np.where(observed, stats.norm.logpdf(f["x"], mu_x, sd_x), 0.0)
    expected = x_part + stats.norm.logpdf(f["y"], a + beta * imputed, sigma)
    np.testing.assert_allclose(naive, expected, atol=1e-10)
    np.testing.assert_allclose(complete, np.where(observed, expected, 0.0), atol=1e-10)

    exact = hf.ClientData(
        data.client_ids,
        dict(f, s=np.zeros(data.num_obs), x_observed=np.ones(data.num_obs, np.int32)),
        data.sizes,
    )
    with x64():
        aware = _row_log_likelihood(quality.model, exact, parameters)
        naive = _row_log_likelihood(quality.naive, exact, parameters)
    np.testing.assert_allclose(aware, naive, atol=1e-10)


def test_the_filler_of_a_missing_covariate_is_never_read():
    """Any finite filler gives the same log density and gradient (masked, weight zero)."""
    data = _rows()
    f = data.fields
    refilled = hf.ClientData(
        data.client_ids, dict(f, x=np.where(f["x_observed"] == 1, f["x"], 1e3)), data.sizes
    )
    params = {
        "beta": 1.2,
        "mu_x": 0.3,
        "sd_x": 0.8,
        "sigma": 0.6,
        "mu_a": 0.1,
        "tau": 0.4,
        "u": jnp.array([0.5, -1.0]),
    }
    for name, model in quality.spectrum().items():

        def energy(p, fields, model=model):
            batch = hf.ModelData(fields, data.client_index, data.num_clients)
            return potential_energy(model, (batch,), {}, p)

        energy = jax.jit(jax.value_and_grad(energy))
        value, grad = energy(params, data.fields)
        value_refilled, grad_refilled = energy(params, refilled.fields)
        assert np.isfinite(value) and float(value) == pytest.approx(float(value_refilled)), name
        for site in params:
            np.testing.assert_allclose(grad[site], grad_refilled[site], rtol=1e-5, err_msg=name)


def _replicate(model, inputs: hf.ModelData, key):
    trace = handlers.trace(handlers.seed(model, key)).get_trace(inputs)
    return trace["x"]["value"], trace["y"]["value"]


def test_treatments_have_one_client_plate_and_replicate_the_data():
    """Each treatment has the client plate and the same globals; without ``x`` and ``y`` in
    the data (ArviZ's posterior predictive) it draws both."""
    data = quality.generate(5, seed=0).train
    batch = data.batch()
    inputs = hf.ModelData({k: batch.fields[k] for k in ("s", "x_observed")}, *batch[1:])
    for name, model in quality.spectrum().items():
        sites = inspect_model(model, batch)
        assert sites.client_plate == "client", name
        assert set(sites.global_sites) == set(quality.GLOBALS), name
        assert sites.observed == {"x": "x", "y": "y"}, name
        x, y = jax.jit(lambda key, m=model: _replicate(m, inputs, key))(jax.random.PRNGKey(0))
        assert x.shape == y.shape == (data.num_obs,), name
        assert np.all(np.isfinite(x)) and np.all(np.isfinite(y)), name


# ---------------------------------------------------------------------- federated EP
def test_ep_row_masks_compose_with_the_missing_covariate_mask():
    """EP pads a client's rows by repeating its first one and masks the padding; the
    model's own mask (missing x) must compose with it: the tilted potential of a padded
    client equals that of its own rows, for every treatment."""
    data = quality.generate(3, seed=2).train
    index = 0
    assert data[data.client_ids[index]]["x_observed"][0] == 1  # padding repeats an observed x
    size = int(data.sizes[index])
    padded, mask = data.padded(size + 7, clients=[index])
    own, own_mask = data.padded(size, clients=[index])
    padded = {k: jnp.asarray(v[0]) for k, v in padded.items()}
    own = {k: jnp.asarray(v[0]) for k, v in own.items()}
    for name, model in quality.spectrum().items():
        sites = inspect_model(model, data.batch())
        problem = ep.tilted_problem(model, sites, padded, size + 7, data.num_clients)
        point = jax.random.normal(jax.random.PRNGKey(1), (problem.dim,)) * 0.3
        value = problem.potential(point, padded, jnp.asarray(mask[0]))
        reference = problem.potential(point, own, jnp.asarray(own_mask[0]))
        assert np.isfinite(reference)
        assert float(value) == pytest.approx(float(reference), rel=1e-5), name
        # without the engine's row mask the padding would count (the check has teeth)
        unmasked = problem.potential(point, padded, jnp.ones(size + 7, bool))
        assert abs(unmasked - reference) > 1e-2, name


@pytest.fixture(scope="module")
def small():
    return quality.generate(8, seed=1).train


@pytest.mark.slow
def test_ep_agrees_with_centralized_nuts(small):
    """Federated EP (nested Laplace tilted inference) on 8 clients against centralized NUTS.

    The slope, the covariate's distribution and the residual sd are nearly Gaussian: means
    agree to a quarter of a posterior sd and sds to 25%. The client sd ``tau`` (8 clients) has
    a right-skewed posterior, and the Laplace sites sit at its mode: below the NUTS mean, by
    less than 0.7 posterior sd (as for VerbAgg's person sd); ``mu_a``'s sd, which scales with
    ``tau``, comes out narrower with it.
    """
    reference = hf.fit(quality.model, small, method="nuts", seed=1, **FAST)
    fit = hf.fit(quality.model, small, method="ep", tilted="laplace", num_rounds=10, seed=1)
    for name in ("beta", "mu_x", "sd_x", "sigma", "mu_a"):
        a = np.asarray(fit.global_samples[name], np.float64)
        b = np.asarray(reference.global_samples[name], np.float64)
        gap = abs(a.mean() - b.mean()) / b.std()
        assert gap < EP_MEAN_SD, (name, gap)
        if name != "mu_a":
            assert abs(a.std() / b.std() - 1) < EP_SD_RATIO, (name, a.std() / b.std())
    tau = np.asarray(reference.global_samples["tau"], np.float64)
    tau_ep = np.asarray(fit.global_samples["tau"], np.float64)
    assert tau.mean() - 0.7 * tau.std() < np.median(tau_ep) < tau.mean()
    # the personal intercepts
    a, b = fit.posterior_samples()["a"], reference.posterior_samples()["a"]
    gap = np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))) / b.std(axis=(0, 1))
    assert gap.max() < EP_MEAN_SD, gap


# ---------------------------------------------------------------------- attenuation
#: one noise level for every client (as a fraction of sd_x), nothing missing: the naive
#: slope's limit is beta * lambda, lambda = 1 / (1 + NOISE^2) = 0.5
NOISE = 1.0
#: NUTS for the slope of a 6 + 20-parameter Gaussian-like posterior: a few hundred draws give
#: an MCSE of a few hundredths of a posterior sd
ATTENUATION_NUTS = {"num_warmup": 200, "num_samples": 400, "num_chains": 1}


@pytest.fixture(scope="module")
def one_noise_level():
    """20 clients, about 1,700 rows: the two limits 0.5 apart, posterior sds 0.015-0.03."""
    return quality.generate(
        20, seed=4, median_size=80, noise_range=(NOISE, NOISE), missing_range=(0.0, 0.0)
    )


@pytest.mark.parametrize("treatment", ["naive", "quality-aware"])
def test_naive_slope_is_attenuated_and_the_quality_aware_one_is_not(one_noise_level, treatment):
    """With one noise sd s and nothing missing, the naive slope converges to beta * lambda,
    lambda = sd_x^2 / (sd_x^2 + s^2) = 0.5; the quality-aware slope to beta."""
    sim = one_noise_level
    beta, sd_x = sim.truth["beta"], sim.truth["sd_x"]
    attenuated = beta * quality.attenuation(sd_x=sd_x, s=NOISE * sd_x)
    assert attenuated == pytest.approx(beta / 2)
    fit = hf.fit(
        quality.make_model(treatment), sim.train, method="nuts", seed=0, **ATTENUATION_NUTS
    )
    draws = np.asarray(fit.global_samples["beta"], np.float64)
    mean, sd = draws.mean(), draws.std()
    target, other = (attenuated, beta) if treatment == "naive" else (beta, attenuated)
    assert abs(mean - target) < DATA_SD * sd + Z * mcse_of_mean(draws), (mean, target, sd)
    assert abs(mean - other) > 10 * sd, (mean, other, sd)  # the two limits are far apart
    if treatment == "quality-aware":
        # a client's predictive mean: a_i + beta x for an exact x (s = 0), a_i + beta mu_x
        # for a missing one, up to the Monte Carlo error of the predictive draws
        client = sim.train.client_ids[3]
        predicted = fit.predict(client, x=[2.0, 0.0], s=[0.0, 0.0], x_observed=[1, 0])["y"]
        posterior = {k: np.asarray(v, np.float64) for k, v in fit.posterior_samples().items()}
        a = posterior["a"][..., 3].reshape(-1)
        expected = [
            np.mean(a + 2.0 * draws.reshape(-1)),
            np.mean(a) + np.mean(draws.reshape(-1) * posterior["mu_x"].reshape(-1)),
        ]
        error = predicted.std(axis=0) / np.sqrt(predicted.shape[0])
        np.testing.assert_array_less(np.abs(predicted.mean(axis=0) - expected), Z * error)
