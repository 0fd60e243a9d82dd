"""The exact engine against centralized NUTS, against closed forms, and its reliability.

Agreement is judged with Monte-Carlo-aware tolerances: two posterior means agree when they
differ by less than ``Z`` combined Monte Carlo standard errors (from each run's effective
sample size), and two sds when their ratio is within ``SD_RATIO`` of one, widened to ``Z``
standard errors of the ratio for heavy-tailed quantities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import (
    FAST,
    Z,
    assert_posteriors_agree,
    mcse_of_mean,
    ragged_normal,
    synthetic_linear_mixed,
)

import hierfl as hf
from hierfl.engines.exact import exact_algorithm
from hierfl.engines.globals_inference import GlobalsSettings
from hierfl.protocol import simulate


# ---------------------------------------------------------------------- against NUTS
def test_the_agreement_check_can_fail(eight_schools_nuts):
    theta = eight_schools_nuts.posterior_samples()["theta"]
    sd = theta.std(axis=(0, 1))
    assert_posteriors_agree(theta, theta[:, ::-1], "theta")  # same draws, other order
    with pytest.raises(AssertionError, match="means differ"):
        assert_posteriors_agree(theta + 0.4 * sd, theta, "theta")
    with pytest.raises(AssertionError, match="sd ratios"):
        mean = theta.mean(axis=(0, 1))
        assert_posteriors_agree(mean + 1.3 * (theta - mean), theta, "theta")


def test_eight_schools_exact_agrees_with_centralized_nuts(eight_schools_exact, eight_schools_nuts):
    assert eight_schools_exact.method == "exact" and eight_schools_nuts.method == "nuts"
    exact, nuts = (eight_schools_exact.posterior_samples(), eight_schools_nuts.posterior_samples())
    assert set(exact) == set(nuts) == {"mu", "tau", "theta"}
    for name in ("mu", "tau", "theta"):
        assert exact[name].shape == nuts[name].shape
        assert_posteriors_agree(exact[name], nuts[name], name)


def test_radon_exact_agrees_with_centralized_nuts(radon_exact, radon_nuts):
    exact, nuts = radon_exact.posterior_samples(), radon_nuts.posterior_samples()
    assert {"beta", "sigma", "tau", "b"} <= set(exact) & set(nuts)
    for name in ("beta", "sigma", "tau", "b"):
        assert exact[name].shape == nuts[name].shape, name
        assert_posteriors_agree(exact[name], nuts[name], name)
    # the engine's own per-client summary agrees with NUTS's per-client draws as well
    mean, sd = radon_exact.personal["b"]
    assert_posteriors_agree(exact["b"], nuts["b"], "b")
    tolerance = Z * np.hypot(mcse_of_mean(nuts["b"]), sd / np.sqrt(radon_exact.num_draws))
    assert np.all(np.abs(mean - nuts["b"].mean(axis=(0, 1))) < tolerance)


def test_radon_floor_effect_is_the_known_value(radon_exact):
    # Gelman & Hill: a first-floor measurement is about 0.7 lower on the log scale
    beta = radon_exact.global_samples["beta"]
    floor = beta[..., radon_exact.coords["coef"].index("floor")]
    assert -0.85 < floor.mean() < -0.55
    assert 0.6 < radon_exact.global_samples["sigma"].mean() < 0.9


def test_exact_server_nuts_is_healthy(eight_schools_exact, radon_exact):
    for fit in (eight_schools_exact, radon_exact):
        diagnostics = fit.diagnostics
        assert diagnostics["server"] == "nuts"
        assert diagnostics["rounds"] == 1 and diagnostics["skips"] == []
        assert diagnostics["clients_received"] == fit.data.num_clients
        assert diagnostics["max_r_hat"] < 1.05
        assert diagnostics["divergences"] == 0
        assert diagnostics["wall_time"] > 0


def test_personal_summary_matches_the_client_draws(radon_exact):
    draws = radon_exact.posterior_samples()["b"]
    mean, sd = radon_exact.personal["b"]
    tolerance = Z * mcse_of_mean(draws)
    assert np.all(np.abs(draws.mean(axis=(0, 1)) - mean) < tolerance)
    np.testing.assert_allclose(draws.std(axis=(0, 1)), sd, rtol=0.15)


# ---------------------------------------------------------------------- Laplace server
@pytest.fixture(scope="module")
def many_clients():
    return synthetic_linear_mixed(2000, seed=0)


def test_laplace_server_agrees_with_nuts_server_on_many_clients(many_clients):
    family = hf.LinearMixed(response="y", fixed=["x"])
    options = dict(FAST, num_samples=1000)
    # 2000 clients: server="auto" (the default) picks the Laplace approximation
    laplace = hf.fit(family, many_clients, seed=0, **options)
    nuts = hf.fit(family, many_clients, server="nuts", seed=0, **options)
    assert laplace.diagnostics["server"] == "laplace"
    assert nuts.diagnostics["server"] == "nuts"
    assert laplace.diagnostics["pareto_k"] < 0.7
    for name in ("beta", "sigma", "tau"):
        a, b = laplace.global_samples[name], nuts.global_samples[name]
        sd = b.std(axis=(0, 1))
        np.testing.assert_array_less(
            np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))), 0.1 * sd, err_msg=name
        )
        np.testing.assert_array_less(np.abs(a.std(axis=(0, 1)) / sd - 1), 0.1, err_msg=name)
    # and both recover the truth that generated the data
    truth = {"beta": [1.0, 0.7], "sigma": 1.0, "tau": 0.5}
    for name, value in truth.items():
        draws = laplace.global_samples[name]
        assert np.all(np.abs(draws.mean(axis=(0, 1)) - value) < 4 * draws.std(axis=(0, 1)))
    mean_l, sd_l = laplace.personal["b"]
    mean_n, sd_n = nuts.personal["b"]
    np.testing.assert_allclose(mean_l, mean_n, atol=0.05 * float(np.mean(sd_n)))
    np.testing.assert_allclose(sd_l, sd_n, rtol=0.02)


# ---------------------------------------------------------------------- closed form
def test_normal_normal_with_fixed_tau_is_exact():
    """With tau fixed, phi is mu alone and everything is Gaussian in closed form.

    ybar_i | mu ~ N(mu, tau^2 + 1/p_i) gives mu | D ~ N(m, v); each client's posterior is
    theta_i | D ~ N(w_i m + (1 - w_i) ybar_i, 1/(1/tau^2 + p_i) + w_i^2 v), with
    w_i = (1/tau^2) / (1/tau^2 + p_i).
    """
    data = ragged_normal(seed=1)
    tau, prior_mean, prior_sd = 1.5, 0.0, 10.0
    family = hf.NormalNormal(priors={"mu": dist.Normal(prior_mean, prior_sd), "tau": tau})
    fit = hf.fit(family, data, seed=0, **FAST)
    assert set(fit.global_samples) == {"mu"}

    y, sigma, owner = data.fields["y"], data.fields["sigma"], data.client_index
    precision = np.bincount(owner, 1 / sigma**2)
    ybar = np.bincount(owner, y / sigma**2) / precision
    marginal_var = tau**2 + 1 / precision
    v = 1 / (1 / prior_sd**2 + np.sum(1 / marginal_var))
    m = v * (prior_mean / prior_sd**2 + np.sum(ybar / marginal_var))

    mu = fit.global_samples["mu"]
    assert abs(mu.mean() - m) < Z * mcse_of_mean(mu)
    assert abs(mu.std() / np.sqrt(v) - 1) < 0.1

    w = (1 / tau**2) / (1 / tau**2 + precision)
    conditional_var = 1 / (1 / tau**2 + precision)
    mean, sd = fit.personal["theta"]
    # exactly the mixture over the server's mu draws...
    np.testing.assert_allclose(mean, w * mu.mean() + (1 - w) * ybar, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sd**2, conditional_var + w**2 * mu.var(), rtol=1e-3)
    # ...which is the closed form up to the Monte Carlo error of the mu draws
    assert np.all(np.abs(mean - (w * m + (1 - w) * ybar)) < Z * w * mcse_of_mean(mu) + 1e-4)
    np.testing.assert_allclose(sd, np.sqrt(conditional_var + w**2 * v), rtol=0.05)
    # the well-observed client keeps its own voice; the others are pulled toward mu
    big = data.index_of("big")
    assert w[big] < 0.01 and abs(mean[big] - ybar[big]) < 0.05
    # the lazily drawn client samples follow the same posterior
    theta = fit.posterior_samples()["theta"]
    assert np.all(
        np.abs(theta.mean(axis=(0, 1)) - mean)
        < Z * sd / np.sqrt(theta.shape[0] * theta.shape[1]) + Z * mcse_of_mean(mu)
    )


# ---------------------------------------------------------------------- reliability
def test_fixed_seed_gives_identical_fits(
    eight_schools_family, eight_schools_data, eight_schools_exact
):
    again = hf.fit(eight_schools_family, eight_schools_data, method="exact", seed=1, **FAST)
    for name, value in eight_schools_exact.posterior_samples().items():
        np.testing.assert_array_equal(again.posterior_samples()[name], value, err_msg=name)
    for site, (mean, sd) in eight_schools_exact.personal.items():
        np.testing.assert_array_equal(again.personal[site][0], mean)
        np.testing.assert_array_equal(again.personal[site][1], sd)
    # client draws depend on the client only, not on which subset is asked for
    subset = again.posterior_samples(["C", "A"])["theta"]
    full = again.posterior_samples()["theta"]
    np.testing.assert_array_equal(subset, full[:, :, [2, 0]])


def test_exact_needs_a_conjugate_family(eight_schools_data):
    def model(data):
        pass

    with pytest.raises(TypeError, match="conjugate family"):
        hf.fit(model, eight_schools_data, method="exact")
    with pytest.raises(ValueError, match="unknown method"):
        hf.fit(hf.NormalNormal(), eight_schools_data, method="magic")
    with pytest.raises(TypeError, match="unknown options"):
        hf.fit(hf.NormalNormal(), eight_schools_data, method="exact", num_leapfrog=3)


# ---------------------------------------------------------------------- the exact engine's round
def test_exact_engine_dropout_is_recorded_and_dropped_clients_contribute_nothing(
    eight_schools_data, eight_schools_family
):
    data, family = eight_schools_data, eight_schools_family
    padded, mask = data.padded()
    stacked = {
        "fields": {k: jnp.asarray(v, jnp.float32) for k, v in padded.items()},
        "mask": jnp.asarray(mask),
    }
    settings = GlobalsSettings(num_warmup=100, num_samples=100, num_chains=1)
    algorithm = exact_algorithm(
        family, server="nuts", settings=settings, num_clients=data.num_clients
    )
    result = simulate(
        algorithm,
        jax.random.PRNGKey(4),
        stacked,
        client_ids=data.client_ids,
        num_rounds=1,
        dropout=0.4,
    )
    dropped = [s.client for s in result.skips]
    assert dropped and all(s.reason == "dropped out" and s.round == 0 for s in result.skips)
    received = np.array([c not in dropped for c in data.client_ids])
    assert result.rounds[0].received == received.sum()
    assert result.server_state.diagnostics["clients_received"] == received.sum()
    # dropped clients' statistics never left them: their stacked state is still the initial zero
    stats = result.client_states
    np.testing.assert_array_equal(np.asarray(stats["precision"])[~received], 0.0)
    assert np.all(np.asarray(stats["precision"])[received] > 0)
    # the server ignores every row it did not receive: garbage there changes no draw
    full = jax.vmap(family.statistics)(stacked["fields"], stacked["mask"])
    garbage = jax.tree_util.tree_map(
        lambda v: jnp.where(
            jnp.asarray(received).reshape((-1,) + (1,) * (v.ndim - 1)), v, 1e3 * v + 5.0
        ),
        full,
    )
    state, _ = algorithm.init(jax.random.PRNGKey(0), stacked)
    key = jax.random.PRNGKey(8)
    clean, _ = algorithm.server_update(key, state, full, jnp.asarray(received))
    dirty, _ = algorithm.server_update(key, state, garbage, jnp.asarray(received))
    for name in clean.draws:
        np.testing.assert_array_equal(clean.draws[name], dirty.draws[name], err_msg=name)
    everyone, _ = algorithm.server_update(key, state, full, jnp.ones_like(jnp.asarray(received)))
    assert not np.array_equal(everyone.draws["mu"], clean.draws["mu"])


@pytest.mark.slow
def test_random_slopes_exact_agrees_with_centralized_nuts():
    rng = np.random.default_rng(5)
    clients = {}
    for i in range(30):
        n = int(rng.integers(3, 12))
        x = rng.normal(size=n)
        b0, b1 = rng.normal(0.0, 0.8), rng.normal(0.0, 0.4)
        clients[f"s{i}"] = {"y": 1.0 + 0.5 * x + b0 + b1 * x + rng.normal(0.0, 0.7, n), "x": x}
    data = hf.ClientData.from_dict(clients)
    family = hf.LinearMixed(response="y", fixed=["x"], random=["x"])
    options = dict(FAST, num_samples=1000)
    exact = hf.fit(family, data, seed=0, **options)
    nuts = hf.fit(family, data, method="nuts", seed=1, **options)
    exact_draws, nuts_draws = exact.posterior_samples(), nuts.posterior_samples()
    assert exact_draws["b"].shape == nuts_draws["b"].shape == (2, 1000, 30, 2)
    for name in ("beta", "sigma", "tau", "b"):
        assert_posteriors_agree(exact_draws[name], nuts_draws[name], name)


@pytest.mark.slow
def test_fixed_seed_gives_identical_centralized_nuts(
    eight_schools_family, eight_schools_data, eight_schools_nuts
):
    again = hf.fit(eight_schools_family, eight_schools_data, method="nuts", seed=2, **FAST)
    for name, value in eight_schools_nuts.posterior_samples().items():
        np.testing.assert_array_equal(again.posterior_samples()[name], value, err_msg=name)
