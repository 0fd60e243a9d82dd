"""Correlated random effects in ``LinearMixed`` (lme4's ``(x | g)``): the Woodbury forms
against dense Gaussian algebra (float64), the diagonal model as the case L = I, sleepstudy's
``Reaction ~ Days + (Days | Subject)`` against lme4's REML figures, and the exact engine
against centralized NUTS on the same model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from conftest import FAST, Z, assert_posteriors_agree, linear_mixed_designs, mcse_of_mean
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy import stats
from scipy.optimize import minimize

import hierfl as hf
from hierfl.data import ModelData
from hierfl.engines.exact import x64
from models import sleepstudy

#: a REML estimate is the mode of the marginal posterior of the variance components under flat
#: priors; an sd's posterior (18 subjects) is right-skewed, its median about a fifth of a
#: posterior sd above the mode (see tests/test_lme4_models.py): allow 0.4 posterior sd, as
#: there. Measured over seeds 1..3: 0.10..0.37.
REML_TOLERANCE_SD = 0.4
#: the fixed effects and the correlation have nearly symmetric posteriors: median within a
#: quarter of a posterior sd of REML (measured: at most 0.05)
SYMMETRIC_TOLERANCE_SD = 0.25


# ---------------------------------------------------------------------- helpers
def _client(n=9, seed=1):
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=n), rng.normal(size=n)
    return {"y": 0.5 + 1.2 * x - 0.3 * w + rng.normal(size=n) * 1.5, "x": x, "w": w}


def _random_cholesky(q, seed):
    """Lower Cholesky factor of a random correlation matrix with sizeable correlations."""
    a = np.random.default_rng(seed).normal(size=(q, q + 1))
    covariance = a @ a.T
    scale = np.sqrt(np.diag(covariance))
    return np.linalg.cholesky(covariance / np.outer(scale, scale))


#: designs with two and three correlated effects
CASES = {
    "intercept+slope": dict(fixed=["x", "w"], random=["x"]),
    "three effects": dict(fixed=["x", "w"], random=["x", "w"]),
    "two slopes": dict(fixed=["x"], random=["x", "w"], random_intercept=False),
}


def _phi(family, seed=0, tau=None):
    q = family.num_effects
    return {
        "beta": np.linspace(0.4, -0.2, family.num_coefficients),
        "sigma": 0.9,
        "tau": np.linspace(0.8, 0.5, q) if tau is None else np.asarray(tau, float),
        family.correlation_cholesky_site: _random_cholesky(q, seed),
    }


def _jnp(record):
    return {k: jnp.asarray(np.asarray(v), dtype=jnp.float64) for k, v in record.items()}


def _statistics(family, fields):
    fields = _jnp(fields)
    return family.statistics(fields, jnp.ones(fields["y"].shape[0], dtype=bool))


def _dense(family, phi, fields):
    """Mean X beta, random-effects covariance G and marginal covariance sigma^2 I + Z G Z'."""
    x, z = linear_mixed_designs(family, fields)
    factor = np.asarray(phi["tau"])[:, None] * phi[family.correlation_cholesky_site]
    g = factor @ factor.T
    covariance = phi["sigma"] ** 2 * np.eye(len(fields["y"])) + z @ g @ z.T
    return x @ phi["beta"], z, g, covariance


# ---------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_log_marginal_is_the_dense_multivariate_normal(case, seed):
    family = hf.LinearMixed(**CASES[case], correlated=True)
    client, phi = _client(seed=seed + 3), _phi(family, seed)
    with x64():
        value = float(family.log_marginal(_jnp(phi), _statistics(family, client)))
    mean, _, _, covariance = _dense(family, phi, client)
    expected = stats.multivariate_normal(mean, covariance).logpdf(client["y"])
    np.testing.assert_allclose(value, expected, rtol=1e-9)


def test_log_marginal_with_a_zero_spread_is_exact():
    """tau_k = 0 makes G singular; the Woodbury form stays exact (the dense density exists)."""
    family = hf.LinearMixed(**CASES["three effects"], correlated=True)
    client, phi = _client(), _phi(family, 2, tau=[0.8, 0.0, 0.4])
    with x64():
        value = float(family.log_marginal(_jnp(phi), _statistics(family, client)))
    mean, _, _, covariance = _dense(family, phi, client)
    expected = stats.multivariate_normal(mean, covariance).logpdf(client["y"])
    np.testing.assert_allclose(value, expected, rtol=1e-9)


