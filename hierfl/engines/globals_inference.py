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

import functools
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
    proposal_df : int
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
    proposal_df: int = 10
    progress: bool = False


class Unconstrained(NamedTuple):
    """A model over ``phi`` in the unconstrained space; ``args`` are the model's arguments,
    passed at call time so that compiled programs are reused across data."""

    z0: dict[str, Any]
    potential: Any  # (z, args) -> scalar
    postprocess: Any  # (z, args) -> {site: constrained value}, deterministic sites included


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

    def potential(z, args):
        return potential_energy(model, args, {}, z)

    def postprocess(z, args):
        return constrain_fn(model, args, {}, z, return_deterministic=True)

    return Unconstrained(z0, potential, postprocess)


@functools.lru_cache(maxsize=64)
def _nuts_chain_program(model, warmup: int, samples: int, target_accept: float, dense: bool):
    """One NUTS chain (warmup and sampling in one scan), compiled once per model and
    settings; the model's arguments are dynamic, so a new fit of the same model reuses it."""
    from numpyro.infer.hmc import hmc

    @jax.jit
    def chain(key, z0, args):
        problem = unconstrained(model, args)
        init_kernel, sample_kernel = hmc(lambda z: problem.potential(z, args), algo="NUTS")
        start_key, jitter_key = jax.random.split(key)
        flat, unravel = ravel_pytree(z0)
        z0 = unravel(flat + jax.random.uniform(jitter_key, flat.shape, minval=-0.5, maxval=0.5))
        state = init_kernel(
            z0,
            num_warmup=warmup,
            target_accept_prob=target_accept,
            dense_mass=dense,
            rng_key=start_key,
        )

        def body(state, _):
            state = sample_kernel(state)
            return state, (state.z, state.diverging)

        _, (zs, diverging) = jax.lax.scan(body, state, None, length=warmup + samples)
        zs = jax.tree_util.tree_map(lambda v: v[warmup:], zs)
        return jax.vmap(lambda z: problem.postprocess(z, args))(zs), diverging[warmup:]

    return chain


def nuts_globals(key, model, model_args: tuple, settings: GlobalsSettings):
    """Draw ``phi`` by NUTS; returns ``(draws, diagnostics)``.

    NumPyro's functional NUTS kernel (:func:`numpyro.infer.hmc.hmc`) runs warmup and sampling
    in one ``lax.scan``, compiled once for one chain; the chains then run one after another
    with the same executable. For a low-dimensional ``phi`` the compile dominates, so this is
    several times faster end to end than ``MCMC`` with sequential chains, which compiles each
    phase of each chain. The program is cached per model and settings: a second fit of the
    same model (on any data of the same shapes) does not recompile.
    """
    from numpyro.diagnostics import summary

    problem = unconstrained(model, model_args)
    dense = ravel_pytree(problem.z0)[0].shape[0] <= DENSE_MASS_UP_TO
    chain = _nuts_chain_program(
        model, settings.num_warmup, settings.num_samples, settings.target_accept, dense
    )
    keys = jax.random.split(key, settings.num_chains)
    if settings.progress:
        from tqdm.auto import tqdm

        keys = tqdm(keys, desc="server NUTS chains")
    runs = [chain(k, problem.z0, model_args) for k in keys]
    draws = {k: np.stack([np.asarray(r[0][k]) for r in runs]) for k in runs[0][0]}
    diverging = np.stack([np.asarray(r[1]) for r in runs])
    # entries fixed by a constraint (the unit diagonal of a correlation matrix and its
    # Cholesky factor's zeros) have no variance: their r_hat and ess are NaN, skipped below
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = summary(draws, group_by_chain=True)
    r_hat = max(float(np.nanmax(s["r_hat"])) for s in stats.values())
    ess = min(float(np.nanmin(s["n_eff"])) for s in stats.values())
    diagnostics = {
        "server": "nuts",
        "divergences": int(diverging.sum()),
        "max_r_hat": r_hat,
        "min_ess": ess,
    }
    if settings.num_chains > 1 and r_hat > 1.05:
        warnings.warn(
            f"server NUTS did not mix: max r_hat {r_hat:.3f} > 1.05; raise "
            "num_warmup or num_samples",
            RuntimeWarning,
            stacklevel=2,
        )
    return draws, diagnostics


