"""The Flower driver runs the same pure functions as the in-process simulator, with the same keys.

The records codec and the client's commit logic are checked without a Flower run; the rest
runs Flower's simulation engine (one SuperNode per client, two worker processes) and checks
that it reproduces :func:`hierfl.protocol.simulate`: the closed-form federated mean of
``test_protocol`` (partial participation, a client whose message is non-finite), the exact
engine's server posterior on the eight schools, and a client that fails on its node.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402
from ray import cloudpickle  # noqa: E402

import hierfl as hf  # noqa: E402
from hierfl import flower  # noqa: E402
from hierfl.drivers import drive  # noqa: E402
from hierfl.engines import ep  # noqa: E402
from hierfl.engines.exact import exact_algorithm  # noqa: E402
from hierfl.engines.globals_inference import GlobalsSettings  # noqa: E402
from hierfl.protocol import SkipRecord, simulate  # noqa: E402

# the simulation workers rebuild the algorithms from this module: ship it by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEP, START = 0.5, 10.0


def federated_mean():
    """One gradient step per round on ``1/2 sum_j (w - y_ij)^2`` (``test_protocol``'s
    algorithm: the fixed point is the pooled mean); the client state counts the rounds
    whose message the server kept."""

    def init(key, client_data):
        del key
        num = client_data["y"].shape[0]
        return jnp.asarray(START), {"updates": jnp.zeros(num, jnp.int32)}

    def client_update(key, w, state, data):
        del key
        n = jnp.sum(data["mask"])
        local_mean = jnp.sum(jnp.where(data["mask"], data["y"], 0.0)) / n
        message = {"delta": -STEP * (w - local_mean), "count": n.astype(jnp.float32)}
        return {"updates": state["updates"] + 1}, message, {}

    def server_update(key, w, messages, received):
        del key
        weights = jnp.where(received, messages["count"], 0.0)
        total = jnp.sum(jnp.where(received, weights * messages["delta"], 0.0))
        return w + jnp.where(weights.sum() > 0, total / weights.sum(), 0.0), {}

    def client_finalize(key, w, state, data):
        del key
        n = jnp.sum(data["mask"])
        gap = jnp.sum(jnp.where(data["mask"], data["y"], 0.0)) / n - w
        return {"gap": gap, "updates": state["updates"]}

    return hf.protocol.FederatedAlgorithm(
        init, lambda w: w, client_update, server_update, client_finalize
    )


@pytest.fixture(scope="module")
def mean_clients():
    data = hf.ClientData.from_dict(
        {f"c{i}": {"y": np.random.default_rng(i).normal(i, 1.0, size=2 + i % 4)} for i in range(6)}
    )
    padded, mask = data.padded(dtype=np.float32)
    y = np.asarray(padded["y"]).copy()
    y[4, 0] = np.nan  # client c4's message is non-finite every round
    return data.client_ids, {"y": jnp.asarray(y), "mask": jnp.asarray(mask)}


# ---------------------------------------------------------------------- records, no Flower run
def test_pack_and_unpack_round_trip_structure_dtypes_and_values():
    tree = {
        "state": SkipRecord(np.int32(3), None, [np.float64(2.5), np.arange(4, dtype=np.uint32)]),
        "w": np.ones((2, 3), np.float32),
        "flags": (np.array([True, False]),),
        "scalar": np.float32(1.5),
    }
    arrays, structure = flower.pack(tree)
    back = flower.unpack(arrays, structure)
    assert isinstance(back["state"], SkipRecord) and back["state"].client is None
    assert isinstance(back["flags"], tuple) and isinstance(back["state"].reason, list)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back), strict=True):
        assert np.asarray(a).dtype == b.dtype and np.shape(a) == b.shape
        np.testing.assert_array_equal(a, b)
    spec = flower.unpack(None, structure, as_spec=True)
    assert spec["w"] == jax.ShapeDtypeStruct((2, 3), np.float32)
    assert spec["scalar"].shape == ()


def test_unpack_never_imports_and_pack_rejects_what_it_cannot_send():
    _, structure = flower.pack(SkipRecord(np.int32(0), None, np.float32(1)))
    forged = structure.replace("hierfl.protocol", "not_a_loaded_module")
    with pytest.raises(TypeError, match="not_a_loaded_module.*not loaded"):
        flower.unpack(None, forged, as_spec=True)
    with pytest.raises(TypeError, match="string keys"):
        flower.pack({1: np.zeros(2)})
    with pytest.raises(TypeError, match="cannot be sent"):
        flower.pack({"x": object()})


def _train_content(broadcast, *, commit, num_clients=3, key=0):
    arrays, structure = flower.pack(broadcast)
    keys = ArrayRecord(
        {
            "client": Array(np.asarray(jax.random.PRNGKey(key))),
            "init": Array(np.asarray(jax.random.PRNGKey(99))),
        }
    )
    config = ConfigRecord({"num_clients": num_clients, "commit": commit, "structure": structure})
    return RecordDict({"hierfl.config": config, "hierfl.arrays": arrays, "hierfl.keys": keys})


def test_client_keeps_a_state_only_when_the_server_accepted_its_message():
    runtime = flower._runtime("test-commit", federated_mean)
    data = {"y": np.array([1.0, 3.0, 0.0], np.float32), "mask": np.array([True, True, False])}
    state = RecordDict()

    def train(commit, w=0.0):
        reply = flower.handle_client_message(
            runtime, "train", _train_content(np.float32(w), commit=commit), state, 1, data
        )
        message = flower.unpack(reply["hierfl.arrays"], reply["hierfl.config"]["structure"])
        committed = flower._load_state(state, "hierfl.state")["updates"]
        pending = flower._load_state(state, "hierfl.pending")["updates"]
        return message, int(committed), int(pending)

    message, committed, pending = train(commit=False)
    assert (committed, pending) == (0, 1)  # the initial state (init's row 1), one pending
    np.testing.assert_allclose(message["delta"], -STEP * (0.0 - 2.0))
    assert float(message["count"]) == 2.0
    assert train(commit=False)[1:] == (0, 1)  # rejected: the pending state is dropped
    assert train(commit=True)[1:] == (1, 2)  # accepted: kept, and the next one is pending


# ---------------------------------------------------------------------- Flower simulation runs
def test_flower_reproduces_the_simulator_with_partial_participation_and_a_bad_client(
    mean_clients,
):
    client_ids, stacked = mean_clients
    key = jax.random.PRNGKey(3)
    options = dict(client_ids=client_ids, num_rounds=4, participation=0.7)
    reference = simulate(federated_mean(), key, stacked, **options)
    result = flower.run_simulation(federated_mean, key, stacked, workers=2, **options)
    np.testing.assert_allclose(result.server_state, reference.server_state, rtol=1e-6)
    assert [(r.participants, r.received) for r in result.rounds] == [
        (r.participants, r.received) for r in reference.rounds
    ]
    assert sorted(result.skips) == sorted(reference.skips)
    assert all(s.client == "c4" and "non-finite" in s.reason for s in result.skips)
    np.testing.assert_allclose(result.personal["gap"], reference.personal["gap"], rtol=1e-5)
    # a client's state moved on only in the rounds whose message the server kept
    np.testing.assert_array_equal(
        result.client_states["updates"], reference.client_states["updates"]
    )
    assert int(result.client_states["updates"][4]) == 0


@pytest.mark.slow  # hf.fit(driver="flower") below covers the same path in the main suite
def test_flower_exact_engine_gives_the_simulators_posterior(
    eight_schools_data, eight_schools_family
):
    padded, mask = eight_schools_data.padded()
    stacked = {
        "fields": {
            k: jnp.asarray(np.asarray(padded[k], np.float32)) for k in eight_schools_family.required
        },
        "mask": jnp.asarray(mask),
    }
    make = functools.partial(
        exact_algorithm,
        eight_schools_family,
        server="nuts",
        settings=GlobalsSettings(num_warmup=150, num_samples=150, num_chains=1),
        num_clients=eight_schools_data.num_clients,
    )
    key = jax.random.PRNGKey(0)
    options = dict(client_ids=eight_schools_data.client_ids, num_rounds=1)
    reference = simulate(make(), key, stacked, **options)
    result = flower.run_simulation(make, key, stacked, workers=2, **options)
    assert result.skips == [] and result.rounds[0].received == 8
    for site, draws in reference.server_state.draws.items():  # same statistics, same keys
        np.testing.assert_allclose(result.server_state.draws[site], draws, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.personal.mean, reference.personal.mean, rtol=1e-4)


class _FailingClient:
    """``load_client``: node ``partition-id`` holds that row; client 2 raises, from the start
    (``always``) or once it has taken part in a round (its node state holds a client state)."""

    def __init__(self, stacked, always: bool):
        self.stacked = jax.tree_util.tree_map(np.asarray, stacked)
        self.always = always

    def __call__(self, context):
        index = int(context.node_config["partition-id"])
        if index == 2 and (self.always or "hierfl.state" in context.state):
            raise RuntimeError("disk full on client 2")
        return index, jax.tree_util.tree_map(lambda a: a[index], self.stacked)


@pytest.mark.parametrize("always", [False, True], ids=["after-round-0", "from-the-start"])
def test_a_client_failing_on_its_node_is_skipped_and_the_rest_go_on(
    mean_clients, always, monkeypatch
):
    from flwr.simulation import run_simulation as flower_run_simulation

    for name, value in flower.OFFLINE_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    client_ids, stacked = mean_clients
    out: dict = {}
    server = flower.server_app(
        federated_mean,
        jax.random.PRNGKey(0),
        num_clients=6,
        num_rounds=3,
        result=out,
        client_ids=client_ids,
    )
    client = flower.client_app(federated_mean, _FailingClient(stacked, always))
    flower_run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=6,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    result = out["result"]
    # c4's messages are non-finite in every round; c2 fails from round 1 (or from the start)
    expected = [4, 4, 4] if always else [5, 4, 4]
    assert [r.received for r in result.rounds] == expected
    failed = [s for s in result.skips if s.client == "c2"]
    assert [s.round for s in failed] == ([0, 1, 2, 3] if always else [1, 2, 3])  # 3: finalize
    assert all("disk full on client 2" in s.reason for s in failed)
    assert np.isfinite(result.server_state) and result.personal is None


def test_fit_with_driver_flower_gives_the_simulators_fit(eight_schools_data, eight_schools_family):
    options = dict(method="exact", seed=1, num_warmup=150, num_samples=150, num_chains=1)
    reference = hf.fit(eight_schools_family, eight_schools_data, **options)
    fit = hf.fit(eight_schools_family, eight_schools_data, driver="flower", **options)
    for site, draws in reference.global_samples.items():
        np.testing.assert_allclose(fit.global_samples[site], draws, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        fit.posterior_samples()["theta"].mean(axis=(0, 1)),
        reference.posterior_samples()["theta"].mean(axis=(0, 1)),
        rtol=1e-4,
    )


def test_svi_with_driver_flower_gives_the_simulators_fit():
    pytest.importorskip("flax")
    from hierfl.neural import mlp_head_model

    rng = np.random.default_rng(0)
    data = hf.ClientData.from_dict(
        {c: {"x": rng.normal(size=(12, 4)), "y": rng.integers(0, 3, 12)} for c in "abcd"}
    )
    model = mlp_head_model(input_dim=4, num_classes=3, hidden=(8,))
    options = dict(method="svi", num_rounds=3, local_steps=3, elbo_steps=20, participation=0.8)
    reference = hf.fit(model, data, **options)
    fit = hf.fit(model, data, driver="flower", **options)
    np.testing.assert_allclose(fit.tau, reference.tau, rtol=1e-4)
    np.testing.assert_allclose(fit.mu, reference.mu, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fit.personal_mean, reference.personal_mean, rtol=1e-3, atol=1e-5)
    x = np.zeros((2, 4))
    np.testing.assert_allclose(
        fit.predict("c", x=x)["probs"], reference.predict("c", x=x)["probs"], rtol=1e-4
    )


def test_ep_with_driver_flower_gives_the_simulators_fit(monkeypatch):
    """Flower runs EP's synchronous rounds as the simulator does. With as many clients as
    open a run with a sequential sweep in process (the threshold lowered to 3 here), a Flower
    run by default has none, and asking for one is refused."""
    from models import cbpp

    herds = cbpp.load()
    data = herds.subset(herds.client_ids[:5])  # each node compiles its own tilted inference
    monkeypatch.setattr(ep, "SEQUENTIAL_START_FROM", 3)
    options = dict(method="ep", tilted="laplace", num_rounds=3, seed=0)
    with pytest.raises(ValueError, match="no opening sequential sweep"):
        hf.fit(cbpp.model, data, driver="flower", sequential_start=True, **options)
    reference = hf.fit(cbpp.model, data, sequential_start=False, **options)
    fit = hf.fit(cbpp.model, data, driver="flower", **options)
    assert fit.diagnostics["rounds"] == reference.diagnostics["rounds"] == 3
    np.testing.assert_allclose(  # Newton-Laplace tilted inference: deterministic
        fit.diagnostics["history"]["mean"], reference.diagnostics["history"]["mean"], atol=1e-4
    )
    for site, draws in reference.global_samples.items():
        np.testing.assert_allclose(fit.global_samples[site], draws, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="synchronous schedule only"):
        hf.fit(cbpp.model, data, driver="flower", schedule="sequential", **options)


def test_driver_flower_refuses_simulated_dropout_and_unknown_drivers(eight_schools_data):
    with pytest.raises(ValueError, match="no simulated dropout"):
        drive(
            "flower",
            federated_mean,
            jax.random.PRNGKey(0),
            {},
            client_ids=(),
            num_rounds=1,
            dropout=0.1,
        )
    with pytest.raises(ValueError, match="driver must be one of"):
        hf.fit(hf.NormalNormal(), eight_schools_data, driver="carrier-pigeon")
    with pytest.raises(ValueError, match="method='nuts' runs in process"):
        hf.fit(hf.NormalNormal(), eight_schools_data, method="nuts", driver="flower")
