r"""Point-estimate baselines in the same harness as ``method="svi"``.

Every baseline is a :class:`hierfl.protocol.FederatedAlgorithm` (pure functions, client state
stacked on the client axis, one ``jax.vmap``-ed, ``jax.jit``-compiled local update per round)
run by :func:`hierfl.protocol.simulate`, on the same :class:`~hierfl.neural.NeuralModel`,
data layout, rounds and local steps as hierfl. The model's ``"params"`` collection is the
body and its ``"personal"`` collection the head (or normalization); the baselines differ only
in what is averaged and what is kept:

=================  ===========================================================================
``local``          every client trains its own full model; nothing is shared
``fedavg``         one global model, client deltas averaged with weights ``n_i``
                   (McMahan et al. 2017)
``fedprox``        FedAvg with the local proximal term ``(strength/2)||v - w||^2`` (Li et al.
                   2020)
``ditto``          FedAvg for the global ``w``; each client also keeps ``v_i`` trained on
                   ``F_i(v) + (strength/2)||v - w||^2`` (Li et al. 2021)
``fedrep``         body averaged, head local; each round the head is trained first with the body
                   frozen, then the body with the head frozen (Collins et al. 2021)
``fedbn``          the personal collection (normalization scale/shift, or the head: FedPer)
                   kept local, the rest averaged (Li et al. 2021, FedBN)
=================  ===========================================================================

FedAvg + local fine-tuning is ``fedavg`` followed by :func:`finetune`. :func:`select` picks
each baseline's learning rate or strength on validation data from a small grid.

:func:`proximal_objective` is the proximal (Ditto / pFedMe) objective; with
``lambda = 1/tau^2`` it equals hierfl's MAP objective
(:func:`hierfl.neural.svi.map_objective`) up to the constant ``P log tau + (P/2) log 2 pi``.
Ditto's own local loss is the *mean* over the client's ``n`` examples, which rescales that
correspondence to ``lambda_Ditto = 1 / (n tau^2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..protocol import FederatedAlgorithm, simulate
from .model import NeuralModel

__all__ = [
    "BASELINES",
    "LEARNING_RATE_GRID",
    "STRENGTH_GRIDS",
    "BaselineSettings",
    "PointState",
    "baseline_algorithm",
    "client_models",
    "finetune",
    "point_probs",
    "proximal_objective",
    "run_baseline",
    "select",
]

PyTree = Any

BASELINES = ("local", "fedavg", "fedprox", "ditto", "fedrep", "fedbn")
#: Adam learning rates tried for every baseline
LEARNING_RATE_GRID = (1e-3, 3e-3, 1e-2)
#: proximal strengths tried for FedProx (mu) and Ditto (lambda); Ditto's paper grid spans
#: 0.01..2 and FedProx's 0.001..1
STRENGTH_GRIDS = {"fedprox": (0.001, 0.01, 0.1), "ditto": (0.01, 0.1, 1.0)}


class BaselineSettings(NamedTuple):
    """Shared training budget (the same as :class:`hierfl.neural.SVISettings`'s)."""

    num_rounds: int = 30
    local_steps: int = 20
    batch_size: int = 32
    learning_rate: float = 3e-3
    strength: float = 0.0


#: the default budget
DEFAULT_SETTINGS = BaselineSettings()


class PointState(NamedTuple):
    """Full parameters ``{"shared": body, "personal": personal pytree}``."""

    params: PyTree


def _nll(model: NeuralModel, params, x, y):
    logits = model.logits(params["shared"], params["personal"], x)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]


