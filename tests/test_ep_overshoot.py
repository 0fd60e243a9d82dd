"""The synchronous EP server backs off when the *undamped* update is not positive definite.

Persons whose responses pull a random-effect sd up have sites of negative precision in log
sigma; in parallel their changes add up to an indefinite undamped update, which damping alone
would hide (the damped precision stays positive definite, but nearly singular, and the mean
runs off: on VerbAgg with 40 persons log sigma went from -1.25 to 161 in round 1 and the fit
needed 20 rounds instead of 9).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hierfl as hf
from hierfl.engines import ep
from models import verbagg

#: persons of VerbAgg in the fit (fewer than ``ep.SEQUENTIAL_START_FROM``: no opening sweep)
PERSONS = 40
#: rounds to converge: 11 with the back-off on the undamped update from the prior's width (9
#: from a unit width; 8 with a sequential start from either), 20 with a back-off on the
#: damped update only
MAX_ROUNDS = 12
#: bound on |log sigma| over the rounds: the runaway reached 161. From the prior's width the
#: first full step reaches 2.1 (sigma 8, four sds of its HalfNormal(2) prior out), and the
#: rounds bring it back to 0.34 within four more
LOG_SIGMA_BOUND = 3.0
#: EP against NUTS, as in test_ep and test_lme4_models: means to a quarter of a posterior sd
#: and sds to 25%
MEAN_SD, SD_RATIO = 0.25, 0.25


@pytest.mark.parametrize("damping", [0.5, 1.0])
def test_server_backs_off_when_the_undamped_update_is_indefinite(damping):
    """A summed change of -0.9 Q leaves the damped precision positive definite (0.1 Q), but
    the undamped update Q - 0.9 Q / alpha is not for alpha = 1/2: the server applies half of
    the sum (so that Q* = 0.1 Q). Undamped (alpha = 1) the two checks are the same, and the
    whole sum is applied."""
    data = hf.ClientData.from_dict(
        {c: {"y": np.array([0.0, 1.0]), "sigma": np.ones(2)} for c in "abc"}
    )
    settings = ep.EPSettings(tilted="laplace", damping=damping)
    _, _, client_data, algorithm = ep.prepare(
        hf.NormalNormal(priors={"tau": 1.0}).model, data, settings
    )
    server, _ = algorithm.init(jax.random.PRNGKey(0), client_data)
    change = -0.9 * server.precision / 3
    messages = ep.EPMessage(jnp.stack([change] * 3), jnp.zeros((3, server.shift.shape[0])))
    new, info = algorithm.server_update(None, server, messages, jnp.ones(3, bool))
    assert float(info.applied_scale) == (0.5 if damping == 0.5 else 1.0)
    assert float(new.applied_scale[0]) == float(info.applied_scale)
    undamped = server.precision + float(info.applied_scale) * 3 * change / damping
    assert np.all(np.linalg.eigvalsh(np.asarray(undamped)) > 0)


@pytest.fixture(scope="module")
def verbagg_small():
    return verbagg.load(verbagg.frame().query(f"id <= {PERSONS}"))


@pytest.fixture(scope="module")
def synchronous_fit(verbagg_small):
    return hf.fit(
        verbagg.model, verbagg_small, method="ep", tilted="laplace", num_rounds=30, seed=1
    )


def test_verbagg_synchronous_rounds_do_not_overshoot(synchronous_fit):
    """Round 1 backs off instead of letting log sigma run off; no sd grows by more than
    damping allows, 1 / sqrt(1 - alpha) per round; and the fit converges within
    :data:`MAX_ROUNDS` rounds."""
    fit = synchronous_fit
    history = fit.diagnostics["history"]
    damping = fit.diagnostics["settings"].damping
    assert fit.diagnostics["converged_round"] is not None
    assert fit.diagnostics["converged_round"] <= MAX_ROUNDS
    assert history["applied_scale"][1] < 1.0  # the back-off engaged in round 1
    log_sigma = np.array([m[-1] for m in history["mean"]])
    assert np.max(np.abs(log_sigma)) < LOG_SIGMA_BOUND, log_sigma  # it was 161
    sd = np.array(history["sd"])
    growth = sd[1:] / sd[:-1]
    assert np.max(growth) <= (1.0 + 1e-3) / np.sqrt(1.0 - damping), growth.max()


@pytest.mark.slow
def test_verbagg_synchronous_fit_agrees_with_nuts(verbagg_small, synchronous_fit):
    """The fixed effects agree with centralized NUTS (the person sd, at the mode of its
    skewed posterior, is checked in test_lme4_models), and the fit is the sequential
    schedule's fixed point."""
    reference = hf.fit(
        verbagg.model,
        verbagg_small,
        method="nuts",
        seed=1,
        num_warmup=300,
        num_samples=500,
        num_chains=2,
    )
    a = np.asarray(synchronous_fit.global_samples["beta"])
    b = np.asarray(reference.global_samples["beta"])
    sd = b.std(axis=(0, 1))
    assert np.all(np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))) / sd < MEAN_SD)
    assert np.all(np.abs(a.std(axis=(0, 1)) / sd - 1.0) < SD_RATIO)
    sequential = hf.fit(
        verbagg.model,
        verbagg_small,
        method="ep",
        tilted="laplace",
        schedule="sequential",
        num_rounds=30,
        seed=1,
    )
    mean, sd = _last_round(synchronous_fit)
    mean_seq, sd_seq = _last_round(sequential)
    assert np.max(np.abs(mean - mean_seq) / sd_seq) < 0.05
    assert np.max(np.abs(np.log(sd / sd_seq))) < 0.05


def _last_round(fit):
    """Mean and sd of the unconstrained globals after the last round."""
    history = fit.diagnostics["history"]
    return np.asarray(history["mean"][-1]), np.asarray(history["sd"][-1])
