"""One harness for hierfl and the baselines: same data, budget, metrics, and cold start.

Used by ``notebooks/03_personal_heads.ipynb`` and ``benchmarks/bench_neural.py``. Every
method trains on the clients' *train* rows; baselines pick their learning rate or strength on
the clients' *validation* rows (mean per-client accuracy); everything is scored on the
*test* rows. hierfl picks only its body's learning rate, on the same grid and the same
validation rows as the baselines' learning rate (the strength of its prior, ``tau``, is
learned, never tuned).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..data import ClientData
from ..protocol import ClientGroups, count_clients, vmap_clients
from . import baselines as bl
from .fit import NeuralFit, fit_svi
from .metrics import accuracy, summarize
from .model import NeuralModel
from .svi import adapt_personal, predictive_probs, stack_client_data

__all__ = [
    "MethodResult",
    "cold_start",
    "compare",
    "hierfl_probs",
    "point_model_probs",
    "round_timings",
    "split_probs",
]

#: fine-tuning steps of FedAvg + FT (full model, minibatch Adam on the client's train rows)
FINETUNE_STEPS = 20
#: cold-start shot counts of issue 4
COLD_START_SHOTS = (5, 10, 20)


class MethodResult(NamedTuple):
    """Scores of one method on one partition."""

    name: str
    setting: Any  # chosen learning rate / strength (None for hierfl)
    metrics: dict  # acc_mean, acc_p10, nll, ece on test
    client_accuracy: np.ndarray  # [num_clients]
    probs: list  # per-client test probabilities
    labels: list  # per-client test labels
    wall_time: float  # seconds, including the validation grid


def split_probs(probs, sizes) -> list[np.ndarray]:
    """Stacked padded probabilities ``[N, max_n, C]`` to a list of ``[n_i, C]``."""
    probs = np.asarray(probs)
    return [probs[i, : int(n)] for i, n in enumerate(np.asarray(sizes))]


def point_model_probs(model: NeuralModel, params, stacked, *, stacked_params: bool = True):
    """Per-client probabilities of point models (one per client, or one shared)."""
    fn = jax.vmap(
        lambda p, x: bl.point_probs(model, p, x), in_axes=(0 if stacked_params else None, 0)
    )
    return split_probs(jax.jit(fn)(params, stacked["x"]), stacked["size"])


def hierfl_probs(fit: NeuralFit, stacked, *, key=None):
    """Per-client posterior predictive probabilities of a :class:`NeuralFit` on stacked data
    of the same clients."""
    unravel, _ = fit._unravel()
    num = stacked["size"].shape[0]
    key = jax.random.PRNGKey(fit.seed + 1) if key is None else key
    fn = jax.vmap(
        lambda m, s, x, k: predictive_probs(
            fit.model, unravel, fit.shared, m, s, x, k, fit.settings.predictive_samples
        )
    )
    probs = jax.jit(fn)(
        jnp.asarray(fit.personal_mean),
        jnp.asarray(fit.personal_sd),
        stacked["x"],
        jax.random.split(key, num),
    )
    return split_probs(probs, stacked["size"])


def _labels(stacked):
    return split_probs(stacked["y"], stacked["size"])


def _mean_accuracy(probs, labels):
    return float(np.mean([accuracy(p, y) for p, y in zip(probs, labels, strict=True)]))


def _result(name, setting, probs, labels, wall):
    accs = np.array([accuracy(p, y) for p, y in zip(probs, labels, strict=True)])
    return MethodResult(name, setting, summarize(probs, labels), accs, probs, labels, wall)


def compare(
    model: NeuralModel,
    train: ClientData,
    validation: ClientData,
    test: ClientData,
    *,
    num_rounds: int,
    local_steps: int,
    batch_size: int = 32,
    seed: int = 0,
    methods=("hierfl", "local", "fedavg", "fedavg_ft", "fedprox", "ditto", "fedrep", "fedbn"),
    learning_rates=bl.LEARNING_RATE_GRID,
    strengths=None,
    svi_options: dict | None = None,
) -> dict[str, MethodResult]:
    """Train hierfl and the baselines on ``train``, choose settings on ``validation``, score
    on ``test``. Returns ``{name: MethodResult}`` (and the hierfl fit under ``"_fit"``).

    hierfl grids its body's learning rate over ``learning_rates`` (unless ``svi_options``
    fixes ``learning_rate``) and keeps the fit with the best validation accuracy.
    Baselines with a strength (FedProx, Ditto) use FedAvg's chosen learning rate and grid
    their strength over ``strengths[name]`` (default :data:`~baselines.STRENGTH_GRIDS`);
    the others grid the learning rate over ``learning_rates``; FedAvg + FT grids its
    fine-tuning learning rate.
    """
    strengths = dict(bl.STRENGTH_GRIDS if strengths is None else strengths)
    stacked = {
        k: stack_client_data(model, d)
        for k, d in (("train", train), ("validation", validation), ("test", test))
    }
    ids = train.client_ids
    val_labels, test_labels = _labels(stacked["validation"]), _labels(stacked["test"])
    out: dict[str, Any] = {}
    if "hierfl" in methods:
        start = time.perf_counter()
        options = dict(svi_options or {})
        grid = [options.pop("learning_rate")] if "learning_rate" in options else learning_rates
        fits = {
            lr: fit_svi(
                model,
                train,
                seed=seed,
                num_rounds=num_rounds,
                local_steps=local_steps,
                batch_size=batch_size,
                learning_rate=lr,
                **options,
            )
            for lr in grid
        }
        best, _ = bl.select(
            fits,
            lambda f: _mean_accuracy(hierfl_probs(f, stacked["validation"]), val_labels),
        )
        fit = fits[best]
        probs = hierfl_probs(fit, stacked["test"])
        out["hierfl"] = _result("hierfl", best, probs, test_labels, time.perf_counter() - start)
        out["_fit"] = fit

    def run(name, learning_rate, strength=0.0):
        settings = bl.BaselineSettings(num_rounds, local_steps, batch_size, learning_rate, strength)
        personal, global_params = bl.run_baseline(
            model, name, stacked["train"], ids, seed=seed, settings=settings
        )
        return personal, global_params

    def scored(params, split, *, stacked_params=True):
        probs = point_model_probs(model, params, stacked[split], stacked_params=stacked_params)
        return probs

    fedavg_lr = None
    fedavg_global = None
    for name in ("local", "fedavg", "fedrep", "fedbn", "fedprox", "ditto"):
        needed = name in methods or (
            name == "fedavg" and ({"fedavg_ft", "fedprox", "ditto"} & set(methods))
        )
        if not needed:
            continue
        start = time.perf_counter()
        if name in strengths:
            grid = [(fedavg_lr, s) for s in strengths[name]]
        else:
            grid = [(lr, 0.0) for lr in learning_rates]
        runs = {setting: run(name, *setting) for setting in grid}
        best, _ = bl.select(runs, lambda r: _mean_accuracy(scored(r[0], "validation"), val_labels))
        params, global_params = runs[best]
        probs = scored(params, "test")
        wall = time.perf_counter() - start
        setting = best[1] if name in strengths else best[0]
        if name == "fedavg":
            fedavg_lr, fedavg_global = best[0], global_params
            fedavg_time = wall
        if name in methods:
            out[name] = _result(name, setting, probs, test_labels, wall)
    if "fedavg_ft" in methods:
        start = time.perf_counter()
        key = jax.random.PRNGKey(seed + 2)
        tuned = {
            lr: bl.finetune(
                model,
                fedavg_global,
                stacked["train"],
                key,
                steps=FINETUNE_STEPS,
                learning_rate=lr,
                batch_size=batch_size,
            )
            for lr in learning_rates
        }
        best, _ = bl.select(tuned, lambda p: _mean_accuracy(scored(p, "validation"), val_labels))
        probs = scored(tuned[best], "test")
        out["fedavg_ft"] = _result(
            "fedavg_ft", best, probs, test_labels, fedavg_time + time.perf_counter() - start
        )
        out["_fedavg_global"] = fedavg_global
        out["_fedavg_ft_lr"] = best
    elif fedavg_global is not None:
        out["_fedavg_global"] = fedavg_global
    return out


def cold_start(
    fit: NeuralFit,
    fedavg_global,
    new_clients: ClientData,
    new_test: ClientData,
    *,
    shots=COLD_START_SHOTS,
    finetune_learning_rate: float,
    seed: int = 0,
    finetune_steps: int = FINETUNE_STEPS,
) -> dict[str, dict[int, float]]:
    """Cold start on clients that were not in training.

    For each ``k`` in ``shots``, every new client uses the first ``k`` of its labelled rows
    (clients with fewer rows are skipped): hierfl adapts its head from the population prior
    (:meth:`NeuralFit.adapt`, no server round); the baseline fine-tunes FedAvg's global model
    on the same ``k`` rows (full batch). ``k = 0`` is the population predictive against
    FedAvg's global model. Returns mean test accuracy ``{"hierfl": {k: acc},
    "fedavg_ft": {k: acc}}`` and the clients used.
    """
    model = fit.model
    unravel, _ = fit._unravel()
    out = {"hierfl": {}, "fedavg_ft": {}, "clients": {}}
    test = stack_client_data(model, new_test)
    test_labels = _labels(test)
    prior_probs = jax.jit(
        jax.vmap(
            lambda x, k: predictive_probs(
                model,
                unravel,
                fit.shared,
                jnp.asarray(fit.mu),
                jnp.asarray(fit.tau),
                x,
                k,
                fit.settings.predictive_samples,
            )
        )
    )(test["x"], jax.random.split(jax.random.PRNGKey(seed), test["size"].shape[0]))
    out["hierfl"][0] = _mean_accuracy(split_probs(prior_probs, test["size"]), test_labels)
    out["fedavg_ft"][0] = _mean_accuracy(
        point_model_probs(model, fedavg_global, test, stacked_params=False), test_labels
    )
    out["clients"][0] = new_clients.num_clients
    adapt = jax.jit(
        jax.vmap(
            lambda x, y, k: adapt_personal(
                model,
                unravel,
                fit.shared,
                jnp.asarray(fit.mu),
                jnp.asarray(fit.tau),
                x,
                y,
                k,
                settings=fit.settings,
            )
        )
    )
    predict = jax.jit(
        jax.vmap(
            lambda m, s, x, k: predictive_probs(
                model, unravel, fit.shared, m, s, x, k, fit.settings.predictive_samples
            )
        )
    )
    for k in shots:
        keep = [c for c in new_clients.client_ids if len(new_clients[c]["y"]) >= k]
        if not keep:
            continue
        index = [new_clients.client_ids.index(c) for c in keep]
        x = jnp.asarray(np.stack([new_clients[c]["x"][:k] for c in keep]), dtype=jnp.float32)
        y = jnp.asarray(np.stack([new_clients[c]["y"][:k] for c in keep]), dtype=jnp.int32)
        keys = jax.random.split(jax.random.PRNGKey(seed + k), len(keep))
        mean, sd = adapt(x, y, keys)
        sub_test = {name: value[np.asarray(index)] for name, value in test.items()}
        labels = [test_labels[i] for i in index]
        probs = split_probs(predict(mean, sd, sub_test["x"], keys), sub_test["size"])
        out["hierfl"][k] = _mean_accuracy(probs, labels)
        shots_data = {"x": x, "y": y, "size": jnp.full(len(keep), k, dtype=jnp.int32)}
        tuned = bl.finetune(
            model,
            fedavg_global,
            shots_data,
            keys[0],
            steps=finetune_steps,
            learning_rate=finetune_learning_rate,
            batch_size=k,
        )
        out["fedavg_ft"][k] = _mean_accuracy(point_model_probs(model, tuned, sub_test), labels)
        out["clients"][k] = len(keep)
    return out


def _memory(compiled) -> dict:
    """Bytes of a compiled call's arguments, outputs and temporaries (XLA's own accounting;
    ``nan`` where the backend reports none)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        analysis = None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    if analysis is None:
        return {name: float("nan") for name in names}
    return {name: float(getattr(analysis, name, float("nan"))) for name in names}


