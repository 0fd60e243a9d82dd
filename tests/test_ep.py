"""Federated EP: exactness, agreement with centralized NUTS, robustness, checkpoint/resume."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats as scipy_stats

import hierfl as hf
from hierfl.engines import ep

NUM_CLIENTS = 10


def _normal_data(seed: int = 0, num_clients: int = NUM_CLIENTS, tau: float = 1.0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(1.0, tau, num_clients)
    sizes = rng.integers(3, 15, num_clients)
    return hf.ClientData.from_dict(
        {
            f"c{i}": {"y": rng.normal(theta[i], 2.0, n), "sigma": np.full(n, 2.0)}
            for i, n in enumerate(sizes)
        }
    )


def _closed_form_mu(data: hf.ClientData, tau: float, prior_sd: float):
    """Posterior of mu in the Normal-Normal model with known tau (theta integrated out)."""
    precision, shift = 1.0 / prior_sd**2, 0.0
    for c in data.client_ids:
        y, s = data[c]["y"], data[c]["sigma"]
        w = np.sum(1.0 / s**2)
        ybar = np.sum(y / s**2) / w
        v = tau**2 + 1.0 / w
        precision += 1.0 / v
        shift += ybar / v
    return shift / precision, precision**-0.5


@pytest.fixture(scope="module")
def gaussian_fit():
    """A jointly Gaussian model (tau fixed): EP with Laplace tilted inference is exact."""
    data = _normal_data()
    family = hf.NormalNormal(priors={"mu": dist.Normal(0.0, 10.0), "tau": 1.0})
    fit = hf.fit(
        family, data, method="ep", tilted="laplace", num_rounds=12, num_samples=1000, tol=1e-3
    )
    return data, family, fit


def test_exact_on_conjugate_gaussian(gaussian_fit):
    data, family, fit = gaussian_fit
    mean, sd = _closed_form_mu(data, 1.0, 10.0)
    history = fit.diagnostics["history"]
    assert history["mean"][-1][0] == pytest.approx(mean, abs=0.01 * sd)
    assert history["sd"][-1][0] == pytest.approx(sd, rel=0.01)
    # and the exact engine (one round of sufficient statistics) agrees, within its Monte Carlo
    exact = hf.fit(family, data, method="exact", num_samples=1000, num_chains=2, num_warmup=300)
    draws = exact.global_samples["mu"].reshape(-1)
    mcse = draws.std() / np.sqrt(draws.size / 2)  # conservative: ESS >= half the draws
    assert history["mean"][-1][0] == pytest.approx(draws.mean(), abs=4 * mcse)
    # personal posteriors: exact conditional means of theta_i (both sides are Monte Carlo
    # averages over 1000-2000 draws: a few hundredths of an sd each)
    ep_mean, ep_sd = fit.personal["theta"]
    exact_mean, exact_sd = exact.personal["theta"]
    np.testing.assert_allclose(ep_mean, exact_mean, atol=0.2 * exact_sd.min())
    np.testing.assert_allclose(ep_sd, exact_sd, rtol=0.15)


def test_adapt_a_new_client_in_closed_form(gaussian_fit):
    """A client not in the fit adapts against q(mu) with no server round (``Fit.adapt``): in
    this jointly Gaussian model its posterior is closed form, ``q(mu)`` (exact here) times
    ``N(theta | mu, tau^2)`` times its likelihood."""
    data, _, fit = gaussian_fit
    m0, s0 = _closed_form_mu(data, 1.0, 10.0)
    y, sigma = np.array([2.5, 1.0, 3.0]), np.array([2.0, 1.0, 2.0])
    precision = np.array(
        [[1 / s0**2 + 1.0, -1.0], [-1.0, 1.0 + np.sum(1 / sigma**2)]]
    )  # over (mu, theta), tau = 1
    covariance = np.linalg.inv(precision)
    mean = covariance @ np.array([m0 / s0**2, np.sum(y / sigma**2)])
    adapted = fit.adapt("newcomer", y=y, sigma=sigma)
    theta_mean, theta_sd = adapted.personal["theta"]
    draws = adapted.global_samples["mu"].reshape(-1)
    se = np.sqrt(covariance[1, 1] / draws.size)
    assert theta_mean[0] == pytest.approx(mean[1], abs=4 * se + 0.01 * np.sqrt(covariance[1, 1]))
    assert theta_sd[0] == pytest.approx(np.sqrt(covariance[1, 1]), rel=0.08)
    assert draws.mean() == pytest.approx(mean[0], abs=4 * np.sqrt(covariance[0, 0] / draws.size))
    # a second client of another size reuses the compiled step (rows padded to 16)
    again = fit.adapt("another", y=y[:2], sigma=sigma[:2])
    assert again.personal["theta"][0].shape == (1,)


def test_fit_object_schema(gaussian_fit):
    data, _, fit = gaussian_fit
    idata = fit.to_arviz()
    assert idata.posterior["theta"].dims == ("chain", "draw", "client")
    assert list(idata.posterior["client"].values) == list(data.client_ids)
    assert idata.log_likelihood["y"].shape[-1] == data.num_obs
    assert fit.predict("c0", sigma=[1.0, 1.0])["y"].shape == (1000, 2)
    assert fit.predict("someone new", sigma=[1.0])["y"].shape == (1000, 1)
    assert fit.diagnostics["converged_round"] is not None
    assert fit.diagnostics["bytes_per_message"] == 4 * (1 + 1)


def _sum_of_sites(server_state, client_states):
    """Sum of the clients' current sites (committed + applied fraction of pending)."""
    bc = ep.final_broadcast(server_state)
    sites = jax.vmap(ep._commit, in_axes=(0, None))(client_states, bc)
    return np.asarray(sites[0].sum(0)), np.asarray(sites[1].sum(0))


