"""The Flower driver: any :class:`~hierfl.protocol.FederatedAlgorithm` over Flower's Message API.

The in-process simulator (:func:`hierfl.protocol.simulate`) and this driver run the *same*
pure functions (``init``, ``broadcast``, ``client_update``, ``server_update``,
``client_finalize``), with the same keys, so a run on Flower gives what the simulator gives
(up to float rounding: the simulator ``vmap``-s the clients, each Flower client runs alone).

**The exchange.** Every pytree travels as an :class:`flwr.app.ArrayRecord` (one array per
leaf, named by its path) with its structure as JSON in a :class:`flwr.app.ConfigRecord`
(:func:`pack` / :func:`unpack`; no pickle crosses the wire, and only ``NamedTuple`` classes
of modules already loaded on the receiving side are rebuilt).

1. ``query``: the server asks every node which client it holds (its index in ``0..N-1``)
   and the shapes (never the values) of its data;
2. ``train``, once per round: the server sends the broadcast, the round's client key and
   whether the node's previous message was accepted; the client commits or drops the state
   that message came from (as the simulator keeps a client's state only when its message
   arrives and passes validation), runs ``client_update`` and replies with its message. The
   server validates every reply against the schema that ``client_update`` declares
   (:func:`hierfl.protocol.algorithm_schema`; finiteness, shapes, the algorithm's own check),
   records every client it skips and why (an error on the node, no reply, an invalid
   message), and runs ``server_update`` on the rest;
3. ``evaluate``: every client computes its personal posterior against the final global
   state and keeps it (in its node state); it sends it back only when the server asks
   (``return_clients``, for simulations and tests).

A client's state lives in its node's :attr:`flwr.app.Context.state` between rounds. The
server holds the server state, as in the simulator.

Use :func:`run_simulation` to run an algorithm in Flower's simulation engine (one
SuperNode per client) and get a :class:`~hierfl.protocol.SimulationResult`; or build the
apps with :func:`server_app` and :func:`client_app` for ``flwr run`` on a SuperLink with
real SuperNodes, where each node loads its own client's data.

Needs the ``flower`` extra: ``pip install "hierfl[flower]"``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .protocol import (
    FederatedAlgorithm,
    RoundRecord,
    SimulationResult,
    SkipRecord,
    asked_clients,
    message_schema,
    progress_postfix,
    round_keys,
    validate_messages,
)

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError("hierfl.flower needs Flower: pip install 'hierfl[flower]'") from error

__all__ = [
    "OFFLINE_ENVIRONMENT",
    "client_app",
    "handle_client_message",
    "pack",
    "run_server",
    "run_simulation",
    "server_app",
    "unpack",
]

PyTree = Any

#: environment for Flower and Ray on a machine without network access: no telemetry, no
#: update check, Ray on 127.0.0.1 only (set by :func:`run_simulation` unless already set)
OFFLINE_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}

#: seconds the server waits for the expected number of nodes to connect
CONNECT_TIMEOUT = 120.0

_CONFIG, _ARRAYS, _KEYS = "hierfl.config", "hierfl.arrays", "hierfl.keys"
_STATE, _PENDING, _META = "hierfl.state", "hierfl.pending", "hierfl.meta"
_PERSONAL, _INITIAL = "hierfl.personal", "hierfl.initial"


# ---------------------------------------------------------------------------- pytree codec
def _encode(tree, path: str, leaves: dict) -> Any:
    """JSON structure of ``tree``; its leaves go into ``leaves`` under their paths."""
    if tree is None:
        return None
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        kind = type(tree)
        return {
            "namedtuple": f"{kind.__module__}:{kind.__qualname__}",
            "fields": [_encode(getattr(tree, f), f"{path}.{f}", leaves) for f in tree._fields],
        }
    if isinstance(tree, (tuple, list)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return {kind: [_encode(item, f"{path}[{i}]", leaves) for i, item in enumerate(tree)]}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise TypeError(f"{path or 'tree'}: only dicts with string keys can be sent")
        return {"dict": [[k, _encode(tree[k], f"{path}.{k}", leaves)] for k in sorted(tree)]}
    array = np.asarray(tree)
    if array.dtype == object:
        raise TypeError(f"{path or 'tree'}: a {type(tree).__name__} cannot be sent as an array")
    name = path or "."
    leaves[name] = array
    return {"leaf": name, "shape": list(array.shape), "dtype": str(array.dtype)}


def _namedtuple_class(spec: str):
    module, _, qualname = spec.partition(":")
    if module not in sys.modules:  # never import on a peer's say-so
        raise TypeError(f"unknown NamedTuple {spec!r}: module {module!r} is not loaded")
    kind = sys.modules[module]
    for part in qualname.split("."):
        kind = getattr(kind, part, None)
    if not (isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields")):
        raise TypeError(f"{spec!r} is not a NamedTuple")
    return kind


def _decode(structure, arrays: dict, as_spec: bool) -> PyTree:
    if structure is None:
        return None
    if "leaf" in structure:
        if as_spec:
            return jax.ShapeDtypeStruct(tuple(structure["shape"]), np.dtype(structure["dtype"]))
        return np.array(arrays[structure["leaf"]])  # exactly as sent (dtype included)
    if "namedtuple" in structure:
        kind = _namedtuple_class(structure["namedtuple"])
        return kind(*(_decode(s, arrays, as_spec) for s in structure["fields"]))
    if "tuple" in structure:
        return tuple(_decode(s, arrays, as_spec) for s in structure["tuple"])
    if "list" in structure:
        return [_decode(s, arrays, as_spec) for s in structure["list"]]
    if "dict" in structure:
        return {k: _decode(s, arrays, as_spec) for k, s in structure["dict"]}
    raise ValueError(f"unrecognized structure node {structure!r}")


def pack(tree: PyTree) -> tuple[ArrayRecord, str]:
    """A pytree as an ``ArrayRecord`` (one array per leaf, named by its path) and its
    structure as a JSON string (:func:`unpack` inverts it).

    Supported nodes: ``None``, dicts with string keys, lists, tuples and ``NamedTuple`` s;
    leaves are anything :func:`numpy.asarray` turns into a numeric or boolean array.

    Examples
    --------
    >>> import numpy as np
    >>> from hierfl.protocol import SkipRecord
    >>> tree = {"w": np.ones((2, 3), np.float32), "info": SkipRecord(np.int32(1), None, 2.5)}
    >>> arrays, structure = pack(tree)
    >>> sorted(arrays.keys())
    ['.info.reason', '.info.round', '.w']
    >>> back = unpack(arrays, structure)
    >>> back["w"].shape, int(back["info"].round), back["info"].client
    ((2, 3), 1, None)
    """
    leaves: dict = {}
    structure = _encode(tree, "", leaves)
    record = ArrayRecord({name: Array(np.array(a, order="C")) for name, a in leaves.items()})
    return record, json.dumps(structure)


def unpack(arrays: ArrayRecord | None, structure: str, *, as_spec: bool = False) -> PyTree:
    """Inverse of :func:`pack`. With ``as_spec`` the leaves are ``jax.ShapeDtypeStruct`` s
    (only the structure is needed, ``arrays`` may be ``None``)."""
    values = {} if arrays is None else {name: a.numpy() for name, a in arrays.items()}
    return _decode(json.loads(structure), values, as_spec)


def _spec_json(tree: PyTree) -> str:
    """Structure, shapes and dtypes of ``tree``, without its values."""
    return json.dumps(_encode(tree, "", {}))


# ---------------------------------------------------------------------------- client side
_RUNTIMES: dict[tuple, dict] = {}


def _runtime(
    token: str, make_algorithm: Callable[..., FederatedAlgorithm], options: dict | None = None
) -> dict:
    """The algorithm (``make_algorithm(**options)``) and its compiled client functions, built
    once per process (a node, or a simulation worker that serves many nodes) and options."""
    options = options or {}
    key = (token, tuple(sorted(options.items())))
    if key not in _RUNTIMES:
        algorithm = make_algorithm(**options)
        _RUNTIMES[key] = {
            "algorithm": algorithm,
            "update": jax.jit(algorithm.client_update),
            "finalize": jax.jit(algorithm.client_finalize),
        }
    return _RUNTIMES[key]


def _initial_state(algorithm: FederatedAlgorithm, init_key, client_data, index, num_clients):
    """Client ``index``'s row of ``init`` (``init`` sees only the data's shapes)."""
    template = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((num_clients, *np.shape(a)), np.asarray(a).dtype),
        client_data,
    )
    _, states = algorithm.init(init_key, template)
    return jax.tree_util.tree_map(lambda a: a[index], states)


def _load_state(context_state: RecordDict, name: str):
    meta = context_state[_META]
    return unpack(context_state[name], meta[name])


def _store_state(context_state: RecordDict, name: str, tree) -> None:
    arrays, structure = pack(tree)
    context_state[name] = arrays
    meta = context_state[_META] if _META in context_state else ConfigRecord({})
    meta[name] = structure
    context_state[_META] = meta


def _commit(context_state: RecordDict, accepted: bool) -> None:
    """Keep the state the last message came from if the server accepted that message."""
    if _PENDING in context_state:
        if accepted:
            context_state[_STATE] = context_state[_PENDING]
            meta = context_state[_META]
            meta[_STATE] = meta[_PENDING]
        del context_state[_PENDING]


def handle_client_message(
    runtime: dict, message_type: str, content: RecordDict, context_state: RecordDict, index, data
) -> RecordDict:
    """What a client does with one server message (the body of the ClientApp; pure but for
    ``context_state``, the node's state between rounds). Returns the reply's content."""
    algorithm = runtime["algorithm"]
    config = content[_CONFIG]
    if message_type == "query":
        return RecordDict({_CONFIG: ConfigRecord({"client": index, "data": _spec_json(data)})})
    keys = content[_KEYS]
    num_clients = int(config["num_clients"])
    client_key = jax.random.split(jnp.asarray(keys["client"].numpy()), num_clients)[index]
    _commit(context_state, bool(config["commit"]))
    if _INITIAL in content:  # the server starts this client from a given state (a resume)
        _store_state(context_state, _STATE, unpack(content[_INITIAL], config["initial"]))
    if _STATE in context_state:
        state = _load_state(context_state, _STATE)
    else:
        state = _initial_state(
            algorithm, jnp.asarray(keys["init"].numpy()), data, index, num_clients
        )
        _store_state(context_state, _STATE, state)
    broadcast = unpack(content[_ARRAYS], config["structure"])
    data = jax.tree_util.tree_map(jnp.asarray, data)
    if message_type == "train":
        new_state, message, _ = runtime["update"](client_key, broadcast, state, data)
        _store_state(context_state, _PENDING, new_state)
        arrays, structure = pack(message)
        return RecordDict(
            {_CONFIG: ConfigRecord({"client": index, "structure": structure}), _ARRAYS: arrays}
        )
    if message_type == "evaluate":
        if algorithm.personal_in_info:
            personal = runtime["update"](client_key, broadcast, state, data)[2].personal
        else:
            personal = runtime["finalize"](client_key, broadcast, state, data)
        _store_state(context_state, _PERSONAL, personal)
        reply = {"client": index}
        records = {}
        if config["return_clients"]:
            personal_arrays, reply["personal"] = pack(personal)
            state_arrays, reply["state"] = pack(state)
            records = {"personal": personal_arrays, "state": state_arrays}
        return RecordDict({_CONFIG: ConfigRecord(reply), **records})
    raise ValueError(f"unknown message type {message_type!r}")


def client_app(
    make_algorithm: Callable[..., FederatedAlgorithm],
    load_client: Callable[[Context], tuple[int, PyTree]],
    *,
    algorithm_options: Callable[[Context], dict] | None = None,
    token: str | None = None,
) -> ClientApp:
    """A Flower ``ClientApp`` running ``make_algorithm()``'s client functions.

    Parameters
    ----------
    make_algorithm : callable
        Builds the algorithm, once per process and options (it must be picklable for the
        simulation engine: a module-level function or a :func:`functools.partial` of one).
    load_client : callable
        ``load_client(context) -> (index, client_data)``: this node's client index in
        ``0..N-1`` and its data pytree (one client's, no client axis), e.g. from
        ``context.node_config``.
    algorithm_options : callable, optional
        ``algorithm_options(context) -> dict`` of keyword arguments for ``make_algorithm``
        (e.g. from ``context.run_config``); hashable values.
    token : str, optional
        Names the compiled functions' cache; apps built from the same algorithm may share it.
    """
    token = token or uuid.uuid4().hex
    app = ClientApp()

    def handler(message: Message, context: Context) -> Message:
        index, data = load_client(context)
        options = {} if algorithm_options is None else algorithm_options(context)
        runtime = _runtime(token, make_algorithm, options)
        content = handle_client_message(
            runtime, message.metadata.message_type, message.content, context.state, index, data
        )
        return Message(content, reply_to=message)

    app.query()(handler)
    app.train()(handler)
    app.evaluate()(handler)
    return app


# ---------------------------------------------------------------------------- server side
def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(nodes)} of {count} Flower nodes connected in {timeout:.0f} s: hierfl "
                f"runs one client per SuperNode (in the simulation runtime, set "
                f'--federation-config "num-supernodes={count}")'
            )
        time.sleep(0.1)


def _last_line(reason: str) -> str:
    """The gist of a client's error report (Flower wraps the exception in its own)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    last = (lines[-1] if lines else str(reason)).rstrip("'>\"")
    return last.rsplit("Message: ", 1)[-1]


def _exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, timeout):
    """Send ``contents[node]`` to each node; returns ``{node: reply content}`` and
    ``{node: error reason}`` (errors and missing replies)."""
    messages = [
        Message(content, dst_node_id=node, message_type=message_type)
        for node, content in contents.items()
    ]
    replies, errors = {}, {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            errors[node] = f"error on the client: {_last_line(reply.error.reason)}"
        else:
            replies[node] = reply.content
    for node in contents:
        if node not in replies and node not in errors:
            errors[node] = "no reply"
    return replies, errors


def _roster(grid: Grid, nodes, num_clients: int, timeout):
    """Ask every node which client it holds; returns ``{index: node}``, the shapes of one
    client's data (from the first reply) and the reasons of the nodes that did not answer."""
    query = {n: RecordDict({_CONFIG: ConfigRecord({"num_clients": num_clients})}) for n in nodes}
    replies, errors = _exchange(grid, query, "query", timeout)
    node_of, data_spec = {}, None
    for node, content in replies.items():
        index = int(content[_CONFIG]["client"])
        if not 0 <= index < num_clients or index in node_of:
            raise RuntimeError(f"node {node} claims client index {index} (taken or out of range)")
        node_of[index] = node
        data_spec = data_spec or content[_CONFIG]["data"]
    if not node_of:
        raise RuntimeError(f"no node answered the roster query: {errors}")
    return node_of, unpack(None, data_spec, as_spec=True), list(errors.values())


def _requests(
    node_of, indices, broadcast, keys: dict, config: dict, accepted, initial=None
) -> dict:
    """One request per client in ``indices``: the broadcast, the keys, whether the client's
    previous message was accepted, and the state to start from where ``initial`` (a function
    of the client index, or ``None``) gives one."""
    arrays, structure = pack(broadcast)
    key_record = ArrayRecord({name: Array(np.asarray(k)) for name, k in keys.items()})
    requests = {}
    for i in indices:
        records = {_ARRAYS: arrays, _KEYS: key_record}
        settings = {"commit": bool(accepted[i]), "structure": structure, **config}
        start = None if initial is None else initial(i)
        if start is not None:
            records[_INITIAL], settings["initial"] = pack(start)
        requests[node_of[i]] = RecordDict({_CONFIG: ConfigRecord(settings), **records})
    return requests


def _stack_replies(replies, index_of, schema_tree, num_clients: int):
    """Stack the decoded messages in client order (zeros where none arrived); returns the
    stacked messages, which rows arrived in shape, and ``{index: reason}`` for the rest."""
    schema = message_schema(schema_tree)
    got = np.zeros(num_clients, dtype=bool)
    rows: list = [None] * num_clients
    unfit = {}
    for node, content in replies.items():
        i = index_of[node]
        try:
            message = unpack(content[_ARRAYS], content[_CONFIG]["structure"])
            if message_schema(message) != schema:
                raise ValueError(f"fields {message_schema(message)} against {schema}")
        except (KeyError, TypeError, ValueError) as error:
            unfit[i] = f"message does not fit: {error}"
            continue
        rows[i], got[i] = message, True
    zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), schema_tree)
    messages = jax.tree_util.tree_map(
        lambda *leaves: jnp.stack(leaves), *[zero if r is None else r for r in rows]
    )
    return messages, got, unfit


