"""The federated protocol: a small set of pure functions over pytrees.

A federated algorithm is a :class:`FederatedAlgorithm`, a NamedTuple of pure functions in
the spirit of BlackJAX's ``(init, step)`` and FedJAX's ``federated_algorithm``:

``init(key, client_data) -> (server_state, client_states)``
    ``client_data`` is the padded per-client pytree (leading client axis) and
    ``client_states`` is stacked on the same axis.
``broadcast(server_state) -> broadcast``
    What the server sends to every participating client this round.
``client_update(key, broadcast, client_state, client_data) -> (client_state, message, info)``
    One client's work, written for a *single* client; drivers ``jax.vmap`` it over clients.
``server_update(key, server_state, messages, received) -> (server_state, info)``
    ``messages`` are stacked on the client axis and ``received`` (bool, ``[num_clients]``)
    marks the clients whose message arrived *and* passed validation. The server must ignore
    every other row.
``client_finalize(key, broadcast, client_state, client_data) -> personal``
    The client's personal posterior against the final global state; it stays on the client.
    An algorithm whose ``client_update`` already computes it sets ``personal_in_info``: the
    update's ``info`` then has a ``personal`` field, and drivers finalize by one more
    ``client_update`` against the final broadcast (its message is dropped), so that one
    compiled program serves both.
``validate_message(message) -> ok`` or ``validate_message(message, broadcast) -> ok``
    Algorithm-specific check of one message (e.g. positive definiteness), returning a
    boolean scalar; a check with two parameters also gets this round's broadcast (e.g. the
    global approximation the message must keep positive definite). Finiteness and shapes
    are checked by the driver for every algorithm.
``progress_info(server_info) -> {name: text}`` (optional)
    What a driver's progress bar shows of a round next to the clients received (e.g. the
    loss and the learned spread).

Two drivers run these functions: :func:`simulate` (in-process, vectorized, with partial
participation and dropout) and the Flower adapter (:mod:`hierfl.flower`: Flower's Message
API, in its simulation engine or on a SuperLink with real SuperNodes).
:func:`hierfl.drivers.drive` picks one by name (the ``driver=`` option of :func:`hierfl.fit`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ClientGroups",
    "FederatedAlgorithm",
    "RoundRecord",
    "SimulationResult",
    "SkipRecord",
    "algorithm_schema",
    "asked_clients",
    "count_clients",
    "finalize_clients",
    "map_clients",
    "message_schema",
    "progress_postfix",
    "round_keys",
    "simulate",
    "validate_messages",
    "vmap_clients",
]

PyTree = Any


class FederatedAlgorithm(NamedTuple):
    """Pure functions that make up a federated algorithm (see the module docstring)."""

    init: Callable[..., tuple[PyTree, PyTree]]
    broadcast: Callable[[PyTree], PyTree]
    client_update: Callable[..., tuple[PyTree, PyTree, PyTree]]
    server_update: Callable[..., tuple[PyTree, PyTree]]
    client_finalize: Callable[..., PyTree]
    validate_message: Callable[[PyTree], Any] | None = None
    personal_in_info: bool = False
    progress_info: Callable[[PyTree], dict] | None = None


def progress_postfix(algorithm: FederatedAlgorithm, server_info, received: int, total: int):
    """The progress bar's text for one round: clients received, and the algorithm's own
    ``progress_info``."""
    extra = {} if algorithm.progress_info is None else algorithm.progress_info(server_info)
    return {"received": f"{received}/{total}", **extra}


def vmap_clients(fn: Callable, client_batch: int | None = None) -> Callable:
    """``fn(key, broadcast, client_state, client_data)``, written for one client, as one
    jitted call over a leading client axis of keys, states and data (the broadcast is
    shared).

    By default all clients are one ``jax.vmap``. With ``client_batch``, ``jax.lax.map`` runs
    chunks of that many clients one after another, each chunk vmapped: the same results,
    with the memory of one chunk instead of all clients (every client holds its own copy of
    whatever it trains, e.g. a body and its optimizer state).

    The jitted call is kept for the same ``fn`` and ``client_batch`` (the last
    ``VMAP_CACHE_SIZE`` of them), so a second run of the same algorithm, e.g. a second
    ``hf.fit`` with the same model and settings, does not compile it again.

    >>> import jax.numpy as jnp
    >>> f = lambda key, b, state, data: state + b * data
    >>> args = (jnp.zeros(5), 2.0, jnp.arange(5.0), jnp.ones(5))
    >>> bool((vmap_clients(f)(*args) == vmap_clients(f, client_batch=2)(*args)).all())
    True
    >>> vmap_clients(f) is vmap_clients(f)
    True
    """
    if client_batch is not None and (
        not isinstance(client_batch, int | np.integer) or int(client_batch) < 1
    ):
        raise ValueError(f"client_batch must be a positive integer, got {client_batch!r}")
    chunk = None if client_batch is None else int(client_batch)
    try:
        return _cached_vmap_clients(fn, chunk)
    except TypeError:  # an unhashable callable: build it afresh
        return _vmap_clients(fn, chunk)


#: jitted client maps kept by :func:`vmap_clients` (each holds its compiled executables)
VMAP_CACHE_SIZE = 16


def _vmap_clients(fn: Callable, client_batch: int | None) -> Callable:
    if client_batch is None:
        return jax.jit(jax.vmap(fn, in_axes=(0, None, 0, 0)))

    def chunked(keys, broadcast, client_states, client_data):
        return jax.lax.map(
            lambda args: fn(args[0], broadcast, args[1], args[2]),
            (keys, client_states, client_data),
            batch_size=client_batch,
        )

    return jax.jit(chunked)


_cached_vmap_clients = functools.lru_cache(maxsize=VMAP_CACHE_SIZE)(_vmap_clients)


def finalize_clients(
    algorithm: FederatedAlgorithm,
    vmapped_update,
    keys,
    broadcast,
    client_states,
    client_data,
    client_batch: int | None = None,
):
    """Every client's personal posterior against ``broadcast`` (see ``personal_in_info``)."""
    if algorithm.personal_in_info:
        return map_clients(vmapped_update, keys, broadcast, client_states, client_data)[2].personal
    return map_clients(
        vmap_clients(algorithm.client_finalize, client_batch),
        keys,
        broadcast,
        client_states,
        client_data,
    )


