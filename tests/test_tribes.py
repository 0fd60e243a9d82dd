"""Tribes (clustered personalization): the Normal mixture family against closed forms,
numerical integration and centralized NUTS; tribe recovery; priors and inputs it rejects."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
from conftest import FAST, TINY, assert_posteriors_agree, x64
from numpyro import handlers
from numpyro.distributions.transforms import OrderedTransform
from scipy import integrate, stats

import hierfl as hf
import hierfl.tribes
from hierfl.priors import OrderStatistics, PriorError
from hierfl.tribes import NormalMixture, membership
from models import tribes as demo

#: tribe means and spreads of the well-separated federation
SEPARATED = {"means": (-4.0, 4.0), "spread": 0.5, "noise": 1.0, "min_rows": 2, "max_rows": 6}


def _jnp(record):
    """A dict of float64 arrays (call inside ``x64()``)."""
    return {k: jnp.asarray(np.asarray(v), dtype=jnp.float64) for k, v in record.items()}


def _stats(family, fields):
    fields = _jnp(fields)
    return family.statistics(fields, jnp.ones(fields["y"].shape[0], dtype=bool))


@pytest.fixture(scope="module")
def client():
    rng = np.random.default_rng(3)
    sigma = rng.uniform(0.5, 2.0, 4)
    return {"y": rng.normal(1.0, sigma), "sigma": sigma}


# ---------------------------------------------------------------------- module
def test_module_documents_its_maths_and_runs_its_examples():
    for module in (hierfl.tribes, demo):
        assert "math" in module.__doc__
        assert all(hasattr(module, name) for name in module.__all__)
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
        assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------- closed forms
@pytest.mark.parametrize(("mu", "tau"), [(0.3, 1.7), (-2.0, 0.05), (5.0, 20.0)])
def test_one_component_is_the_normal_normal_family(client, mu, tau):
    mixture = NormalMixture(num_components=1)
    normal = hf.NormalNormal()
    with x64():
        stats_ = _stats(normal, client)
        assert jax.tree_util.tree_all(
            jax.tree_util.tree_map(jnp.array_equal, _stats(mixture, client), stats_)
        )
        phi = _jnp({"mu": [mu], "tau": [tau], "weights": [1.0]})
        expected = normal.log_marginal(_jnp({"mu": mu, "tau": tau}), stats_)
        np.testing.assert_allclose(mixture.log_marginal(phi, stats_), expected, rtol=1e-10)
        a = mixture.conditional(phi, stats_)
        b = normal.conditional(_jnp({"mu": mu, "tau": tau}), stats_)
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-10)
        np.testing.assert_allclose(a.variance, b.variance, rtol=1e-10)
        points = b.mean + b.scale * jnp.array([-2.0, 0.0, 1.5])
        np.testing.assert_allclose(a.log_prob(points), b.log_prob(points), rtol=1e-10)
        prior = mixture.prior(phi)
        np.testing.assert_allclose(
            prior.log_prob(points), dist.Normal(mu, tau).log_prob(points), rtol=1e-10
        )


THREE_TRIBES = {"weights": [0.2, 0.5, 0.3], "mu": [-3.0, 0.5, 4.0], "tau": [0.4, 1.2, 0.8]}


def _log_integrand(phi, client):
    y, s = np.asarray(client["y"]), np.asarray(client["sigma"])

    def log_f(theta):
        prior = np.log(
            np.sum(np.asarray(phi["weights"]) * stats.norm.pdf(theta, phi["mu"], phi["tau"]))
        )
        return prior + stats.norm.logpdf(y, theta, s).sum()

    return log_f


def test_three_tribes_marginal_and_conditional_equal_quadrature(client):
    family = NormalMixture(num_components=3)
    log_f = _log_integrand(THREE_TRIBES, client)
    lo, hi, knots = -15.0, 15.0, [-3.0, 0.5, 1.0, 4.0]
    shift = max(log_f(t) for t in np.linspace(lo, hi, 2001))

    def moment(power):
        value, error = integrate.quad(
            lambda t: t**power * np.exp(log_f(t) - shift),
            lo,
            hi,
            points=knots,
            limit=400,
            epsabs=0.0,
            epsrel=1e-11,
        )
        return value

    mass = moment(0)
    mean = moment(1) / mass
    variance = moment(2) / mass - mean**2
    with x64():
        stats_ = _stats(family, client)
        phi = _jnp(THREE_TRIBES)
        value = float(family.log_marginal(phi, stats_))
        conditional = family.conditional(phi, stats_)
        np.testing.assert_allclose(value, np.log(mass) + shift, rtol=1e-9)
        np.testing.assert_allclose(float(conditional.mean), mean, rtol=1e-8)
        np.testing.assert_allclose(float(conditional.variance), variance, rtol=1e-7)
        # the conditional density itself, at a few points
        points = np.array([-2.0, 0.0, 1.0, 3.0])
        expected = np.array([log_f(t) for t in points]) - value
        np.testing.assert_allclose(conditional.log_prob(jnp.asarray(points)), expected, rtol=1e-9)
        # responsibilities are the tribes' shares of the marginal
        responsibilities = family.responsibilities(phi, stats_)
        np.testing.assert_allclose(float(jnp.sum(responsibilities)), 1.0, rtol=1e-12)


def test_the_collapsed_model_equals_the_model_with_theta_integrated(client):
    # the NumPyro model's joint density, integrated over theta, is the family's log marginal
    # times the globals' prior: the exact engine and NUTS share one model
    family = NormalMixture(num_components=2, priors={"weights": [0.3, 0.7]})
    data = hf.ClientData.from_dict({"only": client}).batch()
    phi = {"mu": np.array([-1.0, 2.0]), "tau": np.array([0.7, 1.1])}
    with x64():
        data = data._replace(fields=_jnp(data.fields), client=jnp.asarray(data.client))
        prior_density = float(
            OrderStatistics(dist.Normal(0.0, 10.0), 2).log_prob(jnp.asarray(phi["mu"]))
            + dist.HalfNormal(5.0).log_prob(jnp.asarray(phi["tau"])).sum()
        )

        @jax.jit
        @jax.vmap
        def log_joint(theta):
            values = {**_jnp(phi), "theta": theta[None]}
            return numpyro.infer.util.log_density(family.model, (data,), {}, values)[0]

        grid = np.linspace(-15.0, 15.0, 6001)
        values = np.asarray(log_joint(jnp.asarray(grid)))
        shift = values.max()
        mass = integrate.simpson(np.exp(values - shift), x=grid)
        stats_ = _stats(family, client)
        expected = float(family.log_marginal(_jnp({**phi, "weights": [0.3, 0.7]}), stats_))
    np.testing.assert_allclose(np.log(mass) + shift - prior_density, expected, rtol=1e-8)


# ---------------------------------------------------------------------- priors
def test_order_statistics_is_a_normalized_ordered_prior():
    prior = OrderStatistics(dist.Normal(1.0, 2.0), 2)
    log_prob = jax.jit(lambda lower, upper: prior.log_prob(jnp.stack([lower, upper])))
    mass, _ = integrate.dblquad(
        lambda upper, lower: float(np.exp(log_prob(lower, upper))),
        -15,
        15,
        lambda lower: lower,
        17,
    )
    np.testing.assert_allclose(mass, 1.0, rtol=1e-5)
    assert prior.log_prob(jnp.array([1.0, 0.0])) == -jnp.inf
    draws = prior.sample(jax.random.PRNGKey(0), (500,))
    assert draws.shape == (500, 2) and bool(jnp.all(draws[:, 1] > draws[:, 0]))


def test_default_and_user_priors_on_the_mixture_parameters():
    trace = handlers.trace(
        handlers.seed(NormalMixture(num_components=3).sample_globals, 0)
    ).get_trace()
    assert isinstance(trace["weights"]["fn"], dist.Dirichlet)
    assert isinstance(trace["mu"]["fn"], OrderStatistics)
    assert trace["tau"]["value"].shape == (3,)
    assert bool(jnp.all(jnp.diff(trace["mu"]["value"]) > 0))
    # a distribution on the ordered vectors is taken as it is; log_tau is per tribe
    ordered = dist.TransformedDistribution(
        dist.Normal(jnp.zeros(2), 3.0).to_event(1), OrderedTransform()
    )
    family = NormalMixture(
        num_components=2, priors={"mu": ordered, "log_tau": dist.Normal(0.0, 1.0)}
    )
    trace = handlers.trace(handlers.seed(family.sample_globals, 0)).get_trace()
    assert trace["mu"]["fn"] is ordered and trace["log_tau"]["value"].shape == (2,)
    assert family.global_sites == ("weights", "mu", "tau")
    # fixed values, and one tribe (weights fixed at 1, nothing to infer about them)
    family = NormalMixture(num_components=2, priors={"weights": 0.5, "mu": [-1.0, 1.0]})
    assert family.global_sites == ("tau",)
    assert "weights=[0.5, 0.5]" in repr(family)
    assert NormalMixture(num_components=1).global_sites == ("mu", "tau")


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda: NormalMixture(num_components=0), ValueError, "num_components must be >= 1"),
        (lambda: NormalMixture(num_components=2.0), ValueError, "num_components must be an int"),
        (lambda: NormalMixture(num_components=True), ValueError, "num_components must be an int"),
        (lambda: NormalMixture(), TypeError, "num_components"),
        (
            lambda: NormalMixture(num_components=2, priors={"weights": dist.Normal(0.0, 1.0)}),
            PriorError,
            r"prior for 'weights' has support .* must be simplex; use a Dirichlet",
        ),
        (
            lambda: NormalMixture(
                num_components=2, priors={"weights": dist.Dirichlet(jnp.ones(3))}
            ),
            PriorError,
            r"prior for 'weights': event shape \(3,\), parameter has shape \(2,\)",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"weights": [0.5, 0.6]}),
            PriorError,
            r"fixed value of 'weights' must be non-negative and sum to 1",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"weights": [1.2, -0.2]}),
            PriorError,
            r"fixed value of 'weights' must be non-negative",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"mu": [1.0, 1.0]}),
            PriorError,
            r"fixed value of 'mu' must be strictly increasing",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"mu": dist.HalfNormal(1.0)}),
            PriorError,
            r"prior for 'mu' has support .* must be ordered; give a univariate real prior",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"mu": dist.Normal(jnp.zeros(2), 1.0)}),
            PriorError,
            r"prior for 'mu' has support .* must be ordered",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"mu": dist.Poisson(2.0)}),
            PriorError,
            r"prior for 'mu' is discrete",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"tau": 0.0}),
            PriorError,
            r"fixed value of 'tau' must be > 0 for NormalMixture",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"tau": dist.Normal(0.0, 1.0)}),
            PriorError,
            r"prior for 'tau' has support .* must be positive; use 'log_tau'",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"log_weights": dist.Normal(0, 1)}),
            PriorError,
            r"'log_weights': a log-scale prior needs a positive parameter",
        ),
        (
            lambda: NormalMixture(num_components=2, priors={"sigma": 1.0}),
            PriorError,
            r"unknown parameter 'sigma'",
        ),
    ],
    ids=[
        "zero-components",
        "float-components",
        "bool-components",
        "missing-components",
        "normal-on-weights",
        "dirichlet-size",
        "weights-sum",
        "negative-weight",
        "mu-not-increasing",
        "positive-prior-on-mu",
        "batched-mu-prior",
        "discrete-mu",
        "tau-zero",
        "normal-on-tau",
        "log-weights",
        "unknown-name",
    ],
)
def test_bad_settings_and_priors_are_rejected_naming_the_parameter(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_bad_data_names_the_client_and_field(tiny):
    family = NormalMixture(num_components=2)
    bad_scale = hf.ClientData.from_dict(
        {"a": {"y": [1.0], "sigma": [1.0]}, "b": {"y": [1.0, 2.0], "sigma": [1.0, 0.0]}}
    )
    with pytest.raises(hf.DataError, match=r"client 'b', field 'sigma', row 1: must be > 0"):
        hf.fit(family, bad_scale, **tiny)
    with pytest.raises(hf.DataError, match=r"NormalMixture needs field 'sigma'"):
        hf.fit(family, {"a": {"y": [1.0]}}, **tiny)
    with pytest.raises(hf.DataError, match=r"client 'a', field 'y': NaN at row 0"):
        hf.fit(family, {"a": {"y": [np.nan], "sigma": [1.0]}}, **tiny)


# ---------------------------------------------------------------------- fits
@pytest.fixture(scope="module")
def separated():
    return demo.generate(30, seed=4, **SEPARATED)


@pytest.fixture(scope="module")
def mixture_family():
    return demo.family()


@pytest.fixture(scope="module")
def mixture_exact(mixture_family, separated):
    return hf.fit(mixture_family, separated.train, method="exact", seed=1, **FAST)


@pytest.fixture(scope="module")
def normal_exact(separated):
    return hf.fit(hf.NormalNormal(priors=dict(demo.PRIORS)), separated.train, seed=1, **FAST)


def test_membership_recovers_the_true_tribes(mixture_exact, normal_exact, separated):
    frame = membership(mixture_exact)
    assert isinstance(frame, pd.DataFrame)
    assert frame.shape == (30, 2) and frame.index.name == "client"
    assert list(frame.index) == list(separated.train.client_ids)
    np.testing.assert_allclose(frame.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = np.mean(frame.to_numpy().argmax(axis=1) == separated.truth["tribe"])
    assert accuracy >= 0.9
    mu = mixture_exact.global_samples["mu"].mean(axis=(0, 1))
    np.testing.assert_allclose(mu, SEPARATED["means"], atol=1.0)
    with pytest.raises(TypeError, match="membership needs a fit of a NormalMixture"):
        membership(normal_exact)


def test_a_client_is_pulled_toward_its_own_tribe_not_the_grand_mean(mixture_exact, normal_exact):
    # a new client with one row between its tribe (-4) and the grand mean (0); adapt gives
    # the posterior that a fit including it would give
    row = {"y": [-2.5], "sigma": [1.0]}
    mixture = mixture_exact.adapt("probe", **row)
    normal = normal_exact.adapt("probe", **row)
    tribe_mean = mixture_exact.global_samples["mu"].mean(axis=(0, 1))[0]
    personal_mixture = mixture.personal_summary().loc["probe", "theta_mean"]
    personal_normal = normal.personal_summary().loc["probe", "theta_mean"]
    assert tribe_mean < personal_mixture < -2.5 - 0.3  # toward -4, a sizeable step
    assert -2.5 < personal_normal  # toward the grand mean
    assert membership(mixture).loc["probe", 0] > 0.95
    # the same holds for the clients in the fit: a client's shrinkage points at its tribe
    summary = mixture_exact.personal_summary()["theta_mean"].to_numpy()
    data = mixture_exact.data
    raw = np.array([np.mean(data[c]["y"]) for c in data.client_ids])
    tribe = membership(mixture_exact).to_numpy().argmax(axis=1)
    toward = np.sign(mu_of(mixture_exact)[tribe] - raw) == np.sign(summary - raw)
    assert np.mean(toward) >= 0.9


def mu_of(fit):
    return fit.global_samples["mu"].mean(axis=(0, 1))


def test_exact_fit_exports_predicts_and_summarizes(mixture_exact, separated):
    idata = mixture_exact.to_arviz()
    for name in ("weights", "mu", "tau"):
        assert idata.posterior[name].dims == ("chain", "draw", "component")
    assert idata.posterior["theta"].dims == ("chain", "draw", "client")
    assert list(idata.posterior["component"].values) == [0, 1]
    assert idata.log_likelihood["y"].sizes["obs"] == separated.train.num_obs
    summary = mixture_exact.personal_summary()
    assert list(summary.columns) == ["n_obs", "theta_mean", "theta_sd"]
    draws = mixture_exact.posterior_samples(["client000"])["theta"]
    np.testing.assert_allclose(
        summary.loc["client000", "theta_mean"], draws.mean(), atol=4 * draws.std() / 30
    )
    with pytest.raises(hf.DataError, match=r"client 'client000', field 'sigma', row 1"):
        mixture_exact.predict("client000", sigma=[1.0, -1.0])
    known = mixture_exact.predict("client000", sigma=[1.0, 1.0])["y"]
    assert known.shape == (mixture_exact.num_draws, 2)
    # the population predictive of a new client is bimodal: mass near both tribes, little
    # between them
    new = mixture_exact.predict("new", sigma=[0.1], key=0)["y"][:, 0]
    assert np.mean(np.abs(new) < 1.5) < 0.1 and 0.3 < np.mean(new > 0) < 0.7


def test_one_tribe_and_fixed_weights_fit_end_to_end(separated, tiny):
    # one tribe: the weights are fixed at 1 (a fixed simplex value through the engine)
    one = hf.fit(NormalMixture(num_components=1), separated.train, **tiny)
    assert set(one.global_samples) == {"mu", "tau"}
    assert one.global_samples["mu"].shape == (1, 100, 1)
    assert np.all(membership(one).to_numpy() == 1.0)
    assert (
        one.to_arviz(posterior_predictive=False, log_likelihood=False).posterior["tau"].dims[-1]
        == "component"
    )


def test_initial_globals_cluster_the_clients_first_gradient_steps(mixture_family, separated):
    start = mixture_family.initial_globals(separated.train)
    assert set(start) == {"weights", "mu", "tau"}
    np.testing.assert_allclose(start["mu"], SEPARATED["means"], atol=1.0)
    np.testing.assert_allclose(start["weights"].sum(), 1.0)
    assert np.all(start["tau"] > 0) and np.all(np.diff(start["mu"]) > 0)
    fixed = NormalMixture(num_components=2, priors={"weights": [0.3, 0.7]})
    np.testing.assert_array_equal(fixed.initial_globals(separated.train)["weights"], [0.3, 0.7])


@pytest.mark.slow
def test_exact_agrees_with_centralized_nuts(mixture_family, separated, mixture_exact):
    nuts = hf.fit(
        mixture_family, separated.train, method="nuts", seed=2, target_accept=0.95, **FAST
    )
    for name in ("weights", "mu", "tau"):
        assert_posteriors_agree(mixture_exact.global_samples[name], nuts.global_samples[name], name)
    some = list(separated.train.client_ids[:8])
    assert_posteriors_agree(
        mixture_exact.posterior_samples(some)["theta"],
        nuts.posterior_samples(some)["theta"],
        "theta",
    )
    np.testing.assert_allclose(
        membership(mixture_exact).to_numpy(), membership(nuts).to_numpy(), atol=0.05
    )


@pytest.mark.slow
def test_the_demonstration_runs_at_tiny_size():
    frame = demo.compare([0], num_clients=8, settings=TINY)
    assert list(frame["model"]) == ["complete pooling", "one Gaussian", "tribes"]
    assert np.all(np.isfinite(frame[["heldout_rmse", "heldout_lpd", "theta_rmse"]]))
    assert frame["membership_accuracy"].notna().sum() == 1


@pytest.mark.slow
def test_federated_ep_fits_the_tribes_close_to_the_exact_posterior(mixture_family, separated):
    """EP (Laplace tilted inference, message passing on any NumPyro model) on the mixture's
    model agrees with the exact engine: weights and tribe means within 0.25 posterior sd, the
    tribes' spreads within 0.5 sd (Laplace EP puts a skewed scale near its mode), and every
    client's theta within 0.25 sd and its sd within 25%."""
    exact = hf.fit(mixture_family, separated.train, method="exact", seed=3, num_samples=2000)
    ep = hf.fit(mixture_family, separated.train, method="ep", tilted="laplace", seed=3)
    for name, tolerance in (("weights", 0.25), ("mu", 0.25), ("tau", 0.5)):
        reference = np.asarray(exact.global_samples[name], np.float64).reshape(-1, 2)
        approximate = np.asarray(ep.global_samples[name], np.float64).reshape(-1, 2)
        shift = np.abs(approximate.mean(0) - reference.mean(0)) / reference.std(0)
        assert np.all(shift < tolerance), (name, shift)
    reference = exact.personal_summary()
    approximate = ep.personal_summary()
    shift = np.abs(approximate["theta_mean"] - reference["theta_mean"]) / reference["theta_sd"]
    assert shift.max() < 0.25, shift.max()
    np.testing.assert_allclose(approximate["theta_sd"], reference["theta_sd"], rtol=0.25)
