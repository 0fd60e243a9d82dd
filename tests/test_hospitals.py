"""The hospitals and cbpp models: generator, thresholds, loaders, pooling spectra."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from numpyro import handlers

import hierfl as hf
from hierfl.fit import inspect_model
from models import cbpp, hospitals


def test_generator_is_seeded_and_heterogeneous():
    a, b = hospitals.generate(30, seed=3), hospitals.generate(30, seed=3)
    np.testing.assert_array_equal(a.train.fields["score"], b.train.fields["score"])
    np.testing.assert_array_equal(a.truth["alpha"], b.truth["alpha"])
    sizes = a.train.sizes
    assert sizes.min() >= hospitals.MIN_SIZE and sizes.max() <= hospitals.MAX_SIZE
    assert sizes.max() / sizes.min() > 5  # very different sizes
    prevalence = np.array([a.train[h]["y"].mean() for h in a.train.client_ids])
    assert prevalence.max() - prevalence.min() > 0.1  # very different prevalences
    assert a.validation.client_ids == a.train.client_ids == a.test.client_ids


def test_ground_truth_is_recovered_in_a_large_sample():
    sim = hospitals.generate(400, seed=1, median_size=400)
    score, y = sim.train.fields["score"], sim.train.fields["y"]
    # the marginal prevalence matches the generator's truth (Monte Carlo over hospitals)
    alpha = np.repeat(sim.truth["alpha"], sim.train.sizes)
    beta = np.repeat(sim.truth["beta"], sim.train.sizes)
    p = 1.0 / (1.0 + np.exp(-(alpha + beta * score)))
    assert abs(y.mean() - p.mean()) < 4 * np.sqrt(p.mean() * (1 - p.mean()) / y.size)


def test_thresholds():
    p = np.array([0.05, 0.2, 0.4, 0.6, 0.9])
    y = np.array([0, 0, 1, 1, 1])
    assert 0.2 <= hospitals.f1_threshold(p, y) < 0.4
    # with a missed case far costlier than a false alarm, the threshold is low
    assert hospitals.utility_threshold(p, y, cost_false_positive=1, cost_missed_case=50) < 0.4
    assert hospitals.f1_threshold(p, np.zeros(5)) == 0.5
    r = hospitals.rates(y, p > 0.5)
    assert r == {"accuracy": 0.8, "false_positive_rate": 0.0, "missed_case_rate": 1 / 3}


@pytest.mark.parametrize("module", [hospitals, cbpp])
def test_spectrum_models_have_one_client_plate(module):
    data = cbpp.load() if module is cbpp else hospitals.generate(5, seed=0).train
    for name, model in module.spectrum().items():
        sites = inspect_model(model, data.batch())
        assert sites.client_plate == "client", name
        trace = handlers.trace(handlers.seed(model, jax.random.PRNGKey(0))).get_trace(data.batch())
        assert all(np.all(np.isfinite(s["value"])) for s in trace.values() if s["type"] == "sample")


def test_cbpp_loader():
    data = cbpp.load()
    assert data.num_clients == 15 and data.num_obs == 56
    assert set(np.unique(data.fields["period"])) == {1, 2, 3, 4}


@pytest.mark.slow
def test_compare_four_strategies():
    sim = hospitals.generate(6, seed=0, median_size=150)
    fits = {
        name: hf.fit(model, sim.train, method="ep", tilted="laplace", num_rounds=8, num_samples=200)
        for name, model in hospitals.spectrum().items()
    }
    table = hospitals.compare(fits, sim)
    assert set(table["strategy"]) == {
        "global + 0.5",
        "global + local threshold",
        "local only + local threshold",
        "hierfl + local threshold",
    }
    assert len(table) == 4 * 6
    assert (
        table[["accuracy", "false_positive_rate", "missed_case_rate"]].stack().between(0, 1).all()
    )