def _squared_distance(a, b):
    return sum(
        jnp.sum((u - v) ** 2)
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def proximal_objective(model: NeuralModel, shared, personal, anchor, strength, x, y):
    r"""``sum_n l_n(theta) + (strength/2) ||theta - anchor||^2`` for the personal vector
    ``theta`` (flattened ``personal``), the proximal objective of Ditto / pFedMe with a summed
    loss; ``anchor`` is flat ``[P]``."""
    theta, _ = model.unravel(personal)
    nll = _nll(model, {"shared": shared, "personal": personal}, x, y)
    return jnp.sum(nll) + 0.5 * strength * jnp.sum((theta - anchor) ** 2)


def _train(
    model,
    params,
    data,
    key,
    *,
    steps,
    batch_size,
    learning_rate,
    anchor=None,
    strength=0.0,
    trainable=("shared", "personal"),
):
    """``steps`` minibatch Adam steps on mean NLL (+ prox term) for one client."""
    optimizer = optax.adam(learning_rate)
    size = data["size"]

    def loss(params, step_key):
        rows = jax.random.randint(step_key, (batch_size,), 0, size)
        value = jnp.mean(_nll(model, params, data["x"][rows], data["y"][rows]))
        if anchor is not None:
            value = value + 0.5 * strength * _squared_distance(params, anchor)
        return value

    def step(carry, step_key):
        params, opt_state = carry
        grads = jax.grad(loss)(params, step_key)
        grads = {
            k: (g if k in trainable else jax.tree_util.tree_map(jnp.zeros_like, g))
            for k, g in grads.items()
        }
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(
        step, (params, optimizer.init(params)), jax.random.split(key, steps)
    )
    return params


def baseline_algorithm(
    model: NeuralModel, name: str, *, settings: BaselineSettings = DEFAULT_SETTINGS
) -> FederatedAlgorithm:
    """One of :data:`BASELINES` as a :class:`~hierfl.protocol.FederatedAlgorithm`.

    The server state and every client state are :class:`PointState`; ``client_finalize``
    returns the parameters the client predicts with (its own model, or the global one for
    ``fedavg`` and ``fedprox``).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
    train = dict(
        steps=settings.local_steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
    )
    averaged = {
        "local": (),
        "fedavg": ("shared", "personal"),
        "fedprox": ("shared", "personal"),
        "ditto": ("shared", "personal"),
        "fedrep": ("shared",),
        "fedbn": ("shared",),
    }[name]

    def init(key, client_data):
        shared, personal = model.init(key)
        params = {"shared": shared, "personal": personal}
        num_clients = jax.tree_util.tree_leaves(client_data)[0].shape[0]
        clients = jax.tree_util.tree_map(
            lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)), params
        )
        return PointState(params), PointState(clients)

    def broadcast(server_state):
        return server_state.params

    def client_update(key, broadcast, client_state, client_data):
        global_key, own_key = jax.random.split(key)
        own = client_state.params
        if name == "local":
            own = _train(model, own, client_data, own_key, **train)
            trained_global = broadcast
        elif name in ("fedavg", "fedprox"):
            trained_global = _train(
                model,
                broadcast,
                client_data,
                global_key,
                **train,
                anchor=broadcast if name == "fedprox" else None,
                strength=settings.strength,
            )
            own = trained_global
        elif name == "ditto":
            trained_global = _train(model, broadcast, client_data, global_key, **train)
            own = _train(
                model,
                own,
                client_data,
                own_key,
                **train,
                anchor=broadcast,
                strength=settings.strength,
            )
        elif name == "fedrep":
            own = {"shared": broadcast["shared"], "personal": own["personal"]}
            own = _train(model, own, client_data, own_key, **train, trainable=("personal",))
            own = _train(model, own, client_data, global_key, **train, trainable=("shared",))
            trained_global = own
        else:  # fedbn
            own = {"shared": broadcast["shared"], "personal": own["personal"]}
            own = _train(model, own, client_data, own_key, **train)
            trained_global = own
        delta = {
            k: jax.tree_util.tree_map(jnp.subtract, trained_global[k], broadcast[k])
            for k in averaged
        }
        message = {"delta": delta, "weight": client_data["size"].astype(jnp.float32)}
        return PointState(own), message, {}

    def server_update(key, server_state, messages, received):
        del key
        weights = received.astype(jnp.float32) * messages["weight"]
        total = jnp.maximum(weights.sum(), 1.0)
        params = dict(server_state.params)
        for k, delta in messages["delta"].items():
            change = jax.tree_util.tree_map(
                lambda d: jnp.tensordot(weights, d, axes=1) / total, delta
            )
            params[k] = jax.tree_util.tree_map(jnp.add, params[k], change)
        return PointState(params), {"received": received.sum()}

    def client_finalize(key, broadcast, client_state, client_data):
        del key, client_data
        if name in ("fedavg", "fedprox"):
            return broadcast
        if name in ("fedrep", "fedbn"):  # the averaged body with the client's own parts
            return {"shared": broadcast["shared"], "personal": client_state.params["personal"]}
        return client_state.params

    return FederatedAlgorithm(init, broadcast, client_update, server_update, client_finalize)


def run_baseline(
    model: NeuralModel,
    name: str,
    stacked,
    client_ids,
    *,
    seed: int = 0,
    settings: BaselineSettings = DEFAULT_SETTINGS,
):
    """Run a baseline with :func:`hierfl.protocol.simulate`; returns the per-client parameters
    the clients predict with (stacked on the client axis) and the server's global model."""
    result = simulate(
        baseline_algorithm(model, name, settings=settings),
        jax.random.PRNGKey(seed),
        stacked,
        client_ids=tuple(client_ids),
        num_rounds=settings.num_rounds,
    )
    return result.personal, result.server_state.params


def finetune(
    model: NeuralModel,
    params,
    stacked,
    key,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int = 32,
    trainable: Sequence[str] = ("shared", "personal"),
    stacked_params: bool = False,
):
    """Local fine-tuning on each client's data, all clients at once (``jax.vmap``).

    ``params`` is one model broadcast to every client (e.g. FedAvg's global model) or, with
    ``stacked_params=True``, per-client parameters stacked on the client axis."""
    num_clients = stacked["size"].shape[0]
    fn = jax.vmap(
        lambda p, d, k: _train(
            model,
            p,
            d,
            k,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            trainable=tuple(trainable),
        ),
        in_axes=(0 if stacked_params else None, 0, 0),
    )
    return jax.jit(fn)(params, stacked, jax.random.split(key, num_clients))


def point_probs(model: NeuralModel, params, x):
    """Class probabilities ``[rows, classes]`` of one point-estimate model."""
    return jax.nn.softmax(model.logits(params["shared"], params["personal"], x))


def client_models(params, index: int):
    """Client ``index``'s parameters from a stacked pytree."""
    return jax.tree_util.tree_map(lambda a: a[index], params)


def select(candidates: dict, score) -> tuple[Any, dict]:
    """Pick the candidate with the highest validation ``score(candidate_result)``.

    ``candidates`` maps a setting (e.g. a learning rate) to a result; returns the best key and
    all scores."""
    scores = {k: float(score(v)) for k, v in candidates.items()}
    best = max(scores, key=scores.get)
    return best, scores
