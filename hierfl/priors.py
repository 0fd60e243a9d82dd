"""Priors on the global parameters ``phi``, shared by every engine.

A family declares its global parameters with :class:`Parameter` (name, support, shape). The
user chooses a prior for each with a NumPyro distribution, in one of three forms:

* ``{"tau": dist.HalfNormal(5.0)}`` — a prior on the parameter itself;
* ``{"log_tau": dist.Normal(0.0, 1.0)}`` — a prior on the log of a positive parameter; the
  model samples ``log_tau`` and records ``tau = exp(log_tau)`` as a deterministic site;
* ``{"tau": 0.0}`` — a fixed value: the parameter is not inferred (this is how the pooling
  spectrum is written: ``tau = 0`` is complete pooling, a large ``tau`` no pooling).

:func:`sample_globals` turns the resolved priors into NumPyro sample sites. Every engine of a
family (exact, ep, nuts) calls it, so they all infer the same model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = ["Parameter", "PriorError", "ResolvedPrior", "resolve_priors", "sample_globals"]


class PriorError(ValueError):
    """An invalid prior; the message names the parameter."""


class Parameter(NamedTuple):
    """A global parameter of a family.

    Attributes
    ----------
    name : str
    support : str
        ``"real"``, ``"positive"`` or ``"unit"`` (the open interval (0, 1)).
    shape : tuple of int
        Event shape (``()`` for a scalar).
    """

    name: str
    support: str
    shape: tuple[int, ...] = ()


class ResolvedPrior(NamedTuple):
    """A parameter with its chosen prior: sampled at ``site`` (or fixed to ``value``)."""

    parameter: Parameter
    site: str | None
    distribution: Any
    value: Any
    log_scale: bool


def _bounds(support) -> tuple[float, float] | None:
    """Lower and upper bound of a NumPyro support, or None when not an interval-like set."""
    if support is constraints.real or support is constraints.real_vector:
        return (-np.inf, np.inf)
    if support is constraints.positive:
        return (0.0, np.inf)
    if support is constraints.nonnegative:
        return (0.0, np.inf)
    if support is constraints.unit_interval:
        return (0.0, 1.0)
    base = getattr(support, "base_constraint", None)
    if base is not None:
        return _bounds(base)
    lower = getattr(support, "lower_bound", None)
    upper = getattr(support, "upper_bound", None)
    if lower is None and upper is None:
        return None
    lower = -np.inf if lower is None else float(np.min(lower))
    upper = np.inf if upper is None else float(np.max(upper))
    return (lower, upper)


_NEEDED = {"real": (-np.inf, np.inf), "positive": (0.0, np.inf), "unit": (0.0, 1.0)}


def _check_support(name: str, support_name: str, prior) -> None:
    if prior.support.is_discrete:
        raise PriorError(
            f"prior for {name!r} is discrete ({type(prior).__name__}, support "
            f"{prior.support}) but {name!r} is a continuous parameter"
        )
    bounds = _bounds(prior.support)
    needed = _NEEDED[support_name]
    if bounds is None or bounds[0] < needed[0] or bounds[1] > needed[1]:
        hint = (
            f"; use 'log_{name}' for a prior on the log scale" if support_name == "positive" else ""
        )
        raise PriorError(
            f"prior for {name!r} has support {prior.support} but {name!r} must be "
            f"{support_name}{hint}"
        )


def _shaped(name: str, prior, shape: tuple[int, ...]):
    batch, event = tuple(prior.batch_shape), tuple(prior.event_shape)
    if event == shape:
        if batch:
            raise PriorError(
                f"prior for {name!r}: batch shape {batch} not allowed for a "
                f"parameter of shape {shape}"
            )
        return prior
    if event:
        raise PriorError(f"prior for {name!r}: event shape {event}, parameter has shape {shape}")
    if batch == shape:
        return prior.to_event(len(shape))
    if batch == ():
        return prior.expand(shape).to_event(len(shape))
    raise PriorError(
        f"prior for {name!r}: batch shape {batch} does not fit parameter shape {shape}"
    )


def _fixed_value(parameter: Parameter, prior) -> np.ndarray:
    """A fixed value as an array of the parameter's shape, or a PriorError naming it."""
    name = parameter.name
    if isinstance(prior, type) and issubclass(prior, dist.Distribution):
        raise PriorError(
            f"prior for {name!r}: got the class {prior.__name__}, not a "
            f"distribution; call it with its parameters, e.g. {prior.__name__}(...)"
        )
    try:
        value = np.asarray(prior, dtype=float)
    except (TypeError, ValueError):
        raise PriorError(
            f"prior for {name!r} must be a NumPyro distribution or a number, got {prior!r}"
        ) from None
    try:
        return np.broadcast_to(value, parameter.shape)
    except ValueError:
        raise PriorError(
            f"fixed value of {name!r} has shape {value.shape}, parameter has "
            f"shape {parameter.shape}"
        ) from None