def test_total_log_marginal_is_the_sum_over_received_clients():
    family = hf.LinearMixed(**CASES["three effects"], correlated=True)
    phi = _phi(family, 4)
    clients = [_client(n=n, seed=s) for s, n in enumerate([5, 9, 3, 12, 7])]
    width = max(len(c["y"]) for c in clients)
    padded = {
        k: np.stack([np.pad(c[k], (0, width - len(c[k]))) for c in clients])
        for k in ("y", "x", "w")
    }
    mask = np.stack([np.arange(width) < len(c["y"]) for c in clients])
    received = np.array([True, True, False, True, True])
    with x64():
        statistics = jax.vmap(family.statistics)(_jnp(padded), jnp.asarray(mask))
        server = family.server_statistics(statistics, jnp.asarray(received))
        total = float(family.total_log_marginal(_jnp(phi), server))
        terms = [
            float(family.log_marginal(_jnp(phi), _statistics(family, c)))
            for c, keep in zip(clients, received, strict=True)
            if keep
        ]
    np.testing.assert_allclose(total, sum(terms), rtol=1e-12)
    dense = sum(
        stats.multivariate_normal(*_dense(family, phi, c)[::3]).logpdf(c["y"])
        for c, keep in zip(clients, received, strict=True)
        if keep
    )
    np.testing.assert_allclose(total, dense, rtol=1e-9)


@pytest.mark.parametrize("case", sorted(CASES))
def test_conditional_is_dense_gaussian_conditioning(case):
    """b | y ~ N(G Z' V^-1 r, G - G Z' V^-1 Z G) with V = sigma^2 I + Z G Z'."""
    family = hf.LinearMixed(**CASES[case], correlated=True)
    client, phi = _client(), _phi(family, 5)
    with x64():
        posterior = family.conditional(_jnp(phi), _statistics(family, client))
        mean, covariance = np.asarray(posterior.mean), np.asarray(posterior.covariance_matrix)
    location, z, g, v = _dense(family, phi, client)
    gain = g @ z.T @ np.linalg.inv(v)
    np.testing.assert_allclose(mean, gain @ (client["y"] - location), rtol=1e-9, atol=1e-12)
    # (the family adds 1e-10 to the diagonal: hf.families.CONDITIONAL_JITTER)
    np.testing.assert_allclose(covariance, g - gain @ z @ g, rtol=1e-8, atol=1e-9)


def test_prior_and_model_are_the_population_distribution():
    """prior(phi) is N(0, G); the model's client site is the same distribution, and its joint
    density is the collapsed one times the conditional: log p(y, b) = log p(y) + log p(b | y)."""
    family = hf.LinearMixed(**CASES["intercept+slope"], correlated=True)
    phi = _phi(family, 6)
    fixed = hf.LinearMixed(**CASES["intercept+slope"], correlated=True, priors=phi)
    client = _client()
    n = len(client["y"])
    data = ModelData({k: np.asarray(v) for k, v in client.items()}, np.zeros(n, np.int32), 1)
    _, _, g, _ = _dense(family, phi, client)
    points = np.random.default_rng(0).normal(size=(4, 2))
    with x64():
        prior = fixed.prior(_jnp(phi))
        np.testing.assert_allclose(prior.covariance_matrix, g, rtol=1e-12)
        statistics = _statistics(fixed, client)
        collapsed = float(fixed.log_marginal(_jnp(phi), statistics))
        conditional = fixed.conditional(_jnp(phi), statistics)
        for b in points:
            joint = log_density(fixed.model, (data,), {}, {"b": jnp.asarray(b)[None]})[0]
            expected = collapsed + float(conditional.log_prob(jnp.asarray(b)))
            np.testing.assert_allclose(float(joint), expected, rtol=1e-8)
            np.testing.assert_allclose(
                float(fixed._affine_prior(_jnp(phi)).log_prob(b)),
                stats.multivariate_normal(np.zeros(2), g).logpdf(b),
                rtol=1e-10,
            )


