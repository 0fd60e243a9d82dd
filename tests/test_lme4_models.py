"""lme4's sleepstudy, VerbAgg and InstEval: loaders, pooling spectra, and fits checked against
published lme4 estimates, closed forms and centralized NUTS."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from conftest import FAST, TINY, Z, assert_posteriors_agree, mcse_of_mean
from numpyro import handlers

import hierfl as hf
from hierfl.fit import inspect_model
from models import insteval, sleepstudy, verbagg

SPECTRUM = ("no pooling", "complete pooling", "partial pooling")
MODULES = [sleepstudy, verbagg, insteval]

#: variance components: a Bayesian posterior is not a REML estimate. REML maximizes the
#: likelihood with the fixed effects integrated out under a flat prior, i.e. it is the *mode*
#: of the marginal posterior of (sigma, tau) under flat priors (ours are HalfNormal(100) on
#: parameters of 6..40 ms: flat to within a few percent there). An sd with 17 degrees of
#: freedom (18 subjects) has a right-skewed posterior whose median lies above the mode by
#: roughly a fifth of a posterior sd (for a scaled chi-square with 17 df, (median - mode) / sd
#: is about 0.23); allow 0.4 posterior sd for that, for the prior and for Monte Carlo error.
REML_TOLERANCE_SD = 0.4
#: the Normal(0, 1000) prior pulls a fixed effect toward 0 by (posterior var / prior var)
#: times its value: at most (11 / 1000)^2 * 252 = 0.03 ms
PRIOR_PULL = 0.05


# ---------------------------------------------------------------------- data and modules
def test_sleepstudy_data():
    frame = sleepstudy.frame()
    assert list(frame.columns) == ["Reaction", "Days", "Subject"]
    data = sleepstudy.load()
    assert data.num_clients == 18 and data.num_obs == 180
    assert data.client_ids[:3] == (308, 309, 310)
    np.testing.assert_array_equal(data.sizes, 10)
    np.testing.assert_array_equal(data[308]["Days"], np.arange(10.0))
    assert data[308]["Reaction"][0] == pytest.approx(249.56)
    assert data.fields["Reaction"].mean() == pytest.approx(298.5079, abs=1e-4)


def test_verbagg_data():
    data = verbagg.load()
    assert data.num_clients == 316 and data.num_obs == 7584
    np.testing.assert_array_equal(data.sizes, 24)
    assert data.client_ids[:3] == (1, 2, 3)
    assert int(data.fields["y"].sum()) == 3611  # r2 == "Y" in 3,611 of 7,584 responses
    # every item feature is balanced: 1/3 scold, 1/3 shout, 1/2 self, 1/2 do
    for name, share in (("scold", 1 / 3), ("shout", 1 / 3), ("self", 0.5), ("do", 0.5)):
        assert data.fields[name].mean() == pytest.approx(share), name
    first = np.cumsum(np.concatenate([[0], data.sizes[:-1]]))
    anger, male = data.fields["anger"][first], data.fields["male"][first]
    assert anger.mean() == pytest.approx(0.00316, abs=1e-5)  # Anger's mean is 20.003
    assert male.sum() == 73  # 73 of 316 persons are men
    # person-level fields are constant within a person
    assert np.all(np.repeat(anger, 24) == data.fields["anger"])


def test_insteval_data():
    frame = insteval.frame()
    assert tuple(frame.columns) == insteval.COLUMNS
    data = insteval.load()
    assert data.num_clients == 1128 and data.num_obs == 73421
    assert list(data.client_ids) == sorted(data.client_ids)
    assert (data.sizes.min(), data.sizes.max()) == (10, 792)
    assert set(np.unique(data.fields["y"])) == {1.0, 2.0, 3.0, 4.0, 5.0}
    with_service = insteval.load(fields=("y", "service"))
    assert set(with_service.field_names) == {"y", "service"}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_modules_document_their_model_and_run_their_examples(module):
    assert tuple(module.spectrum()) == SPECTRUM
    assert "math" in module.__doc__ and "PROVENANCE.md" in module.__doc__
    assert set(module.__all__) >= {"frame", "load", "spectrum"}
    assert all(hasattr(module, name) for name in module.__all__)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------- bad input
def test_nan_in_one_row_names_the_client_and_field():
    frame = sleepstudy.frame()
    frame.loc[(frame["Subject"] == 335) & (frame["Days"] == 3), "Reaction"] = np.nan
    with pytest.raises(hf.DataError, match=r"client 335, field 'Reaction': NaN at row 3"):
        sleepstudy.load(frame)
    frame = insteval.frame()
    row = frame.index[frame["d"] == 1002][4]
    frame.loc[row, "y"] = np.inf
    with pytest.raises(hf.DataError, match=r"client 1002, field 'y': infinite value at row 4"):
        insteval.load(frame)


def test_verbagg_response_must_be_binary():
    frame = verbagg.frame()
    frame.loc[(frame["id"] == 7) & (frame["item"] == "S1WantShout"), "y"] = 2
    with pytest.raises(hf.DataError, match=r"client 7, field 'y', row 2: must be 0 or 1 \(got 2\)"):
        verbagg.load(frame)


# ---------------------------------------------------------------------- sleepstudy
@pytest.fixture(scope="module")
def sleep_exact():
    """Exact fits of the random-intercept and the random-slope model."""
    data = sleepstudy.load()
    return {
        slopes: hf.fit(sleepstudy.family(slopes=slopes), data, method="exact", seed=1, **FAST)
        for slopes in (False, True)
    }


def _median_within_reml(draws, reml, name):
    draws = np.asarray(draws, np.float64)
    median, sd = np.median(draws, axis=(0, 1)), draws.std(axis=(0, 1))
    gap = np.abs(median - np.asarray(reml)) / sd
    assert np.all(gap < REML_TOLERANCE_SD), f"{name}: median {median} vs REML {reml} ({gap} sd)"


@pytest.mark.parametrize("slopes", [False, True], ids=["1|Subject", "Days||Subject"])
def test_sleepstudy_matches_lme4(sleep_exact, slopes):
    """Fixed effects equal lme4's 251.405 and 10.467 (the design is balanced, so the GLS
    estimate is OLS whatever the variance components, and the posterior mean of beta is it up
    to Monte Carlo error and the prior's pull); variance components near lme4's REML ones."""
    fit = sleep_exact[slopes]
    beta = fit.global_samples["beta"]
    lme4 = np.array([sleepstudy.LME4["intercept"], sleepstudy.LME4["Days"]])
    tolerance = Z * mcse_of_mean(beta) + PRIOR_PULL
    np.testing.assert_array_less(np.abs(beta.mean(axis=(0, 1)) - lme4), tolerance)
    reml = sleepstudy.LME4["random slope" if slopes else "random intercept"]
    _median_within_reml(fit.global_samples["sigma"], reml["sigma"], "sigma")
    _median_within_reml(fit.global_samples["tau"], reml["tau"], "tau")
    # the posterior sd of the slope is lme4's standard error (0.804 and 1.560)
    standard_error = 1.560 if slopes else 0.804
    assert abs(beta[..., 1].std() / standard_error - 1) < 0.15


def _ols(x, y):
    design = np.stack([np.ones_like(x), x], -1)
    return np.linalg.lstsq(design, y, rcond=None)[0]


def test_sleepstudy_spectrum_ends(sleep_exact):
    """No pooling gives every subject its own least-squares line, complete pooling one line
    (the pooled least-squares fit) for everyone, partial pooling lies between."""
    data = sleepstudy.load()
    spectrum = sleepstudy.spectrum()
    fits = {
        name: hf.fit(family, data, seed=0, **TINY)
        for name, family in spectrum.items()
        if name != "partial pooling"
    }
    fits["partial pooling"] = sleep_exact[True]
    own = np.array([_ols(data[c]["Days"], data[c]["Reaction"]) for c in data.client_ids])
    lines = {}
    for name, fit in fits.items():
        draws = fit.posterior_samples()
        line = draws["beta"][:, :, None, :] + draws["b"]  # [chain, draw, subject, 2]
        lines[name] = line.mean(axis=(0, 1))
        if name == "no pooling":  # the lines are the subjects' own, up to Monte Carlo error
            sd = line.std(axis=(0, 1))
            np.testing.assert_array_less(
                np.abs(lines[name] - own), Z * sd / np.sqrt(fit.num_draws) + 0.1
            )
    pooled = _ols(data.fields["Days"], data.fields["Reaction"])
    np.testing.assert_allclose(
        pooled, [sleepstudy.LME4["intercept"], sleepstudy.LME4["Days"]], atol=1e-3
    )
    # zero up to the 1e-10 jitter the family adds to the conditional covariance of b (an sd of
    # 1e-5 ms)
    np.testing.assert_allclose(fits["complete pooling"].posterior_samples()["b"], 0.0, atol=1e-3)
    beta = fits["complete pooling"].global_samples["beta"]
    np.testing.assert_array_less(
        np.abs(beta.mean(axis=(0, 1)) - pooled), Z * mcse_of_mean(beta) + PRIOR_PULL
    )
    spread = {name: lines[name][:, 1].std() for name in SPECTRUM}
    assert spread["complete pooling"] < 1e-3
    assert spread["complete pooling"] < spread["partial pooling"] < spread["no pooling"]


@pytest.mark.slow
def test_sleepstudy_exact_agrees_with_centralized_nuts(sleep_exact):
    fit = sleep_exact[True]
    nuts = hf.fit(sleepstudy.family(), sleepstudy.load(), method="nuts", seed=2, **FAST)
    for name in ("beta", "sigma", "tau"):
        assert_posteriors_agree(fit.global_samples[name], nuts.global_samples[name], name)
    assert_posteriors_agree(fit.posterior_samples()["b"], nuts.posterior_samples()["b"], "b")


@pytest.mark.slow
def test_sleepstudy_ep_reaches_the_exact_posterior_in_the_default_rounds(sleep_exact):
    """The intercept (251 ms) sits 0.25 prior sd from a Normal(0, 1000) prior's centre: EP
    starts at the prior's width and is within 0.3 posterior sd of the exact posterior on
    every global after its default 10 rounds (from a unit start it stood at 1.6 ms, 33 sd
    off)."""
    fit = hf.fit(sleepstudy.family(), sleepstudy.load(), method="ep", tilted="laplace", seed=0)
    exact = sleep_exact[True]
    for name in ("beta", "sigma", "tau"):
        draws, reference = fit.global_samples[name], exact.global_samples[name]
        gap = np.abs(draws.mean(axis=(0, 1)) - reference.mean(axis=(0, 1)))
        np.testing.assert_array_less(gap, 0.3 * reference.std(axis=(0, 1)), err_msg=name)


# ---------------------------------------------------------------------- verbagg
#: persons in the agreement tests (their first 40 ids: 960 responses)
VERBAGG_PERSONS = 40
#: EP against NUTS: EP's own Monte Carlo error (stochastic tilted runs averaged over rounds)
#: is not in the effective sample size of its final Gaussian draws, so, as in test_ep, means
#: must agree to a quarter of a posterior sd and sds to 25%
EP_MEAN_SD, EP_SD_RATIO = 0.25, 0.25


def test_verbagg_spectrum_models_have_one_client_plate():
    data = verbagg.load(verbagg.frame().query("id <= 5"))
    for name, model in verbagg.spectrum().items():
        sites = inspect_model(model, data.batch())
        assert sites.client_plate == "client", name
        trace = handlers.trace(handlers.seed(model, 0)).get_trace(data.batch())
        assert trace["y"]["value"].shape == (120,)
        b = trace["b"]["value"]
        assert b.shape == (5,)
        assert np.all(b == 0) == (name == "complete pooling"), name
    with pytest.raises(ValueError, match="pooling must be"):
        verbagg.make_model("some")


@pytest.fixture(scope="module")
def verbagg_small():
    return verbagg.load(verbagg.frame().query(f"id <= {VERBAGG_PERSONS}"))


@pytest.fixture(scope="module")
def verbagg_nuts(verbagg_small):
    return hf.fit(verbagg.model, verbagg_small, method="nuts", seed=1, **FAST)


def _ep_agreement(fit, reference, name):
    a, b = np.asarray(fit.global_samples[name]), np.asarray(reference.global_samples[name])
    sd = b.std(axis=(0, 1))
    gap = np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))) / sd
    ratio = a.std(axis=(0, 1)) / sd
    return gap, ratio


@pytest.mark.slow
def test_verbagg_ep_agrees_with_centralized_nuts(verbagg_small, verbagg_nuts):
    """Federated EP (NUTS tilted inference) on 40 persons against centralized NUTS."""
    fit = hf.fit(
        verbagg.model,
        verbagg_small,
        method="ep",
        tilted="nuts",
        num_rounds=10,
        num_warmup=200,
        num_samples=500,
        sequential_start=True,
        seed=1,
    )
    for name in ("beta", "sigma"):
        gap, ratio = _ep_agreement(fit, verbagg_nuts, name)
        assert np.all(gap < EP_MEAN_SD), (name, gap)
        assert np.all(np.abs(ratio - 1) < EP_SD_RATIO), (name, ratio)
    a, b = fit.posterior_samples()["b"], verbagg_nuts.posterior_samples()["b"]
    sd = b.std(axis=(0, 1))
    assert np.max(np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))) / sd) < EP_MEAN_SD
    assert np.max(np.abs(a.std(axis=(0, 1)) / sd - 1)) < EP_SD_RATIO


@pytest.mark.slow
def test_verbagg_ep_laplace_fixed_effects_agree_with_nuts(verbagg_small, verbagg_nuts):
    """EP with (nested) Laplace tilted inference: deterministic and faster. Its sites sit at
    the tilted modes, so the fixed effects (nearly Gaussian) agree with NUTS, while the
    person sd comes out at the mode of its right-skewed posterior: below the NUTS mean, by
    about half a posterior sd with 40 persons."""
    fit = hf.fit(verbagg.model, verbagg_small, method="ep", tilted="laplace", num_rounds=30, seed=1)
    assert fit.diagnostics["converged_round"] is not None
    gap, ratio = _ep_agreement(fit, verbagg_nuts, "beta")
    assert np.all(gap < EP_MEAN_SD), gap
    assert np.all(np.abs(ratio - 1) < EP_SD_RATIO), ratio
    sigma_ep = fit.global_samples["sigma"].mean()
    sigma = verbagg_nuts.global_samples["sigma"]
    assert sigma.mean() - 0.7 * sigma.std() < sigma_ep < sigma.mean()


# ---------------------------------------------------------------------- insteval
@pytest.fixture(scope="module")
def instructors():
    data = insteval.load()
    means = np.array([data[c]["y"].mean() for c in data.client_ids])
    return data, means


@pytest.fixture(scope="module")
def insteval_partial(instructors):
    return hf.fit(insteval.family(), instructors[0], seed=0, **FAST)


def test_insteval_complete_pooling_is_the_grand_mean(instructors):
    """With tau = 0 the rating of every instructor is the population intercept, whose
    posterior given sigma is Normal with mean (sum y / sigma^2) / (n / sigma^2 + 1 / 10^2)
    (prior N(0, 10^2)): the grand mean 3.2057, and sd sigma / sqrt(n)."""
    data, _ = instructors
    fit = hf.fit(insteval.spectrum()["complete pooling"], data, seed=0, **FAST)
    y = data.fields["y"]
    sigma = np.asarray(fit.global_samples["sigma"], np.float64)
    precision = y.size / sigma**2 + 1 / 10.0**2
    closed = (y.sum() / sigma**2 / precision).mean()
    assert closed == pytest.approx(y.mean(), abs=1e-5)
    assert y.mean() == pytest.approx(3.2057, abs=1e-4)
    beta = fit.global_samples["beta"][..., 0]
    assert abs(beta.mean() - closed) < Z * mcse_of_mean(beta)
    assert abs(beta.std() / (y.std() / np.sqrt(y.size)) - 1) < 0.15
    assert sigma.mean() == pytest.approx(y.std(), rel=1e-3)
    np.testing.assert_array_equal(fit.posterior_samples()["b"], 0.0)


def test_insteval_partial_pooling_is_closed_form_shrinkage(instructors, insteval_partial):
    """Each instructor's effect is E over (beta, sigma, tau) draws of the closed-form
    shrinkage n tau^2 / (sigma^2 + n tau^2) (ybar - beta); every intercept lies between the
    instructor's own mean and the population intercept, the more so the fewer ratings."""
    data, means = instructors
    fit = insteval_partial
    draws = {k: np.asarray(v, np.float64).reshape(-1) for k, v in fit.global_samples.items()}
    n = data.sizes[None, :]
    tau2, sigma2 = draws["tau"][:, None] ** 2, draws["sigma"][:, None] ** 2
    shrunk = n * tau2 / (sigma2 + n * tau2) * (means[None, :] - draws["beta"][:, None])
    mean, sd = fit.personal["b"]
    np.testing.assert_allclose(mean, shrunk.mean(axis=0), atol=1e-3 * sd.min())
    beta = draws["beta"].mean()
    away = np.abs(means - beta) > 0.05  # (the share is 0 / 0 for a mean at the population's)
    kept = mean / (means - beta)  # the share of its own deviation an instructor keeps
    assert np.all((kept[away] > 0) & (kept[away] < 1))
    few, many = away & (data.sizes <= 20), away & (data.sizes >= 300)
    assert kept[few].max() < kept[many].min()


