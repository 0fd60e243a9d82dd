r"""Priors on the global parameters ``phi``, shared by every engine.

A family declares its global parameters with :class:`Parameter` (name, support, shape). The
user chooses a prior for each with a NumPyro distribution, in one of three forms:

* ``{"tau": dist.HalfNormal(5.0)}`` — a prior on the parameter itself;
* ``{"log_tau": dist.Normal(0.0, 1.0)}`` — a prior on the log of a positive parameter; the
  model samples ``log_tau`` and records ``tau = exp(log_tau)`` as a deterministic site;
* ``{"tau": 0.0}`` — a fixed value: the parameter is not inferred (this is how the pooling
  spectrum is written: ``tau = 0`` is complete pooling, a large ``tau`` no pooling).

Supports: ``"real"``, ``"positive"``, ``"unit"`` (the open interval (0, 1)), ``"simplex"``
(a probability vector, e.g. mixture weights under a ``Dirichlet`` prior) and ``"ordered"``
(a strictly increasing vector, e.g. the component means of a mixture, ordered to remove label
switching). An ``"ordered"`` parameter takes either a distribution on
``constraints.ordered_vector`` or a univariate real prior ``p``, read as the prior of
:math:`K` exchangeable values relabelled in increasing order (:class:`OrderStatistics`:
density :math:`K!\prod_k p(x_k)` on :math:`x_1 < \dots < x_K`).

A ``"corr_cholesky"`` parameter is a matrix: the lower Cholesky factor :math:`L` of a
correlation matrix :math:`\Omega = L L^\top` (e.g. of a linear mixed model's random effects),
under an ``LKJCholesky`` prior or fixed (``numpy.eye(q)``: uncorrelated).

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
from jax.scipy.special import gammaln
from numpyro.distributions import constraints

__all__ = [
    "OrderStatistics",
    "Parameter",
    "PriorError",
    "ResolvedPrior",
    "resolve_priors",
    "sample_globals",
]

#: tolerance of the sum of a fixed ``"simplex"`` value (weights given in float32 sum to 1
#: within a few units of 1e-7)
SIMPLEX_TOLERANCE = 1e-6


class PriorError(ValueError):
    """An invalid prior; the message names the parameter."""


class Parameter(NamedTuple):
    """A global parameter of a family.

    Attributes
    ----------
    name : str
    support : str
        ``"real"``, ``"positive"``, ``"unit"`` (the open interval (0, 1)), ``"simplex"``
        (non-negative, summing to one) or ``"ordered"`` (strictly increasing); the last two
        are vectors. ``"corr_cholesky"``: a matrix, the lower Cholesky factor of a
        correlation matrix.
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