def test_dropout_and_invalid_updates_are_skipped():
    data = _normal_data(1)
    family = hf.NormalNormal(priors={"tau": 1.0})

    def corrupt(round_index, messages):
        if round_index == 1:  # a NaN message from c1 and a non-PD one from c2
            precision = messages.precision_change.at[1].set(jnp.nan)
            precision = precision.at[2].set(-1e6 * jnp.eye(precision.shape[-1]))
            return messages._replace(precision_change=precision)
        return messages

    fit = hf.fit(
        family,
        data,
        method="ep",
        tilted="laplace",
        num_rounds=25,
        dropout=0.3,
        corrupt=corrupt,
        num_samples=200,
        tol=1e-4,
    )
    skips = fit.diagnostics["skips"]
    reasons = {(s.round, s.client): s.reason for s in skips}
    assert any(s.reason == "dropped out" for s in skips)
    if (1, "c1") not in reasons or (1, "c2") not in reasons:  # unless they dropped out anyway
        pytest.skip("the corrupted clients dropped out in round 1 with this seed")
    assert "non-finite" in reasons[(1, "c1")] or reasons[(1, "c1")] == "dropped out"
    assert reasons[(1, "c2")] in ("message failed the algorithm's validity check", "dropped out")
    # the global approximation is the sum of the clients' sites, and it is still right
    server, clients = fit.diagnostics["state"]
    precision, shift = _sum_of_sites(server, clients)
    np.testing.assert_allclose(np.asarray(server.precision), precision, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(server.shift), shift, rtol=1e-4, atol=1e-5)
    mean, sd = _closed_form_mu(data, 1.0, 10.0)
    assert fit.diagnostics["history"]["mean"][-1][0] == pytest.approx(mean, abs=0.01 * sd)


def test_server_backs_off_when_the_sum_is_not_positive_definite():
    data = _normal_data(2, num_clients=4)
    settings = ep.EPSettings(tilted="laplace", num_rounds=3)
    _, _, client_data, algorithm = ep.prepare(
        hf.NormalNormal(priors={"tau": 1.0}).model, data, settings
    )
    server, _ = algorithm.init(jax.random.PRNGKey(0), client_data)
    d = server.precision.shape[0]
    messages = ep.EPMessage(jnp.stack([-0.3 * server.precision] * 4), jnp.zeros((4, d)))
    new, info = algorithm.server_update(None, server, messages, jnp.ones(4, bool))
    assert 0.0 < float(info.applied_scale) < 1.0
    assert np.all(np.linalg.eigvalsh(np.asarray(new.precision)) > 0)
    assert float(new.applied_scale[0]) == float(info.applied_scale)