def test_identity_correlation_is_the_diagonal_model():
    """With L = I fixed, every closed form is the diagonal model's (to rounding: bit-equal
    or within a few ulps)."""
    spec = CASES["three effects"]
    diagonal = hf.LinearMixed(**spec)
    correlated = hf.LinearMixed(**spec, correlated=True, priors={"correlation_cholesky": np.eye(3)})
    assert correlated.global_sites == ("beta", "sigma", "tau")
    phi = _phi(diagonal, 0)
    phi[correlated.correlation_cholesky_site] = np.eye(3)
    clients = [_client(n=n, seed=s) for s, n in enumerate([6, 6, 6])]
    stacked = {k: np.stack([c[k] for c in clients]) for k in ("y", "x", "w")}
    with x64():
        p = _jnp(phi)
        for c in clients:
            s = _statistics(diagonal, c)
            np.testing.assert_allclose(
                correlated.log_marginal(p, s), diagonal.log_marginal(p, s), rtol=1e-14
            )
            a, b = correlated.conditional(p, s), diagonal.conditional(p, s)
            np.testing.assert_allclose(a.mean, b.mean, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(
                a.covariance_matrix, b.covariance_matrix, rtol=1e-13, atol=1e-15
            )
        statistics = jax.vmap(diagonal.statistics)(_jnp(stacked), jnp.ones((3, 6), bool))
        server = diagonal.server_statistics(statistics, jnp.ones(3, bool))
        np.testing.assert_allclose(
            correlated.total_log_marginal(p, server),
            diagonal.total_log_marginal(p, server),
            rtol=1e-14,
        )
        point = jnp.asarray([0.3, -1.0, 0.5])
        np.testing.assert_allclose(
            correlated.prior(p).log_prob(point), diagonal.prior(p).log_prob(point), rtol=1e-13
        )


def test_reparameterized_model_is_non_centred():
    """For NUTS the client site is b = F u with u ~ N(0, I) (NumPyro's TransformReparam)."""
    family = hf.LinearMixed(**CASES["intercept+slope"], correlated=True)
    data = hf.ClientData.from_dict({c: _client(seed=i) for i, c in enumerate("abc")}).batch()
    model = handlers.reparam(family.model, config=family.reparam_config())
    trace = handlers.trace(handlers.seed(model, 0)).get_trace(data)
    u = trace["b_base"]
    assert u["type"] == "sample" and u["value"].shape == (3, 2)
    np.testing.assert_allclose(  # standard normals in the client plate
        u["fn"].log_prob(u["value"]), stats.norm.logpdf(u["value"]).sum(-1), rtol=1e-5
    )
    assert trace["b"]["type"] == "deterministic"
    factor = trace["tau"]["value"][:, None] * trace["correlation_cholesky"]["value"]
    np.testing.assert_allclose(trace["b"]["value"], u["value"] @ factor.T, rtol=1e-5, atol=1e-6)
    omega = trace["correlation"]["value"]
    np.testing.assert_allclose(np.diag(omega), 1.0, rtol=1e-6)


def test_declares_dims_coords_and_priors():
    family = hf.LinearMixed(fixed=["x"], random=["x"], correlated=True)
    assert family.dims() == {
        "beta": ["coef"],
        "tau": ["effect"],
        "b": ["client", "effect"],
        "correlation_cholesky": ["effect_row", "effect_column"],
        "correlation": ["effect_row", "effect_column"],
    }
    coords = family.coords()
    assert coords["effect_row"] == coords["effect_column"] == ["intercept", "x"]
    prior = next(r for r in family.priors if r.parameter.name == "correlation_cholesky")
    assert isinstance(prior.distribution, dist.LKJCholesky)
    assert float(prior.distribution.concentration) == 2.0
    assert prior.distribution.event_shape == (2, 2)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(correlated=True), ValueError, r"needs at least two random effects.*'intercept'"),
        (
            dict(random=["x"], priors={"correlation_cholesky": dist.LKJCholesky(2, 1.0)}),
            hf.PriorError,
            r"'correlation_cholesky'.*correlated=True",
        ),
        (
            dict(random=["x"], correlated=True, priors={"correlation_cholesky": dist.Normal()}),
            hf.PriorError,
            r"prior for 'correlation_cholesky'.*LKJCholesky",
        ),
        (
            dict(random=["x"], correlated=True, priors={"correlation_cholesky": dist.LKJ(2)}),
            hf.PriorError,
            r"prior for 'correlation_cholesky'.*Cholesky factor of a correlation matrix",
        ),
        (
            dict(
                random=["x"], correlated=True, priors={"correlation_cholesky": dist.LKJCholesky(3)}
            ),
            hf.PriorError,
            r"prior for 'correlation_cholesky': event shape \(3, 3\), parameter has shape",
        ),
        (
            dict(
                random=["x"],
                correlated=True,
                priors={"correlation_cholesky": [[1.0, 0.0], [0.5, 0.5]]},
            ),
            hf.PriorError,
            r"fixed value of 'correlation_cholesky' must be the lower Cholesky factor",
        ),
        (
            dict(random=["x"], correlated=True, priors={"correlation_cholesky": 1.0}),
            hf.PriorError,
            r"fixed value of 'correlation_cholesky'.*numpy.eye\(2\)",
        ),
        (
            dict(random=["x"], correlated=True, priors={"log_correlation_cholesky": dist.Normal()}),
            hf.PriorError,
            r"'log_correlation_cholesky'.*positive parameter",
        ),
    ],
    ids=[
        "one-effect",
        "prior-without-option",
        "real-prior",
        "lkj-on-the-matrix",
        "wrong-dimension",
        "not-unit-rows",
        "scalar",
        "log-form",
    ],
)
def test_bad_options_and_priors_are_refused_naming_the_parameter(options, error, message):
    with pytest.raises(error, match=message):
        hf.LinearMixed(fixed=["x"], **options)