def run_server(
    grid: Grid,
    algorithm: FederatedAlgorithm,
    key,
    *,
    num_clients: int,
    num_rounds: int,
    client_ids: tuple | None = None,
    participation: float = 1.0,
    timeout: float | None = None,
    return_clients: bool = False,
    progress: bool | str = False,
    connect_timeout: float = CONNECT_TIMEOUT,
    state: tuple[PyTree, PyTree] | None = None,
    start_round: int = 0,
    converged: Callable[[PyTree], bool] | None = None,
    on_round: Callable | None = None,
    final_broadcast: Callable[[PyTree], PyTree] | None = None,
) -> SimulationResult:
    """The server's main loop over a Flower ``Grid`` (the body of the ServerApp).

    Same keys and schedule as :func:`hierfl.protocol.simulate`: ``init``, then per round a
    ``fold_in(key, round)`` split into participation, client and server keys; dropout is
    whatever the network does (a node that errs or does not reply within ``timeout`` is
    skipped with its reason). With ``return_clients`` the result carries every client's
    final state and personal posterior (for simulations; in a deployment they stay on the
    nodes and ``personal`` and ``client_states`` are ``None``). The run starts once
    ``num_clients`` nodes have connected (at most ``connect_timeout`` seconds), each holding
    one client; a client whose node fails the roster query is skipped in every round (with
    the node's error as the reason).

    ``state``, ``start_round``, ``converged``, ``on_round`` and ``final_broadcast`` are those
    of :func:`~hierfl.protocol.simulate`: with ``state=(server_state, client_states)`` every
    client starts from its row of ``client_states`` (sent with its first request), and
    ``on_round(record, server_state, None)`` gets no client states (they are on the nodes).
    """
    client_ids = tuple(range(num_clients)) if client_ids is None else tuple(client_ids)
    init_key, run_key, final_key = jax.random.split(key, 3)
    nodes = _wait_for_nodes(grid, num_clients, connect_timeout)
    node_of, data_row, roster_errors = _roster(grid, nodes, num_clients, timeout)
    index_of = {node: i for i, node in node_of.items()}
    present = np.isin(np.arange(num_clients), list(node_of))
    absent = "no node holds this client" + (
        f" (a node failed the roster query: {roster_errors[0]})" if roster_errors else ""
    )
    if state is None:
        server_state, client_spec = algorithm.init(
            init_key,
            jax.tree_util.tree_map(
                lambda s: jax.ShapeDtypeStruct((num_clients, *s.shape), s.dtype), data_row
            ),
        )
        initial = None
    else:
        server_state, client_spec = state
        sent = np.zeros(num_clients, dtype=bool)

        def initial(i):  # each client's row of the given states, with its first request
            if sent[i]:
                return None
            sent[i] = True
            return jax.tree_util.tree_map(lambda a: np.asarray(a[i]), client_spec)

    state_row = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), client_spec
    )
    accepted = np.zeros(num_clients, dtype=bool)  # was the client's last message kept?
    schemas: dict[str, PyTree] = {}  # what client_update declares, per broadcast structure
    rounds: list[RoundRecord] = []
    skips: list[SkipRecord] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_rounds, desc=progress if isinstance(progress, str) else "rounds")
    for round_index in range(start_round, num_rounds):
        pick_key, _, client_key, server_key = round_keys(run_key, round_index)
        asked = asked_clients(pick_key, num_clients, participation)
        skips += [
            SkipRecord(round_index, client_ids[i], absent) for i in np.flatnonzero(asked & ~present)
        ]
        asked &= present
        broadcast = algorithm.broadcast(server_state)
        structure = _spec_json(broadcast)
        if structure not in schemas:
            schemas[structure] = jax.eval_shape(
                algorithm.client_update, client_key, broadcast, state_row, data_row
            )[1]
        requests = _requests(
            node_of,
            np.flatnonzero(asked),
            broadcast,
            {"client": client_key, "init": init_key},
            {"num_clients": num_clients},
            accepted,
            initial,
        )
        replies, errors = _exchange(grid, requests, "train", timeout)
        messages, got, unfit = _stack_replies(replies, index_of, schemas[structure], num_clients)
        ok, reasons = validate_messages(
            messages, message_schema(schemas[structure]), algorithm.validate_message, broadcast
        )
        reasons = (
            {index_of[n]: r for n, r in errors.items()}
            | unfit
            | {i: reasons[i] for i in np.flatnonzero(got & ~ok)}
        )
        skips += [SkipRecord(round_index, client_ids[i], r) for i, r in sorted(reasons.items())]
        received = got & ok
        accepted[asked] = received[asked]
        server_state, server_info = algorithm.server_update(
            server_key, server_state, messages, jnp.asarray(received)
        )
        record = RoundRecord(round_index, int(asked.sum()), int(received.sum()), server_info)
        rounds.append(record)
        if on_round is not None:
            on_round(record, server_state, None)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                progress_postfix(algorithm, server_info, int(received.sum()), num_clients)
            )
        if converged is not None and converged(server_info):
            break
    if bar is not None:
        bar.close()
    skips += [
        SkipRecord(num_rounds, client_ids[i], f"finalize: {absent}")
        for i in np.flatnonzero(~present)
    ]
    requests = _requests(
        node_of,
        np.flatnonzero(present),
        (algorithm.broadcast if final_broadcast is None else final_broadcast)(server_state),
        {"client": final_key, "init": init_key},
        {"num_clients": num_clients, "return_clients": return_clients},
        accepted,
        initial,
    )
    replies, errors = _exchange(grid, requests, "evaluate", timeout)
    skips += [
        SkipRecord(num_rounds, client_ids[index_of[n]], f"finalize: {r}") for n, r in errors.items()
    ]
    if not return_clients:
        return SimulationResult(server_state, None, None, rounds, skips)
    if errors or not present.all():
        failed = sorted(
            {client_ids[index_of[n]] for n in errors}
            | set(np.array(client_ids, dtype=object)[~present])
        )
        raise RuntimeError(
            f"clients {failed} have no personal posterior to return (see the skip records: "
            "their nodes failed); run with return_clients=False to keep the global state"
        )
    ordered = [replies[node_of[i]] for i in range(num_clients)]

    def stacked(name):
        trees = [unpack(c[name], c[_CONFIG][name]) for c in ordered]
        return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)

    return SimulationResult(server_state, stacked("state"), stacked("personal"), rounds, skips)


