"""The model zoo: bundled data load with the documented facts, and every pooling-spectrum
member fits at tiny sizes with answers in the right places."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST, TINY, assert_posteriors_agree, mcse_of_mean

import hierfl as hf
from models import eight_schools, radon

SPECTRUM = ("no pooling", "complete pooling", "partial pooling")

#: the standard errors of the eight schools (arviz's bundled copy lacks them)
SCHOOL_SIGMA = [15, 10, 16, 11, 9, 11, 10, 18]
SCHOOL_Y = [28, 8, -3, 7, -1, 1, 18, 12]


# ---------------------------------------------------------------------- data
def test_eight_schools_data():
    data = eight_schools.load()
    assert data.client_ids == tuple("ABCDEFGH")
    np.testing.assert_array_equal(data.sizes, np.ones(8))
    np.testing.assert_array_equal(data.fields["y"], SCHOOL_Y)
    np.testing.assert_array_equal(data.fields["sigma"], SCHOOL_SIGMA)
    assert list(eight_schools.frame().columns) == ["school", "y", "sigma"]


def test_radon_data_facts():
    frame = radon.frame()
    assert len(frame) == 919
    assert frame["county"].nunique() == 85
    assert set(frame["floor"].unique()) == {0.0, 1.0}
    assert abs(frame["floor"].mean() - 0.17) < 0.01  # Gelman & Hill: 17% first-floor
    # county-level covariates are constant within a county
    assert (frame.groupby("county")["log_uranium"].nunique() == 1).all()
    np.testing.assert_allclose(
        frame.groupby("county")["floor_mean"].first(), frame.groupby("county")["floor"].mean()
    )
    data = radon.load()
    assert data.num_clients == 85 and data.num_obs == 919
    assert set(data.field_names) == set(radon.FIELDS)
    assert len(data["HENNEPIN"]["log_radon"]) == 105
    assert len(data["ST LOUIS"]["log_radon"]) == 116 == data.sizes.max()
    assert data.sizes.min() == 1
    assert np.isfinite(data.fields["log_radon"]).all()


def test_radon_load_accepts_a_frame_subset():
    frame = radon.frame()
    subset = frame[frame["county"].isin(["AITKIN", "HENNEPIN"])]
    data = radon.load(subset)
    assert set(data.client_ids) == {"AITKIN", "HENNEPIN"}
    assert data.num_obs == len(subset)


@pytest.mark.parametrize("module", [eight_schools, radon])
def test_spectrum_has_three_members_and_a_docstring(module):
    spectrum = module.spectrum()
    assert tuple(spectrum) == SPECTRUM
    assert all(isinstance(family, hf.ConjugateFamily) for family in spectrum.values())
    assert module.__doc__ and "math" in module.__doc__
    assert set(module.__all__) >= {"family", "load", "spectrum"}


# ---------------------------------------------------------------------- spectrum fits
def _fit_spectrum(module, partial):
    """Fit no and complete pooling at tiny sizes; partial pooling is the module's reference
    family, already fitted once per session (``partial``)."""
    spectrum = module.spectrum()
    assert repr(spectrum["partial pooling"]) == repr(module.family())
    fits = {
        name: hf.fit(family, module.load(), seed=0, **TINY)
        for name, family in spectrum.items()
        if name != "partial pooling"
    }
    return dict(fits, **{"partial pooling": partial})


@pytest.fixture(scope="module")
def school_spectrum(eight_schools_exact):
    return _fit_spectrum(eight_schools, eight_schools_exact)


@pytest.fixture(scope="module")
def radon_spectrum(radon_exact):
    return _fit_spectrum(radon, radon_exact)


def test_eight_schools_complete_pooling_is_the_precision_weighted_mean(school_spectrum):
    fit = school_spectrum["complete pooling"]
    assert set(fit.global_samples) == {"mu"}
    y, sigma = np.array(SCHOOL_Y, float), np.array(SCHOOL_SIGMA, float)
    precision = 1 / 5.0**2 + np.sum(1 / sigma**2)  # prior mu ~ N(0, 5^2)
    mean = np.sum(y / sigma**2) / precision
    mu = fit.global_samples["mu"]
    assert abs(mu.mean() - mean) < 4 * mcse_of_mean(mu)
    assert abs(mu.std() * np.sqrt(precision) - 1) < 0.25
    # every school's effect is mu itself
    theta = fit.posterior_samples()["theta"]
    np.testing.assert_allclose(theta, np.broadcast_to(mu[..., None], theta.shape), atol=1e-5)


def test_eight_schools_no_pooling_keeps_each_school(school_spectrum):
    mean, sd = school_spectrum["no pooling"].personal["theta"]
    np.testing.assert_allclose(mean, SCHOOL_Y, atol=0.05)
    np.testing.assert_allclose(sd, SCHOOL_SIGMA, rtol=0.01)


def test_eight_schools_partial_pooling_lies_between(school_spectrum):
    spread = {name: np.std(fit.personal["theta"][0]) for name, fit in school_spectrum.items()}
    assert spread["complete pooling"] < 1e-3
    assert spread["complete pooling"] < spread["partial pooling"] < spread["no pooling"]


def test_radon_spectrum(radon_spectrum):
    complete = radon_spectrum["complete pooling"]
    assert set(complete.global_samples) == {"beta", "sigma"}
    np.testing.assert_array_equal(complete.posterior_samples()["b"], 0.0)
    intercepts = {name: radon.county_intercepts(fit) for name, fit in radon_spectrum.items()}
    for name, value in intercepts.items():
        fit = radon_spectrum[name]
        assert value.shape == fit.global_samples["beta"].shape[:2] + (85,)
    spread = {name: np.std(value.mean(axis=(0, 1))) for name, value in intercepts.items()}
    assert spread["complete pooling"] < 1e-5
    assert spread["partial pooling"] < spread["no pooling"]
    # no pooling: a county's intercept is near its own basement mean
    data = radon.load()
    hennepin = data["HENNEPIN"]
    own = hennepin["log_radon"][hennepin["floor"] == 0].mean()
    index = data.index_of("HENNEPIN")
    assert abs(intercepts["no pooling"][..., index].mean() - own) < 0.15


def test_synthetic_lmm_generates_its_truth():
    from models import synthetic_lmm

    data, effects = synthetic_lmm.generate(2000, seed=1)
    assert data.num_clients == 2000 and len(effects) == 2000
    assert data.sizes.min() >= 1 and abs(data.sizes.mean() - 10) < 0.5
    truth = synthetic_lmm.TRUTH
    assert abs(np.std(effects) - truth.tau) < 0.05
    x, y = data.fields["x"], data.fields["y"]
    slope = np.polyfit(x, y - np.repeat(effects, data.sizes), 1)
    np.testing.assert_allclose(slope, [truth.beta[1], truth.beta[0]], atol=0.05)


@pytest.mark.slow
def test_synthetic_lmm_recovers_its_truth():
    from models import synthetic_lmm

    data, effects = synthetic_lmm.generate(300, seed=1)
    fit = hf.fit(synthetic_lmm.family(), data, seed=0, **TINY)
    truth = synthetic_lmm.TRUTH
    for name, value in (("beta", truth.beta), ("sigma", truth.sigma), ("tau", truth.tau)):
        draws = fit.global_samples[name]
        assert np.all(np.abs(draws.mean(axis=(0, 1)) - value) < 4 * draws.std(axis=(0, 1))), name


@pytest.mark.slow
@pytest.mark.parametrize("module", [eight_schools, radon])
def test_spectrum_runs_with_centralized_nuts(module):
    """Every member also runs under centralized NUTS and agrees with the exact engine on the
    identified per-client quantity (a school's effect; a county's intercept, since under no
    pooling the population intercept and the mean county effect are only weakly separated)."""
    data = module.load()
    for name, family in module.spectrum().items():
        exact = hf.fit(family, data, seed=0, **FAST)
        nuts = hf.fit(family, data, method="nuts", seed=0, **FAST)
        if module is radon:
            a, b = radon.county_intercepts(exact), radon.county_intercepts(nuts)
        else:
            a, b = exact.posterior_samples()["theta"], nuts.posterior_samples()["theta"]
        if name == "complete pooling":  # every client equals the population: compare one
            a, b = a[..., :1], b[..., :1]
        assert_posteriors_agree(a, b, name)


def test_eight_schools_complete_pooling_runs_with_centralized_nuts():
    family = eight_schools.spectrum()["complete pooling"]
    fit = hf.fit(
        family, eight_schools.load(), method="nuts", num_warmup=50, num_samples=50, num_chains=1
    )
    theta = fit.posterior_samples()["theta"]
    np.testing.assert_allclose(
        theta, np.broadcast_to(fit.global_samples["mu"][..., None], theta.shape)
    )
