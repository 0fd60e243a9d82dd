"""Conjugate families against closed forms, SciPy and numerical integration (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_mixed_designs, x64
from numpyro.infer.util import log_density
from scipy import integrate, stats
from scipy.special import logsumexp

import hierfl as hf
from hierfl.data import ModelData


def _jnp(record):
    """A dict of float64 arrays (call inside ``x64()``)."""
    return {k: jnp.asarray(np.asarray(v), dtype=jnp.float64) for k, v in record.items()}


def _stats(family, fields, mask=None):
    fields = _jnp(fields)
    n = next(iter(fields.values())).shape[0]
    mask = jnp.ones(n, dtype=bool) if mask is None else jnp.asarray(mask)
    return family.statistics(fields, mask)


def _log_quad(log_f, lo, hi, points=None):
    """log of the integral of exp(log_f) over [lo, hi], stabilized by the max on a grid."""
    grid = np.linspace(lo, hi, 4001)
    shift = max(log_f(t) for t in grid)
    value, error = integrate.quad(
        lambda t: np.exp(log_f(t) - shift),
        lo,
        hi,
        points=points,
        limit=200,
        epsabs=0.0,
        epsrel=1e-10,
    )
    assert error < 1e-6 * value
    return np.log(value) + shift


# ---------------------------------------------------------------------- Normal–Normal
@pytest.fixture
def normal_client():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.5, 3.0, 5)
    return {"y": rng.normal(2.0, sigma), "sigma": sigma}


@pytest.mark.parametrize(("mu", "tau"), [(0.3, 1.7), (-2.0, 0.05), (5.0, 20.0)])
def test_normal_normal_log_marginal_equals_quadrature(normal_client, mu, tau):
    family = hf.NormalNormal()
    y, s = normal_client["y"], normal_client["sigma"]
    with x64():
        value = float(
            family.log_marginal(_jnp({"mu": mu, "tau": tau}), _stats(family, normal_client))
        )

    def log_f(theta):
        return stats.norm.logpdf(theta, mu, tau) + stats.norm.logpdf(y, theta, s).sum()

    precision = 1 / tau**2 + np.sum(1 / s**2)
    centre = (mu / tau**2 + np.sum(y / s**2)) / precision
    width = 30 / np.sqrt(precision)
    np.testing.assert_allclose(
        value, _log_quad(log_f, centre - width, centre + width, points=[centre]), rtol=1e-8
    )


def test_normal_normal_log_marginal_single_observation_is_a_normal_density():
    family = hf.NormalNormal()
    with x64():
        value = family.log_marginal(
            _jnp({"mu": 1.0, "tau": 2.0}), _stats(family, {"y": [4.0], "sigma": [3.0]})
        )
    np.testing.assert_allclose(value, stats.norm.logpdf(4.0, 1.0, np.sqrt(4.0 + 9.0)), rtol=1e-12)


@pytest.mark.parametrize(("mu", "tau"), [(0.3, 1.7), (-2.0, 0.05)])
def test_normal_normal_conditional_is_the_conjugate_posterior(normal_client, mu, tau):
    family = hf.NormalNormal()
    y, s = normal_client["y"], normal_client["sigma"]
    with x64():
        posterior = family.conditional(_jnp({"mu": mu, "tau": tau}), _stats(family, normal_client))
    precision = 1 / tau**2 + np.sum(1 / s**2)
    mean = (mu / tau**2 + np.sum(y / s**2)) / precision
    np.testing.assert_allclose(posterior.loc, mean, rtol=1e-10)
    np.testing.assert_allclose(posterior.scale, 1 / np.sqrt(precision), rtol=1e-10)


def test_normal_normal_tau_zero_pools_completely(normal_client):
    family = hf.NormalNormal()
    y, s = normal_client["y"], normal_client["sigma"]
    with x64():
        phi = _jnp({"mu": 0.7, "tau": 0.0})
        statistics = _stats(family, normal_client)
        value = family.log_marginal(phi, statistics)
        # a zero scale is a point mass; NumPyro's eager argument check rejects it, so read
        # the moments under jit as the engine does
        loc, scale = jax.jit(
            lambda p, t: (family.conditional(p, t).loc, family.conditional(p, t).scale)
        )(phi, statistics)
    np.testing.assert_allclose(value, stats.norm.logpdf(y, 0.7, s).sum(), rtol=1e-10)
    np.testing.assert_allclose(loc, 0.7)
    np.testing.assert_allclose(scale, 0.0)


# ---------------------------------------------------------------------- linear mixed
def _lmm_client(n=7, seed=1):
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=n), rng.normal(size=n)
    return {"y": 0.5 + 1.2 * x - 0.3 * w + rng.normal(size=n), "x": x, "w": w}


LMM_CASES = {
    "intercept": dict(family=dict(fixed=["x", "w"]), beta=[0.4, 1.1, -0.2], tau=0.8),
    "intercept+slope": dict(
        family=dict(fixed=["x", "w"], random=["x"]), beta=[0.4, 1.1, -0.2], tau=[0.8, 0.5]
    ),
    "slope-only": dict(
        family=dict(fixed=["x"], random=["w"], random_intercept=False), beta=[0.4, 1.1], tau=0.6
    ),
    "slope-variance-zero": dict(
        family=dict(fixed=["x", "w"], random=["x"]), beta=[0.4, 1.1, -0.2], tau=[0.8, 0.0]
    ),
}


@pytest.mark.parametrize("case", sorted(LMM_CASES))
def test_linear_mixed_log_marginal_is_the_multivariate_normal(case):
    spec = LMM_CASES[case]
    family = hf.LinearMixed(**spec["family"])
    client = _lmm_client()
    beta, sigma = np.asarray(spec["beta"]), 0.9
    tau = np.broadcast_to(spec["tau"], (family.num_effects,))
    with x64():
        value = family.log_marginal(
            _jnp({"beta": beta, "sigma": sigma, "tau": spec["tau"]}), _stats(family, client)
        )
    x, z = linear_mixed_designs(family, client)
    covariance = sigma**2 * np.eye(len(client["y"])) + z @ np.diag(tau**2) @ z.T
    expected = stats.multivariate_normal(x @ beta, covariance).logpdf(client["y"])
    np.testing.assert_allclose(value, expected, rtol=1e-10)


@pytest.mark.parametrize("case", ["intercept", "intercept+slope", "slope-only"])
def test_linear_mixed_conditional_is_the_conjugate_posterior(case):
    spec = LMM_CASES[case]
    family = hf.LinearMixed(**spec["family"])
    client = _lmm_client()
    beta, sigma = np.asarray(spec["beta"]), 0.9
    tau = np.broadcast_to(spec["tau"], (family.num_effects,))
    with x64():
        posterior = family.conditional(
            _jnp({"beta": beta, "sigma": sigma, "tau": spec["tau"]}), _stats(family, client)
        )
    x, z = linear_mixed_designs(family, client)
    precision = z.T @ z / sigma**2 + np.diag(1 / tau**2)
    covariance = np.linalg.inv(precision)
    mean = covariance @ z.T @ (client["y"] - x @ beta) / sigma**2
    if family.num_effects == 1:
        np.testing.assert_allclose(posterior.loc, mean[0], rtol=1e-10)
        np.testing.assert_allclose(posterior.scale, np.sqrt(covariance[0, 0]), rtol=1e-10)
    else:
        np.testing.assert_allclose(posterior.mean, mean, rtol=1e-9)
        np.testing.assert_allclose(posterior.covariance_matrix, covariance, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("case", ["intercept", "intercept+slope"])
def test_linear_mixed_tau_zero_is_the_pooled_regression(case):
    spec = LMM_CASES[case]
    family = hf.LinearMixed(**spec["family"])
    client = _lmm_client(n=11, seed=4)
    beta, sigma = np.asarray(spec["beta"]), 1.3
    tau0 = np.zeros_like(np.asarray(spec["tau"], dtype=float))
    with x64():
        value = family.log_marginal(
            _jnp({"beta": beta, "sigma": sigma, "tau": tau0}), _stats(family, client)
        )
    x, _ = linear_mixed_designs(family, client)
    np.testing.assert_allclose(
        value, stats.norm.logpdf(client["y"], x @ beta, sigma).sum(), rtol=1e-12
    )


def test_linear_mixed_statistics_are_the_normal_equations():
    family = hf.LinearMixed(fixed=["x", "w"], random=["x"])
    client = _lmm_client()
    with x64():
        s = _stats(family, client)
    x, z = linear_mixed_designs(family, client)
    y = client["y"]
    np.testing.assert_allclose(s["n"], len(y))
    np.testing.assert_allclose(s["yy"], y @ y)
    np.testing.assert_allclose(s["xy"], x.T @ y)
    np.testing.assert_allclose(s["xx"], x.T @ x)
    np.testing.assert_allclose(s["zy"], z.T @ y)
    np.testing.assert_allclose(s["zx"], z.T @ x)
    np.testing.assert_allclose(s["zz"], z.T @ z)


def test_linear_mixed_declares_dims_and_coords():
    family = hf.LinearMixed(response="y", fixed=["x"], random=["x"])
    assert family.coefficient_names == ["intercept", "x"]
    assert family.effect_names == ["intercept", "x"]
    assert family.dims() == {"beta": ["coef"], "tau": ["effect"], "b": ["client", "effect"]}
    assert family.coords() == {"coef": ["intercept", "x"], "effect": ["intercept", "x"]}
    one = hf.LinearMixed(fixed=["x"])
    assert one.dims() == {"beta": ["coef"]} and one.coords() == {"coef": ["intercept", "x"]}


def test_linear_mixed_needs_fixed_and_random_parts():
    with pytest.raises(ValueError, match="intercept or at least one fixed"):
        hf.LinearMixed(intercept=False)
    with pytest.raises(ValueError, match="random intercept or at least one random"):
        hf.LinearMixed(random_intercept=False)


# ---------------------------------------------------------------------- Beta–Binomial
@pytest.mark.parametrize(("mean", "concentration"), [(0.3, 5.0), (0.9, 0.7), (0.05, 200.0)])
def test_beta_binomial_single_observation_is_scipy_betabinom(mean, concentration):
    family = hf.BetaBinomial()
    a, b = mean * concentration, (1 - mean) * concentration
    for k, n in [(0, 10), (3, 10), (10, 10), (7, 31)]:
        with x64():
            value = family.log_marginal(
                _jnp({"mean": mean, "concentration": concentration}),
                _stats(family, {"y": [k], "trials": [n]}),
            )
        # jax.scipy.special.betaln is accurate to ~1e-7 relative even in float64
        np.testing.assert_allclose(value, stats.betabinom.logpmf(k, n, a, b), rtol=1e-6)


def test_beta_binomial_several_observations_equals_quadrature():
    family = hf.BetaBinomial()
    y, n = np.array([2, 0, 5, 1]), np.array([10, 3, 12, 4])
    mean, concentration = 0.25, 6.0
    a, b = mean * concentration, (1 - mean) * concentration
    with x64():
        value = float(
            family.log_marginal(
                _jnp({"mean": mean, "concentration": concentration}),
                _stats(family, {"y": y, "trials": n}),
            )
        )

    def log_f(p):
        return stats.beta.logpdf(p, a, b) + stats.binom.logpmf(y, n, p).sum()

    np.testing.assert_allclose(value, _log_quad(log_f, 1e-12, 1 - 1e-12), rtol=1e-8)


def test_beta_binomial_conditional_is_the_conjugate_posterior():
    family = hf.BetaBinomial()
    y, n = np.array([2, 0, 5]), np.array([10, 3, 12])
    with x64():
        posterior = family.conditional(
            _jnp({"mean": 0.25, "concentration": 6.0}), _stats(family, {"y": y, "trials": n})
        )
    np.testing.assert_allclose(posterior.concentration1, 1.5 + 7)
    np.testing.assert_allclose(posterior.concentration0, 4.5 + 25 - 7)


# ---------------------------------------------------------------------- Gamma–Poisson
@pytest.mark.parametrize(("mean", "shape"), [(2.0, 3.0), (0.1, 0.5), (40.0, 80.0)])
def test_gamma_poisson_single_observation_is_negative_binomial(mean, shape):
    family = hf.GammaPoisson()
    rate = shape / mean
    for k, exposure in [(0, 1.0), (4, 1.0), (4, 2.5), (17, 0.3)]:
        with x64():
            value = family.log_marginal(
                _jnp({"mean": mean, "shape": shape}),
                _stats(family, {"y": [k], "exposure": [exposure]}),
            )
        expected = stats.nbinom.logpmf(k, shape, rate / (rate + exposure))
        np.testing.assert_allclose(value, expected, rtol=1e-10)


def test_gamma_poisson_several_observations_with_exposure_equals_quadrature():
    family = hf.GammaPoisson()
    y, e = np.array([3, 0, 7, 2]), np.array([1.0, 0.5, 2.0, 0.8])
    mean, shape = 1.5, 2.0
    with x64():
        value = float(
            family.log_marginal(
                _jnp({"mean": mean, "shape": shape}), _stats(family, {"y": y, "exposure": e})
            )
        )

    def log_f(rate):
        return (
            stats.gamma.logpdf(rate, shape, scale=mean / shape)
            + stats.poisson.logpmf(y, rate * e).sum()
        )

    np.testing.assert_allclose(value, _log_quad(log_f, 1e-12, 40.0), rtol=1e-8)


def test_gamma_poisson_without_exposure_field():
    family = hf.GammaPoisson(exposure=None)
    assert family.required == ("y",)
    y = np.array([3.0, 1.0])
    with x64():
        value = family.log_marginal(_jnp({"mean": 2.0, "shape": 3.0}), _stats(family, {"y": y}))
        posterior = family.conditional(_jnp({"mean": 2.0, "shape": 3.0}), _stats(family, {"y": y}))
    log_f = lambda r: stats.gamma.logpdf(r, 3.0, scale=2.0 / 3.0) + stats.poisson.logpmf(y, r).sum()
    np.testing.assert_allclose(value, _log_quad(log_f, 1e-12, 40.0), rtol=1e-8)
    np.testing.assert_allclose(posterior.concentration, 3.0 + 4.0)
    np.testing.assert_allclose(posterior.rate, 1.5 + 2.0)


def test_gamma_poisson_conditional_is_the_conjugate_posterior():
    family = hf.GammaPoisson()
    y, e = np.array([3, 0, 7]), np.array([1.0, 0.5, 2.0])
    with x64():
        posterior = family.conditional(
            _jnp({"mean": 1.5, "shape": 2.0}), _stats(family, {"y": y, "exposure": e})
        )
    np.testing.assert_allclose(posterior.concentration, 2.0 + 10)
    np.testing.assert_allclose(posterior.rate, 2.0 / 1.5 + 3.5)


# ---------------------------------------------------------------------- shared properties
def _families_and_clients():
    rng = np.random.default_rng(3)
    return {
        "NormalNormal": (
            hf.NormalNormal(priors={"mu": 0.5, "tau": 1.3}),
            {"y": rng.normal(size=4), "sigma": rng.uniform(0.5, 2.0, 4)},
        ),
        "LinearMixed": (
            hf.LinearMixed(fixed=["x"], priors={"beta": [0.5, -1.0], "sigma": 0.8, "tau": 0.6}),
            {"y": rng.normal(size=5), "x": rng.normal(size=5)},
        ),
        "BetaBinomial": (
            hf.BetaBinomial(priors={"mean": 0.3, "concentration": 5.0}),
            {"y": np.array([1.0, 4.0, 0.0]), "trials": np.array([5.0, 9.0, 2.0])},
        ),
        "GammaPoisson": (
            hf.GammaPoisson(priors={"mean": 2.0, "shape": 3.0}),
            {"y": np.array([1.0, 4.0, 0.0]), "exposure": np.array([0.5, 2.0, 1.0])},
        ),
    }


def _fixed_phi(family):
    return {r.parameter.name: jnp.asarray(r.value, dtype=jnp.float64) for r in family.priors}


@pytest.mark.parametrize("name", ["NormalNormal", "LinearMixed", "BetaBinomial", "GammaPoisson"])
def test_statistics_are_invariant_to_padding(name):
    family, client = _families_and_clients()[name]
    n = len(client["y"])
    # padded rows hold arbitrary finite values; only the mask may decide what counts
    garbage = {k: np.concatenate([v, np.full(3, 7.5)]) for k, v in client.items()}
    mask = np.arange(n + 3) < n
    with x64():
        plain = _stats(family, client)
        padded = _stats(family, garbage, mask)
        phi = _fixed_phi(family)
        np.testing.assert_allclose(
            family.log_marginal(phi, padded), family.log_marginal(phi, plain), rtol=1e-12
        )
    for key in plain:
        np.testing.assert_allclose(padded[key], plain[key], rtol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", ["NormalNormal", "LinearMixed", "BetaBinomial", "GammaPoisson"])
def test_statistics_vmapped_over_clientdata_padded_view(name):
    family, client = _families_and_clients()[name]
    other = {k: v[:1] for k, v in client.items()}
    data = hf.ClientData.from_dict({"one": client, "two": other})
    padded, mask = data.padded()
    with x64():
        stacked = jax.vmap(family.statistics)(_jnp(padded), jnp.asarray(mask))
        for i, record in enumerate([client, other]):
            single = _stats(family, record)
            for key in single:
                np.testing.assert_allclose(stacked[key][i], single[key], rtol=1e-12)


@pytest.mark.parametrize("name", ["NormalNormal", "LinearMixed", "BetaBinomial", "GammaPoisson"])
def test_numpyro_model_integrates_to_the_collapsed_likelihood(name):
    """The family's NumPyro model (what method='nuts' runs) and its log_marginal (what the exact
    engine uses) are the same hierarchy: integrating theta out of the model numerically gives
    log_marginal."""
    family, client = _families_and_clients()[name]
    n = len(client["y"])
    data = ModelData({k: np.asarray(v) for k, v in client.items()}, np.zeros(n, np.int32), 1)
    with x64():
        expected = float(family.log_marginal(_fixed_phi(family), _stats(family, client)))
        conditional = family.conditional(_fixed_phi(family), _stats(family, client))
        centre, width = float(conditional.mean), 30 * float(jnp.sqrt(conditional.variance))

        @jax.jit
        @jax.vmap
        def log_f(theta):
            values = {family.client_site: theta[None]}
            return log_density(family.model, (data,), {}, values)[0]

        lo, hi = centre - width, centre + width
        if name in ("BetaBinomial", "GammaPoisson"):
            lo = max(lo, 1e-9)
            hi = min(hi, 1 - 1e-9) if name == "BetaBinomial" else hi
        grid = np.linspace(lo, hi, 4001)
        log_values = np.asarray(log_f(jnp.asarray(grid)))
    # trapezoid rule on a fine grid around the conditional's mass (plenty for 1e-6)
    log_integral = logsumexp(log_values, b=np.gradient(grid))
    np.testing.assert_allclose(log_integral, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["NormalNormal", "BetaBinomial", "GammaPoisson"])
def test_prior_is_the_population_distribution(name):
    family, _ = _families_and_clients()[name]
    with x64():
        prior = family.prior(_fixed_phi(family))
    expected_mean = {"NormalNormal": 0.5, "BetaBinomial": 0.3, "GammaPoisson": 2.0}[name]
    np.testing.assert_allclose(prior.mean, expected_mean, rtol=1e-12)


@pytest.mark.parametrize(
    ("family", "clients", "message"),
    [
        (
            hf.BetaBinomial(),
            {"a": {"y": [1, 2], "trials": [3, 3]}, "b": {"y": [4, 0], "trials": [3, 3]}},
            "BetaBinomial: client 'b', field 'y', row 0: must be <= 'trials' (got 4)",
        ),
        (
            hf.BetaBinomial(),
            {"a": {"y": [1, 2.5], "trials": [3, 3]}},
            "client 'a', field 'y', row 1: must be a whole number >= 0 (got 2.5)",
        ),
        (
            hf.BetaBinomial(),
            {"a": {"y": [0, 0], "trials": [3, -3]}},
            "client 'a', field 'trials', row 1: must be a whole number >= 0",
        ),
        (
            hf.GammaPoisson(),
            {"a": {"y": [1, 2], "exposure": [1.0, 1.0]}, "b": {"y": [-1], "exposure": [2.0]}},
            "GammaPoisson: client 'b', field 'y', row 0: must be a whole number >= 0",
        ),
        (
            hf.GammaPoisson(),
            {"a": {"y": [1, 2], "exposure": [1.0, 0.0]}},
            "client 'a', field 'exposure', row 1: must be > 0 (got 0.0)",
        ),
        (
            hf.NormalNormal(),
            {"a": {"y": [1.0], "sigma": [1.0]}, "b": {"y": [1.0], "sigma": [0.0]}},
            "NormalNormal: client 'b', field 'sigma', row 0: must be > 0 (got 0.0)",
        ),
    ],
)
@pytest.mark.parametrize("method", ["exact", "ep", "nuts"])
def test_invalid_values_are_refused_naming_client_field_and_row(family, clients, message, method):
    """Values outside a family's support are refused before anything runs (before, they
    fitted silently, or the client was skipped with a non-finite message)."""
    data = hf.ClientData.from_dict(clients)
    with pytest.raises(hf.DataError) as error:
        hf.fit(family, data, method=method)
    assert message in str(error.value)