class SkipRecord(NamedTuple):
    """A client left out of a round, and why."""

    round: int
    client: Any
    reason: str


class RoundRecord(NamedTuple):
    """What one round of :func:`simulate` did."""

    round: int
    participants: int
    received: int
    server_info: PyTree


class SimulationResult(NamedTuple):
    """Output of :func:`simulate`."""

    server_state: PyTree
    client_states: PyTree
    personal: PyTree
    rounds: list[RoundRecord]
    skips: list[SkipRecord]


def message_schema(message: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of a single client's message (arrays or ``ShapeDtypeStruct``s),
    keyed by tree path."""
    leaves = jax.tree_util.tree_leaves_with_path(message)
    return {
        jax.tree_util.keystr(path): (tuple(np.shape(leaf)), str(np.dtype(leaf.dtype)))
        for path, leaf in leaves
    }


class ClientGroups(NamedTuple):
    """Client data in groups of clients of similar size, each group stacked on its own
    leading axis and padded to its own width, so that small clients do not pay for the
    largest one's rows (each group is one ``jax.vmap``; one compiled program per width).

    Attributes
    ----------
    indices : tuple of ndarray
        Positions (in client order) of each group's clients; together a permutation.
    data : tuple of pytree
        Each group's stacked client data.
    """

    indices: tuple
    data: tuple


def count_clients(client_data) -> int:
    """Number of clients in stacked client data or in :class:`ClientGroups`."""
    if isinstance(client_data, ClientGroups):
        return sum(len(index) for index in client_data.indices)
    return int(jax.tree_util.tree_leaves(client_data)[0].shape[0])


def map_clients(fn: Callable, keys, broadcast, client_states, client_data):
    """``fn(keys, broadcast, client_states, client_data)``, a jitted vmap over clients, on
    stacked client data or on :class:`ClientGroups` (one call per group; the outputs are put
    back in client order)."""
    if not isinstance(client_data, ClientGroups):
        return fn(keys, broadcast, client_states, client_data)
    outputs = []
    for index, data in zip(client_data.indices, client_data.data, strict=True):
        rows = jnp.asarray(index)
        states = jax.tree_util.tree_map(lambda a, r=rows: a[r], client_states)
        outputs.append(fn(keys[rows], broadcast, states, data))
    order = jnp.asarray(np.argsort(np.concatenate(client_data.indices)))
    return jax.tree_util.tree_map(lambda *parts: jnp.concatenate(parts)[order], *outputs)


def algorithm_schema(
    vmapped_update, keys, broadcast, client_states, client_data
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The message schema the algorithm declares: the per-client shapes its (jitted, vmapped)
    ``client_update`` returns, found by ``eval_shape`` (nothing runs, and the trace is shared
    with the call that follows), so a malformed first round is rejected instead of defining
    the schema."""
    if isinstance(client_data, ClientGroups):
        rows = jnp.asarray(client_data.indices[0])
        keys, client_data = keys[rows], client_data.data[0]
        client_states = jax.tree_util.tree_map(lambda a: a[rows], client_states)
    shapes = vmapped_update.eval_shape(keys, broadcast, client_states, client_data)[1]
    per_client = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes
    )
    return message_schema(per_client)


