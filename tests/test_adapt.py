"""Cold start with a few rows (``Fit.adapt``): a client left out of the fit, adapted on its
own rows without a server round, gets the posterior a fit that included it gives."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST, SD_RATIO, Z, mcse_of_mean, mcse_of_sd

import hierfl as hf

HELD_OUT = "LAC QUI PARLE"  # 2 homes: its intercept is mostly the population's


@pytest.fixture(scope="module")
def radon_without(radon_family, radon_data):
    rest = radon_data.subset([c for c in radon_data.client_ids if c != HELD_OUT])
    return hf.fit(radon_family, rest, method="exact", seed=3, **FAST)


@pytest.fixture(scope="module")
def radon_adapted(radon_without, radon_data):
    return radon_without.adapt(HELD_OUT, **radon_data[HELD_OUT])


def test_exact_adapt_equals_the_fit_that_included_the_client(radon_adapted, radon_exact):
    """Importance-weighted phi draws plus the closed-form conditional: the held-out county's
    intercept, and phi, as the exact fit of all 85 counties gives them (that fit equals
    centralized NUTS: tests/test_exact.py)."""
    reference = radon_exact.posterior_samples([HELD_OUT])
    adapted = radon_adapted.posterior_samples([HELD_OUT])
    pairs = [("b", reference["b"][:, :, 0], adapted["b"][:, :, 0])]
    pairs += [(name, reference[name], adapted[name]) for name in ("tau", "sigma", "beta")]
    for name, ref, new in pairs:
        ref, new = np.asarray(ref, np.float64), np.asarray(new, np.float64)
        tolerance = Z * np.hypot(mcse_of_mean(ref), mcse_of_mean(new))
        np.testing.assert_array_less(
            np.abs(ref.mean(axis=(0, 1)) - new.mean(axis=(0, 1))), tolerance + 1e-6, err_msg=name
        )
        ratio = new.std(axis=(0, 1)) / ref.std(axis=(0, 1))
        slack = SD_RATIO + Z * np.hypot(mcse_of_sd(ref), mcse_of_sd(new)) / ref.std(axis=(0, 1))
        np.testing.assert_array_less(np.abs(ratio - 1.0), slack, err_msg=name)


def test_exact_adapt_matches_the_exact_fit_that_included_the_client(
    radon_adapted, radon_exact, radon_data
):
    """The weighted mixture moments equal the full exact fit's personal moments."""
    index = radon_data.index_of(HELD_OUT)
    mean, sd = radon_exact.personal["b"]
    new_mean, new_sd = radon_adapted.personal["b"]
    assert radon_adapted.diagnostics["pareto_k"] < 0.5
    assert radon_adapted.diagnostics["ess"] > 500
    assert abs(new_mean[0] - mean[index]) < 0.05 * sd[index]
    assert abs(new_sd[0] / sd[index] - 1.0) < 0.05


def test_adapted_fit_works_like_a_fit(radon_adapted, radon_data):
    rows = radon_data[HELD_OUT]
    draws = radon_adapted.predict(
        HELD_OUT,
        floor=[0.0],
        log_uranium=rows["log_uranium"][:1],
        floor_mean=rows["floor_mean"][:1],
    )["log_radon"]
    assert draws.shape == (FAST["num_samples"] * FAST["num_chains"], 1)
    idata = radon_adapted.to_arviz()
    assert list(idata.posterior["b"].coords["client"].values) == [HELD_OUT]
    assert idata.log_likelihood["log_radon"].shape[-1] == len(rows["log_radon"])
    frame = radon_adapted.personal_summary()
    assert frame.loc[HELD_OUT, "n_obs"] == 2


def test_surprising_rows_warn(radon_without, radon_data):
    rows = dict(radon_data[HELD_OUT])
    rows = {k: np.repeat(v[:1], 40) for k, v in rows.items()}
    rows["log_radon"] = np.full(40, 9.0)  # far above any county
    with pytest.warns(UserWarning, match="Pareto k"):
        radon_without.adapt("SURPRISE", **rows)


def test_adapt_errors_name_the_client_and_field(radon_without, radon_data, eight_schools_nuts):
    rows = dict(radon_data[HELD_OUT])
    with pytest.raises(hf.DataError, match="'AITKIN' is in the fit"):
        radon_without.adapt("AITKIN", **radon_data["AITKIN"])
    missing = {k: v for k, v in rows.items() if k != "log_uranium"}
    with pytest.raises(hf.DataError, match=r"'NEW'.*log_uranium"):
        radon_without.adapt("NEW", **missing)
    bad = dict(rows, log_radon=np.array([1.0, np.nan]))
    with pytest.raises(hf.DataError, match=r"'NEW'.*log_radon"):
        radon_without.adapt("NEW", **bad)
    with pytest.raises(ValueError, match="centralized reference"):
        eight_schools_nuts.adapt("new school", y=[1.0], sigma=[10.0])


@pytest.mark.slow  # 40 s; the main suite checks ep adapt in closed form (tests/test_ep.py)
def test_ep_adapt_agrees_with_centralized_nuts(fast):
    """EP: the new client's tilted inference against q(phi) gives its personal posterior as
    centralized NUTS on every hospital, the client included, gives it (EP's approximation
    and Monte Carlo error: 0.3 sd in the mean, 20% in the sd)."""
    from models import hospitals

    sim = hospitals.generate(6, seed=2, median_size=100)
    data = sim.train
    target = data.client_ids[-1]
    rest = data.subset(data.client_ids[:-1])
    fit = hf.fit(
        hospitals.partial_pooling, rest, method="ep", tilted="laplace", num_rounds=8, seed=0
    )
    adapted = fit.adapt(target, **data[target])
    reference = hf.fit(hospitals.partial_pooling, data, method="nuts", seed=1, **fast)
    draws = reference.posterior_samples([target])
    for name in ("alpha", "beta"):
        ref = np.asarray(draws[name][:, :, 0], np.float64)
        mean, sd = adapted.personal[name]
        assert abs(mean[0] - ref.mean()) < 0.3 * ref.std(), name
        assert abs(sd[0] / ref.std() - 1.0) < 0.2, name
    # the client's rows narrowed its intercept well below the population's spread (cold start)
    population = np.sqrt(
        fit.global_samples["mu_alpha"].var() + np.mean(fit.global_samples["sigma_alpha"] ** 2)
    )
    assert adapted.personal["alpha"][1][0] < 0.5 * population
    assert adapted.predict(target, score=[0.0, 2.0])["y"].shape == (fit.num_draws, 2)
    assert fit.client_ids == rest.client_ids  # the fit is left as it was
