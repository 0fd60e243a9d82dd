r"""The exact engine: one round of sufficient statistics for conjugate families.

Round 1. Each client computes its sufficient statistics from its own rows and sends them
once. The server, holding :math:`\log p(D_i \mid \phi)` exactly for every client, infers the
low-dimensional ``phi`` (NUTS for up to ``laplace_above`` clients, a PSIS-corrected Laplace
approximation beyond) and broadcasts draws of ``phi``.

Finalize. Each client forms :math:`\theta_i \mid \phi, D_i` in closed form for every draw of
``phi``; its personal posterior is that mixture, which is exactly the centralized posterior
:math:`p(\theta_i \mid D_1..D_N)`. The client keeps it; the fit records its mean and sd, and
draws from it lazily (one conditional draw per ``phi`` draw).

What the server sees: each client's statistics (e.g. for a linear mixed model ``n``,
``y'y``, ``X'y``, ``X'X``, ``Z'y``, ``Z'X``, ``Z'Z``), never its rows.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from ..families import ConjugateFamily
from ..protocol import FederatedAlgorithm
from .globals_inference import GlobalsSettings, laplace_globals, nuts_globals

__all__ = ["ExactClientSampler", "ExactServerState", "collapsed_model", "exact_algorithm", "x64"]

#: above this many clients, ``server="auto"`` uses the Laplace approximation
LAPLACE_ABOVE = 1000
#: budget of (clients x phi draws) for the personal moments; beyond it draws are thinned
MOMENT_BUDGET = 100_000_000
#: at most this many (evenly thinned) phi draws enter the personal moments: the Monte Carlo
#: error of a mixture mean over 1000 draws is far below the personal posterior sd
MOMENT_DRAWS = 1000


class ExactServerState(NamedTuple):
    """Server state: draws of every global site, ``[num_chains, num_samples, ...]``."""

    draws: dict[str, Any] | None
    diagnostics: dict[str, Any]


class PersonalMoments(NamedTuple):
    """A client's personal posterior mean and variance (mixture over ``phi`` draws)."""

    mean: Any
    variance: Any