class OrderStatistics(dist.Distribution):
    r"""The :math:`K` order statistics of :math:`K` independent draws of a univariate ``base``.

    .. math::
        p(x_1, \dots, x_K) = K! \prod_{k=1}^K p_{base}(x_k),\qquad x_1 < \dots < x_K

    It is the prior "the :math:`K` values are exchangeable draws of ``base``", with the labels
    assigned in increasing order; a mixture's component means under it are identifiable (no
    label switching). Its support is ``constraints.ordered_vector``, so NUTS runs on it through
    NumPyro's ``OrderedTransform``.

    Parameters
    ----------
    base : numpyro.distributions.Distribution
        Univariate, real support, no batch shape.
    size : int
        :math:`K`.

    Examples
    --------
    >>> import jax, numpyro.distributions as dist
    >>> prior = OrderStatistics(dist.Normal(0.0, 1.0), 3)
    >>> prior.event_shape
    (3,)
    >>> bool((jax.numpy.diff(prior.sample(jax.random.PRNGKey(0))) > 0).all())
    True
    """

    support = constraints.ordered_vector
    pytree_data_fields = ("base",)
    pytree_aux_fields = ("size",)

    def __init__(self, base, size: int, *, validate_args=None):
        self.base, self.size = base, int(size)
        super().__init__(batch_shape=(), event_shape=(self.size,), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        draws = self.base.expand(tuple(sample_shape) + (self.size,)).sample(key)
        return jnp.sort(draws, axis=-1)

    def log_prob(self, value):
        value = jnp.asarray(value)
        ordered = jnp.all(jnp.diff(value, axis=-1) > 0, axis=-1)
        log_density = gammaln(self.size + 1.0) + jnp.sum(self.base.log_prob(value), axis=-1)
        return jnp.where(ordered, log_density, -jnp.inf)


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
#: vector supports, checked by their NumPyro constraint rather than by bounds
_VECTOR_SUPPORTS = {"simplex": constraints.simplex, "ordered": constraints.ordered_vector}
#: matrix supports, checked by their NumPyro constraint: the lower Cholesky factor of a
#: correlation matrix (lower triangular, positive diagonal, rows of unit length)
_MATRIX_SUPPORTS = {"corr_cholesky": constraints.corr_cholesky}
#: tolerance of the unit row lengths of a fixed ``"corr_cholesky"`` value (as NumPyro's
#: ``constraints.corr_cholesky``)
UNIT_NORM_TOLERANCE = 1e-6


def _check_support(name: str, support_name: str, prior) -> None:
    if prior.support.is_discrete:
        raise PriorError(
            f"prior for {name!r} is discrete ({type(prior).__name__}, support "
            f"{prior.support}) but {name!r} is a continuous parameter"
        )
    if support_name in _MATRIX_SUPPORTS:
        if prior.support is not _MATRIX_SUPPORTS[support_name]:
            raise PriorError(
                f"prior for {name!r} has support {prior.support} but {name!r} must be the "
                "Cholesky factor of a correlation matrix; use an LKJCholesky prior"
            )
        return
    if support_name in _VECTOR_SUPPORTS:
        if prior.support is not _VECTOR_SUPPORTS[support_name]:
            hint = (
                "; give a univariate real prior (its draws are sorted: OrderStatistics) or a "
                "distribution on constraints.ordered_vector"
                if support_name == "ordered"
                else "; use a Dirichlet prior"
            )
            raise PriorError(
                f"prior for {name!r} has support {prior.support} but {name!r} must be "
                f"{support_name}{hint}"
            )
        return
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
            prior = _ordered_from_univariate(p, prior)
            _check_support(p.name, p.support, prior)
            resolved.append(ResolvedPrior(p, p.name, _shaped(p.name, prior, p.shape), None, False))
            continue
        value = _fixed_value(p, prior)
        if not np.all(np.isfinite(value)):
            raise PriorError(f"fixed value of {p.name!r} must be finite, got {prior!r}")
        if p.support in _MATRIX_SUPPORTS:
            _check_fixed_correlation_cholesky(p, value, prior)
            resolved.append(ResolvedPrior(p, None, None, value, False))
            continue
        if p.support in _VECTOR_SUPPORTS:
            _check_fixed_vector(p, value, prior)
            resolved.append(ResolvedPrior(p, None, None, value, False))
            continue
        lower, upper = _NEEDED[p.support]
        if p.support == "positive" and np.any(value < 0):
            raise PriorError(f"fixed value of {p.name!r} must be >= 0, got {prior!r}")
        if p.support == "unit" and np.any((value <= lower) | (value >= upper)):
            raise PriorError(f"fixed value of {p.name!r} must lie in (0, 1), got {prior!r}")
        resolved.append(ResolvedPrior(p, None, None, value, False))
    return tuple(resolved)


def _ordered_from_univariate(parameter: Parameter, prior):
    """A univariate real prior on an ``"ordered"`` parameter, as its :class:`OrderStatistics`."""
    if (
        parameter.support == "ordered"
        and len(parameter.shape) == 1
        and not prior.support.is_discrete
        and prior.event_shape == ()
        and prior.batch_shape == ()
        and _bounds(prior.support) == _NEEDED["real"]
    ):
        return OrderStatistics(prior, parameter.shape[0])
    return prior


def _check_fixed_vector(parameter: Parameter, value: np.ndarray, given) -> None:
    """A fixed ``"simplex"`` or ``"ordered"`` value lies in its support."""
    name = parameter.name
    if parameter.support == "simplex":
        if np.any(value < 0) or abs(float(np.sum(value)) - 1.0) > SIMPLEX_TOLERANCE:
            raise PriorError(
                f"fixed value of {name!r} must be non-negative and sum to 1, got {given!r}"
            )
    elif np.any(np.diff(value) <= 0):
        raise PriorError(f"fixed value of {name!r} must be strictly increasing, got {given!r}")


def _check_fixed_correlation_cholesky(parameter: Parameter, value: np.ndarray, given) -> None:
    """A fixed ``"corr_cholesky"`` value is the lower Cholesky factor of a correlation matrix."""
    lower = np.all(np.triu(value, 1) == 0)
    positive = np.all(np.diagonal(value, axis1=-2, axis2=-1) > 0)
    unit_rows = np.all(np.abs(np.linalg.norm(value, axis=-1) - 1.0) <= UNIT_NORM_TOLERANCE)
    if not (lower and positive and unit_rows):
        raise PriorError(
            f"fixed value of {parameter.name!r} must be the lower Cholesky factor of a "
            "correlation matrix (lower triangular, positive diagonal, rows of length 1; e.g. "
            f"numpy.eye({parameter.shape[-1]}) for uncorrelated effects), got {given!r}"
        )


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
