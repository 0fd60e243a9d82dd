"""Server-side inference of the low-dimensional global parameters ``phi``.

Given a NumPyro model over ``phi`` alone (its likelihood a ``numpyro.factor`` of collapsed
client terms), draw from ``p(phi | D)`` by

* :func:`nuts_globals` — NUTS; accurate, for a moderate number of clients;
* :func:`laplace_globals` — a Laplace approximation at the mode in the unconstrained space,
  corrected by Pareto-smoothed importance sampling (INLA-style: the Gaussian is only the
  proposal, the exact collapsed posterior weighs the draws). When the number of clients is
  large, ``p(phi | D)`` is close to Gaussian and this costs a few dozen passes over the
  clients' statistics instead of thousands.

Both return draws of every sample and deterministic site of the model, shaped
``[num_chains, num_samples, ...]``, and a dict of diagnostics.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to

__all__ = ["GlobalsSettings", "laplace_globals", "nuts_globals"]

#: a dense mass matrix is adapted when phi has at most this many unconstrained dimensions
#: (cheap at that size, and it removes the correlation between regression coefficients that
#: otherwise makes NUTS trees deep)
DENSE_MASS_UP_TO = 50


class GlobalsSettings(NamedTuple):
    """How the server infers ``phi``.

    Attributes
    ----------
    num_warmup, num_samples, num_chains : int
        NUTS settings; Laplace returns ``num_chains * num_samples`` resampled draws.
    target_accept : float
        NUTS target acceptance probability.
    importance_draws : int or None
        Proposal draws for the Laplace importance correction (default: the number of draws).
    proposal_df : float
        Degrees of freedom of the Student-t proposal around the Laplace Gaussian; heavier tails
        than the Gaussian keep the importance weights bounded.
    progress : bool
        Show NUTS progress bars.
    """

    num_warmup: int = 1000
    num_samples: int = 1000
    num_chains: int = 4
    target_accept: float = 0.9
    importance_draws: int | None = None
    proposal_df: float = 10.0
    progress: bool = False


class Unconstrained(NamedTuple):
    """A model over ``phi`` in the unconstrained space."""

    z0: dict[str, Any]
    potential: Any
    postprocess: Any


def unconstrained(model, model_args: tuple) -> Unconstrained:
    """Potential energy and constraining map of ``model``, built without running it eagerly.

    The sites are discovered by tracing under ``jax.eval_shape`` (nothing is executed, so no
    per-primitive compilation); the initial point is the origin of the unconstrained space.
    """
    from numpyro import handlers
    from numpyro.infer.util import constrain_fn, potential_energy

    shapes: dict[str, Any] = {}

    def probe():
        trace = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(*model_args)
        for name, site in trace.items():
            if site["type"] == "sample" and not site["is_observed"]:
                transform = biject_to(site["fn"].support)
                shapes[name] = jnp.shape(transform.inv(site["value"]))
        return 0

    jax.eval_shape(probe)
    z0 = {name: jnp.zeros(shape) for name, shape in shapes.items()}

    def potential(z):
        return potential_energy(model, model_args, {}, z)

    def postprocess(z):
        return constrain_fn(model, model_args, {}, z, return_deterministic=True)

    return Unconstrained(z0, potential, postprocess)


def nuts_globals(key, model, model_args: tuple, settings: GlobalsSettings):
    """Draw ``phi`` by NUTS; returns ``(draws, diagnostics)``.

    NumPyro's functional NUTS kernel (:func:`numpyro.infer.hmc.hmc`) runs warmup and sampling
    in one ``lax.scan``, compiled once for one chain; the chains then run one after another
    with the same executable. For a low-dimensional ``phi`` the compile dominates, so this is
    several times faster end to end than ``MCMC`` with sequential chains, which compiles each
    phase of each chain.
    """
    from numpyro.diagnostics import summary
    from numpyro.infer.hmc import hmc

    problem = unconstrained(model, model_args)
    potential, postprocess = problem.potential, problem.postprocess
    init_kernel, sample_kernel = hmc(potential, algo="NUTS")
    dense = ravel_pytree(problem.z0)[0].shape[0] <= DENSE_MASS_UP_TO
    warmup, samples = settings.num_warmup, settings.num_samples

    @jax.jit
    def chain(key, z0):
        start_key, jitter_key = jax.random.split(key)
        flat, unravel = ravel_pytree(z0)
        z0 = unravel(flat + jax.random.uniform(jitter_key, flat.shape, minval=-0.5, maxval=0.5))
        state = init_kernel(z0, num_warmup=warmup, target_accept_prob=settings.target_accept,
                            dense_mass=dense, rng_key=start_key)

        def body(state, _):
            state = sample_kernel(state)
            return state, (state.z, state.diverging)

        _, (zs, diverging) = jax.lax.scan(body, state, None, length=warmup + samples)
        zs = jax.tree_util.tree_map(lambda v: v[warmup:], zs)
        return jax.vmap(postprocess)(zs), diverging[warmup:]

    runs = [chain(k, problem.z0) for k in jax.random.split(key, settings.num_chains)]
    draws = {k: np.stack([np.asarray(r[0][k]) for r in runs]) for k in runs[0][0]}
    diverging = np.stack([np.asarray(r[1]) for r in runs])
    stats = summary(draws, group_by_chain=True)
    r_hat = max(float(np.nanmax(s["r_hat"])) for s in stats.values())
    ess = min(float(np.nanmin(s["n_eff"])) for s in stats.values())
    diagnostics = {"server": "nuts", "divergences": int(diverging.sum()), "max_r_hat": r_hat,
                   "min_ess": ess}
    if settings.num_chains > 1 and r_hat > 1.05:
        warnings.warn(f"server NUTS did not mix: max r_hat {r_hat:.3f} > 1.05; raise "
                      "num_warmup or num_samples", RuntimeWarning, stacklevel=2)
    return draws, diagnostics


def _psis(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    from .._arviz import arviz
    smoothed, k_hat = arviz().psislw(log_weights)
    return np.asarray(smoothed), float(k_hat)


def laplace_globals(key, model, model_args: tuple, settings: GlobalsSettings,
                    batch_size: int = 64):
    """Draw ``phi`` from a PSIS-corrected Laplace approximation; returns ``(draws, diagnostics)``.

    The mode is found by BFGS in the unconstrained space and polished by Newton steps with the
    exact Hessian; the Hessian's inverse is the proposal's scale.
    """
    proposal_key, resample_key = jax.random.split(key)
    problem = unconstrained(model, model_args)
    flat0, unravel = ravel_pytree(problem.z0)

    def flat_potential(x):
        return problem.potential(unravel(x))

    potential = jax.jit(flat_potential)
    grad = jax.jit(jax.grad(flat_potential))
    hessian = jax.jit(jax.hessian(flat_potential))

    result = jax.scipy.optimize.minimize(potential, flat0, method="BFGS",
                                         options={"maxiter": 500})
    mode = result.x
    for _ in range(20):  # Newton polish: exact Hessian, backtracking line search
        g, h = grad(mode), hessian(mode)
        step = jnp.linalg.solve(h, g)
        if not bool(jnp.all(jnp.isfinite(step))):
            break
        value, scale = potential(mode), 1.0
        while scale > 1e-4 and not bool(potential(mode - scale * step) <= value):
            scale *= 0.5
        mode = mode - scale * step
        if float(jnp.max(jnp.abs(grad(mode)))) < 1e-6 * max(1.0, abs(float(value))):
            break
    h = hessian(mode)
    h = 0.5 * (h + h.T)
    chol_precision = jnp.linalg.cholesky(h)
    if not bool(jnp.all(jnp.isfinite(chol_precision))):
        raise FloatingPointError("Laplace approximation failed: the Hessian of the collapsed "
                                 "posterior is not positive definite at the mode; use "
                                 "server='nuts'")
    eye = jnp.eye(h.shape[0])
    scale_tril = jax.scipy.linalg.solve_triangular(chol_precision, eye, lower=True).T
    scale_tril = jnp.linalg.cholesky(scale_tril @ scale_tril.T)
    proposal = dist.MultivariateStudentT(settings.proposal_df, mode, scale_tril)
    total = settings.num_chains * settings.num_samples
    num_proposals = settings.importance_draws or total
    z = proposal.sample(proposal_key, (num_proposals,))
    potentials = jax.jit(lambda zs: jax.lax.map(flat_potential, zs,
                                                batch_size=batch_size))(z)
    log_w = np.asarray(-potentials - proposal.log_prob(z), dtype=np.float64)
    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    smoothed, k_hat = _psis(log_w - np.max(log_w))
    weights = np.exp(smoothed - np.max(smoothed))
    weights /= weights.sum()
    ess = float(1.0 / np.sum(weights**2))
    # systematic resampling: equally weighted draws for every downstream consumer
    u = (np.asarray(jax.random.uniform(resample_key, ())) + np.arange(total)) / total
    index = np.minimum(np.searchsorted(np.cumsum(weights), u), num_proposals - 1)
    chosen = jax.jit(jax.vmap(lambda x: problem.postprocess(unravel(x))))(z[index])
    draws = {k: np.asarray(v).reshape((settings.num_chains, settings.num_samples)
                                      + np.shape(v)[1:]) for k, v in chosen.items()}
    if k_hat > 0.7:
        warnings.warn(f"Laplace importance correction is unreliable (Pareto k = {k_hat:.2f} > "
                      "0.7); use server='nuts' for this model", RuntimeWarning, stacklevel=2)
    diagnostics = {"server": "laplace", "pareto_k": k_hat, "importance_ess": ess,
                   "optimizer_success": bool(result.success),
                   "mode_gradient": float(jnp.max(jnp.abs(grad(mode))))}
    return draws, diagnostics