def test_sleepstudy_correlated_needs_the_slope():
    with pytest.raises(ValueError, match="needs slopes=True"):
        sleepstudy.family(slopes=False, correlated=True)
    assert sleepstudy.family(correlated=True).correlated


def test_a_fixed_correlation_is_accepted():
    rho = 0.5
    cholesky = np.array([[1.0, 0.0], [rho, np.sqrt(1 - rho**2)]])
    family = hf.LinearMixed(
        fixed=["x"], random=["x"], correlated=True, priors={"correlation_cholesky": cholesky}
    )
    assert "correlation_cholesky" not in family.global_sites
    assert "correlation_cholesky=" in repr(family)


# ---------------------------------------------------------------------- sleepstudy
def _sleepstudy_reml():
    """REML estimates of ``Reaction ~ Days + (Days | Subject)`` by direct maximization of the
    restricted likelihood (dense 10 x 10 covariances per subject): sigma, tau (2), rho, beta,
    and the standard errors of beta."""
    data = sleepstudy.load()
    subjects = [
        (
            np.column_stack([np.ones(10), data[c]["Days"]]).astype(np.float64),
            np.asarray(data[c]["Reaction"], np.float64),
        )
        for c in data.client_ids
    ]

    def restricted(parameters):
        log_sigma, log_tau_0, log_tau_1, atanh_rho = parameters
        tau, rho = np.exp([log_tau_0, log_tau_1]), np.tanh(atanh_rho)
        g = np.outer(tau, tau) * np.array([[1.0, rho], [rho, 1.0]])
        information, score, log_det, inverses = np.zeros((2, 2)), np.zeros(2), 0.0, []
        for x, y in subjects:
            v = np.exp(2 * log_sigma) * np.eye(len(y)) + x @ g @ x.T
            inverse = np.linalg.inv(v)
            log_det += np.linalg.slogdet(v)[1]
            information += x.T @ inverse @ x
            score += x.T @ inverse @ y
            inverses.append(inverse)
        beta = np.linalg.solve(information, score)
        quadratic = sum(
            (y - x @ beta) @ inverse @ (y - x @ beta)
            for (x, y), inverse in zip(subjects, inverses, strict=True)
        )
        value = 0.5 * (log_det + np.linalg.slogdet(information)[1] + quadratic)
        return value, beta, np.sqrt(np.diag(np.linalg.inv(information)))

    best = minimize(
        lambda p: restricted(p)[0],
        np.array([np.log(30.0), np.log(30.0), np.log(5.0), 0.0]),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20_000, "maxfev": 20_000},
    )
    _, beta, standard_errors = restricted(best.x)
    return {
        "sigma": float(np.exp(best.x[0])),
        "tau": np.exp(best.x[1:3]),
        "rho": float(np.tanh(best.x[3])),
        "beta": beta,
        "standard_errors": standard_errors,
    }