def _one_way_reml(sizes, means, within):
    """REML estimates (beta, sigma, tau) of ``y_ij = beta + b_i + e_ij`` from each group's
    size, mean and within-group sum of squares (the profiled closed-form likelihood)."""
    from scipy.optimize import minimize

    def negative_log_likelihood(log_scales):
        sigma2, tau2 = np.exp(2 * log_scales)
        weight = sizes / (sigma2 + sizes * tau2)  # 1 / Var(group mean)
        beta = np.sum(weight * means) / np.sum(weight)
        return 0.5 * (
            (sizes.sum() - sizes.size) * np.log(sigma2)
            + np.sum(np.log(sigma2 + sizes * tau2))
            + within / sigma2
            + np.sum(weight * (means - beta) ** 2)
            + np.log(np.sum(weight))
        ), beta

    start = np.log([1.0, 0.5])
    best = minimize(
        lambda p: negative_log_likelihood(p)[0],
        start,
        method="Nelder-Mead",
        options={"xatol": 1e-9, "fatol": 1e-9},
    )
    return (negative_log_likelihood(best.x)[1], *np.exp(best.x))


def test_insteval_partial_pooling_matches_reml(instructors, insteval_partial):
    """With 1,128 instructors the posterior of (beta, sigma, tau) is close to Gaussian
    (Bernstein-von Mises), so its mean lies within a small fraction of a posterior sd of the
    REML estimate (the marginal posterior mode under flat priors), computed here in closed
    form from the instructors' sizes, means and within sums of squares (beta 3.2401, sigma
    1.2223, tau 0.5194). Allowed: a quarter of a posterior sd (Monte Carlo error of the mean
    of ~1000 importance-weighted draws is about 0.03 sd)."""
    data, means = instructors
    fit = insteval_partial
    y = data.fields["y"]
    within = np.sum((y - np.repeat(means, data.sizes)) ** 2)
    reml = _one_way_reml(data.sizes.astype(float), means, within)
    np.testing.assert_allclose(reml, [3.2401, 1.2223, 0.5194], atol=1e-4)
    for name, value in zip(("beta", "sigma", "tau"), reml, strict=True):
        draws = np.asarray(fit.global_samples[name], np.float64)
        gap = abs(draws.mean() - value) / draws.std()
        assert gap < 0.25, (name, draws.mean(), value, gap)