def server_app(
    make_algorithm: Callable[[], FederatedAlgorithm],
    key,
    *,
    num_clients: int,
    num_rounds: int,
    result: dict | None = None,
    **options,
) -> ServerApp:
    """A Flower ``ServerApp`` whose main loop is :func:`run_server`.

    ``options`` go to :func:`run_server`; the :class:`~hierfl.protocol.SimulationResult` is
    put in ``result["result"]`` when a dict is given (the ServerApp runs in the calling
    process under :func:`flwr.simulation.run_simulation`).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        del context
        out = run_server(
            grid,
            make_algorithm(),
            key,
            num_clients=num_clients,
            num_rounds=num_rounds,
            **options,
        )
        if result is not None:
            result["result"] = out

    return app


def _stacked_row(client_data: PyTree, index: int) -> PyTree:
    return jax.tree_util.tree_map(lambda a: np.asarray(a[index]), client_data)


class _SimulationClients:
    """``load_client`` for :func:`run_simulation`: node ``partition-id`` holds that row of
    the stacked data (a picklable callable, shipped to the simulation workers)."""

    def __init__(self, client_data: PyTree):
        self.client_data = jax.tree_util.tree_map(np.asarray, client_data)

    def __call__(self, context: Context) -> tuple[int, PyTree]:
        index = int(context.node_config["partition-id"])
        return index, _stacked_row(self.client_data, index)


def run_simulation(
    make_algorithm: Callable[[], FederatedAlgorithm],
    key,
    client_data: PyTree,
    *,
    client_ids: tuple,
    num_rounds: int,
    participation: float = 1.0,
    return_clients: bool = True,
    workers: int | None = None,
    timeout: float | None = None,
    progress: bool | str = False,
    verbose: bool = False,
    load_client: Callable[[Context], tuple[int, PyTree]] | None = None,
    **server_options,
) -> SimulationResult:
    """Run ``make_algorithm()`` in Flower's simulation engine, one SuperNode per client.

    The drop-in counterpart of :func:`hierfl.protocol.simulate` (same keys, same result
    type) on Flower's Message API, its ``ServerApp`` and ``ClientApp`` s exchanging records
    through the simulation engine's workers (Ray, ``workers`` processes of one CPU each;
    default: every core). Sets :data:`OFFLINE_ENVIRONMENT` unless already set.

    Parameters
    ----------
    make_algorithm : callable
        Builds the algorithm; picklable (each worker builds its own).
    key : jax PRNGKey
    client_data : pytree
        Stacked on a leading client axis (as for ``simulate``); node ``i`` gets row ``i``.
    client_ids : tuple
    num_rounds : int
    participation : float
    return_clients : bool
        Collect every client's final state and personal posterior into the result.
    workers : int, optional
        Simulation workers (CPU processes).
    load_client : callable, optional
        ``load_client(context) -> (index, client_data)`` for every node (see
        :func:`client_app`); default: node ``partition-id`` holds row ``partition-id`` of
        ``client_data``.
    **server_options
        ``state``, ``start_round``, ``converged``, ``on_round``, ``final_broadcast`` (see
        :func:`run_server`).
    """
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    from flwr.simulation import run_simulation as flower_run_simulation

    num_clients = len(client_ids)
    workers = workers or os.cpu_count() or 1
    out: dict = {}
    token = uuid.uuid4().hex
    server = server_app(
        make_algorithm,
        key,
        num_clients=num_clients,
        num_rounds=num_rounds,
        result=out,
        client_ids=client_ids,
        participation=participation,
        timeout=timeout,
        return_clients=return_clients,
        progress=progress,
        **server_options,
    )
    load_client = _SimulationClients(client_data) if load_client is None else load_client
    client = client_app(make_algorithm, load_client, token=token)
    flower_run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": workers, "include_dashboard": False},
        },
        verbose_logging=verbose,
    )
    if "result" not in out:
        raise RuntimeError("the Flower simulation ended without a result (see its log)")
    return out["result"]