def test_checkpoint_resume_is_identical():
    data = _normal_data(3, num_clients=6)
    settings = ep.EPSettings(tilted="laplace", num_rounds=6, tol=0.0, num_samples=100, dropout=0.2)
    _, _, client_data, algorithm = ep.prepare(
        hf.NormalNormal(priors={"tau": 1.0}).model, data, settings
    )
    key = jax.random.PRNGKey(5)
    checkpoints = {}

    def keep(record, server_state, client_states):
        checkpoints[record.round] = (server_state, client_states)

    straight = ep.run_ep(algorithm, key, client_data, data.client_ids, settings, on_round=keep)
    resumed = ep.run_ep(
        algorithm, key, client_data, data.client_ids, settings, state=checkpoints[2], start_round=3
    )
    for x, y in zip(
        jax.tree_util.tree_leaves(
            (straight.server_state, straight.client_states, straight.personal)
        ),
        jax.tree_util.tree_leaves((resumed.server_state, resumed.client_states, resumed.personal)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [s[:2] for s in straight.skips if s.round >= 3] == [s[:2] for s in resumed.skips]


def test_sequential_schedule_reaches_the_same_fixed_point():
    data = _normal_data(4, num_clients=5)
    family = hf.NormalNormal(priors={"mu": dist.Normal(0.0, 10.0), "tau": 1.0})
    fit = hf.fit(
        family,
        data,
        method="ep",
        tilted="laplace",
        schedule="sequential",
        damping=1.0,
        num_rounds=4,
        num_samples=100,
    )
    mean, sd = _closed_form_mu(data, 1.0, 10.0)
    assert fit.diagnostics["history"]["mean"][-1][0] == pytest.approx(mean, abs=0.01 * sd)
    assert fit.diagnostics["history"]["sd"][-1][0] == pytest.approx(sd, rel=0.01)


def test_laplace_quadrature_integrates_client_parameters_out():
    """The inner integral of the nested Laplace: exact for a Gaussian, and for a Poisson
    log-normal integrand equal to brute-force quadrature on a fine grid."""
    grid, log_weights = (jnp.asarray(a) for a in ep.quadrature_grid(7, 1))
    np.testing.assert_allclose(
        np.exp(jax.scipy.special.logsumexp(log_weights)), np.sqrt(2 * np.pi), rtol=1e-5
    )

    def gaussian(x):  # -log N(t; 0.3 phi, 0.5^2) without its normalizer, phi = x[0]
        return 0.5 * ((x[1] - 0.3 * x[0]) / 0.5) ** 2

    quad = ep._local_quadrature(gaussian, jnp.array([1.0]), jnp.zeros(1), grid, log_weights, 20)
    assert float(quad.value) == pytest.approx(-np.log(np.sqrt(2 * np.pi) * 0.5), abs=1e-5)
    assert float(quad.mode[0]) == pytest.approx(0.3, abs=1e-5)

    counts = jnp.array([0.0, 2.0, 5.0])

    def poisson(x):  # log-rate t ~ N(phi, 1), counts ~ Poisson(exp(t))
        t = x[1]
        return 0.5 * (t - x[0]) ** 2 - jnp.sum(counts * t - jnp.exp(t))

    phi = jnp.array([0.2])
    quad = ep._local_quadrature(poisson, phi, jnp.zeros(1), grid, log_weights, 20)
    fine = np.linspace(-8.0, 8.0, 20001)

    def integrand(p, ts):  # poisson at (p, t) for every t of a grid, vectorized
        return jax.vmap(lambda t: poisson(jnp.stack([p, t])))(jnp.asarray(ts))

    values = -np.asarray(integrand(jnp.asarray(0.2), fine[::20]), dtype=np.float64)
    brute = -np.log(np.trapezoid(np.exp(values), fine[::20]))
    assert float(quad.value) == pytest.approx(brute, abs=1e-3)
    # the derivatives by Fisher's and Louis' identities match those of the exact integral
    gradient, hessian = ep._marginal_derivatives(poisson, phi, quad)

    def exact(p):
        return -jax.scipy.special.logsumexp(-integrand(p, np.linspace(-8.0, 8.0, 1601))) - np.log(
            16.0 / 1600
        )

    assert float(gradient[0]) == pytest.approx(float(jax.grad(exact)(0.2)), abs=2e-3)
    assert float(hessian[0, 0]) == pytest.approx(float(jax.hessian(exact)(0.2)), abs=5e-3)


def test_laplace_tilted_with_a_learned_spread_matches_exact():
    """The client parameters are integrated out, so the learned spread is not pulled to
    zero (the funnel that biases a joint Laplace approximation)."""
    data = _normal_data(7, num_clients=12, tau=1.5)
    family = hf.NormalNormal(priors={"tau": dist.HalfNormal(2.0)})
    exact = hf.fit(family, data, method="exact", num_samples=2000, num_chains=2, seed=0)
    fit = hf.fit(family, data, method="ep", tilted="laplace", num_rounds=15, num_samples=2000)
    for name, tolerance in (("mu", 0.1), ("tau", 0.25)):
        a, b = np.ravel(exact.global_samples[name]), np.ravel(fit.global_samples[name])
        assert abs(b.mean() - a.mean()) < tolerance * a.std(), name
    a = exact.client_samples(np.arange(12))["theta"].reshape(-1, 12)
    b = fit.client_samples(np.arange(12))["theta"].reshape(-1, 12)
    assert np.max(np.abs(b.mean(0) - a.mean(0)) / a.std(0)) < 0.25


def test_clients_grouped_by_size_give_the_same_fit():
    rng = np.random.default_rng(8)
    sizes = [2] * 8 + [90, 90]
    data = hf.ClientData.from_dict(
        {
            f"c{i}": {"y": rng.normal(i % 3, 2.0, n), "sigma": np.full(n, 2.0)}
            for i, n in enumerate(sizes)
        }
    )
    family = hf.NormalNormal(priors={"tau": dist.HalfNormal(2.0)})
    _, _, grouped, _ = ep.prepare(family.model, data, ep.EPSettings(tilted="laplace"))
    assert isinstance(grouped, hf.protocol.ClientGroups)
    assert [len(g) for g in grouped.indices] == [8, 2]
    fits = [
        hf.fit(
            family,
            data,
            method="ep",
            tilted="laplace",
            num_rounds=6,
            num_samples=200,
            size_groups=groups,
        )
        for groups in (1, 3)
    ]
    np.testing.assert_allclose(
        fits[0].diagnostics["history"]["mean"][-1],
        fits[1].diagnostics["history"]["mean"][-1],
        rtol=1e-3,
        atol=1e-3,
    )


def test_synchronous_schedule_with_a_sequential_start():
    """One sequential (ADF) sweep before the parallel rounds: same fixed point, recorded as
    round 0."""
    data = _normal_data(9)
    family = hf.NormalNormal(priors={"mu": dist.Normal(0.0, 10.0), "tau": 1.0})
    fit = hf.fit(
        family,
        data,
        method="ep",
        tilted="laplace",
        num_rounds=8,
        num_samples=200,
        tol=1e-3,
        sequential_start=True,
    )
    history = fit.diagnostics["history"]
    mean, sd = _closed_form_mu(data, 1.0, 10.0)
    # after the sweep alone the global mean is already close (ADF)
    assert history["mean"][0][0] == pytest.approx(mean, abs=0.5 * sd)
    assert history["mean"][-1][0] == pytest.approx(mean, abs=0.01 * sd)
    assert history["sd"][-1][0] == pytest.approx(sd, rel=0.01)


def test_bad_options_are_named():
    data = _normal_data(5, num_clients=3)
    with pytest.raises(TypeError, match="unknown options"):
        hf.fit(hf.NormalNormal(), data, method="ep", bogus=1)
    with pytest.raises(ValueError, match="tilted"):
        hf.fit(hf.NormalNormal(), data, method="ep", tilted="magic")


def _logistic_data(seed: int = 0, num_clients: int = 8):
    from models import hospitals

    return hospitals.generate(num_clients, seed=seed, median_size=80).train


def _agreement(fit, ref, global_names, client_names):
    worst_mean, worst_sd, worst_client = 0.0, 0.0, 0.0
    for name in global_names:
        a, b = ref.global_samples[name], fit.global_samples[name]
        sd = a.std(axis=(0, 1))
        worst_mean = max(
            worst_mean, float(np.max(np.abs(b.mean(axis=(0, 1)) - a.mean(axis=(0, 1))) / sd))
        )
        worst_sd = max(worst_sd, float(np.max(np.abs(b.std(axis=(0, 1)) / sd - 1.0))))
    clients = np.arange(ref.data.num_clients)
    for name in client_names:
        a, b = ref.client_samples(clients)[name], fit.client_samples(clients)[name]
        sd = a.std(axis=(0, 1))
        worst_client = max(
            worst_client, float(np.max(np.abs(b.mean(axis=(0, 1)) - a.mean(axis=(0, 1))) / sd))
        )
    return worst_mean, worst_sd, worst_client


@pytest.mark.slow
def test_agrees_with_centralized_nuts_on_hierarchical_logistic():
    from models import hospitals

    data = _logistic_data()
    ref = hf.fit(
        hospitals.model, data, method="nuts", num_chains=2, num_samples=1500, num_warmup=500, seed=1
    )
    fit = hf.fit(
        hospitals.model,
        data,
        method="ep",
        tilted="nuts",
        num_rounds=12,
        num_warmup=300,
        num_samples=1000,
        seed=1,
    )
    # Monte Carlo-aware tolerances: the reference has ESS of a few hundred for the scales
    # (MCSE ~0.05 sd), EP's Gaussian approximation adds its own small bias
    mean, sd, client = _agreement(
        fit, ref, ["mu_alpha", "mu_beta", "sigma_alpha"], ["alpha", "beta"]
    )
    assert mean < 0.25, mean
    assert sd < 0.25, sd
    assert client < 0.25, client


@pytest.mark.slow
def test_nuts_tilted_matches_exact_on_conjugate_family():
    data = _normal_data(6, num_clients=12)
    family = hf.NormalNormal(priors={"tau": dist.HalfNormal(2.0)})
    exact = hf.fit(family, data, method="exact", num_samples=2000, num_chains=2)
    fit = hf.fit(
        family, data, method="ep", tilted="nuts", num_rounds=10, num_warmup=300, num_samples=800
    )
    for name in ("mu", "tau"):
        a, b = exact.global_samples[name], fit.global_samples[name]
        assert abs(b.mean() - a.mean()) < 0.25 * a.std(), name


def test_average_from_is_the_mean_of_the_rounds_natural_parameters():
    """Polyak averaging: the returned approximation averages the global natural parameters
    of the rounds from ``average_from`` on (here with the deterministic Laplace, so the
    per-round approximations are known exactly from the history)."""
    data = _normal_data()
    family = hf.NormalNormal(priors={"mu": dist.Normal(0.0, 10.0), "tau": 1.0})
    fit = hf.fit(
        family,
        data,
        method="ep",
        tilted="laplace",
        num_rounds=5,
        tol=0.0,
        average_from=1,
        num_samples=4000,
    )
    history = fit.diagnostics["history"]
    assert fit.diagnostics["averaged_updates"] == 4
    precision = np.array([1.0 / s[0] ** 2 for s in history["sd"][1:]])
    shift = np.array(
        [m[0] / s[0] ** 2 for m, s in zip(history["mean"][1:], history["sd"][1:], strict=True)]
    )
    server = fit.diagnostics["state"][0]
    np.testing.assert_allclose(server.average_precision[0, 0], precision.mean(), rtol=1e-4)
    np.testing.assert_allclose(server.average_shift[0], shift.mean(), rtol=1e-4)
    # the fit's global draws come from the averaged Gaussian, not the last round's
    bc = ep.final_broadcast(server)
    mean, sd = shift.mean() / precision.mean(), precision.mean() ** -0.5
    assert float(bc.draw_shift[0] / bc.draw_precision[0, 0]) == pytest.approx(mean, rel=1e-4)
    draws = fit.global_samples["mu"].reshape(-1)
    assert draws.mean() == pytest.approx(mean, abs=4 * sd / np.sqrt(draws.size))
    # not the last round's: EP starts at the prior's width, so the sd still narrows over
    # these rounds (the mean settles in the first: the start is wide)
    assert abs(sd - history["sd"][-1][0]) > 0.02 * sd


def test_a_run_that_stops_while_still_moving_warns_and_resumes():
    """Out of rounds while the global approximation still moves: EPConvergenceWarning, with
    how to continue; continuing from the checkpoint reaches the closed-form fixed point, and
    that converged run does not warn."""
    data = _normal_data(4, num_clients=6)
    family = hf.NormalNormal(priors={"mu": dist.Normal(20.0, 10.0), "tau": 1.0})
    options = {"tilted": "laplace", "num_samples": 100, "tol": 1e-3}
    warning = r"did not converge in 2 rounds.*start_round=2"
    with pytest.warns(ep.EPConvergenceWarning, match=warning):
        short = hf.fit(family, data, method="ep", num_rounds=2, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = hf.fit(
            family,
            data,
            method="ep",
            num_rounds=30,
            state=short.diagnostics["state"],
            start_round=short.diagnostics["next_round"],
            **options,
        )
    assert not [w for w in caught if issubclass(w.category, ep.EPConvergenceWarning)]
    assert resumed.diagnostics["converged_round"] is not None
    centred, sd = _closed_form_mu(data, 1.0, 10.0)  # with the prior mean at 0
    exact = centred + 20.0 * sd**2 / 10.0**2  # the prior mean at 20 adds 20 / 10^2 of shift
    assert resumed.diagnostics["history"]["mean"][-1][0] == pytest.approx(exact, abs=0.01 * sd)


def test_ep_starts_at_the_prior_width():
    """EP's first global approximation has the prior's width (half the 16-84% range of
    prior draws of the unconstrained globals); a real-line global is centred at its prior
    median (of the draws), a constrained one at the origin. The half-normal's width on the
    log scale is ``log(z_0.92 / z_0.58) / 2`` whatever its scale."""
    data = _normal_data()
    far = hf.NormalNormal(priors={"mu": dist.Normal(250.0, 100.0), "tau": dist.HalfNormal(100.0)})
    problem = ep.prepare(far.model, data, ep.EPSettings(tilted="laplace"))[1]
    location, width = (np.asarray(a) for a in problem.prior_start())
    assert problem.global_latent == ("mu", "tau")
    # the median of 512 draws: standard error 1.25 * 100 / sqrt(512) = 5.5
    assert location[0] == pytest.approx(250.0, abs=4 * 5.5)
    assert location[1] == 0.0
    z = scipy_stats.norm.ppf([0.92, 0.58])
    assert width[0] == pytest.approx(100.0, rel=0.08)  # 512 draws: quantiles within ~4%
    assert width[1] == pytest.approx(0.5 * np.log(z[0] / z[1]), rel=0.08)


def test_ep_reaches_globals_far_from_the_origin_in_few_rounds():
    """Population mean near 250 under a N(0, 1000) prior (tau fixed, so the posterior of mu
    is closed form): EP starting at the prior's width is there within 0.05 sd after 4
    rounds (from a unit start it stood some 6 sd short)."""
    data = _normal_data()
    far = hf.ClientData.from_dict(
        {c: {"y": data[c]["y"] + 250.0, "sigma": data[c]["sigma"]} for c in data.client_ids}
    )
    family = hf.NormalNormal(priors={"mu": dist.Normal(0.0, 1000.0), "tau": 1.0})
    fit = hf.fit(family, far, method="ep", tilted="laplace", num_rounds=4, num_samples=100)
    mean, sd = _closed_form_mu(far, 1.0, 1000.0)
    assert fit.diagnostics["history"]["mean"][-1][0] == pytest.approx(mean, abs=0.05 * sd)
