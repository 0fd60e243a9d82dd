"""``hf.fit``: one entry point for every engine."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .data import ClientData, DataError
from .drivers import drive
from .engines.exact import ExactClientSampler, exact_algorithm
from .engines.globals_inference import GlobalsSettings
from .engines.nuts import fit_nuts
from .families import ConjugateFamily
from .fit import Fit, inspect_model
from .fit import _subset_batch as subset_batch

__all__ = ["DRIVER_METHODS", "METHODS", "as_client_data", "fit"]

#: engines by name; later engines register themselves here
METHODS: dict[str, Callable[..., Fit]] = {}
#: methods that take ``driver=`` (:data:`hierfl.drivers.DRIVERS`); the rest run in process
DRIVER_METHODS = ("exact", "ep", "svi")


def as_client_data(data, *, client: str | None = None) -> ClientData:
    """Coerce ``data`` (ClientData, ``{id: {field: array}}`` or a pandas frame) to ClientData."""
    if isinstance(data, ClientData):
        return data
    if isinstance(data, Mapping):
        return ClientData.from_dict(data)
    if hasattr(data, "groupby") and hasattr(data, "columns"):
        if client is None:
            raise DataError("a data frame needs client='<column>' naming the client column")
        return ClientData.from_frame(data, client=client)
    raise DataError(
        f"expected ClientData, a dict {{client: {{field: array}}}} or a pandas "
        f"frame, got {type(data).__name__}"
    )


def fit(
    model,
    data,
    method: str = "exact",
    *,
    client: str | None = None,
    seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> Fit:
    """Fit a hierarchical model to federated client data.

    Parameters
    ----------
    model : ConjugateFamily or callable
        A conjugate family (:class:`~hierfl.NormalNormal`, :class:`~hierfl.LinearMixed`, ...)
        or a NumPyro model function ``model(data: ModelData)`` with one client plate.
    data : ClientData, dict or pandas.DataFrame
        Per-client data; a frame needs ``client=`` naming the client column.
    method : {"exact", "nuts"}, or any engine registered in :data:`METHODS`
        ``"exact"``: one round of sufficient statistics (conjugate families);
        ``"nuts"``: centralized NUTS on the pooled data (the reference, not federated).
    seed : int
        Fixed seed: the same seed gives identical results.
    progress : bool
        Show progress bars.
    **options
        Engine options: ``num_warmup``, ``num_samples``, ``num_chains`` (defaults 1000, 1000,
        4), ``target_accept``; for ``exact`` also ``server`` (``"auto"``, ``"nuts"`` or
        ``"laplace"``) and ``importance_draws``; for ``exact``, ``ep`` and ``svi`` also
        ``driver``: ``"simulate"`` (default, in process) or ``"flower"`` (Flower's simulation
        engine, one SuperNode per client; the ``flower`` extra; see :mod:`hierfl.flower`).

    Returns
    -------
    Fit

    Examples
    --------
    >>> import numpy as np, hierfl as hf
    >>> from models import eight_schools
    >>> data = eight_schools.load()
    >>> fit = hf.fit(eight_schools.family(), data, num_samples=200, num_warmup=200,
    ...              num_chains=1)
    >>> sorted(fit.global_samples)
    ['mu', 'tau']
    >>> fit.to_arviz().posterior["theta"].dims
    ('chain', 'draw', 'client')
    """
    data = as_client_data(data, client=client)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    if options.get("driver", "simulate") != "simulate" and method not in DRIVER_METHODS:
        raise ValueError(
            f"driver={options['driver']!r} is available for methods {sorted(DRIVER_METHODS)}; "
            f"method={method!r} runs in process (leave driver out)"
        )
    start = time.perf_counter()
    result = METHODS[method](model, data, seed=seed, progress=progress, **options)
    result.diagnostics["wall_time"] = time.perf_counter() - start
    return result


def _settings(options: dict[str, Any], progress: bool) -> GlobalsSettings:
    names = GlobalsSettings._fields
    unknown = set(options) - set(names) - {"server"}
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    return GlobalsSettings(**{k: v for k, v in options.items() if k in names}, progress=progress)


def _fit_exact(
    model,
    data: ClientData,
    *,
    seed: int,
    progress: bool,
    server: str = "auto",
    driver: str = "simulate",
    **options,
) -> Fit:
    if not isinstance(model, ConjugateFamily):
        raise TypeError(
            "method='exact' needs a conjugate family (NormalNormal, LinearMixed, "
            "BetaBinomial, GammaPoisson); use method='nuts' (or 'ep') for a "
            "general NumPyro model"
        )
    settings = _settings(options, progress)
    model.check_data(data)
    padded, mask = data.padded()
    float_type = np.dtype(jnp.result_type(float))  # converted on the host: no device compile
    client_data = {
        "fields": {k: jnp.asarray(np.asarray(padded[k], float_type)) for k in model.required},
        "mask": jnp.asarray(mask),
    }
    make_algorithm = functools.partial(
        exact_algorithm, model, server=server, settings=settings, num_clients=data.num_clients
    )
    key = jax.random.PRNGKey(seed)
    result = drive(
        driver,
        make_algorithm,
        key,
        client_data,
        client_ids=data.client_ids,
        num_rounds=1,
        progress="exact: sufficient statistics" if progress else False,
    )
    state = result.server_state
    if state.draws is None:
        raise RuntimeError("no client statistics reached the server")
    shape = (settings.num_chains, settings.num_samples)
    probe = subset_batch(data, np.arange(min(3, data.num_clients)))
    sites = inspect_model(model.model, probe, client_plate="client")
    draws = {
        k: np.asarray(v).reshape(shape + v.shape[1:])
        for k, v in state.draws.items()
        if k in sites.global_sites
    }
    stats = jax.tree_util.tree_map(np.asarray, result.client_states)
    sampler = ExactClientSampler(model, draws, stats, jax.random.fold_in(key, 7))
    personal = {
        model.client_site: (
            np.asarray(result.personal.mean),
            np.sqrt(np.asarray(result.personal.variance)),
        )
    }
    diagnostics = dict(state.diagnostics, rounds=len(result.rounds), skips=result.skips)
    return Fit(
        "exact",
        model.model,
        data,
        draws,
        sampler,
        sites,
        personal=personal,
        diagnostics=diagnostics,
        dims=model.dims(),
        coords=model.coords(),
        seed=seed,
    )


def _fit_nuts(model, data: ClientData, *, seed: int, progress: bool, **options) -> Fit:
    known = {"num_warmup", "num_samples", "num_chains", "target_accept"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown options for method='nuts': {sorted(unknown)}")
    key = jax.random.PRNGKey(seed)
    if isinstance(model, ConjugateFamily):
        model.check_data(data)
        return fit_nuts(
            key,
            model.model,
            data,
            reparam=model.reparam_config(),
            progress=progress,
            dims=model.dims(),
            coords=model.coords(),
            seed=seed,
            **options,
        )
    if not callable(model):
        raise TypeError(
            f"model must be a conjugate family or a NumPyro model function, got "
            f"{type(model).__name__}"
        )
    return fit_nuts(key, model, data, progress=progress, seed=seed, **options)


METHODS["exact"] = _fit_exact
METHODS["nuts"] = _fit_nuts


def _fit_svi(model, data: ClientData, *, seed: int, progress: bool, **options):
    """``method="svi"``: federated VI for neural models (:mod:`hierfl.neural`, the ``neural``
    extra), imported only when called."""
    try:
        from .neural import fit_svi
    except ImportError as error:
        raise ImportError(
            "method='svi' needs the neural extra (Flax and Optax): pip install 'hierfl[neural]'"
        ) from error
    return fit_svi(model, data, seed=seed, progress=progress, **options)


METHODS["svi"] = _fit_svi