def round_timings(
    algorithm, client_data: dict, *, key=None, repeats: int = 3, client_batch: int | None = None
) -> dict:
    """Seconds of one round's client updates: all clients as one ``jax.vmap``-ed, ``jit``-ed
    call (as :func:`hierfl.protocol.simulate` runs them) vs a Python loop over the clients
    of the same ``jit``-ed ``client_update``, one call per client.

    Both run the same function on the same (padded) rows, so they do the same arithmetic;
    the difference is what batching the clients buys on the device at hand. With
    :class:`~hierfl.protocol.ClientGroups` the vmapped round is one call per group and each
    looped client runs on its group's rows. Each is compiled first, run once to warm up and
    then timed ``repeats`` times (the best is kept).

    Parameters
    ----------
    algorithm : hierfl.FederatedAlgorithm
    client_data : dict or ClientGroups
        Stacked client data (:func:`~hierfl.neural.svi.stack_client_data`), or groups of
        clients of similar size (:func:`~hierfl.neural.svi.group_client_data`).
    client_batch : int, optional
        Vmap chunks of this many clients one after another (:func:`hierfl.protocol.vmap_clients`)
        instead of all clients at once.

    Returns
    -------
    dict
        ``vmapped`` and ``loop`` (seconds), ``speedup`` (loop / vmapped), and XLA's memory
        accounting of the vmapped call and of one looped call (``vmapped_bytes``,
        ``loop_call_bytes``: arguments + outputs + temporaries; the largest group's).

    Examples
    --------
    >>> import numpy as np, hierfl as hf
    >>> from hierfl.neural import SVISettings, mlp_head_model, svi_algorithm
    >>> from hierfl.neural.svi import stack_client_data
    >>> rng = np.random.default_rng(0)
    >>> data = hf.ClientData.from_dict({c: {"x": rng.normal(size=(8, 4)),
    ...                                     "y": rng.integers(0, 3, 8)} for c in "abc"})
    >>> model = mlp_head_model(input_dim=4, num_classes=3, hidden=(8,))
    >>> algorithm = svi_algorithm(model, settings=SVISettings(local_steps=2, elbo_steps=5))
    >>> t = round_timings(algorithm, stack_client_data(model, data), repeats=1)
    >>> sorted(t)[:3]
    ['loop', 'loop_call_bytes', 'speedup']
    """
    key = jax.random.PRNGKey(0) if key is None else key
    init_key, round_key = jax.random.split(key)
    server, clients = algorithm.init(init_key, client_data)
    broadcast = algorithm.broadcast(server)
    num_clients = count_clients(client_data)
    keys = jax.random.split(round_key, num_clients)
    if isinstance(client_data, ClientGroups):
        groups = list(zip(client_data.indices, client_data.data, strict=True))
    else:
        groups = [(np.arange(num_clients), client_data)]
    vmapped = vmap_clients(algorithm.client_update, client_batch)
    single = jax.jit(algorithm.client_update)
    calls, loop_calls = [], []  # (compiled, arguments): one per group / one per client
    for index, data in groups:
        rows = jnp.asarray(index)
        args = (
            keys[rows],
            broadcast,
            jax.tree_util.tree_map(lambda a, r=rows: a[r], clients),
            data,
        )
        calls.append((vmapped.lower(*args).compile(), args))
        one = [
            jax.tree_util.tree_map(lambda a, j=j: a[j], (args[0], args[2], args[3]))
            for j in range(len(index))
        ]
        compiled = single.lower(one[0][0], broadcast, one[0][1], one[0][2]).compile()
        loop_calls += [(compiled, (k, broadcast, state, row)) for k, state, row in one]

    def run_vmapped():
        jax.block_until_ready([compiled(*args) for compiled, args in calls])

    def run_loop():
        jax.block_until_ready([compiled(*args) for compiled, args in loop_calls])

    out = {}
    for name, run in (("vmapped", run_vmapped), ("loop", run_loop)):
        run()  # warm up (allocations, caches)
        best = np.inf
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        out[name] = best
    out["speedup"] = out["loop"] / out["vmapped"]
    out["vmapped_bytes"] = max(sum(_memory(compiled).values()) for compiled, _ in calls)
    out["loop_call_bytes"] = max(sum(_memory(compiled).values()) for compiled, _ in loop_calls)
    return out