def x64():
    """Context in which JAX computes in float64 (``jax.enable_x64``, or its older home)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # JAX < 0.7

    return enable_x64()


@functools.lru_cache(maxsize=64)
def _server_statistics(family: ConjugateFamily):
    """``family.server_statistics`` as one compiled program (not one per eager op)."""
    return jax.jit(family.server_statistics)


@functools.lru_cache(maxsize=64)
def collapsed_model(family: ConjugateFamily):
    """The server's model: priors on ``phi`` and the clients' exact collapsed likelihood.

    One function object per family, so the server's compiled programs are reused by every fit
    of that family.
    """

    def model(server_stats):
        phi = family.sample_globals()
        numpyro.factor("collapsed_log_likelihood", family.total_log_marginal(phi, server_stats))

    return model


def _global_params(family: ConjugateFamily, draws: dict[str, Any]) -> dict[str, Any]:
    """``{parameter: [S, ...]}`` from flat server draws (fixed parameters broadcast)."""
    out = {}
    for r in family.priors:
        name = r.parameter.name
        out[name] = draws[name] if name in draws else None
    size = next(v.shape[0] for v in out.values() if v is not None)
    for r in family.priors:
        if out[r.parameter.name] is None:
            out[r.parameter.name] = jnp.broadcast_to(
                jnp.asarray(r.value, dtype=float), (size,) + r.parameter.shape
            )
    return out


def exact_algorithm(
    family: ConjugateFamily,
    *,
    server: str = "auto",
    settings: GlobalsSettings | None = None,
    num_clients: int | None = None,
) -> FederatedAlgorithm:
    """The exact engine as a :class:`~hierfl.protocol.FederatedAlgorithm`.

    Parameters
    ----------
    family : ConjugateFamily
    server : {"auto", "nuts", "laplace"}
        How the server infers ``phi``.
    settings : GlobalsSettings
    num_clients : int, optional
        Used by ``server="auto"``.
    """
    settings = GlobalsSettings() if settings is None else settings
    if server not in ("auto", "nuts", "laplace"):
        raise ValueError(f"server must be 'auto', 'nuts' or 'laplace', got {server!r}")
    if server == "auto":
        server = "laplace" if (num_clients or 0) > LAPLACE_ABOVE else "nuts"
    model = collapsed_model(family)

    def init(key, client_data):
        del key
        shapes = jax.eval_shape(
            jax.vmap(family.statistics), client_data["fields"], client_data["mask"]
        )
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return ExactServerState(None, {}), zeros

    def broadcast(state):
        return None if state.draws is None else _global_params(family, state.draws)

    def client_update(key, broadcast_value, client_state, client_data):
        del key, broadcast_value, client_state
        stats = family.statistics(client_data["fields"], client_data["mask"])
        return stats, stats, {}

    def server_update(key, state, messages, received):
        infer = laplace_globals if server == "laplace" else nuts_globals
        # The collapsed log-likelihood sums one term per client: with a million clients it is
        # ~1e7 in size, beyond float32's resolution of the posterior's curvature. The server
        # therefore works in float64 (the clients' statistics are promoted on arrival).
        with x64():
            messages = jax.tree_util.tree_map(lambda m: np.asarray(m, np.float64), messages)
            server_stats = _server_statistics(family)(messages, np.asarray(received))
            draws, diagnostics = infer(key, model, (server_stats,), settings)
        float_type = jnp.result_type(float)
        flat = {
            k: jnp.asarray(v.reshape((-1,) + v.shape[2:]), float_type) for k, v in draws.items()
        }
        diagnostics = dict(diagnostics, clients_received=int(np.sum(received)))
        return ExactServerState(flat, diagnostics), diagnostics

    def client_finalize(key, phi, stats, client_data):
        del key, client_data
        return personal_moments(family, phi, stats, num_clients or 1)

    return FederatedAlgorithm(init, broadcast, client_update, server_update, client_finalize)


def personal_moments(family: ConjugateFamily, phi, stats, num_clients: int) -> PersonalMoments:
    """Mean and variance of the mixture over ``phi`` draws of ``theta_i | phi, D_i``.

    Uses at most :data:`MOMENT_DRAWS` evenly thinned draws, fewer when ``num_clients x
    draws`` would exceed :data:`MOMENT_BUDGET` (but at least 100); accumulated by
    ``lax.scan`` so memory stays linear in the number of clients. (Draws of the personal
    posterior, :class:`ExactClientSampler`, use every draw.)
    """
    size = next(iter(phi.values())).shape[0]
    stride = max(
        1, int(np.ceil(size * num_clients / MOMENT_BUDGET)), int(np.ceil(size / MOMENT_DRAWS))
    )
    stride = min(stride, max(1, size // 100))
    thinned = jax.tree_util.tree_map(lambda v: v[::stride], phi)
    count = next(iter(thinned.values())).shape[0]

    def step(carry, phi_s):
        conditional = family.conditional(phi_s, stats)
        mean, var = conditional.mean, conditional.variance
        total, square, variance = carry
        return (total + mean, square + mean**2, variance + var), None

    shape = family.conditional(jax.tree_util.tree_map(lambda v: v[0], phi), stats).mean
    zeros = jnp.zeros_like(shape)
    (total, square, variance), _ = jax.lax.scan(step, (zeros, zeros, zeros), thinned)
    mean = total / count
    return PersonalMoments(mean, variance / count + jnp.maximum(square / count - mean**2, 0.0))


class ExactClientSampler:
    """Draws of each client's personal posterior: one conditional draw per ``phi`` draw.

    ``sampler(indices)`` returns ``{client_site: [num_chains, num_samples, len(indices), ...]}``.
    Draws depend only on the client's index (its key is ``fold_in(key, index)``), so a client
    gets the same draws whichever subset is asked for.
    """

    def __init__(
        self,
        family: ConjugateFamily,
        draws: dict[str, np.ndarray],
        stats: dict[str, np.ndarray],
        key,
    ):
        self.family, self.draws, self.stats, self.key = family, draws, stats, np.asarray(key)

    def __call__(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        chains, samples = next(iter(self.draws.values())).shape[:2]
        phi = _global_params(
            self.family,
            {k: jnp.asarray(v.reshape((-1,) + v.shape[2:])) for k, v in self.draws.items()},
        )
        stats = jax.tree_util.tree_map(lambda s: jnp.asarray(s[indices]), self.stats)
        out = _sample_clients(self.family, jnp.asarray(self.key), phi, stats, jnp.asarray(indices))
        return {
            self.family.client_site: np.asarray(out).reshape(
                (chains, samples, len(indices)) + out.shape[2:]
            )
        }


def _sample_clients(family, key, phi, stats, indices):
    def one_client(stats_i, index):
        client_key = jax.random.fold_in(key, index)
        keys = jax.random.split(client_key, next(iter(phi.values())).shape[0])
        return jax.vmap(lambda k, p: family.conditional(p, stats_i).sample(k))(keys, phi)

    return jnp.moveaxis(jax.vmap(one_client)(stats, indices), 0, 1)