@pytest.fixture(scope="module")
def reml():
    return _sleepstudy_reml()


def test_reml_reproduces_lme4(reml):
    """lme4's published REML fit of ``(Days | Subject)`` (sleepstudy.LME4, to its 3 decimals;
    standard errors 6.825 and 1.546)."""
    published = sleepstudy.LME4["correlated slope"]
    np.testing.assert_allclose(
        reml["beta"], [sleepstudy.LME4["intercept"], sleepstudy.LME4["Days"]], atol=1e-3
    )
    np.testing.assert_allclose(reml["tau"], published["tau"], atol=1e-3)
    assert reml["rho"] == pytest.approx(published["correlation"], abs=1e-3)
    assert reml["sigma"] == pytest.approx(published["sigma"], abs=1e-3)
    np.testing.assert_allclose(reml["standard_errors"], [6.825, 1.546], atol=1e-3)


@pytest.fixture(scope="module")
def sleep_correlated():
    return hf.fit(
        sleepstudy.family(correlated=True), sleepstudy.load(), method="exact", seed=1, **FAST
    )


def _median_gap(draws, value):
    draws = np.asarray(draws, np.float64)
    return np.abs(np.median(draws, axis=(0, 1)) - value) / draws.std(axis=(0, 1))


def test_sleepstudy_exact_matches_lme4_reml(sleep_correlated, reml):
    fit = sleep_correlated
    draws = fit.global_samples
    for name, value, tolerance in [
        ("sigma", reml["sigma"], REML_TOLERANCE_SD),
        ("tau", reml["tau"], REML_TOLERANCE_SD),
        ("beta", reml["beta"], SYMMETRIC_TOLERANCE_SD),
    ]:
        gap = _median_gap(draws[name], value)
        assert np.all(gap < tolerance), (name, gap)
    correlation = draws["correlation"]
    gap = _median_gap(correlation[..., 0, 1], reml["rho"])
    assert gap < SYMMETRIC_TOLERANCE_SD, gap
    np.testing.assert_array_equal(correlation[..., 0, 1], correlation[..., 1, 0])
    np.testing.assert_allclose(correlation[..., [0, 1], [0, 1]], 1.0, rtol=1e-5)
    # the balanced design: the posterior mean of beta is OLS (= lme4's) up to Monte Carlo error
    beta = np.asarray(draws["beta"], np.float64)
    np.testing.assert_array_less(
        np.abs(beta.mean(axis=(0, 1)) - reml["beta"]), Z * mcse_of_mean(beta) + 0.05
    )
    # the slope's posterior sd is lme4's standard error widened by the uncertainty of the
    # variance components (measured 1.05..1.12 times over seeds 1..3)
    assert 1.0 < beta[..., 1].std() / reml["standard_errors"][1] < 1.2
    assert fit.diagnostics["divergences"] == 0 and fit.diagnostics["max_r_hat"] < 1.05


def test_sleepstudy_correlated_fit_api(sleep_correlated):
    fit = sleep_correlated
    idata = fit.to_arviz()
    posterior = idata.posterior
    assert posterior["correlation"].dims == ("chain", "draw", "effect_row", "effect_column")
    assert posterior["correlation_cholesky"].dims == posterior["correlation"].dims
    assert posterior["b"].dims == ("chain", "draw", "client", "effect")
    assert list(posterior["effect_row"].values) == ["intercept", "Days"]
    rho = posterior["correlation"].sel(effect_row="intercept", effect_column="Days")
    assert rho.shape == (FAST["num_chains"], FAST["num_samples"])
    assert idata.log_likelihood["Reaction"].shape[-1] == 180
    summary = fit.personal_summary()
    assert list(summary.columns) == [
        "n_obs",
        "b[intercept]_mean",
        "b[intercept]_sd",
        "b[Days]_mean",
        "b[Days]_sd",
    ]
    # a subject's predictive mean is its own line: population line plus its effects
    mean_b = fit.personal["b"][0][0]
    beta = fit.global_samples["beta"].mean(axis=(0, 1))
    mu = fit.predict(308, Days=[0.0, 9.0])["mu"].mean(axis=0)
    np.testing.assert_allclose(
        mu, beta[0] + mean_b[0] + np.array([0, 9]) * (beta[1] + mean_b[1]), rtol=2e-3
    )
    new = fit.predict("new", Days=[0.0])["Reaction"]
    assert new.shape == (fit.num_draws, 1) and np.all(np.isfinite(new))
    adapted = fit.adapt("new", Reaction=[250.0, 262.0, 280.0], Days=[0.0, 1.0, 2.0])
    assert adapted.personal_summary().shape == (1, 5)
    assert adapted.diagnostics["pareto_k"] < 0.7


