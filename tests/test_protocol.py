"""The federated protocol: pure functions, stacked client state, and the in-process simulator.

A hand-written algorithm with a closed-form answer drives the simulator: federated averaging on
the quadratic losses ``L_i(w) = 1/2 sum_j (w - y_ij)^2``. Each participating client takes one
gradient step of size ``eta`` on its mean loss and sends the change with its weight ``n_i``;
the server adds the weighted average change. The fixed point is the pooled mean
``w* = sum_ij y_ij / sum_i n_i`` and, with every client taking part, after ``k`` rounds
``w_k - w* = (1 - eta)^k (w_0 - w*)``.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hierfl as hf
from hierfl.engines.exact import ExactServerState, exact_algorithm
from hierfl.engines.globals_inference import GlobalsSettings
from hierfl.protocol import (
    FederatedAlgorithm,
    RoundRecord,
    SimulationResult,
    SkipRecord,
    message_schema,
    simulate,
    validate_messages,
)

STEP = 0.5  # eta, the clients' gradient step
START = 10.0  # w_0


class AverageState(NamedTuple):
    weight: Any  # [] the global estimate w
    rounds: Any  # [] rounds applied


class CounterState(NamedTuple):
    updates: Any  # [] rounds this client's message was used (stacked: [num_clients])
    last: Any  # [] the global value the client last saw


def federated_mean(step: float = STEP, start: float = START) -> FederatedAlgorithm:
    def init(key, client_data):
        del key
        num = client_data["y"].shape[0]
        return (
            AverageState(jnp.asarray(start), jnp.asarray(0)),
            CounterState(jnp.zeros(num, jnp.int32), jnp.zeros(num)),
        )

    def broadcast(state):
        return state.weight

    def client_update(key, w, state, data):
        del key
        n = jnp.sum(data["mask"])
        local_mean = jnp.sum(jnp.where(data["mask"], data["y"], 0.0)) / n
        delta = -step * (w - local_mean)
        message = {"delta": delta, "count": n.astype(jnp.float32)}
        return CounterState(state.updates + 1, w), message, {"local_mean": local_mean}

    def server_update(key, state, messages, received):
        del key
        weights = jnp.where(received, messages["count"], 0.0)
        # jnp.where, not a product: an unreceived row may hold NaN
        total = jnp.sum(jnp.where(received, weights * messages["delta"], 0.0))
        change = jnp.where(weights.sum() > 0, total / weights.sum(), 0.0)
        new = AverageState(state.weight + change, state.rounds + 1)
        return new, {"change": change, "received": jnp.sum(received)}

    def client_finalize(key, w, state, data):
        del key, state
        n = jnp.sum(data["mask"])
        local_mean = jnp.sum(jnp.where(data["mask"], data["y"], 0.0)) / n
        return {"gap": local_mean - w}

    def validate(message):
        return message["count"] > 0

    return FederatedAlgorithm(
        init, broadcast, client_update, server_update, client_finalize, validate
    )


@pytest.fixture(scope="module")
def clients():
    data = hf.ClientData.from_dict(
        {f"c{i}": {"y": np.random.default_rng(i).normal(i, 1.0, size=2 + i % 4)} for i in range(10)}
    )
    padded, mask = data.padded(dtype=np.float32)
    return data, {"y": jnp.asarray(padded["y"]), "mask": jnp.asarray(mask)}


def _pooled_mean(data):
    return float(np.mean(data.fields["y"]))


def _run(clients, **options):
    data, stacked = clients
    options.setdefault("num_rounds", 6)
    return simulate(
        federated_mean(),
        jax.random.PRNGKey(options.pop("seed", 0)),
        stacked,
        client_ids=data.client_ids,
        **options,
    )


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
    )


# ---------------------------------------------------------------------- shape of the protocol
def test_algorithm_is_a_namedtuple_of_pure_functions():
    assert FederatedAlgorithm._fields == (
        "init",
        "broadcast",
        "client_update",
        "server_update",
        "client_finalize",
        "validate_message",
        "personal_in_info",
        "progress_info",
    )
    for name in ("SkipRecord", "RoundRecord", "SimulationResult"):
        assert issubclass(globals()[name], tuple) and hasattr(globals()[name], "_fields")


def test_exact_algorithm_signatures_and_states(eight_schools_data, eight_schools_family):
    algorithm = exact_algorithm(
        eight_schools_family,
        server="nuts",
        settings=GlobalsSettings(num_warmup=50, num_samples=50, num_chains=1),
    )
    assert isinstance(algorithm, FederatedAlgorithm)
    parameters = {
        name: list(inspect.signature(getattr(algorithm, name)).parameters)
        for name in ("init", "broadcast", "client_update", "server_update", "client_finalize")
    }
    assert len(parameters["init"]) == 2 and parameters["init"][0] == "key"
    assert len(parameters["broadcast"]) == 1
    assert len(parameters["client_update"]) == 4 and parameters["client_update"][0] == "key"
    assert len(parameters["server_update"]) == 4 and parameters["server_update"][0] == "key"
    assert len(parameters["client_finalize"]) == 4
    padded, mask = eight_schools_data.padded()
    stacked = {
        "fields": {k: jnp.asarray(v, jnp.float32) for k, v in padded.items()},
        "mask": jnp.asarray(mask),
    }
    server_state, client_states = algorithm.init(jax.random.PRNGKey(0), stacked)
    assert isinstance(server_state, ExactServerState) and server_state.draws is None
    assert algorithm.broadcast(server_state) is None
    # client state is stacked on the client axis
    for leaf in jax.tree_util.tree_leaves(client_states):
        assert leaf.shape[0] == eight_schools_data.num_clients
    # one client's update, written for a single client
    one = jax.tree_util.tree_map(lambda v: v[0], stacked)
    state, message, info = algorithm.client_update(
        jax.random.PRNGKey(1), None, jax.tree_util.tree_map(lambda v: v[0], client_states), one
    )
    assert set(message) == {"precision", "weighted_sum", "weighted_square", "log_norm"}
    np.testing.assert_allclose(message["precision"], 1 / 15.0**2, rtol=1e-6)
    np.testing.assert_allclose(message["weighted_sum"], 28 / 15.0**2, rtol=1e-6)
    assert message_schema(message)["['precision']"] == ((), "float32")


def test_exact_algorithm_rejects_unknown_server(eight_schools_family):
    with pytest.raises(ValueError, match="server must be"):
        exact_algorithm(eight_schools_family, server="bfgs")


# ---------------------------------------------------------------------- closed-form fixed point
def test_full_participation_reaches_the_closed_form(clients):
    data, _ = clients
    result = _run(clients, num_rounds=8)
    assert isinstance(result, SimulationResult)
    target = _pooled_mean(data)
    expected = target + (1 - STEP) ** 8 * (START - target)
    np.testing.assert_allclose(result.server_state.weight, expected, rtol=1e-5)
    assert int(result.server_state.rounds) == 8
    assert [r.round for r in result.rounds] == list(range(8))
    assert all(
        isinstance(r, RoundRecord) and r.participants == r.received == 10 for r in result.rounds
    )
    assert result.skips == []
    np.testing.assert_array_equal(result.client_states.updates, np.full(10, 8))
    # the personal output is computed against the final global state, per client
    local = np.array([data[c]["y"].mean() for c in data.client_ids])
    np.testing.assert_allclose(
        result.personal["gap"], local - float(result.server_state.weight), rtol=1e-4, atol=1e-5
    )


def test_many_rounds_converge_to_the_pooled_mean(clients):
    data, _ = clients
    result = _run(clients, num_rounds=40)
    np.testing.assert_allclose(result.server_state.weight, _pooled_mean(data), rtol=1e-5)


def test_converged_stops_early_and_on_round_sees_every_round(clients):
    seen = []
    result = _run(
        clients,
        num_rounds=50,
        converged=lambda info: abs(float(info["change"])) < 1e-3,
        on_round=lambda record, server, client: seen.append((record.round, float(server.weight))),
    )
    assert len(result.rounds) < 50
    assert [r for r, _ in seen] == [r.round for r in result.rounds]
    assert seen[-1][1] == float(result.server_state.weight)
    assert abs(float(result.rounds[-1].server_info["change"])) < 1e-3


# ---------------------------------------------------------------------- partial participation
def test_partial_participation_and_dropout_are_recorded(clients):
    data, _ = clients
    result = _run(clients, num_rounds=12, participation=0.6, dropout=0.25, seed=3)
    participants = [r.participants for r in result.rounds]
    assert min(participants) < 10  # some rounds leave clients out
    dropped = [s for s in result.skips if s.reason == "dropped out"]
    assert dropped and all(isinstance(s, SkipRecord) for s in dropped)
    assert {s.client for s in dropped} <= set(data.client_ids)
    assert all(s.reason == "dropped out" for s in result.skips)
    # a client's state advances exactly in the rounds its message was used
    total_received = sum(r.received for r in result.rounds)
    assert int(np.sum(result.client_states.updates)) == total_received
    assert total_received < 12 * 10
    # every received message moved the estimate toward the pooled mean: still a contraction
    target = _pooled_mean(data)
    assert abs(float(result.server_state.weight) - target) < abs(START - target)


def test_dropout_of_everyone_leaves_the_server_state_unchanged(clients):
    result = _run(clients, num_rounds=3, dropout=1.0)
    assert float(result.server_state.weight) == START
    assert len(result.skips) == 3 * 10
    assert all(r.received == 0 for r in result.rounds)
    np.testing.assert_array_equal(result.client_states.updates, np.zeros(10))


# ---------------------------------------------------------------------- invalid messages
def test_nan_message_is_skipped_with_reason_and_the_state_stays_clean(clients):
    data, _ = clients

    def corrupt(round_index, messages):
        if round_index == 1:
            return dict(messages, delta=messages["delta"].at[2].set(jnp.nan))
        return messages

    result = _run(clients, num_rounds=3, corrupt=corrupt)
    assert result.skips == [SkipRecord(1, "c2", "non-finite values in message field ['delta']")]
    assert result.rounds[1].received == 9
    assert np.isfinite(float(result.server_state.weight))
    updates = np.full(10, 3)
    updates[2] = 2
    np.testing.assert_array_equal(result.client_states.updates, updates)
    # the server applied exactly the weighted average of the nine valid changes in round 1
    local = np.array([data[c]["y"].mean() for c in data.client_ids])
    counts = data.sizes.astype(float)
    w = START
    for round_index in range(3):
        keep = np.ones(10, bool)
        if round_index == 1:
            keep[2] = False
        w = w + np.sum(counts[keep] * STEP * (local[keep] - w)) / counts[keep].sum()
    np.testing.assert_allclose(result.server_state.weight, w, rtol=1e-5)


def test_message_failing_the_algorithm_check_is_skipped(clients):
    def corrupt(round_index, messages):
        return dict(messages, count=messages["count"].at[4].set(-1.0))

    result = _run(clients, num_rounds=2, corrupt=corrupt)
    assert [s.client for s in result.skips] == ["c4", "c4"]
    assert {s.reason for s in result.skips} == {"message failed the algorithm's validity check"}
    assert int(result.client_states.updates[4]) == 0


def _reshape_delta_from(first_round):
    def corrupt(round_index, messages):
        if round_index >= first_round:
            return dict(messages, delta=jnp.stack([messages["delta"]] * 2, axis=1))
        return messages

    return corrupt


def test_message_with_wrong_shape_is_an_error_naming_the_field(clients):
    with pytest.raises(ValueError, match=r"message field \['delta'\]: shape"):
        _run(clients, num_rounds=2, corrupt=_reshape_delta_from(1))


def test_message_with_wrong_shape_in_the_first_round_is_an_error_naming_the_field(clients):
    with pytest.raises(ValueError, match=r"message field \['delta'\]: shape"):
        _run(clients, num_rounds=1, corrupt=_reshape_delta_from(0))


def test_validate_messages_row_by_row():
    schema = {"['a']": ((2,), "float32")}
    messages = {"a": jnp.array([[1.0, 2.0], [jnp.inf, 0.0], [1.0, -1.0]])}
    ok, reasons = validate_messages(messages, schema, lambda m: jnp.all(m["a"] > 0))
    np.testing.assert_array_equal(ok, [True, False, False])
    assert reasons == [
        "",
        "non-finite values in message field ['a']",
        "message failed the algorithm's validity check",
    ]
    with pytest.raises(ValueError, match="do not match the schema"):
        validate_messages({"b": messages["a"]}, schema)


# ---------------------------------------------------------------------- reproducibility
def test_checkpoint_and_resume_continue_identically(clients):
    options = dict(participation=0.7, dropout=0.2, seed=5)
    full = _run(clients, num_rounds=6, **options)
    first = _run(clients, num_rounds=3, **options)
    resumed = _run(
        clients,
        num_rounds=6,
        state=(first.server_state, first.client_states),
        start_round=3,
        **options,
    )
    assert _tree_equal(full.server_state, resumed.server_state)
    assert _tree_equal(full.client_states, resumed.client_states)
    assert _tree_equal(full.personal, resumed.personal)
    assert full.skips == first.skips + resumed.skips
    assert [r.round for r in resumed.rounds] == [3, 4, 5]
    assert [r.received for r in full.rounds] == [r.received for r in first.rounds + resumed.rounds]


def test_checkpoint_from_on_round_hook(clients):
    checkpoints = {}
    options = dict(participation=0.5, seed=9)
    full = _run(
        clients,
        num_rounds=6,
        on_round=lambda record, server, client: checkpoints.__setitem__(
            record.round, (server, client)
        ),
        **options,
    )
    resumed = _run(clients, num_rounds=6, state=checkpoints[2], start_round=3, **options)
    assert _tree_equal(full.server_state, resumed.server_state)
    assert _tree_equal(full.client_states, resumed.client_states)


def test_same_seed_same_result_other_seed_other_result(clients):
    options = dict(num_rounds=6, participation=0.5, dropout=0.1)
    a, b = _run(clients, seed=11, **options), _run(clients, seed=11, **options)
    c = _run(clients, seed=12, **options)
    assert _tree_equal(a.server_state, b.server_state) and a.skips == b.skips
    assert [r.participants for r in a.rounds] == [r.participants for r in b.rounds]
    assert not _tree_equal(a.server_state, c.server_state)


def test_clients_get_distinct_keys_per_round_and_client(clients):
    data, stacked = clients
    base = federated_mean()

    def client_update(key, w, state, client_data):
        state, message, info = base.client_update(key, w, state, client_data)
        return state, dict(message, noise=jax.random.normal(key)), info

    algorithm = base._replace(client_update=client_update)
    seen = []

    def corrupt(round_index, messages):
        seen.append(np.asarray(messages["noise"]))
        return messages

    simulate(
        algorithm,
        jax.random.PRNGKey(0),
        stacked,
        client_ids=data.client_ids,
        num_rounds=3,
        corrupt=corrupt,
    )
    noise = np.stack(seen)  # [round, client]
    assert len(np.unique(noise)) == noise.size