def _takes_broadcast(check: Callable) -> bool:
    """Whether an algorithm's ``validate_message`` takes the broadcast as a second argument."""
    try:
        parameters = inspect.signature(check).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def validate_messages(
    messages: PyTree, schema: dict, check: Callable | None = None, broadcast: PyTree = None
):
    """Check stacked messages row by row.

    Parameters
    ----------
    messages : pytree with a leading client axis
    schema : dict
        Expected per-client schema from :func:`message_schema`.
    check : callable, optional
        Algorithm-specific per-message check returning a boolean scalar; called as
        ``check(message, broadcast)`` when it takes two parameters.
    broadcast : pytree, optional
        This round's broadcast, for checks that need it.

    Returns
    -------
    ok : ndarray of bool, ``[num_clients]``
    reasons : list of str
        Reason for each row (empty string where ``ok``).
    """
    leaves = jax.tree_util.tree_leaves_with_path(messages)
    got = {jax.tree_util.keystr(p): leaf for p, leaf in leaves}
    if set(got) != set(schema):
        raise ValueError(f"message fields {sorted(got)} do not match the schema {sorted(schema)}")
    num = None
    for name, leaf in got.items():
        shape, _ = schema[name]
        if tuple(np.shape(leaf)[1:]) != shape:
            raise ValueError(
                f"message field {name}: shape {np.shape(leaf)[1:]} per client, schema says {shape}"
            )
        num = np.shape(leaf)[0]
    ok = np.ones(num, dtype=bool)
    reasons = [""] * num
    for name, leaf in got.items():
        finite = np.isfinite(np.asarray(leaf)).reshape(num, -1).all(axis=1)
        for i in np.flatnonzero(ok & ~finite):
            reasons[i] = f"non-finite values in message field {name}"
        ok &= finite
    if check is not None:
        if _takes_broadcast(check):
            valid = np.asarray(jax.vmap(check, in_axes=(0, None))(messages, broadcast), dtype=bool)
        else:
            valid = np.asarray(jax.vmap(check)(messages), dtype=bool)
        for i in np.flatnonzero(ok & ~valid):
            reasons[i] = "message failed the algorithm's validity check"
        ok &= valid
    return ok, reasons


@jax.jit
def _select(mask, new, old):
    """Row-wise choice between two client-stacked pytrees (one compiled program)."""

    def choose(a, b):
        m = mask.reshape(mask.shape + (1,) * (jnp.ndim(a) - 1))
        return jnp.where(m, a, b)

    return jax.tree_util.tree_map(choose, new, old)


def round_keys(run_key, round_index: int):
    """The keys of round ``round_index``: ``(pick, drop, client, server)``, from
    ``fold_in(run_key, round_index)`` (so a resumed run continues identically). Every driver
    uses this schedule, so that drivers agree."""
    return tuple(jax.random.split(jax.random.fold_in(run_key, round_index), 4))


def asked_clients(pick_key, num_clients: int, participation: float) -> np.ndarray:
    """Which clients a round asks to work (bool ``[num_clients]``): each with probability
    ``participation``; all of them when it is 1."""
    if participation >= 1.0:
        return np.ones(num_clients, dtype=bool)
    return np.array(jax.random.uniform(pick_key, (num_clients,)) < participation)


