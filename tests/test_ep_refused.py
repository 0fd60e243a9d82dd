"""A round in which the EP server refused every update it received applies nothing.

The server backs off the summed change until the undamped update is positive definite, down to
a fraction of 0 (test_ep_overshoot). A round that applied nothing leaves the global
approximation as it was, so with deterministic (Laplace) tilted inference the next round
repeats it exactly and its change is 0: it must not count as converged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import hierfl as hf
from hierfl.engines import ep

#: each client's precision change, as a fraction of the global precision Q: valid on its own
#: (Q + change = 0.1 Q is positive definite), but the undamped update Q + s change / damping
#: is indefinite even at the smallest back-off fraction s = 2^-(BACKOFF_STEPS - 1) when
#: 0.9 / (128 damping) > 1, for one client (sequential) as for three (synchronous)
CHANGE = -0.9
DAMPING = 0.005
NUM_ROUNDS = 3


def _data():
    return hf.ClientData.from_dict(
        {c: {"y": np.array([0.0, 1.0]), "sigma": np.ones(2)} for c in "abc"}
    )


def _family():
    """Complete pooling (tau = 0): no client parameters in the tilted inference, which
    compiles quickly."""
    return hf.NormalNormal(priors={"tau": 0.0})


def _refused(precision):
    """A message every server refuses: a precision change of CHANGE times ``precision``."""
    return ep.EPMessage(CHANGE * precision, jnp.zeros(precision.shape[:-1]))


def _assert_refused(history, converged_round, server, initial):
    assert history["applied_scale"] == [0.0] * NUM_ROUNDS
    assert history["refused"] == [True] * NUM_ROUNDS
    assert history["received"] == [3] * NUM_ROUNDS
    # nothing moved (up to float32 rounding: the log sd of the same precision, computed
    # twice, may differ in its last bit)
    assert max(history["mean_change"] + history["sd_change"]) < 1e-6
    assert converged_round is None  # it was 2: two rounds of change 0
    np.testing.assert_array_equal(server.precision, initial.precision)
    np.testing.assert_array_equal(server.shift, initial.shift)


def test_synchronous_round_that_applied_nothing_is_not_converged():
    """Every client's message corrupted to CHANGE Q (Q stays the initial precision, since
    nothing is applied): all rounds run, and the global approximation stays where it began."""
    data = _data()
    settings = ep.EPSettings(tilted="laplace", damping=DAMPING)
    _, _, client_data, algorithm = ep.prepare(_family().model, data, settings)
    initial, _ = algorithm.init(jax.random.PRNGKey(0), client_data)

    def corrupt(round_index, messages):
        del round_index
        return _refused(jnp.broadcast_to(initial.precision, messages.precision_change.shape))

    fit = hf.fit(
        _family(),
        data,
        method="ep",
        tilted="laplace",
        damping=DAMPING,
        num_rounds=NUM_ROUNDS,
        num_samples=20,
        corrupt=corrupt,
    )
    assert fit.diagnostics["rounds"] == NUM_ROUNDS
    server, _ = fit.diagnostics["state"]
    _assert_refused(fit.diagnostics["history"], fit.diagnostics["converged_round"], server, initial)


def test_sequential_sweep_that_applied_nothing_is_not_converged():
    """The sequential sweep gives the server one message at a time: each client's message,
    CHANGE times the latest global precision, is refused, and so is the whole sweep."""
    data = _data()
    settings = ep.EPSettings(
        tilted="laplace",
        damping=DAMPING,
        num_rounds=NUM_ROUNDS,
        num_samples=20,
        schedule="sequential",
    )
    _, _, client_data, algorithm = ep.prepare(_family().model, data, settings)
    tilted_update = algorithm.client_update

    def client_update(key, bc, state, data):
        new_state, _, info = tilted_update(key, bc, state, data)
        return new_state, _refused(bc.precision), info

    algorithm = algorithm._replace(client_update=client_update)
    key = jax.random.PRNGKey(0)
    initial, _ = algorithm.init(key, client_data)
    run = ep.run_ep(algorithm, key, client_data, data.client_ids, settings)
    assert len(run.rounds) == NUM_ROUNDS
    _assert_refused(run.history, run.converged_round, run.server_state, initial)