@pytest.mark.slow
def test_sleepstudy_exact_agrees_with_centralized_nuts(sleep_correlated):
    fit = sleep_correlated
    nuts = hf.fit(
        sleepstudy.family(correlated=True), sleepstudy.load(), method="nuts", seed=2, **FAST
    )
    assert nuts.diagnostics["divergences"] == 0
    for name in ("beta", "sigma", "tau"):
        assert_posteriors_agree(fit.global_samples[name], nuts.global_samples[name], name)
    assert_posteriors_agree(
        fit.global_samples["correlation"][..., 1, 0],
        nuts.global_samples["correlation"][..., 1, 0],
        "correlation",
    )
    assert_posteriors_agree(fit.posterior_samples()["b"], nuts.posterior_samples()["b"], "b")


# ---------------------------------------------------------------------- many clients
#: the truth of :func:`_correlated_clients`
TRUTH = {"beta": [1.0, 0.7], "sigma": 1.0, "tau": [0.8, 0.5], "rho": -0.5}


def _correlated_clients(num_clients, *, seed=0):
    """Ragged data from ``y = beta_0 + beta_1 x + b_i0 + b_i1 x + eps`` with correlated
    ``(b_i0, b_i1)`` (:data:`TRUTH`), 4 to 12 rows per client."""
    rng = np.random.default_rng(seed)
    tau, rho = np.asarray(TRUTH["tau"]), TRUTH["rho"]
    covariance = np.outer(tau, tau) * np.array([[1.0, rho], [rho, 1.0]])
    effects = rng.multivariate_normal(np.zeros(2), covariance, num_clients)
    clients = {}
    for i, n in enumerate(rng.integers(4, 13, num_clients)):
        x = rng.normal(size=n)
        line = np.asarray(TRUTH["beta"]) + effects[i]
        clients[f"c{i:04d}"] = {"y": line[0] + line[1] * x + rng.normal(0.0, 1.0, n), "x": x}
    return hf.ClientData.from_dict(clients)


@pytest.mark.slow
def test_laplace_server_handles_the_correlation_factor():
    """The server's Laplace approximation works in the unconstrained space of the Cholesky
    factor (NumPyro's CorrCholeskyTransform) as for any other global: with 1,500 clients it
    agrees with the server's NUTS and both recover the truth."""
    data = _correlated_clients(1500)
    family = hf.LinearMixed(fixed=["x"], random=["x"], correlated=True)
    laplace = hf.fit(family, data, server="laplace", seed=0, **FAST)
    nuts = hf.fit(family, data, server="nuts", seed=0, **FAST)
    assert laplace.diagnostics["pareto_k"] < 0.7
    for name in ("beta", "sigma", "tau", "correlation"):
        a, b = (np.asarray(f.global_samples[name], np.float64) for f in (laplace, nuts))
        if name == "correlation":
            a, b = a[..., 1, 0], b[..., 1, 0]
        sd = b.std(axis=(0, 1))
        gap = np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))) / sd
        assert np.all(gap < 0.15), (name, gap)
        assert np.all(np.abs(a.std(axis=(0, 1)) / sd - 1) < 0.15), name
    rho = laplace.global_samples["correlation"][..., 1, 0]
    assert abs(rho.mean() - TRUTH["rho"]) < 4 * rho.std()