def simulate(
    algorithm: FederatedAlgorithm,
    key,
    client_data: PyTree,
    *,
    client_ids: tuple,
    num_rounds: int,
    participation: float = 1.0,
    dropout: float = 0.0,
    corrupt: Callable | None = None,
    state: tuple[PyTree, PyTree] | None = None,
    start_round: int = 0,
    converged: Callable[[PyTree], bool] | None = None,
    on_round: Callable[[RoundRecord, PyTree, PyTree], None] | None = None,
    progress: bool | str = False,
    final_broadcast: Callable[[PyTree], PyTree] | None = None,
    client_batch: int | None = None,
) -> SimulationResult:
    """Run a federated algorithm in process.

    Every round: the server broadcasts; a random fraction ``participation`` of clients is
    asked to work; each asked client independently drops out with probability ``dropout``;
    the rest run ``client_update`` (one ``jax.vmap`` over all clients, with non-participants'
    states kept); messages are validated and invalid ones skipped with a recorded reason; the
    server updates from the valid messages only.

    Parameters
    ----------
    algorithm : FederatedAlgorithm
    key : jax.random.PRNGKey
        Split explicitly into one key per round, and per client within a round.
    client_data : pytree or ClientGroups
        Per-client data stacked on a leading client axis (e.g. ``ClientData.padded``), or in
        groups of similar size (:class:`ClientGroups`; ``init`` then receives the groups).
    client_ids : tuple
        Client ids, used in skip records.
    num_rounds : int
        Maximum number of rounds.
    participation, dropout : float
        Fraction of clients asked per round, and probability that an asked client drops out.
    corrupt : callable, optional
        ``corrupt(round, messages) -> messages``, a fault injector for tests and benchmarks.
    state : (server_state, client_states), optional
        Resume from a checkpoint instead of calling ``init``.
    start_round : int
        Round number to resume from; rounds use ``fold_in(key, round)``, so a resumed run
        continues identically.
    converged : callable, optional
        ``converged(server_info) -> bool``; stops early when true.
    on_round : callable, optional
        Called after every round with the record and the new states (e.g. to checkpoint).
    progress : bool or str
        Show a progress bar (the string is its description).
    final_broadcast : callable, optional
        ``final_broadcast(server_state) -> broadcast`` the personal posteriors are taken
        against (default ``algorithm.broadcast``; e.g. an averaged approximation).
    client_batch : int, optional
        Run the clients in chunks of this many, one chunk at a time (each chunk one
        ``jax.vmap``; :func:`vmap_clients`): the same results with bounded memory, for many
        clients that each train a copy of a large model. Default: all clients at once.
    """
    init_key, run_key, final_key = jax.random.split(key, 3)
    num_clients = len(client_ids)
    if state is None:
        server_state, client_states = algorithm.init(init_key, client_data)
    else:
        server_state, client_states = state
    vmapped_update = vmap_clients(algorithm.client_update, client_batch)
    schema = None
    rounds: list[RoundRecord] = []
    skips: list[SkipRecord] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=num_rounds,
            initial=start_round,
            desc=progress if isinstance(progress, str) else "rounds",
        )
    for round_index in range(start_round, num_rounds):
        pick_key, drop_key, client_key, server_key = round_keys(run_key, round_index)
        asked = asked_clients(pick_key, num_clients, participation)
        dropped = asked & np.array(jax.random.uniform(drop_key, (num_clients,)) < dropout)
        working = asked & ~dropped
        for i in np.flatnonzero(dropped):
            skips.append(SkipRecord(round_index, client_ids[i], "dropped out"))
        broadcast = algorithm.broadcast(server_state)
        keys = jax.random.split(client_key, num_clients)
        new_states, messages, _ = map_clients(
            vmapped_update, keys, broadcast, client_states, client_data
        )
        if corrupt is not None:
            messages = corrupt(round_index, messages)
        if schema is None:
            schema = algorithm_schema(vmapped_update, keys, broadcast, client_states, client_data)
        ok, reasons = validate_messages(messages, schema, algorithm.validate_message, broadcast)
        for i in np.flatnonzero(working & ~ok):
            skips.append(SkipRecord(round_index, client_ids[i], reasons[i]))
        received = working & ok
        client_states = (
            new_states
            if received.all()
            else _select(jnp.asarray(received), new_states, client_states)
        )
        server_state, server_info = algorithm.server_update(
            server_key, server_state, messages, jnp.asarray(received)
        )
        record = RoundRecord(round_index, int(working.sum()), int(received.sum()), server_info)
        rounds.append(record)
        if on_round is not None:
            on_round(record, server_state, client_states)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(progress_postfix(algorithm, server_info, record.received, num_clients))
        if converged is not None and converged(server_info):
            break
    if bar is not None:
        bar.close()
    broadcast = (algorithm.broadcast if final_broadcast is None else final_broadcast)(server_state)
    final_keys = jax.random.split(final_key, num_clients)
    personal = finalize_clients(
        algorithm, vmapped_update, final_keys, broadcast, client_states, client_data, client_batch
    )
    return SimulationResult(server_state, client_states, personal, rounds, skips)
