"""Priors on the global parameters: NumPyro distributions, log-scale priors, fixed values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import hierfl as hf
from hierfl.priors import Parameter, PriorError, resolve_priors, sample_globals

POSITIVE_PRIORS = {
    "HalfNormal": dist.HalfNormal(2.0),
    "HalfCauchy": dist.HalfCauchy(5.0),
    "Uniform": dist.Uniform(0.0, 20.0),
    "LogNormal": dist.LogNormal(0.0, 1.0),
    "Exponential": dist.Exponential(1.0),
}


def _trace(priors):
    return handlers.trace(handlers.seed(sample_globals, rng_seed=0)).get_trace(priors)


@pytest.mark.parametrize("name", sorted(POSITIVE_PRIORS))
def test_positive_prior_becomes_the_sample_site(name):
    prior = POSITIVE_PRIORS[name]
    family = hf.NormalNormal(priors={"mu": dist.Normal(1.0, 2.0), "tau": prior})
    trace = _trace(family.priors)
    assert trace["tau"]["type"] == "sample"
    assert isinstance(trace["tau"]["fn"], type(prior))
    value = jnp.asarray(1.3)
    np.testing.assert_allclose(trace["tau"]["fn"].log_prob(value), prior.log_prob(value))
    np.testing.assert_allclose(trace["mu"]["fn"].log_prob(0.5), dist.Normal(1.0, 2.0).log_prob(0.5))
    assert family.global_sites == ("mu", "tau")


def test_default_priors_are_used_where_the_user_gives_none():
    family = hf.NormalNormal(priors={"mu": dist.Normal(0.0, 1.0)})
    trace = _trace(family.priors)
    assert isinstance(trace["tau"]["fn"], dist.HalfCauchy)


def test_log_scale_prior_samples_log_and_records_the_parameter():
    family = hf.NormalNormal(priors={"log_tau": dist.Normal(-1.0, 0.5)})
    trace = _trace(family.priors)
    assert trace["log_tau"]["type"] == "sample"
    assert trace["tau"]["type"] == "deterministic"
    np.testing.assert_allclose(trace["tau"]["value"], np.exp(trace["log_tau"]["value"]), rtol=1e-6)
    assert family.global_sites == ("mu", "tau")
    assert "log_tau~Normal" in repr(family)


def test_fixed_value_is_not_sampled():
    family = hf.NormalNormal(priors={"tau": 0.0})
    trace = _trace(family.priors)
    assert "tau" not in trace
    assert family.global_sites == ("mu",)
    phi = handlers.seed(family.sample_globals, rng_seed=0)()
    assert float(phi["tau"]) == 0.0


def test_vector_parameter_gets_a_scalar_prior_expanded_and_fixed_values_broadcast():
    family = hf.LinearMixed(
        fixed=["x"], random=["x"], priors={"tau": dist.HalfNormal(1.0), "beta": 0.5}
    )
    trace = _trace(family.priors)
    assert trace["tau"]["fn"].event_shape == (2,)
    assert trace["tau"]["value"].shape == (2,)
    phi = handlers.seed(family.sample_globals, rng_seed=0)()
    np.testing.assert_array_equal(phi["beta"], [0.5, 0.5])


def test_vector_prior_with_matching_batch_shape_becomes_one_event():
    prior = dist.Normal(jnp.array([0.0, 1.0]), jnp.array([1.0, 2.0]))
    (resolved, *_) = resolve_priors((Parameter("beta", "real", (2,)),), {}, {"beta": prior})
    assert resolved.distribution.event_shape == (2,)
    assert resolved.distribution.batch_shape == ()


def test_multivariate_prior_on_coefficients():
    prior = dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2))
    family = hf.LinearMixed(fixed=["x"], priors={"beta": prior})
    assert _trace(family.priors)["beta"]["value"].shape == (2,)


def test_user_priors_reach_the_exact_posterior(eight_schools_data, tiny):
    # a sharp prior on mu dominates eight noisy schools; tau = exp(log_tau) in every draw
    family = hf.NormalNormal(
        priors={"mu": dist.Normal(100.0, 0.01), "log_tau": dist.Normal(-3.0, 0.1)}
    )
    fit = hf.fit(family, eight_schools_data, **tiny)
    draws = fit.global_samples
    assert set(draws) == {"mu", "log_tau", "tau"}
    np.testing.assert_allclose(draws["tau"], np.exp(draws["log_tau"]), rtol=1e-5)
    assert abs(draws["mu"].mean() - 100.0) < 0.01
    assert abs(draws["log_tau"].mean() + 3.0) < 0.3


def test_bounded_prior_maps_the_unconstrained_line_into_its_support():
    # NUTS on phi runs on the unconstrained line; a Uniform(0, 1) prior's support must map
    # every point of it into (0, 1), with a finite prior density there
    from numpyro.distributions.transforms import biject_to

    family = hf.NormalNormal(priors={"mu": dist.Normal(0.0, 5.0), "tau": dist.Uniform(0.0, 1.0)})
    (prior,) = [r.distribution for r in family.priors if r.parameter.name == "tau"]
    transform = biject_to(prior.support)
    z = jnp.array([-30.0, -1.0, 0.0, 2.0, 30.0])
    tau = transform(z)
    assert jnp.all((tau >= 0.0) & (tau <= 1.0))
    assert jnp.all(jnp.isfinite(prior.log_prob(jnp.clip(tau, 1e-6, 1 - 1e-6))))


# ---------------------------------------------------------------------- rejected priors
@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: hf.NormalNormal(priors={"tau": dist.Normal(0.0, 1.0)}),
            r"prior for 'tau' has support .* 'tau' must be positive; use 'log_tau'",
        ),
        (
            lambda: hf.NormalNormal(priors={"tau": dist.Uniform(-1.0, 1.0)}),
            r"prior for 'tau' has support",
        ),
        (lambda: hf.NormalNormal(priors={"mu": dist.Poisson(3.0)}), r"prior for 'mu' is discrete"),
        (
            lambda: hf.NormalNormal(priors={"log_tau": dist.Poisson(3.0)}),
            r"prior for 'log_tau' is discrete",
        ),
        (
            lambda: hf.BetaBinomial(priors={"mean": dist.Uniform(0.0, 2.0)}),
            r"prior for 'mean' has support .* must be unit",
        ),
        (lambda: hf.BetaBinomial(priors={"mean": dist.Normal(0.5, 0.1)}), r"prior for 'mean'"),
        (
            lambda: hf.NormalNormal(priors={"sigma": dist.HalfNormal(1.0)}),
            r"unknown parameter 'sigma'",
        ),
        (
            lambda: hf.NormalNormal(priors={"log_mu": dist.Normal(0.0, 1.0)}),
            r"'log_mu': a log-scale prior needs a positive parameter",
        ),
        (
            lambda: hf.NormalNormal(
                priors={"tau": dist.HalfNormal(1.0), "log_tau": dist.Normal(0.0, 1.0)}
            ),
            r"two priors for 'tau'",
        ),
        (
            lambda: hf.NormalNormal(priors={"log_tau": 0.0}),
            r"'log_tau' must be a NumPyro distribution",
        ),
        (
            lambda: hf.LinearMixed(fixed=["x"], priors={"beta": dist.Normal(jnp.zeros(3), 1.0)}),
            r"prior for 'beta': batch shape \(3,\) does not fit parameter shape \(2,\)",
        ),
        (
            lambda: hf.LinearMixed(
                fixed=["x"], priors={"beta": dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3))}
            ),
            r"prior for 'beta': event shape \(3,\)",
        ),
        (
            lambda: hf.LinearMixed(fixed=["x"], priors={"tau": dist.HalfNormal(jnp.ones(2))}),
            r"prior for 'tau': batch shape \(2,\)",
        ),
        (
            lambda: hf.LinearMixed(fixed=["x"], priors={"beta": [1.0, 2.0, 3.0]}),
            r"fixed value of 'beta' has shape \(3,\)",
        ),
        (lambda: hf.NormalNormal(priors={"tau": -1.0}), r"fixed value of 'tau' must be >= 0"),
        (lambda: hf.LinearMixed(priors={"sigma": -0.5}), r"fixed value of 'sigma' must be >= 0"),
        (
            lambda: hf.NormalNormal(priors={"tau": float("nan")}),
            r"fixed value of 'tau' must be finite",
        ),
        (lambda: hf.NormalNormal(priors={"mu": np.inf}), r"fixed value of 'mu' must be finite"),
        (
            lambda: hf.BetaBinomial(priors={"mean": 1.0}),
            r"fixed value of 'mean' must lie in \(0, 1\)",
        ),
        (
            lambda: hf.NormalNormal(priors={"tau": "wide"}),
            r"prior for 'tau' must be a NumPyro distribution or a number",
        ),
        (
            lambda: hf.NormalNormal(priors={"tau": dist.HalfNormal}),
            r"prior for 'tau': got the class HalfNormal",
        ),
        (lambda: hf.NormalNormal(priors=[("tau", 1.0)]), r"priors must be a dict"),
    ],
    ids=[
        "normal-on-tau",
        "uniform-straddling-zero",
        "discrete-on-mu",
        "discrete-on-log-tau",
        "uniform-beyond-unit",
        "normal-on-unit",
        "unknown-name",
        "log-of-real",
        "tau-and-log-tau",
        "log-fixed",
        "batch-shape",
        "event-shape",
        "scalar-tau-vector-prior",
        "fixed-shape",
        "negative-tau",
        "negative-sigma",
        "nan-fixed",
        "inf-fixed",
        "unit-boundary",
        "string",
        "class-not-instance",
        "not-a-dict",
    ],
)
def test_bad_priors_rejected_naming_the_parameter(make, pattern):
    with pytest.raises(PriorError, match=pattern):
        make()


def test_prior_error_is_a_value_error():
    assert issubclass(PriorError, ValueError)
    assert hf.PriorError is PriorError


def test_sample_globals_inside_a_model_gives_the_prior_density():
    family = hf.NormalNormal(priors={"mu": dist.Normal(1.0, 2.0), "tau": dist.HalfNormal(3.0)})

    def model():
        family.sample_globals()

    values = {"mu": jnp.asarray(0.3), "tau": jnp.asarray(0.7)}
    log_joint, _ = numpyro.infer.util.log_density(model, (), {}, values)
    expected = dist.Normal(1.0, 2.0).log_prob(0.3) + dist.HalfNormal(3.0).log_prob(0.7)
    np.testing.assert_allclose(log_joint, expected, rtol=1e-6)
    assert jax.numpy.isfinite(log_joint)