def _psis(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    from .._arviz import arviz

    smoothed, k_hat = arviz().psislw(log_weights)
    return np.asarray(smoothed), float(k_hat)


#: relative step of the central differences in :func:`value_grad_hessian`
HESSIAN_STEP = 1e-5


def value_grad_hessian(potential):
    """Value, gradient and Hessian of ``potential`` from ONE batched ``value_and_grad``.

    The Hessian is by central differences of the exact gradient, ``H[:, k] = (g(x + h e_k) -
    g(x - h e_k)) / 2h`` (symmetrized), with the point itself evaluated in the same batch. For
    the low-dimensional ``phi`` in float64 this is accurate to ~1e-10 relative, and the
    compiled program holds a single copy of the clients' gradient, so it compiles several
    times faster than forward-over-reverse autodiff.
    """
    value_and_grad = jax.vmap(jax.value_and_grad(potential))

    def evaluate(x):
        n = x.shape[0]
        step = HESSIAN_STEP * jnp.maximum(1.0, jnp.abs(x))
        shifts = jnp.diag(step)
        values, grads = value_and_grad(jnp.concatenate([x[None], x + shifts, x - shifts]))
        columns = (grads[1 : n + 1] - grads[n + 1 :]) / (2.0 * step[:, None])
        return values[0], grads[0], 0.5 * (columns + columns.T)

    return evaluate


def newton_mode(potential, x0, *, max_iter: int = 200, tolerance: float = 1e-10):
    """Minimize a smooth low-dimensional ``potential`` by damped Newton steps.

    Levenberg–Marquardt damping (``H + lam I``) makes every step a descent step far from the
    mode; near it the steps become pure Newton and converge quadratically. Stops when the
    Newton decrement ``g' H^-1 g`` (the predicted decrease of the potential) falls below
    ``tolerance``. One ``lax.while_loop`` in which the potential, its gradient and Hessian
    are traced once (the first iteration evaluates ``x0``), so it compiles once and small.

    Returns
    -------
    mode, Hessian at the mode, decrement, iterations
    """
    evaluate = value_grad_hessian(potential)
    eye = jnp.eye(x0.shape[0], dtype=x0.dtype)

    def decrement(grad, hess):
        value = grad @ jnp.linalg.solve(hess, grad)
        return jnp.where(jnp.isfinite(value) & (value >= 0), value, jnp.inf)

    def cond(state):
        it, dec = state[-2], state[-1]
        return (it == 0) | ((dec > tolerance) & (it < max_iter))

    def body(state):
        x, value, grad, hess, candidate, lam, it, dec = state
        value_new, grad_new, hess_new = evaluate(candidate)
        better = jnp.isfinite(value_new) & (value_new <= value)
        x, value, grad, hess = jax.tree_util.tree_map(
            lambda a, b: jnp.where(better, a, b),
            (candidate, value_new, grad_new, hess_new),
            (x, value, grad, hess),
        )
        lam = jnp.where(better, jnp.maximum(lam * 0.1, 1e-12), lam * 10.0)
        dec = jnp.where(better, decrement(grad, hess), dec)
        candidate = x - jnp.linalg.solve(hess + lam * eye, grad)
        return x, value, grad, hess, candidate, lam, it + 1, dec

    n = x0.shape[0]
    init = (
        x0,
        jnp.asarray(jnp.inf, x0.dtype),
        jnp.zeros(n, x0.dtype),
        jnp.zeros((n, n), x0.dtype),
        x0,
        jnp.asarray(10.0, x0.dtype),
        0,
        jnp.asarray(jnp.inf, x0.dtype),
    )
    x, _, _, hess, _, _, it, dec = jax.lax.while_loop(cond, body, init)
    return x, hess, dec, it


#: client-term evaluations allowed for the importance correction (draws x clients)
IMPORTANCE_BUDGET = 1_000_000_000
#: fewest importance draws, whatever the number of clients
MIN_IMPORTANCE_DRAWS = 1000


def _student_t_draws(key, loc, scale_tril, df: int, num: int):
    """Multivariate Student-t draws with integer ``df``: ``chi2(df)`` as a sum of ``df``
    squared normals (exact), which compiles in a fraction of the time of a gamma sampler."""
    normal_key, chi_key = jax.random.split(key)
    eps = jax.random.normal(normal_key, (num, loc.shape[0]), loc.dtype)
    chi2 = jnp.sum(jax.random.normal(chi_key, (num, df), loc.dtype) ** 2, axis=-1)
    return loc + (eps @ scale_tril.T) * jnp.sqrt(df / chi2)[:, None]


@functools.lru_cache(maxsize=64)
def _laplace_programs(model, df: int, num_proposals: int, batch_size: int):
    """The Laplace path's two programs, compiled once per model and settings: mode, proposal
    and importance log weights; and the constraining map of the chosen draws."""

    def flat_problem(x0, args):
        problem = unconstrained(model, args)
        _, unravel = ravel_pytree(problem.z0)
        return problem, unravel

    @jax.jit
    def approximate(key, x0, args):
        problem, unravel = flat_problem(x0, args)

        def flat_potential(x):
            return problem.potential(unravel(x), args)

        mode, h, decrement, iterations = newton_mode(flat_potential, x0)
        precision_chol = jnp.linalg.cholesky(h)
        eye = jnp.eye(mode.shape[0], dtype=mode.dtype)
        # covariance H^-1 = L^-T L^-1; its lower Cholesky factor by re-factorization
        inverse_chol = jax.scipy.linalg.solve_triangular(precision_chol, eye, lower=True)
        scale_tril = jnp.linalg.cholesky(inverse_chol.T @ inverse_chol)
        proposal = dist.MultivariateStudentT(df, mode, scale_tril)
        z = _student_t_draws(key, mode, scale_tril, df, num_proposals)
        potentials = jax.lax.map(flat_potential, z, batch_size=batch_size)
        log_w = -potentials - proposal.log_prob(z)
        ok = jnp.all(jnp.isfinite(precision_chol)) & jnp.all(jnp.isfinite(scale_tril))
        return z, log_w, ok, decrement, iterations

    @jax.jit
    def constrain(z, args):
        problem, unravel = flat_problem(z[0], args)
        return jax.vmap(lambda x: problem.postprocess(unravel(x), args))(z)

    return approximate, constrain


def laplace_globals(key, model, model_args: tuple, settings: GlobalsSettings, batch_size: int = 16):
    """Draw ``phi`` from a PSIS-corrected Laplace approximation; returns ``(draws, diagnostics)``.

    The mode is found by damped Newton steps in the unconstrained space
    (:func:`newton_mode`); the Hessian there is the proposal's precision. The proposal is a
    Student-t around the mode; its draws are weighted by the exact collapsed posterior,
    Pareto-smoothed (Vehtari et al. 2024) and resampled systematically to equally weighted
    draws. The number of proposals is ``importance_draws`` or, by default, as many as fit in
    :data:`IMPORTANCE_BUDGET` client evaluations (at least :data:`MIN_IMPORTANCE_DRAWS`, at
    most the number of draws asked for).
    """
    proposal_key, resample_key = jax.random.split(key)
    problem = unconstrained(model, model_args)
    flat0, _ = ravel_pytree(problem.z0)
    total = settings.num_chains * settings.num_samples
    num_clients = max(
        1,
        max(
            int(np.shape(leaf)[0]) if np.ndim(leaf) else 1
            for leaf in jax.tree_util.tree_leaves(model_args)
        ),
    )
    num_proposals = settings.importance_draws or int(
        np.clip(IMPORTANCE_BUDGET // num_clients, min(MIN_IMPORTANCE_DRAWS, total), total)
    )
    approximate, constrain = _laplace_programs(
        model, settings.proposal_df, num_proposals, batch_size
    )
    z, log_w, ok, decrement, iterations = approximate(proposal_key, flat0, model_args)
    if not bool(ok):
        raise FloatingPointError(
            "Laplace approximation failed: the Hessian of the collapsed "
            "posterior is not positive definite at the mode; use "
            "server='nuts'"
        )
    log_w = np.asarray(log_w, dtype=np.float64)
    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    smoothed, k_hat = _psis(log_w - np.max(log_w))
    weights = np.exp(smoothed - np.max(smoothed))
    weights /= weights.sum()
    ess = float(1.0 / np.sum(weights**2))
    # systematic resampling: equally weighted draws for every downstream consumer
    u = (np.asarray(jax.random.uniform(resample_key, ())) + np.arange(total)) / total
    index = np.minimum(np.searchsorted(np.cumsum(weights), u), num_proposals - 1)
    chosen = constrain(z[index], model_args)
    draws = {
        k: np.asarray(v).reshape((settings.num_chains, settings.num_samples) + np.shape(v)[1:])
        for k, v in chosen.items()
    }
    if k_hat > 0.7:
        warnings.warn(
            f"Laplace importance correction is unreliable (Pareto k = {k_hat:.2f} > "
            "0.7); use server='nuts' for this model",
            RuntimeWarning,
            stacklevel=2,
        )
    diagnostics = {
        "server": "laplace",
        "pareto_k": k_hat,
        "importance_ess": ess,
        "importance_draws": num_proposals,
        "newton_iterations": int(iterations),
        "newton_decrement": float(decrement),
    }
    return draws, diagnostics