def resolve_priors(
    parameters: tuple[Parameter, ...], defaults: Mapping[str, Any], user: Mapping[str, Any] | None
) -> tuple[ResolvedPrior, ...]:
    """Combine a family's defaults with the user's priors and check them.

    Raises
    ------
    PriorError
        Unknown parameter names, a support that does not match, shapes that do not fit, a
        fixed value out of the support, or two priors for one parameter.
    """
    if user is not None and not isinstance(user, Mapping):
        raise PriorError(
            f"priors must be a dict {{parameter: distribution or value}}, got {type(user).__name__}"
        )
    user = dict(user or {})
    by_name = {p.name: p for p in parameters}
    for key in user:
        base = key[4:] if key.startswith("log_") and key[4:] in by_name else key
        if base not in by_name:
            raise PriorError(
                f"unknown parameter {key!r}; this family has {[p.name for p in parameters]}"
            )
        if key.startswith("log_") and by_name[base].support != "positive":
            raise PriorError(
                f"'{key}': a log-scale prior needs a positive parameter, "
                f"{base!r} is {by_name[base].support}"
            )
    resolved = []
    for p in parameters:
        plain, logged = p.name in user, f"log_{p.name}" in user
        if plain and logged:
            raise PriorError(f"two priors for {p.name!r}: give either {p.name!r} or 'log_{p.name}'")
        if logged:
            prior = user[f"log_{p.name}"]
            if not isinstance(prior, dist.Distribution):
                raise PriorError(f"'log_{p.name}' must be a NumPyro distribution")
            _check_support(f"log_{p.name}", "real", prior)
            resolved.append(
                ResolvedPrior(p, f"log_{p.name}", _shaped(p.name, prior, p.shape), None, True)
            )
            continue
        prior = user[p.name] if plain else defaults[p.name]
        if isinstance(prior, dist.Distribution):
            _check_support(p.name, p.support, prior)
            resolved.append(ResolvedPrior(p, p.name, _shaped(p.name, prior, p.shape), None, False))
            continue
        value = _fixed_value(p, prior)
        lower, upper = _NEEDED[p.support]
        if not np.all(np.isfinite(value)):
            raise PriorError(f"fixed value of {p.name!r} must be finite, got {prior!r}")
        if p.support == "positive" and np.any(value < 0):
            raise PriorError(f"fixed value of {p.name!r} must be >= 0, got {prior!r}")
        if p.support == "unit" and np.any((value <= lower) | (value >= upper)):
            raise PriorError(f"fixed value of {p.name!r} must lie in (0, 1), got {prior!r}")
        resolved.append(ResolvedPrior(p, None, None, value, False))
    return tuple(resolved)


def sample_globals(priors: tuple[ResolvedPrior, ...]) -> dict[str, Any]:
    """Sample the global parameters inside a NumPyro model; returns ``{name: value}``."""
    phi = {}
    for r in priors:
        if r.site is None:
            phi[r.parameter.name] = jnp.asarray(r.value, dtype=jnp.result_type(float))
        elif r.log_scale:
            log_value = numpyro.sample(r.site, r.distribution)
            phi[r.parameter.name] = numpyro.deterministic(r.parameter.name, jnp.exp(log_value))
        else:
            phi[r.parameter.name] = numpyro.sample(r.site, r.distribution)
    return phi
