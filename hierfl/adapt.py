r"""Cold start with a few rows: a new client's personal posterior, without a server round.

A client that was not in the fit has, before it has data, the population predictive
(``fit.predict(new_id, ...)``: ``theta ~ p(theta | phi)`` for each draw of ``phi``). With a
few rows of its own it runs the engine's client step against the final global state, on its
own machine, and gets its personal posterior; nothing is sent, and the federation's ``phi``
is left as it is.

* ``exact`` fits (conjugate families): the client's sufficient statistics give its exact
  marginal likelihood :math:`p(D_{new} \mid \phi)` and the closed-form conditional
  :math:`\theta_{new} \mid \phi, D_{new}`. The server's draws of ``phi`` are draws of
  :math:`p(\phi \mid D_1..D_N)`; weighted by :math:`p(D_{new} \mid \phi)` (Pareto-smoothed
  importance sampling, :func:`arviz.psislw`) they are draws of
  :math:`p(\phi \mid D_1..D_N, D_{new})`, so the result is the posterior the client would
  have had in a fit that included it, up to Monte Carlo error. The Pareto ``k`` of the weights
  says when the new rows are too surprising for that (``k > 0.7``: refit with the client).
* ``ep`` fits (any NumPyro model): the client's tilted inference (Laplace, NUTS or SVI, as in
  the fit) with the global approximation :math:`q(\phi)` as its cavity, the same computation
  as a client's step in the fit. ``q(phi)`` already holds the prior, so the tilted problem
  holds none of it, and the tilted distribution :math:`q(\phi)\,p(\theta, D_{new} \mid \phi)`
  is EP's approximation of the posterior with the client included: its draws of ``phi`` and
  ``theta`` are the result, unpaired with the fit's global draws.

``svi`` (neural) fits have :meth:`hierfl.neural.fit.NeuralFit.adapt`; a ``nuts`` fit is the
centralized reference: refit it with the client's rows.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .data import ClientData, DataError

__all__ = ["PARETO_K_WARN", "adapt"]

#: above this Pareto k the importance weights of an ``exact`` adaptation are unreliable
PARETO_K_WARN = 0.7


def adapt(fit, client: Hashable, *, key=None, **fields) -> Any:
    """A new client's personal posterior from its own rows (see the module docstring).

    Returns a :class:`~hierfl.Fit` holding that one client: ``predict(client, ...)``,
    ``to_arviz()``, ``personal_summary()`` work on it as on any fit. Its ``diagnostics``
    hold ``adapted_from`` (the fit's method) and, for ``exact``, ``pareto_k`` and ``ess``.
    """
    if client in fit.data:
        raise DataError(
            f"client {client!r} is in the fit; adapt is for a client that was not "
            "(its personal posterior is fit.personal_summary() / fit.predict)"
        )
    if not fields:
        raise DataError(f"client {client!r}: adapt needs the client's rows as keyword fields")
    data = ClientData.from_dict({client: fields})
    if fit.method == "exact":
        return _adapt_exact(fit, data, key)
    if fit.method == "ep":
        return _adapt_ep(fit, data, key)
    raise ValueError(
        f"adapt works on 'exact' and 'ep' fits, not {fit.method!r}"
        + (
            ": a 'nuts' fit is the centralized reference; refit it with the client's rows"
            if fit.method == "nuts"
            else ""
        )
    )


def _single_client(data: ClientData, names) -> tuple[dict, Any]:
    padded, mask = data.padded()
    missing = [n for n in names if n not in padded]
    if missing:
        raise DataError(f"client {data.client_ids[0]!r}: missing field {missing[0]!r}")
    float_type = np.dtype(jnp.result_type(float))
    return (
        {k: jnp.asarray(np.asarray(padded[k][0], float_type)) for k in names},
        jnp.asarray(mask[0]),
    )


def _adapt_exact(fit, data: ClientData, key):
    from .engines.exact import _global_params
    from .families import ConjugateFamily
    from .fit import Fit, StoredClientSamples, arviz

    family = getattr(fit.model, "__self__", None)
    if not isinstance(family, ConjugateFamily):
        raise TypeError("this exact fit does not hold its conjugate family")
    try:
        family.check_data(data)
    except DataError as error:
        message = str(error)
        client = data.client_ids[0]
        raise DataError(
            message if repr(client) in message else f"client {client!r}: {message}"
        ) from None
    fields, mask = _single_client(data, family.required)
    stats = family.statistics(fields, mask)
    chains, draws = next(iter(fit.global_samples.values())).shape[:2]
    size = chains * draws
    flat = {
        k: jnp.asarray(np.reshape(v, (size,) + v.shape[2:])) for k, v in fit.global_samples.items()
    }
    phi = _global_params(family, flat)
    log_weights = np.asarray(jax.vmap(lambda p: family.log_marginal(p, stats))(phi), np.float64)
    if not np.all(np.isfinite(log_weights)):
        raise DataError(
            f"client {data.client_ids[0]!r}: non-finite marginal likelihood of its rows"
        )
    smoothed, pareto_k = arviz().psislw(log_weights - log_weights.max())
    weights = np.exp(smoothed - np.logaddexp.reduce(smoothed))
    weights /= weights.sum()
    pareto_k = float(np.asarray(pareto_k))
    if pareto_k > PARETO_K_WARN:
        warnings.warn(
            f"client {data.client_ids[0]!r}: its rows move phi far from the fit's posterior "
            f"(Pareto k {pareto_k:.2f} > {PARETO_K_WARN}); the adapted posterior is "
            "unreliable: refit with this client included",
            stacklevel=3,
        )
    key = fit._key(key, 11)
    pick_key, draw_key = jax.random.split(key)
    # systematic resampling: each draw of phi kept in proportion to its weight
    offset = float(jax.random.uniform(pick_key))
    picks = np.searchsorted(np.cumsum(weights), (np.arange(size) + offset) / size)
    picks = np.minimum(picks, size - 1)
    chosen = jax.tree_util.tree_map(lambda v: v[picks], phi)
    keys = jax.random.split(draw_key, size)
    theta = jax.vmap(lambda k, p: family.conditional(p, stats).sample(k))(keys, chosen)

    def moments(p):
        conditional = family.conditional(p, stats)
        return conditional.mean, conditional.variance

    mean_s, var_s = (np.asarray(m, np.float64) for m in jax.vmap(moments)(phi))
    w = weights.reshape((size,) + (1,) * (mean_s.ndim - 1))
    mean = np.sum(w * mean_s, axis=0)
    variance = np.sum(w * (var_s + mean_s**2), axis=0) - mean**2
    site = family.client_site
    global_samples = {
        k: np.asarray(v)[picks].reshape((chains, draws) + v.shape[1:]) for k, v in flat.items()
    }
    theta = np.asarray(theta).reshape((chains, draws, 1) + theta.shape[1:])
    return Fit(
        "exact",
        fit.model,
        data,
        global_samples,
        StoredClientSamples({site: theta}),
        fit.sites,
        personal={site: (mean[None], np.sqrt(np.maximum(variance, 0.0))[None])},
        diagnostics={
            "adapted_from": "exact",
            "pareto_k": pareto_k,
            "ess": float(1.0 / np.sum(weights**2)),
        },
        dims=fit.dims,
        coords=fit.coords,
        seed=fit.seed,
    )


#: rows of a new client are padded to a power of two, at least this many (one compiled step
#: serves every client of up to that many rows)
MIN_WIDTH = 16
#: compiled EP client steps kept (per model, settings and padded shape)
EP_CACHE_SIZE = 16
_EP_STEPS: OrderedDict = OrderedDict()


def _ep_client_step(model, sites, settings, width: int, spec: tuple, probe: dict):
    """``(finalize, start, phi_dim)``: the EP client's jitted final step for a new client
    with rows padded to ``width``, and its starting state (no site: its cavity is the global
    approximation). Kept for the same model, sites, settings and shapes (``spec``), so that
    adapting many new clients compiles once; ``probe`` (one client's padded fields) is traced
    for the model's sites, its values are not kept."""
    from .engines import ep

    key = (model, sites.global_sites, sites.client_sites, repr(settings), width, spec)
    if key in _EP_STEPS:
        _EP_STEPS.move_to_end(key)
        return _EP_STEPS[key]
    # the global approximation already holds the whole prior: the new client's tilted
    # problem holds none of it (prior weight 1/N with N -> infinity)
    problem = ep.tilted_problem(
        model, sites, probe, width, num_clients=np.inf, reparam=settings.reparam
    )
    algorithm = ep.ep_algorithm(
        problem,
        num_clients=1,
        settings=settings,
        max_steps=1,
        keep=sites.global_sites + sites.client_sites,
        client_sites=sites.client_sites,
        pair_with_global=False,
    )
    stacked = {"fields": {k: v[None] for k, v in probe.items()}, "mask": jnp.ones((1, width))}
    _, clients = algorithm.init(jax.random.PRNGKey(0), stacked)
    start = jax.tree_util.tree_map(lambda a: a[0], clients)
    start = start._replace(
        site_precision=jnp.zeros_like(start.site_precision),
        site_shift=jnp.zeros_like(start.site_shift),
    )
    entry = (jax.jit(algorithm.client_finalize), start, problem.phi_dim)
    _EP_STEPS[key] = entry
    if len(_EP_STEPS) > EP_CACHE_SIZE:
        _EP_STEPS.popitem(last=False)
    return entry


def _adapt_ep(fit, data: ClientData, key):
    from .engines import ep
    from .fit import Fit, StoredClientSamples, inspect_model

    settings = fit.diagnostics.get("settings")
    state = fit.diagnostics.get("state")
    if settings is None or state is None:
        raise TypeError("this ep fit holds no final state (diagnostics['state'])")
    server_state = state[0]
    model = fit.model
    if settings.reparam:
        from numpyro import handlers

        model_for_check = handlers.reparam(model, config=settings.reparam)
    else:
        model_for_check = model
    client = data.client_ids[0]
    try:
        inspect_model(model_for_check, data.batch())
    except KeyError as error:
        raise DataError(f"client {client!r}: missing field {error.args[0]!r}") from None
    size = int(data.sizes[0])
    width = max(MIN_WIDTH, 1 << (size - 1).bit_length())  # padded: a few compiled widths
    padded, mask = data.padded(width, dtype=np.float32)
    one = {
        "fields": {k: jnp.asarray(v[0]) for k, v in padded.items()},
        "mask": jnp.asarray(mask[0]),
    }
    spec = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(one["fields"].items()))
    finalize, start, phi_dim = _ep_client_step(
        model, fit.sites, settings, width, spec, one["fields"]
    )
    if phi_dim != fit.diagnostics.get("phi_dim", phi_dim):
        raise DataError(f"client {client!r}: its rows give the model other global sites")
    bc = ep.final_broadcast(server_state)
    mean = jnp.linalg.solve(bc.precision, bc.shift)
    start = start._replace(position=start.position.at[:phi_dim].set(mean))
    values = finalize(fit._key(key, 12), bc, start, one)
    values = {k: np.asarray(v) for k, v in values.items()}
    global_samples = {name: values[name][None] for name in fit.sites.global_sites if name in values}
    client_samples = {
        name: values[name][:, 0][None, :, None] for name in fit.sites.client_sites if name in values
    }
    personal = {k: (v[0].mean(axis=0), v[0].std(axis=0)) for k, v in client_samples.items()}
    return Fit(
        "ep",
        fit.model,
        data,
        global_samples,
        StoredClientSamples(client_samples),
        fit.sites,
        personal=personal,
        diagnostics={"adapted_from": "ep", "settings": settings},
        dims=fit.dims,
        coords=fit.coords,
        seed=fit.seed,
    )
