r"""Federated expectation propagation (EP) for any NumPyro model with one client plate.

The model is :math:`\phi \sim p(\phi)`, :math:`\theta_i \mid \phi \sim p(\theta_i \mid \phi)`,
:math:`D_i \mid \theta_i, \phi \sim p(D_i \mid \theta_i, \phi)`. EP approximates the posterior
of the unconstrained global parameters :math:`z = T^{-1}(\phi)` by a Gaussian that factorizes
over clients (Vehtari et al. 2020, *EP as a way of life*; Ashman et al. 2022, *Partitioned
VI*; Guo et al. 2023, *FedEP*):

.. math::
    q(z) = \prod_{i=1}^N t_i(z), \qquad
    t_i(z) \approx p(z)^{1/N} \int p(\theta_i \mid z)\, p(D_i \mid \theta_i, z)\, d\theta_i

Each site :math:`t_i` is a Gaussian in natural parameters (precision :math:`\Lambda_i`,
precision-times-mean :math:`h_i`) and **lives on client i**.

**The prior.** It is divided among the clients, exactly: each tilted problem carries
:math:`p(z)^{1/N}` (the prior's log density and its log-Jacobian, scaled by ``1/N`` with a
NumPyro handler), so no Gaussian approximation of the prior is made and the server never
evaluates it. The global approximation is the sum of the sites only. The initial sites are
:math:`N(m_0, N\,\mathrm{diag}(s_0^2))` each, so the first global approximation is
:math:`N(m_0, \mathrm{diag}(s_0^2))`, with the prior's width (half the 16-84% range of
prior draws of the unconstrained globals: ``TiltedProblem.prior_start``). EP's fixed
point does not depend on them, but the rounds it takes do: a unit width is far too narrow
for a global on the millisecond scale and costs many damped rounds (sleepstudy, whose
intercept is near 251 ms under a ``Normal(0, 1000)`` prior: after 10 Laplace rounds EP
stood at 1.6 ms from a unit start, 33 sd off, and within 0.3 sd of the exact posterior on
every global from the prior's width, converging in round 14). It costs where the unit start
happened to suit the posterior: cbpp and VerbAgg (40 persons), whose coefficients have
``Normal(0, 5)`` priors, converge in 10 and 11 rounds instead of 8 and 9, to the same fixed
point (hospitals with 20 and 100 clients: one round fewer, or as many with 30% dropout;
``benchmarks/bench_ep.py``). A global on the real line is centred at its prior median; a
constrained one at the origin of its unconstrained space (a scale at 1), as before.

**One round, on client i** (:func:`ep_algorithm`'s ``client_update``):

1. cavity :math:`q_{-i} = q / t_i` (natural parameters ``Q - Lambda_i``, ``eta - h_i``);
   if it is not positive definite the client removes only a fraction
   :math:`\kappa \in \{1, 1/2, 1/4, \dots, 0\}` of its site, the largest that leaves a
   positive definite cavity (recorded as ``cavity_power``);
2. tilted inference on :math:`(z, \theta_i)` with the cavity as the prior on :math:`z`,
   using only its own rows: the model is run with ``num_clients=1`` on the client's padded
   rows through handlers (prior scaled by ``1/N``, padding rows masked), never rewritten.
   ``"laplace"`` (a nested Laplace approximation: the client's own parameters integrated
   out by adaptive Gauss-Hermite quadrature, then mode and Hessian of the marginal of
   :math:`z` by damped Newton; see :func:`_laplace`), ``"nuts"`` (NumPyro's functional NUTS
   kernel) or ``"svi"`` (a full-covariance Gaussian over :math:`(z, \theta_i)` fitted with
   Optax, the partitioned-VI update);
3. moment matching: the tilted marginal of :math:`z` gives new global natural parameters
   :math:`(P, P m)`; the site that would produce them is
   :math:`\Lambda_i^{new} = \Lambda_i + P - Q`, so the damped change is
   :math:`\delta_i = \alpha\,(P - Q,\ P m - \eta)`, whatever the cavity fraction;
4. the client sends :math:`\delta_i` and keeps it as *pending*.

For sampled tilted distributions (NUTS) and for SVI the moments are estimated with Stein's
identity rather than from raw sample moments (:func:`tilted_moments`): with
:math:`g = \nabla_z \log h` the gradient of the client's own log factor,
:math:`Q_c(m - m_c) = E[g]` and :math:`S\,Q_c = I + E[(z - m) g^\top]`. The Monte Carlo error
of the *change* then scales with the client's own information rather than with the global
precision, so summing N noisy sites does not add :math:`\sqrt{N}` times the noise of one.
(When the client's own information dominates its cavity, the plain sample moments are used.)

**The server** (``server_update``) adds the changes of the clients whose messages arrived
and passed validation: ``Q += sum(delta_precision)``, ``eta += sum(delta_shift)``. The damped
step is a convex combination :math:`(1 - \alpha)(Q, \eta) + \alpha (Q^*, \eta^*)` of the
current approximation and the undamped EP update :math:`Q^* = Q + \sum_i \delta_i / \alpha`.
If :math:`Q^*` is not positive definite the server backs off, applying only a fraction
:math:`s \in \{1, 1/2, \dots, 2^{-7}, 0\}` of the sum, the largest for which
:math:`Q + s \sum_i \delta_i / \alpha` is, and records ``s`` for that step in
``applied_scale``; each client commits its pending change times that fraction when it next
works (or finalizes), so the server's sum always equals the sum of the clients' sites.

Checking the undamped update rather than the damped one makes the back-off the same whatever
:math:`\alpha`. Sites may have negative precision where a client's marginal likelihood is
log-convex in a global (a person whose responses pull a random-effect sd up from a small
value). In parallel their negative changes add up, and where the summed curvature is negative
:math:`Q^*` is indefinite: a Newton step on a non-convex function. Damping alone would then
only *hide* the improper target, since :math:`(1 - \alpha) Q + \alpha Q^*` can still be
positive definite, yet nearly singular, so that the mean runs off by the summed gradient
divided by a near-zero precision (VerbAgg, 40 persons: log sigma from -1.25 to 161 in one
round, and 20 rounds to converge instead of 9). With :math:`Q^*` positive definite the new
precision is at least :math:`(1 - \alpha) Q` in every direction, the rate at which damping
widens the approximation anyway. (In the sequential schedule :math:`Q^*` is the one
client's tilted precision, positive definite whenever its tilted inference succeeded.)

**What the server sees**: the *sum* of the damped changes of natural parameters over the
clients that replied (a ``[d, d]`` matrix and a ``[d]`` vector, ``d`` the number of
unconstrained global parameters), and which clients replied. It never sees a client's data,
its site, or its personal parameters; the per-message positive-definiteness check
(:func:`validate_message`) is the only thing that looks at one message alone, and a secure
aggregation transport can replace it by the aggregate check the server does anyway.

**Personal posteriors** (``client_finalize``): each client runs its tilted inference once
more against the final global approximation. Its draws of :math:`\theta_i` are paired with
the global draws of :math:`z` (the same for every client) by a linear regression adjustment,
:math:`\theta_s = \theta^{tilt}_s + B (z^{glob}_s - z^{tilt}_s)` with
:math:`B = \mathrm{Cov}(\theta, z)\mathrm{Cov}(z)^{-1}` from the tilted draws, so the joint
draws keep the tilted correlation between :math:`\theta_i` and :math:`z` (exact for a
Gaussian tilted distribution).

Examples
--------
>>> import numpy as np, hierfl as hf
>>> rng = np.random.default_rng(0)
>>> data = hf.ClientData.from_dict({c: {"y": rng.normal(i, 1.0, 5), "sigma": np.ones(5)}
...                                 for i, c in enumerate("abcd")})
>>> fit = hf.fit(hf.NormalNormal(priors={"tau": 1.0}), data, method="ep", tilted="laplace",
...              num_rounds=8, num_samples=100)
>>> fit.to_arviz().posterior["theta"].dims
('chain', 'draw', 'client')
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.distributions.transforms import IdentityTransform, IndependentTransform
from numpyro.infer.util import constrain_fn, potential_energy
from numpyro.primitives import Messenger

from ..data import MIN_GROUPING_GAIN, ClientData, ModelData
from ..drivers import drive
from ..fit import Fit, ModelSites, StoredClientSamples, inspect_model
from ..protocol import (
    ClientGroups,
    SkipRecord,
    asked_clients,
    finalize_clients,
    vmap_clients,
)
from .globals_inference import unconstrained

__all__ = [
    "EPBroadcast",
    "EPConvergenceWarning",
    "EPClientState",
    "EPMessage",
    "EPServerInfo",
    "EPServerState",
    "EPSettings",
    "TiltedProblem",
    "ep_algorithm",
    "final_broadcast",
    "fit_ep",
    "tilted_moments",
    "tilted_problem",
]

#: sd of an unconstrained global parameter in the *initial* global approximation where its
#: prior draws give no finite, positive width (otherwise the prior's own: ``prior_start``)
INITIAL_SCALE = 1.0
#: prior draws that place and size the initial global approximation, and their fixed seed
PRIOR_START_DRAWS = 512
PRIOR_START_SEED = 0
#: scale of the per-client random start of the tilted optimizers and samplers
INITIAL_JITTER = 0.05
#: server back-off: fractions 1, 1/2, ..., 2^-(BACKOFF_STEPS-1) of the summed change, then 0
BACKOFF_STEPS = 8
#: client back-off: fractions of its own site removed to form the cavity (then 0)
CAVITY_STEPS = 8
#: Stein moment estimators are used when the cavity holds at least this share of the tilted
#: precision (``trace(Q_c S) / d``); below it the client dominates and raw moments are used
STEIN_MIN_CAVITY_SHARE = 0.5
#: relative tolerance of the symmetry check on a message's precision change
SYMMETRY_TOLERANCE = 1e-3
#: most Newton steps for a client's own parameters given ``phi`` (Laplace tilted inference;
#: warm-started, usually a convex problem)
INNER_NEWTON_STEPS = 20
#: at most this many Gauss-Hermite points per client dimension for the moments of
#: ``theta_i | phi`` behind the final personal draws (one set of nodes per draw of ``phi``)
CONDITIONAL_POINTS = 3
#: Newton's line search accepts a step that raises the potential by at most this many float
#: epsilons (relative to the potential's size)
SEARCH_SLACK = 8.0
#: damped Newton: most halvings of the step, and the predicted gain in log density below
#: which it stops
MAX_HALVINGS, NEWTON_TOL = 12, 1e-6
#: eigenvalue floor (relative) that makes a Newton direction a descent direction
EIGEN_FLOOR = 1e-6
#: a NUTS tilted run with more divergent transitions than this fraction sends no update
MAX_DIVERGENT_FRACTION = 0.1
#: a NUTS run whose draws' potential energies spread over more than this (plus the
#: per-dimension allowance times the dimension) has left the typical set: no update
MAX_ENERGY_SPREAD = 100.0
MAX_ENERGY_SPREAD_PER_DIM = 10.0
#: ridge added to the tilted covariance of phi in the finalize regression adjustment
REGRESSION_JITTER = 1e-6
#: NUTS tilted inference: a mode farther than this many sds per dimension (in the previous
#: run's metric) from the previous run's last draw is not used as the start
RUNAWAY_DISTANCE = 5.0
#: ridge of that regression, as a fraction of the global covariance of ``phi``
REGRESSION_RIDGE = 1e-3
#: the synchronous schedule opens with a sequential sweep from this many clients on
SEQUENTIAL_START_FROM = 50
#: rounds in a row below ``tol`` that count as converged
PATIENCE = 2
#: with averaging (stochastic tilted inference, ``average_from``), a converged run stops only
#: once this many rounds are in the average: stopping at the first quiet rounds returned about
#: one round's Monte Carlo noise (cbpp, NUTS tilted inference, 30% dropout, 20 rounds, EP
#: seeds 0-4: worst global mean 0.074 sd from centralized NUTS on average and up to 0.114,
#: stopping after 7-12 rounds with 0-2 of them averaged; with this rule 0.061 and up to 0.073,
#: after 15-16; ``benchmarks/bench_ep.py --ep-seeds``)
MIN_AVERAGED_ROUNDS = 5
#: default convergence tolerance (max change of a global mean in sds, and of log sd)
DEFAULT_TOL = {"laplace": 0.02, "nuts": 0.05, "svi": 0.05}
#: Laplace tilted inference: most Gauss-Hermite points per client dimension, and most
#: points in the tensor grid over the client's own parameters
MAX_QUADRATURE_POINTS, QUADRATURE_BUDGET = 5, 81


# ---------------------------------------------------------------------------- settings


class EPSettings(NamedTuple):
    """Options of the EP engine (all keyword options of ``hf.fit(..., method="ep")``).

    Attributes
    ----------
    tilted : {"nuts", "laplace", "svi"}
        Tilted inference on each client.
    damping : float
        Fraction :math:`\\alpha` of the moment-matched site change that a client applies.
    num_rounds : int
        Maximum number of rounds.
    schedule : {"synchronous", "sequential"}
        All (or a random fraction of) clients in parallel from the same global
        approximation, or one client after another, each seeing the previous one's update.
    participation, dropout : float
        Fraction of clients asked per round; probability an asked client drops out.
    tol : float or None
        Converged when the largest change of a global mean (in posterior sds) and of a log
        sd stay below ``tol`` for :data:`PATIENCE` rounds (default by ``tilted``:
        :data:`DEFAULT_TOL`). A round whose received updates the server all refused (back-off
        fraction 0) changed nothing, and does not count.
    num_warmup, num_samples : int
        NUTS warmup and kept draws per tilted run; ``num_samples`` is also the number of
        posterior draws of the fit (global and personal).
    target_accept, max_tree_depth : float, int
        NUTS settings.
    newton_steps : int
        Damped Newton iterations of the Laplace tilted inference (warm-started).
    svi_steps, svi_learning_rate, svi_particles : int, float, int
        SVI tilted inference: Adam steps, learning rate, ELBO draws per step.
    moment_draws : int
        Draws from the fitted Gaussian used for the SVI moment estimate.
    quadrature_points : int or None
        Laplace tilted inference: Gauss-Hermite points per dimension of the client's own
        parameters when they are integrated out (1 is a plain Laplace approximation; default
        by :func:`quadrature_points`).
    size_groups : int
        Synchronous schedule: clients are split into at most this many groups of similar
        size, each padded to its own largest client (one compiled program per group), when
        that cuts the padded rows by at least :data:`hierfl.data.MIN_GROUPING_GAIN`.
    sequential_start : bool or None
        Synchronous schedule: open with one sequential sweep (assumed density filtering), so
        that the parallel rounds start near the fixed point; default: with at least
        :data:`SEQUENTIAL_START_FROM` clients, in process only (under Flower the sweep would
        be one round trip per client, one after another; hospitals with 1,000 clients
        converge in 12 rounds without it, 6 with it).
    average_from : int or None
        The fit's global approximation (and the personal posteriors taken against it) is the
        average of the global natural parameters over the rounds from this one on
        (Polyak-Ruppert averaging of the Monte Carlo noise of stochastic tilted inference);
        the rounds and the stopping rule use the current approximation. Default: half of
        ``num_rounds`` for ``nuts`` and ``svi``, no averaging for the deterministic
        ``laplace``. With the sequential schedule every update of a round from this one on
        is averaged. With averaging, a run whose changes fall below ``tol`` stops only once
        :data:`MIN_AVERAGED_ROUNDS` rounds are in the average (``converged_round`` is still
        the round where they fell below it).
    reparam : dict or None
        :func:`numpyro.handlers.reparam` configuration for the tilted problems (default for a
        conjugate family: its :meth:`reparam_config`, non-centred client sites).
    """

    tilted: str = "nuts"
    damping: float = 0.5
    num_rounds: int = 10
    schedule: str = "synchronous"
    participation: float = 1.0
    dropout: float = 0.0
    tol: float | None = None
    num_warmup: int = 300
    num_samples: int = 500
    target_accept: float = 0.85
    max_tree_depth: int = 8
    newton_steps: int = 20
    svi_steps: int = 400
    svi_learning_rate: float = 0.05
    svi_particles: int = 8
    moment_draws: int = 256
    quadrature_points: int | None = None
    size_groups: int = 3
    sequential_start: bool | None = None
    average_from: int | None = None
    reparam: dict | None = None


# ---------------------------------------------------------------------------- states


class EPClientState(NamedTuple):
    """One client's state (stacked on a leading client axis by the drivers).

    ``d`` unconstrained global dimensions, ``D = d + local`` dimensions of the tilted problem.
    """

    site_precision: Any  # [d, d]  committed site natural parameters
    site_shift: Any  # [d]
    pending_precision: Any  # [d, d] last change sent, applied by the server times a fraction
    pending_shift: Any  # [d]
    pending_step: Any  # int32 []  server step of the pending change (-1: none)
    position: Any  # [D]  warm start: last mode / last draw / guide mean
    scale: Any  # [D, D] warm start: NUTS inverse mass matrix / SVI guide scale_tril
    step_size: Any  # []  NUTS step size
    cavity_power: Any  # []  fraction of the site removed in the last cavity


class EPServerState(NamedTuple):
    """Server state: the global Gaussian on the unconstrained ``phi``, natural parameters."""

    precision: Any  # [d, d]
    shift: Any  # [d]
    step: Any  # int32 []  number of server updates so far
    applied_scale: Any  # [max_steps] fraction of each step's summed change applied
    draw_key: Any  # PRNG key of the final global draws (the same for every client)
    average_precision: Any  # [d, d] running average of the global natural parameters ...
    average_shift: Any  # [d] ... over the updates from ``average_from`` on
    average_count: Any  # int32 [] updates in the average


class EPBroadcast(NamedTuple):
    """What the server sends: the global natural parameters and the commit fractions."""

    precision: Any
    shift: Any
    step: Any
    applied_scale: Any
    draw_key: Any
    # the Gaussian the global draws of the personal posteriors come from: the global
    # approximation, or at the end its average (``EPSettings.average_from``); cavities are
    # always taken from ``precision`` and ``shift``, which the clients' sites sum to
    draw_precision: Any
    draw_shift: Any
    # bool []: the broadcast the personal posteriors are taken against (:func:`final_broadcast`)
    final: Any


class EPMessage(NamedTuple):
    """A client's damped change of its site's natural parameters."""

    precision_change: Any  # [d, d]
    shift_change: Any  # [d]


class EPServerInfo(NamedTuple):
    """Per-round server diagnostics."""

    mean: Any  # [d] global mean of the unconstrained phi
    sd: Any  # [d] global sd
    mean_change: Any  # [] max |change of mean| / sd
    sd_change: Any  # [] max |change of log sd|
    applied_scale: Any  # [] fraction of the summed change applied (back-off); 0: refused
    received: Any  # [] number of messages added


class ClientInfo(NamedTuple):
    """Per-client diagnostics of one tilted inference."""

    cavity_power: Any
    divergences: Any
    used_stein: Any
    personal: Any  # what ``client_finalize`` returns against this round's broadcast


# ---------------------------------------------------------------------------- tilted problem


class _TiltedWeights(Messenger):
    """Handler turning the model at ``num_clients=1`` into one client's tilted factor.

    Sites outside every plate (the global prior, its log-Jacobian, global factors) are scaled
    by ``prior_weight = 1/N``; observed sites in a row plate are masked to the client's real
    rows. Sites in the client plate are left as they are.
    """

    def __init__(self, fn, *, prior_weight, mask, num_rows: int, client_plate: str):
        self.prior_weight, self.mask = prior_weight, mask
        self.num_rows, self.client_plate = num_rows, client_plate
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        frames = msg.get("cond_indep_stack") or []
        if not frames:
            msg["scale"] = (
                self.prior_weight if msg["scale"] is None else msg["scale"] * self.prior_weight
            )
            return
        if not msg["is_observed"] or str(msg["name"]).endswith("_log_det"):
            return
        row_plate = any(f.name != self.client_plate and f.size == self.num_rows for f in frames)
        batch_shape = tuple(msg["fn"].batch_shape)
        if row_plate and batch_shape and batch_shape[0] == self.num_rows:
            mask = jnp.reshape(self.mask, (self.num_rows,) + (1,) * (len(batch_shape) - 1))
            msg["fn"] = msg["fn"].mask(mask)


class TiltedProblem(NamedTuple):
    """One client's tilted problem, as pure functions of a flat vector ``[phi, local]``.

    Attributes
    ----------
    phi_dim, dim : int
        Unconstrained dimensions of the global sites, and of globals plus the client's own.
    global_latent, local_latent : tuple of str
        Latent sample sites (global; the client's own).
    potential : callable
        ``potential(x, fields, mask) -> -log [p(z)^{1/N} p(theta_i | z) p(D_i | theta_i, z)]``
        (without the cavity), ``x`` flat ``[dim]``.
    constrain : callable
        ``constrain(x, fields, mask) -> {site: value}`` constrained sample and deterministic
        sites of the model at ``num_clients=1``.
    unravel : callable
        Flat vector to ``{"phi": {...}, "local": {...}}`` of unconstrained values.
    prior_start : callable
        ``prior_start() -> (location, scale)``, each ``[phi_dim]``: the centre and width of
        EP's initial global approximation. The width is the prior's (half the 16-84% range of
        :data:`PRIOR_START_DRAWS` prior draws of the unconstrained globals); the centre is the
        draws' median for globals on the real line and the origin for constrained ones (see
        the module docstring). Coordinates whose
        draws are degenerate (no finite, positive width) get ``(0, INITIAL_SCALE)``.
    """

    phi_dim: int
    dim: int
    global_latent: tuple
    local_latent: tuple
    potential: Callable
    constrain: Callable
    unravel: Callable
    prior_start: Callable


def _client_model_data(fields, num_rows: int) -> ModelData:
    return ModelData(fields, jnp.zeros(num_rows, dtype=jnp.int32), 1)


def tilted_problem(
    model,
    sites: ModelSites,
    probe_fields: dict,
    num_rows: int,
    num_clients: int,
    reparam: dict | None = None,
) -> TiltedProblem:
    """Build the tilted problem of ``model`` for clients padded to ``num_rows`` rows.

    Parameters
    ----------
    model : callable
        NumPyro model with one client plate (``sites.client_plate``).
    sites : ModelSites
        From :func:`~hierfl.fit.inspect_model` on the full data.
    probe_fields : dict
        One client's padded fields ``{name: [num_rows, ...]}`` (shapes only are used).
    num_rows : int
        Padded rows per client.
    num_clients : int
        ``N``: the prior is raised to ``1/N`` in every tilted problem.
    reparam : dict, optional
        :func:`numpyro.handlers.reparam` configuration applied to the model in the tilted
        problem (e.g. non-centred client sites, which remove the funnel between a client's
        parameters and the population scale); the reparameterized sites stay available as
        deterministic sites under their own names.
    """
    if reparam:
        model = handlers.reparam(model, config=reparam)
    probe = _client_model_data(probe_fields, num_rows)
    z0 = unconstrained(model, (probe,)).z0
    global_latent = tuple(k for k in z0 if k in sites.global_sites)
    local_latent = tuple(k for k in z0 if k not in sites.global_sites)
    phi_flat, unravel_phi = ravel_pytree({k: z0[k] for k in global_latent})
    local_flat, unravel_local = ravel_pytree({k: z0[k] for k in local_latent})
    phi_dim = int(phi_flat.shape[0])
    flat = jnp.concatenate([phi_flat, local_flat])

    def unravel(x):  # phi first, then the client's own sites
        return {"phi": unravel_phi(x[:phi_dim]), "local": unravel_local(x[phi_dim:])}

    if phi_dim == 0:
        raise ValueError(
            "method='ep' needs at least one latent global site outside the client "
            "plate; this model has none"
        )
    prior_weight = 1.0 / num_clients

    def params_of(x):
        z = unravel(x)
        return {**z["phi"], **z["local"]}

    def potential(x, fields, mask):
        rows = mask.shape[-1]  # static: clients may be padded to different widths
        weighted = _TiltedWeights(
            model,
            prior_weight=prior_weight,
            mask=mask,
            num_rows=rows,
            client_plate=sites.client_plate,
        )
        return potential_energy(weighted, (_client_model_data(fields, rows),), {}, params_of(x))

    def constrain(x, fields, mask):
        return constrain_fn(
            model,
            (_client_model_data(fields, mask.shape[-1]),),
            {},
            params_of(x),
            return_deterministic=True,
        )

    def prior_start():
        return _prior_start(model, probe, global_latent, phi_dim)

    # jitted so that the model is traced once per shape: every transformation of it (the
    # nested derivatives of the Laplace and NUTS tilted inference) then reuses its jaxpr
    # instead of running the NumPyro model through its handlers again
    return TiltedProblem(
        phi_dim,
        int(flat.shape[0]),
        global_latent,
        local_latent,
        jax.jit(potential),
        constrain,
        unravel,
        prior_start,
    )


def _prior_start(model, probe: ModelData, global_latent: tuple, phi_dim: int):
    """Location and width of the prior of the unconstrained globals (see
    :class:`TiltedProblem`), from :data:`PRIOR_START_DRAWS` draws with a fixed key."""
    fallback = (jnp.zeros(phi_dim), jnp.full(phi_dim, INITIAL_SCALE))

    def draw(key):
        trace = handlers.trace(handlers.seed(model, rng_seed=key)).get_trace(probe)
        values, real = {}, {}
        for name in global_latent:
            site = trace[name]
            transform = biject_to(site["fn"].support)
            values[name] = value = transform.inv(site["value"])
            while isinstance(transform, IndependentTransform):
                transform = transform.base_transform
            real[name] = jnp.full(jnp.shape(value), isinstance(transform, IdentityTransform))
        return ravel_pytree(values)[0], ravel_pytree(real)[0]

    keys = jax.random.split(jax.random.PRNGKey(PRIOR_START_SEED), PRIOR_START_DRAWS)
    draws, real = jax.jit(jax.vmap(draw))(keys)
    low, median, high = jnp.nanquantile(draws, jnp.array([0.16, 0.5, 0.84]), axis=0)
    scale = 0.5 * (high - low)
    # a global on the real line starts at its prior median (of the draws: within some 0.06
    # prior sd of it, which a start of the prior's width does not feel); a constrained one at
    # the origin of its unconstrained space
    good = jnp.isfinite(median) & jnp.isfinite(scale) & (scale > 0)
    return (
        jnp.where(good & real[0].astype(bool), median, fallback[0]),
        jnp.where(good, scale, fallback[1]),
    )


# ---------------------------------------------------------------------------- linear algebra


def _symmetrize(a):
    return 0.5 * (a + a.T)


def _is_pd(a):
    chol = jnp.linalg.cholesky(_symmetrize(a))
    return jnp.all(jnp.isfinite(chol))


def _moments(precision, shift):
    """Mean and covariance of a Gaussian in natural parameters (NaN if not PD)."""
    chol = jnp.linalg.cholesky(_symmetrize(precision))
    eye = jnp.eye(precision.shape[0], dtype=precision.dtype)
    inv_chol = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    covariance = inv_chol.T @ inv_chol
    return covariance @ shift, covariance


def _inverse(a):
    chol = jnp.linalg.cholesky(_symmetrize(a))
    eye = jnp.eye(a.shape[0], dtype=a.dtype)
    inv_chol = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    return inv_chol.T @ inv_chol


def tilted_moments(phi_draws, gradients, cavity_precision, cavity_shift):
    r"""Natural parameters :math:`(P, Pm)` of the tilted marginal of ``phi`` from draws.

    Stein's identity for the tilted density :math:`c(z) h(z)` with Gaussian cavity
    :math:`c = N(m_c, Q_c^{-1})` and :math:`g = \nabla \log h` gives
    :math:`Q_c (m - m_c) = E[g]` and :math:`S Q_c = I + E[(z - m) g^\top]`, so

    .. math::
        P = Q_c (I + C)^{-1},\qquad P m = Q_c m_c + E[g] + (P - Q_c) m.

    Used when the cavity holds at least :data:`STEIN_MIN_CAVITY_SHARE` of the tilted
    precision; otherwise the raw sample moments.

    Parameters
    ----------
    phi_draws : ``[S, d]`` draws of the unconstrained globals from the tilted distribution
    gradients : ``[S, d]`` gradients of ``log h`` (the non-cavity part) w.r.t. ``phi``
    cavity_precision : ``[d, d]``
    cavity_shift : ``[d]``

    Returns
    -------
    precision, shift, used_stein
    """
    d = phi_draws.shape[-1]
    eye = jnp.eye(d, dtype=phi_draws.dtype)
    mean = jnp.mean(phi_draws, axis=0)
    centred = phi_draws - mean
    covariance = centred.T @ centred / phi_draws.shape[0]
    direct_precision = _inverse(covariance)
    cross = centred.T @ gradients / phi_draws.shape[0]
    stein_precision = _symmetrize(cavity_precision @ jnp.linalg.inv(eye + cross))
    stein_shift = (
        cavity_shift + jnp.mean(gradients, axis=0) + (stein_precision - cavity_precision) @ mean
    )
    share = jnp.trace(cavity_precision @ covariance) / d
    use_stein = (
        (share >= STEIN_MIN_CAVITY_SHARE)
        & _is_pd(stein_precision)
        & jnp.all(jnp.isfinite(stein_shift))
    )
    precision = jnp.where(use_stein, stein_precision, direct_precision)
    shift = jnp.where(use_stein, stein_shift, direct_precision @ mean)
    return precision, shift, use_stein


# ---------------------------------------------------------------------------- tilted inference


class TiltedResult(NamedTuple):
    precision: Any  # [d, d] tilted precision of phi
    shift: Any  # [d]
    draws: Any  # [S, D] joint draws (unconstrained)
    position: Any
    scale: Any
    step_size: Any
    divergences: Any
    used_stein: Any


def _newton(
    potential,
    x0,
    num_steps: int,
    derivatives=None,
    max_halvings: int = MAX_HALVINGS,
    with_curvature: bool = False,
):
    r"""Damped Newton from ``x0``: eigenvalue-floored Hessian, backtracking line search.

    Stops where half the squared Newton decrement :math:`g^\top H^{-1} g / 2` (the predicted
    gain in log density) is below :data:`NEWTON_TOL`, after ``num_steps`` steps, or when no
    step of the line search (halving up to ``max_halvings`` times) improves the potential.
    ``derivatives(x) -> (value, gradient, hessian, aux)`` (default: automatic
    differentiation of ``potential``, no ``aux``); ``potential`` alone is used in the line
    search. The derivatives are taken once per point visited, the last one included, so a
    warm start that is already at the mode costs one evaluation; within the tolerance the
    final (tiny) Newton step is taken without a line search.

    With ``with_curvature`` it returns ``(mode, hessian, aux)``, the Hessian and ``aux``
    taken at the last point visited (one tiny step from the returned mode).
    """
    if derivatives is None:

        def derivatives(x):
            value, grad = jax.value_and_grad(potential)(x)
            return value, grad, jax.hessian(potential)(x), ()

    def look(x):
        """Derivatives at ``x``, the Newton direction, and whether Newton is done there."""
        value, grad, hessian, aux = derivatives(x)
        eigenvalues, vectors = jnp.linalg.eigh(_symmetrize(hessian))
        floor = EIGEN_FLOOR * jnp.maximum(1.0, jnp.max(jnp.abs(eigenvalues)))
        direction = vectors @ ((vectors.T @ grad) / jnp.maximum(jnp.abs(eigenvalues), floor))
        usable = jnp.all(jnp.isfinite(direction)) & jnp.isfinite(value)
        converged = usable & (0.5 * grad @ direction < NEWTON_TOL)
        done = ~usable | converged
        return value, jnp.where(usable, direction, 0.0), done, hessian, aux, converged

    def search(x, value, direction):
        # a step is accepted when the potential does not rise by more than its float32
        # resolution: near the mode the true gain is below what the comparison can resolve
        slack = SEARCH_SLACK * jnp.finfo(x.dtype).eps * (1.0 + jnp.abs(value))

        def not_better(carry):
            halvings, candidate_value = carry
            return (halvings <= max_halvings) & ~(candidate_value <= value + slack)

        def halve(carry):
            halvings, _ = carry
            return halvings + 1, potential(x - 0.5 ** (halvings + 1) * direction)

        first = (jnp.asarray(0), potential(x - direction))
        halvings, candidate_value = jax.lax.while_loop(not_better, halve, first)
        return x - 0.5**halvings * direction, candidate_value <= value + slack

    def keep_going(carry):
        step, _, seen = carry
        return (step < num_steps) & ~seen[2]

    def newton(carry):
        step, x, seen = carry
        # the first pass only takes derivatives at x0 (its "search" accepts x0 itself), so
        # that the derivatives appear once in the compiled program
        candidate, improved = search(x, seen[0], seen[1])
        x = jnp.where(improved, candidate, x)
        # no improvement: stay, keeping the derivatives already taken there
        stay = seen[:2] + (jnp.asarray(True),) + seen[3:5] + (jnp.asarray(False),)
        seen = jax.tree_util.tree_map(lambda a, b: jnp.where(improved, a, b), look(x), stay)
        return step + 1, x, seen

    shapes = jax.eval_shape(look, x0)
    blank = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    start = (jnp.asarray(jnp.inf, shapes[0].dtype),) + blank[1:]
    _, x, (_, direction, _, hessian, aux, converged) = jax.lax.while_loop(
        keep_going, newton, (jnp.asarray(-1), x0, start)
    )
    # within the tolerance the last Newton step is tiny and safe without a line search (whose
    # comparison of potentials could no longer resolve the gain in float32)
    mode = jnp.where(converged, x - direction, x)
    if with_curvature:
        return mode, hessian, aux
    return mode


def quadrature_grid(points: int, dim: int):
    """Tensor Gauss-Hermite grid for the weight :math:`e^{-|u|^2/2}` on :math:`R^{dim}`.

    Returns ``(nodes [points**dim, dim], log_weights [points**dim])``; the weights sum to
    :math:`(2\\pi)^{dim/2}`. One point is the Laplace approximation.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(points)
    grid = np.stack(np.meshgrid(*([nodes] * dim), indexing="ij"), -1).reshape(-1, dim)
    log_weights = np.stack(np.meshgrid(*([np.log(weights)] * dim), indexing="ij"), -1)
    return grid, log_weights.reshape(-1, dim).sum(axis=-1)


def quadrature_points(local_dim: int, requested: int | None = None) -> int:
    """Gauss-Hermite points per local dimension: ``requested``, or the largest odd number up
    to :data:`MAX_QUADRATURE_POINTS` whose grid has at most :data:`QUADRATURE_BUDGET` points
    (1, the Laplace approximation, for many local dimensions)."""
    if requested is not None:
        return int(requested)
    for points in range(MAX_QUADRATURE_POINTS, 1, -2):
        if points**local_dim <= QUADRATURE_BUDGET:
            return points
    return 1


class _LocalQuadrature(NamedTuple):
    value: Any  # -log of the integral over the client's own parameters
    nodes: Any  # [G, k] quadrature nodes
    weights: Any  # [G] normalized weights of the nodes (sum to one)
    mode: Any  # [k] inner mode
    chol: Any  # [k, k] Cholesky factor of the inner Hessian at the mode


def _local_quadrature(potential, phi, t0, grid, log_weights, num_steps: int):
    r""":math:`-\log \int e^{-U(\phi, t)}\, dt` by adaptive Gauss-Hermite quadrature.

    The inner mode :math:`t^*` is found by damped Newton from ``t0``. With :math:`H = LL^\top`
    the Hessian in ``t`` at the mode, the nodes are :math:`t_j = t^* + L^{-\top}u_j` and

    .. math::
        \int e^{-U} dt \approx |L|^{-1} \sum_j w_j\, e^{-U(\phi, t_j) + |u_j|^2/2}

    (one node is the Laplace approximation). The normalized terms are the weights of the
    nodes under :math:`p(t \mid \phi)`; nothing here is differentiated.
    """

    def inner(t):
        return potential(jnp.concatenate([phi, t]))

    mode = jax.lax.stop_gradient(_newton(inner, t0, num_steps))
    chol = jnp.linalg.cholesky(_symmetrize(jax.hessian(inner)(mode)))
    nodes = mode + jax.scipy.linalg.solve_triangular(chol.T, grid.T, lower=False).T
    log_terms = log_weights - jax.vmap(inner)(nodes) + 0.5 * jnp.sum(grid**2, axis=-1)
    log_integral = jax.scipy.special.logsumexp(log_terms) - jnp.sum(jnp.log(jnp.diag(chol)))
    return _LocalQuadrature(-log_integral, nodes, jax.nn.softmax(log_terms), mode, chol)


def _marginal_derivatives(potential, phi, quadrature: _LocalQuadrature):
    r"""Gradient and Hessian in ``phi`` of :math:`V(\phi) = -\log \int e^{-U(\phi, t)} dt`
    by Fisher's and Louis' identities, :math:`\nabla V = E[\nabla_\phi U]` and
    :math:`\nabla^2 V = E[\nabla^2_\phi U] - \mathrm{Cov}[\nabla_\phi U]` under
    :math:`p(t \mid \phi)`, the expectations taken over the quadrature nodes. Only first and
    second derivatives of the model's log density are needed (none through the inner mode).
    """

    def joint(phi_, t):
        return potential(jnp.concatenate([phi_, t]))

    grads = jax.vmap(jax.grad(joint), in_axes=(None, 0))(phi, quadrature.nodes)
    hessians = jax.vmap(jax.hessian(joint), in_axes=(None, 0))(phi, quadrature.nodes)
    w = quadrature.weights
    gradient = w @ grads
    centred = grads - gradient
    hessian = jnp.einsum("g,gij->ij", w, hessians) - (centred * w[:, None]).T @ centred
    return gradient, _symmetrize(hessian)


def _laplace(potential, x0, settings: EPSettings, phi_dim: int, key, num_draws: int):
    r"""Laplace approximation of the tilted marginal of ``phi``, client parameters integrated
    out (a nested, INLA-style Laplace).

    A joint Gaussian on :math:`(\phi, \theta_i)` at the joint mode is badly biased when the
    client's parameters have a learned spread (the funnel: the joint mode drives the spread
    to zero). Instead the client's own parameters are integrated out for each ``phi`` by
    adaptive Gauss-Hermite quadrature (:func:`_local_quadrature`); the mode of the marginal
    is found by damped Newton on its exact derivatives (:func:`_marginal_derivatives`) and
    the precision is the marginal's Hessian there. Draws: ``phi`` from that Gaussian, then
    :math:`\theta_i` from its conditional Laplace approximation given each ``phi``.
    """
    local_dim = x0.shape[0] - phi_dim
    if local_dim == 0:
        mode = _newton(potential, x0, settings.newton_steps)
        precision = _symmetrize(jax.hessian(potential)(mode))
        chol = jnp.linalg.cholesky(_inverse(precision))
        draws = mode + jax.random.normal(key, (num_draws, phi_dim), mode.dtype) @ chol.T
        return _laplace_result(precision, mode, draws, mode, chol)
    points = quadrature_points(local_dim, settings.quadrature_points)
    grid, log_weights = (jnp.asarray(a, x0.dtype) for a in quadrature_grid(points, local_dim))
    t0 = x0[phi_dim:]

    def quadrature(phi):
        return _local_quadrature(potential, phi, t0, grid, log_weights, INNER_NEWTON_STEPS)

    def derivatives(phi):
        q = quadrature(phi)
        gradient, hessian = _marginal_derivatives(potential, phi, q)
        return q.value, gradient, hessian, q.mode

    # the precision is the marginal's Hessian where Newton last took derivatives (within one
    # converged step of the mode), and the client's own mode is the inner mode there
    mode, precision, local_mode = _newton(
        lambda phi: quadrature(phi).value,
        x0[:phi_dim],
        settings.newton_steps,
        derivatives=derivatives,
        with_curvature=True,
    )
    position = jnp.concatenate([mode, local_mode])
    joint = _symmetrize(jax.hessian(potential)(position))
    scale = jnp.linalg.cholesky(_inverse(joint))
    # draws: phi from the Laplace marginal; the client's own parameters from their Gaussian
    # conditional at the joint point (mean moving linearly with phi, covariance the inverse
    # local Hessian)
    phi_key, local_key = jax.random.split(key)
    phi_chol = jnp.linalg.cholesky(_inverse(precision))
    phis = mode + jax.random.normal(phi_key, (num_draws, phi_dim), mode.dtype) @ phi_chol.T
    local_precision = joint[phi_dim:, phi_dim:]
    slope = -jnp.linalg.solve(local_precision, joint[phi_dim:, :phi_dim])
    local_chol = jnp.linalg.cholesky(local_precision)
    noise = jax.random.normal(local_key, (num_draws, local_dim), mode.dtype)
    locals_ = (
        local_mode
        + (phis - mode) @ slope.T
        + jax.scipy.linalg.solve_triangular(local_chol.T, noise.T, lower=False).T
    )
    draws = jnp.concatenate([phis, locals_], axis=1)
    return _laplace_result(precision, mode, draws, position, scale)


def _conditional_laplace_draws(
    potential, draws, phi_dim: int, position, scale, fields, mask, key, points
):
    r"""Redraw the client's own parameters of ``draws`` ``[S, dim]`` (``phi`` first) given
    each draw of ``phi``, from a Gaussian with the mean and covariance of
    :math:`p(t \mid \phi_s)`.

    The moments come from Gauss-Hermite quadrature (``points`` per dimension) centred at the
    joint Gaussian's conditional mean :math:`m(\phi_s)` and scaled by its conditional
    covariance (the Laplace approximation at ``position``, covariance ``scale scale^T``),
    each node weighted by the client's exact conditional density: an importance-weighted
    rule with no inner optimization, so it costs ``points^k`` evaluations of the potential
    per draw. With non-centred client parameters, :math:`\alpha_i = \mu + \sigma u_i`, the
    conditional of ``u`` moves nonlinearly with ``log sigma`` and is skewed; the linear
    conditional alone widens the personal posterior (cbpp: worst client mean 0.20 sd from
    centralized NUTS, against 0.08 with the quadrature). The cavity term depends on ``phi``
    only, so it is left out: the conditional is the same.
    """
    phis, locals_ = draws[:, :phi_dim], draws[:, phi_dim:]
    local_dim = locals_.shape[1]
    grid, log_weights = (jnp.asarray(a, draws.dtype) for a in quadrature_grid(points, local_dim))
    joint_precision = _inverse(scale @ scale.T)
    local_precision = _symmetrize(joint_precision[phi_dim:, phi_dim:])
    slope = -jnp.linalg.solve(local_precision, joint_precision[phi_dim:, :phi_dim])
    chol = jnp.linalg.cholesky(local_precision)
    offsets = jax.scipy.linalg.solve_triangular(chol.T, grid.T, lower=False).T  # [G, k]
    noise = jax.random.normal(key, locals_.shape, locals_.dtype)

    def one(phi, z):
        centre = position[phi_dim:] + slope @ (phi - position[:phi_dim])
        nodes = centre + offsets
        values = jax.vmap(lambda t: potential(jnp.concatenate([phi, t]), fields, mask))(nodes)
        log_terms = log_weights - values + 0.5 * jnp.sum(grid**2, axis=-1)
        w = jax.nn.softmax(jnp.where(jnp.isfinite(log_terms), log_terms, -jnp.inf))
        mean = w @ nodes
        centred = nodes - mean
        covariance = _symmetrize((centred * w[:, None]).T @ centred)
        factor = jnp.linalg.cholesky(covariance + 1e-9 * jnp.eye(local_dim, dtype=draws.dtype))
        drawn = mean + factor @ z
        fallback = centre + jax.scipy.linalg.solve_triangular(chol.T, z, lower=False)
        return jnp.where(jnp.all(jnp.isfinite(drawn)), drawn, fallback)

    return jnp.concatenate([phis, jax.vmap(one)(phis, noise)], axis=1)


def _laplace_result(precision, mean, draws, position, scale) -> TiltedResult:
    """A Gaussian tilted result: no step size, no divergences, no Stein estimate."""
    return TiltedResult(
        precision,
        precision @ mean,
        draws,
        position,
        scale,
        jnp.asarray(1.0, mean.dtype),
        jnp.asarray(0, jnp.int32),
        jnp.asarray(False),
    )


def _nuts(
    potential,
    noncavity,
    cavity,
    x0,
    inverse_mass,
    step_size,
    settings: EPSettings,
    phi_dim: int,
    key,
    warm,
):
    from numpyro.infer.hmc import hmc

    init_kernel, sample_kernel = hmc(potential, algo="NUTS")
    warmup, samples = settings.num_warmup, settings.num_samples
    # start at the tilted mode, with the inverse Hessian there as the mass matrix: robust
    # against a wide first cavity, and most of the warmup is then spent on fine tuning. In
    # later runs (``warm``) a mode far from the previous run's last draw, in the previous
    # metric, is a mode search that ran down a funnel (non-centred client parameters), where
    # a chain would stay stuck: the chain then starts from that draw and metric instead
    mode = _newton(potential, x0, settings.newton_steps)
    laplace_mass = _inverse(jax.hessian(potential)(mode))
    offset = mode - x0
    distance = offset @ jnp.linalg.solve(inverse_mass, offset)
    near = ~warm | (distance <= RUNAWAY_DISTANCE**2 * x0.shape[0])
    good = jnp.all(jnp.isfinite(laplace_mass)) & jnp.all(jnp.isfinite(mode)) & near
    x0 = jnp.where(good, mode, x0)
    inverse_mass = jnp.where(good, laplace_mass, inverse_mass)
    # the metric is the Laplace one, kept fixed: NumPyro's windowed mass-matrix adaptation
    # restarts the step size at every window, which in float32 occasionally lets a chain
    # jump to an absurd state; only the step size is adapted (dual averaging)
    state = init_kernel(
        x0,
        num_warmup=warmup,
        step_size=step_size,
        inverse_mass_matrix=inverse_mass,
        dense_mass=True,
        adapt_mass_matrix=False,
        target_accept_prob=settings.target_accept,
        max_tree_depth=settings.max_tree_depth,
        rng_key=key,
    )

    def body(state, _):
        state = sample_kernel(state)
        return state, (state.z, state.diverging, state.potential_energy)

    state, (draws, diverging, energy) = jax.lax.scan(body, state, None, length=warmup + samples)
    draws, diverging, energy = draws[warmup:], diverging[warmup:], energy[warmup:]
    gradients = -jax.vmap(jax.grad(noncavity))(draws)[:, :phi_dim]
    precision, shift, used = tilted_moments(draws[:, :phi_dim], gradients, *cavity)
    adapt = state.adapt_state
    divergences = jnp.sum(diverging).astype(jnp.int32)
    spread = jnp.max(energy) - jnp.min(energy)
    failed = (
        (divergences > MAX_DIVERGENT_FRACTION * samples)
        | ~jnp.isfinite(spread)
        | (spread > MAX_ENERGY_SPREAD + MAX_ENERGY_SPREAD_PER_DIM * draws.shape[1])
    )
    precision = jnp.where(failed, jnp.nan, precision)  # an invalid message: skipped, recorded
    return TiltedResult(
        precision,
        shift,
        draws,
        draws[-1],
        adapt.inverse_mass_matrix,
        adapt.step_size,
        divergences,
        used,
    )


def _svi(
    potential,
    noncavity,
    cavity,
    x0,
    scale_tril0,
    settings: EPSettings,
    phi_dim: int,
    key,
    num_draws: int,
):
    """Full-covariance Gaussian VI on the tilted problem (Adam, Polyak-averaged)."""
    import optax

    dim = x0.shape[0]
    lower = jnp.tril_indices(dim, -1)

    def unpack(params):
        loc, log_diag, off = params
        chol = jnp.diag(jnp.exp(log_diag)).at[lower].set(off)
        return loc, chol

    params = (x0, jnp.log(jnp.diag(scale_tril0)), scale_tril0[lower])
    optimizer = optax.adam(settings.svi_learning_rate)

    def negative_elbo(params, key):
        loc, chol = unpack(params)
        q = dist.MultivariateNormal(loc, scale_tril=chol)
        x = q.rsample(key, (settings.svi_particles,))
        return jnp.mean(jax.vmap(potential)(x)) - q.entropy()

    def step(carry, key):
        params, opt_state, average, count = carry
        grads = jax.grad(negative_elbo)(params, key)
        grads = jax.tree_util.tree_map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        late = count >= settings.svi_steps // 2
        weight = jnp.where(late, 1.0 / jnp.maximum(count - settings.svi_steps // 2 + 1, 1), 1.0)
        average = jax.tree_util.tree_map(lambda a, p: a + weight * (p - a), average, params)
        return (params, opt_state, average, count + 1), None

    fit_key, draw_key = jax.random.split(key)
    carry = (params, optimizer.init(params), params, jnp.asarray(0))
    (_, _, average, _), _ = jax.lax.scan(step, carry, jax.random.split(fit_key, settings.svi_steps))
    loc, chol = unpack(average)
    moment_key, final_key = jax.random.split(draw_key)
    x = loc + jax.random.normal(moment_key, (settings.moment_draws, dim), loc.dtype) @ chol.T
    gradients = -jax.vmap(jax.grad(noncavity))(x)[:, :phi_dim]
    precision, shift, used = tilted_moments(x[:, :phi_dim], gradients, *cavity)
    draws = loc + jax.random.normal(final_key, (num_draws, dim), loc.dtype) @ chol.T
    return TiltedResult(
        precision,
        shift,
        draws,
        loc,
        chol,
        jnp.asarray(1.0, loc.dtype),
        jnp.asarray(0, jnp.int32),
        used,
    )


# ---------------------------------------------------------------------------- the algorithm


def _commit(state: EPClientState, broadcast: EPBroadcast):
    """The client's current site: committed part plus its pending change times the fraction
    the server applied."""
    index = jnp.clip(state.pending_step, 0, broadcast.applied_scale.shape[0] - 1)
    fraction = jnp.where(state.pending_step >= 0, broadcast.applied_scale[index], 0.0)
    return (
        state.site_precision + fraction * state.pending_precision,
        state.site_shift + fraction * state.pending_shift,
    )


def ep_algorithm(
    problem: TiltedProblem,
    *,
    num_clients: int,
    settings: EPSettings | None = None,
    max_steps: int | None = None,
    keep: tuple[str, ...] | None = None,
    client_sites: tuple[str, ...] | None = None,
    pair_with_global: bool = True,
):
    """EP as a :class:`~hierfl.protocol.FederatedAlgorithm` (see the module docstring).

    Parameters
    ----------
    problem : TiltedProblem
    num_clients : int
    settings : EPSettings
    max_steps : int, optional
        Number of server updates the state has room for (default ``settings.num_rounds``;
        the sequential schedule makes one server update per client).
    keep : tuple of str, optional
        Sites that ``client_finalize`` returns (default: every sample and deterministic site;
        per-row deterministic sites can be large).
    client_sites : tuple of str, optional
        The client's own sites; their tilted draws are paired with the global draws of
        ``phi`` by a linear regression adjustment in the constrained space,
        :math:`\theta_s + B(z^{glob}_s - z^{tilt}_s)`. Every other site is evaluated at the
        global draws.
    pair_with_global : bool
        ``False``: ``client_finalize`` returns the tilted draws themselves, globals included
        (a new client adapting against the final state, whose tilted distribution is its
        posterior: :mod:`hierfl.adapt`).
    """
    from ..protocol import FederatedAlgorithm

    settings = EPSettings() if settings is None else settings
    client_names = () if client_sites is None else tuple(client_sites)
    if settings.tilted not in ("laplace", "nuts", "svi"):
        raise ValueError(f"tilted must be 'laplace', 'nuts' or 'svi', got {settings.tilted!r}")
    d, dim = problem.phi_dim, problem.dim
    # Gauss-Hermite points per client dimension for the final personal draws (at most
    # CONDITIONAL_POINTS; none where the tilted inference itself uses the Laplace point)
    conditional_points = (
        min(CONDITIONAL_POINTS, quadrature_points(dim - d, settings.quadrature_points))
        if dim > d
        else 1
    )
    max_steps = int(max_steps or settings.num_rounds)
    average_start = _average_start(settings, num_clients)
    powers = jnp.concatenate([2.0 ** -jnp.arange(CAVITY_STEPS), jnp.zeros(1)])
    scales = jnp.concatenate([2.0 ** -jnp.arange(BACKOFF_STEPS), jnp.zeros(1)])

    def init(key, client_data):
        del client_data
        location, width = problem.prior_start()
        precision = jnp.diag(1.0 / width**2)
        shift = precision @ location
        site = EPClientState(
            site_precision=precision / num_clients,
            site_shift=shift / num_clients,
            pending_precision=jnp.zeros((d, d)),
            pending_shift=jnp.zeros(d),
            pending_step=jnp.asarray(-1, jnp.int32),
            position=jnp.zeros(dim),
            scale=jnp.eye(dim) * (0.1 if settings.tilted == "svi" else 1.0),
            step_size=jnp.array(0.1, jnp.float32),
            cavity_power=jnp.array(1.0, jnp.float32),
        )
        clients = jax.tree_util.tree_map(
            lambda a: jnp.array(
                jnp.broadcast_to(a, (num_clients,) + jnp.shape(a)), dtype=jnp.asarray(a).dtype
            ),
            site,
        )
        # start every client slightly off the origin: some likelihoods have a kink exactly at
        # a zero linear predictor (NumPyro's binomial clamps the logits there), where the
        # gradient is wrong
        jitter_key, key = jax.random.split(key)
        start = jnp.concatenate([location, jnp.zeros(dim - d)])
        clients = clients._replace(
            position=start + INITIAL_JITTER * jax.random.normal(jitter_key, (num_clients, dim))
        )
        server = EPServerState(
            precision,
            shift,
            jnp.array(0, jnp.int32),
            jnp.ones(max_steps),
            key,
            jnp.zeros((d, d)),
            jnp.zeros(d),
            jnp.array(0, jnp.int32),
        )
        return _strong(server), clients

    def broadcast(state: EPServerState) -> EPBroadcast:
        return _broadcast(state, state.precision, state.shift)

    def tilted(key, bc: EPBroadcast, state: EPClientState, data, num_draws: int):
        site_precision, site_shift = _commit(state, bc)
        candidates = jax.vmap(lambda p: _is_pd(bc.precision - p * site_precision))(powers)
        power = powers[jnp.argmax(candidates)]
        cavity = (_symmetrize(bc.precision - power * site_precision), bc.shift - power * site_shift)
        fields, mask = data["fields"], data["mask"]

        def noncavity(x):
            return problem.potential(x, fields, mask)

        # the cavity term centred at the cavity mean (the same up to a constant):
        # phi' C phi / 2 - c' phi cancels badly in float32 when C is the precision of many
        # clients' data, and hides the small changes the line searches must see
        cavity_mean = jnp.linalg.solve(cavity[0], cavity[1])

        def potential(x):
            offset = x[:d] - cavity_mean
            return noncavity(x) + 0.5 * offset @ cavity[0] @ offset

        if settings.tilted == "laplace":
            result = _laplace(potential, state.position, settings, d, key, num_draws)
        elif settings.tilted == "nuts":
            result = _nuts(
                potential,
                noncavity,
                cavity,
                state.position,
                state.scale,
                state.step_size,
                settings,
                d,
                key,
                state.pending_step >= 0,
            )
        else:
            result = _svi(
                potential,
                noncavity,
                cavity,
                state.position,
                state.scale,
                settings,
                d,
                key,
                num_draws,
            )
        return result, (site_precision, site_shift), power

    def client_update(key, bc: EPBroadcast, state: EPClientState, data):
        result, (site_precision, site_shift), power = tilted(
            key, bc, state, data, settings.num_samples
        )
        change = EPMessage(
            settings.damping * _symmetrize(result.precision - bc.precision),
            settings.damping * (result.shift - bc.shift),
        )
        scale = jnp.where(jnp.all(jnp.isfinite(result.scale)), result.scale, state.scale)
        position = jnp.where(
            jnp.all(jnp.isfinite(result.position)), result.position, state.position
        )
        step_size = jnp.where(jnp.isfinite(result.step_size), result.step_size, state.step_size)
        new_state = EPClientState(
            site_precision,
            site_shift,
            change.precision_change,
            change.shift_change,
            bc.step.astype(jnp.int32),
            position,
            scale,
            step_size,
            power,
        )
        info = ClientInfo(
            power, result.divergences, result.used_stein, personal_of(result, bc, data)
        )
        return new_state, change, info

    @jax.jit
    def server_update(key, state: EPServerState, messages: EPMessage, received):
        del key
        weight = received.astype(state.precision.dtype)
        total_precision = jnp.einsum(
            "n,nij->ij", weight, jnp.where(received[:, None, None], messages.precision_change, 0.0)
        )
        total_shift = jnp.einsum(
            "n,ni->i", weight, jnp.where(received[:, None], messages.shift_change, 0.0)
        )
        # the damped step is (1 - alpha) Q + alpha Q*, with Q* = Q + total / alpha the
        # undamped EP update: back off until Q* itself is positive definite (module docstring)
        undamped = total_precision / settings.damping
        ok = jax.vmap(lambda s: _is_pd(state.precision + s * undamped))(scales)
        applied = scales[jnp.argmax(ok)]
        precision = _symmetrize(state.precision + applied * total_precision)
        shift = state.shift + applied * total_shift
        old_mean, old_cov = _moments(state.precision, state.shift)
        mean, covariance = _moments(precision, shift)
        old_sd, sd = jnp.sqrt(jnp.diag(old_cov)), jnp.sqrt(jnp.diag(covariance))
        info = EPServerInfo(
            mean,
            sd,
            jnp.max(jnp.abs(mean - old_mean) / sd),
            jnp.max(jnp.abs(jnp.log(sd / old_sd))),
            applied,
            jnp.sum(received),
        )
        index = jnp.clip(state.step, 0, max_steps - 1)
        averaged = state.step >= average_start
        count = state.average_count + averaged.astype(jnp.int32)
        rate = jnp.where(averaged, 1.0 / jnp.maximum(count, 1), 0.0)
        new_state = EPServerState(
            precision,
            shift,
            state.step + 1,
            state.applied_scale.at[index].set(applied),
            state.draw_key,
            state.average_precision + rate * (precision - state.average_precision),
            state.average_shift + rate * (shift - state.average_shift),
            count,
        )
        return new_state, info

    def personal_of(result: TiltedResult, bc: EPBroadcast, data):
        """Constrained personal draws from a tilted result: the client's own sites
        regression-adjusted towards the global draws of ``phi``, every other site evaluated
        at the global draws."""
        global_draws = _global_draws(bc, settings.num_samples)
        draws = result.draws
        fields, mask = data["fields"], data["mask"]
        if settings.tilted == "laplace" and conditional_points > 1:
            # against the final broadcast only (a cond on the shared flag: the rounds before
            # skip it), the client's own draws from quadrature moments of their conditional
            # at each draw of phi rather than from the joint point's linearization
            draws = jax.lax.cond(
                bc.final,
                lambda x: _conditional_laplace_draws(
                    problem.potential,
                    x,
                    d,
                    result.position,
                    result.scale,
                    fields,
                    mask,
                    jax.random.fold_in(bc.draw_key, 1),
                    conditional_points,
                ),
                lambda x: x,
                draws,
            )
        phi_tilted, local = draws[:, :d], draws[:, d:]
        tilted_values = jax.vmap(lambda x: problem.constrain(x, fields, mask))(draws)
        if not pair_with_global:
            return {k: v for k, v in tilted_values.items() if keep is None or k in keep}
        global_values = jax.vmap(lambda x: problem.constrain(x, fields, mask))(
            jnp.concatenate([global_draws, local], axis=1)
        )
        centred_phi = phi_tilted - jnp.mean(phi_tilted, axis=0)
        cov_pp = centred_phi.T @ centred_phi / draws.shape[0]
        # ridge relative to the global covariance: a degenerate set of tilted draws (a
        # stuck chain) gives no slope instead of an exploding one
        ridge = REGRESSION_RIDGE * _inverse(bc.draw_precision) + REGRESSION_JITTER * jnp.eye(d)
        solve = jnp.linalg.solve(cov_pp + ridge, centred_phi.T)
        values = {}
        for name, value in tilted_values.items():
            if keep is not None and name not in keep:
                continue
            if name in client_names:  # regression-adjust towards the global draws of phi
                flat = value.reshape(value.shape[0], -1)
                regression = (solve @ (flat - jnp.mean(flat, axis=0))) / draws.shape[0]
                adjusted = flat + (global_draws - phi_tilted) @ regression
                values[name] = adjusted.reshape(value.shape)
            else:
                values[name] = global_values[name]
        return values

    def client_finalize(key, bc: EPBroadcast, state: EPClientState, data):
        """The personal posterior: the client's tilted inference against ``bc`` (the same
        computation as :func:`client_update`, whose ``info.personal`` it is)."""
        return client_update(key, bc, state, data)[2].personal

    return FederatedAlgorithm(
        init,
        broadcast,
        client_update,
        server_update,
        client_finalize,
        validate_message,
        personal_in_info=True,
    )


def _average_start(settings: EPSettings, num_clients: int) -> int:
    """Index of the first server update in the averaged approximation (``average_from``)."""
    start = settings.average_from
    if start is None:
        start = settings.num_rounds // 2 if settings.tilted in ("nuts", "svi") else None
    if start is None:
        return np.iinfo(np.int32).max
    start = max(int(start), 0)
    if settings.schedule == "sequential":
        return start * num_clients
    # the opening sequential sweep (round 0) makes one update per client
    return start + (num_clients - 1 if _sequential_start(settings, num_clients) and start else 0)


def final_broadcast(state: EPServerState) -> EPBroadcast:
    """The broadcast the personal posteriors are taken against: cavities from the current
    global approximation (the sum of the clients' sites), global draws from its average
    where there is one (see ``EPSettings.average_from``)."""
    use = state.average_count > 0
    return _broadcast(
        state,
        jnp.where(use, state.average_precision, state.precision),
        jnp.where(use, state.average_shift, state.shift),
        final=True,
    )


def _broadcast(state: EPServerState, draw_precision, draw_shift, final=False) -> EPBroadcast:
    return EPBroadcast(
        state.precision,
        state.shift,
        state.step,
        state.applied_scale,
        state.draw_key,
        draw_precision,
        draw_shift,
        jnp.asarray(final),
    )


def _strong(tree):
    """The same arrays without weak types (so that the second round does not recompile)."""
    return jax.tree_util.tree_map(lambda a: jnp.array(a, dtype=jnp.asarray(a).dtype), tree)


def _global_draws(bc: EPBroadcast, num_draws: int):
    mean, covariance = _moments(bc.draw_precision, bc.draw_shift)
    chol = jnp.linalg.cholesky(covariance + 1e-12 * jnp.eye(mean.shape[0]))
    noise = jax.random.normal(bc.draw_key, (num_draws, mean.shape[0]), mean.dtype)
    return mean + noise @ chol.T


def validate_message(message: EPMessage, bc: EPBroadcast | None = None):
    """A message is valid when its precision change is symmetric and, given the broadcast
    global approximation, ``Q + change`` is positive definite (finiteness and shapes are
    checked by the driver)."""
    change = message.precision_change
    asymmetry = jnp.max(jnp.abs(change - change.T))
    symmetric = asymmetry <= SYMMETRY_TOLERANCE * (1.0 + jnp.max(jnp.abs(change)))
    if bc is None:
        return symmetric
    return symmetric & _is_pd(bc.precision + change)


# ---------------------------------------------------------------------------- sequential


def _sequential_round(
    algorithm, problem_dim, round_key, server_state, client_states, client_data, working
):
    """One sequential sweep: clients in a random order, each against the latest global."""
    num_clients = working.shape[0]
    order = jax.random.permutation(jax.random.fold_in(round_key, 0), num_clients)

    def body(carry, i):
        server, clients = carry
        key = jax.random.fold_in(round_key, i + 1)
        bc = algorithm.broadcast(server)
        state_i = jax.tree_util.tree_map(lambda a: a[i], clients)
        data_i = jax.tree_util.tree_map(lambda a: a[i], client_data)
        new_state, message, _ = algorithm.client_update(key, bc, state_i, data_i)
        finite = jnp.all(
            jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(message)])
        )
        valid = finite & algorithm.validate_message(message, bc)
        ok = working[i] & valid
        stacked = jax.tree_util.tree_map(lambda a: a[None], message)
        server_new, info = algorithm.server_update(key, server, stacked, ok[None])
        chosen = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new_state, state_i)
        clients = jax.tree_util.tree_map(lambda a, b: a.at[i].set(b), clients, chosen)
        return (server_new, clients), (i, working[i] & ~valid, info.applied_scale)

    (server_state, client_states), (index, invalid, applied) = jax.lax.scan(
        body, (server_state, client_states), order
    )
    return server_state, client_states, index, invalid, applied


# ---------------------------------------------------------------------------- fit


def _options(options: dict) -> EPSettings:
    unknown = set(options) - set(EPSettings._fields)
    if unknown:
        raise TypeError(
            f"unknown options for method='ep': {sorted(unknown)}; known: "
            f"{sorted(EPSettings._fields)}"
        )
    settings = EPSettings(**options)
    if settings.schedule not in ("synchronous", "sequential"):
        raise ValueError(
            f"schedule must be 'synchronous' or 'sequential', got {settings.schedule!r}"
        )
    if not 0.0 < settings.damping <= 1.0:
        raise ValueError(f"damping must be in (0, 1], got {settings.damping}")
    return settings


class EPRun(NamedTuple):
    """Everything a fit needs from a run of the pure core (also what a checkpoint holds)."""

    server_state: EPServerState
    client_states: EPClientState
    personal: dict
    rounds: list
    skips: list
    history: dict
    converged_round: int | None


def prepare(model, data: ClientData, settings: EPSettings):
    """Sites, tilted problem, stacked client data and the algorithm for ``model`` on ``data``.

    Returns ``(sites, problem, client_data, algorithm)``; ``client_data`` is
    ``{"fields": {name: [N, max_n, ...]}, "mask": [N, max_n]}``, or with the synchronous
    schedule and clients of very different sizes, :class:`~hierfl.protocol.ClientGroups` of
    such dicts (at most ``settings.size_groups`` groups, each padded to its own largest
    client).
    """
    sites = inspect_model(model, data.batch())
    reparam = settings.reparam

    def stacked(clients=None):
        padded, mask = data.padded(dtype=np.float32, clients=clients)
        return {"fields": {k: jnp.asarray(v) for k, v in padded.items()}, "mask": jnp.asarray(mask)}

    groups = [np.arange(data.num_clients)]
    if settings.schedule == "synchronous" and settings.size_groups > 1:
        groups = data.size_groups(settings.size_groups, min_gain=MIN_GROUPING_GAIN)
    if len(groups) == 1:
        client_data = stacked()
    else:
        client_data = ClientGroups(tuple(groups), tuple(stacked(g) for g in groups))
    first = client_data if len(groups) == 1 else client_data.data[0]
    probe = {k: v[0] for k, v in first["fields"].items()}
    problem = tilted_problem(
        model, sites, probe, int(first["mask"].shape[1]), data.num_clients, reparam=reparam
    )
    if settings.schedule == "sequential":
        steps = settings.num_rounds * data.num_clients
    else:  # room for an opening sequential sweep
        steps = settings.num_rounds + data.num_clients * _sequential_start(
            settings, data.num_clients
        )
    algorithm = ep_algorithm(
        problem,
        num_clients=data.num_clients,
        settings=settings,
        max_steps=steps,
        keep=sites.global_sites + sites.client_sites,
        client_sites=sites.client_sites,
    )
    return sites, problem, client_data, algorithm


def _prepared_algorithm(model, data: ClientData, settings: EPSettings):
    """The EP algorithm for ``model`` on ``data`` (rebuilt on every Flower node)."""
    return prepare(model, data, settings)[3]


def run_ep(
    algorithm,
    key,
    client_data,
    client_ids,
    settings: EPSettings,
    *,
    corrupt=None,
    state=None,
    start_round: int = 0,
    on_round=None,
    progress: bool = False,
    driver: str = "simulate",
    make_algorithm=None,
) -> EPRun:
    """Run EP rounds with either schedule; returns an :class:`EPRun`.

    ``state=(server_state, client_states)`` and ``start_round`` resume a run; rounds use
    ``fold_in(key, round)``, so a resumed run continues identically. ``driver="flower"``
    runs the synchronous rounds on Flower (:func:`hierfl.drivers.drive`; ``make_algorithm``
    rebuilds ``algorithm`` on every node); the sequential schedule and the opening sequential
    sweep run in process only.
    """
    if driver == "flower":
        if settings.schedule != "synchronous":
            raise ValueError("driver='flower' runs the synchronous schedule only")
        if start_round == 0 and _sequential_start(settings, len(client_ids)):
            raise ValueError(
                "driver='flower' has no opening sequential sweep (it would pass the clients "
                "one by one): pass sequential_start=False"
            )
    tol = DEFAULT_TOL[settings.tilted] if settings.tol is None else settings.tol
    history = {
        "round": [],
        "mean": [],
        "sd": [],
        "mean_change": [],
        "sd_change": [],
        "applied_scale": [],
        "refused": [],
        "received": [],
        "participants": [],
        "seconds": [],
    }
    below = [0]
    converged_at: list[int | None] = [None]
    stop_now = [False]
    averaging = _average_start(settings, len(client_ids)) < np.iinfo(np.int32).max
    # server updates in the average before a converged run may stop (a sequential round
    # makes one update per client)
    needed = 0
    if averaging:
        needed = MIN_AVERAGED_ROUNDS * (len(client_ids) if settings.schedule == "sequential" else 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=settings.num_rounds, initial=start_round, desc=f"ep[{settings.tilted}] rounds"
        )
    clock = [time.perf_counter()]

    def record(round_index, participants, received, info, refused, averaged):
        """Append one round to ``history``; returns whether to stop. ``refused``: updates
        arrived but the server applied none of them; the round repeats unchanged, so it never
        counts towards convergence. ``averaged``: server updates in the average so far (a
        converged run with averaging stops only once it holds ``needed`` of them)."""
        now = time.perf_counter()
        history["round"].append(round_index)
        history["mean"].append(np.asarray(info.mean))
        history["sd"].append(np.asarray(info.sd))
        history["mean_change"].append(float(info.mean_change))
        history["sd_change"].append(float(info.sd_change))
        history["applied_scale"].append(float(info.applied_scale))
        history["refused"].append(bool(refused))
        history["received"].append(int(received))
        history["participants"].append(int(participants))
        history["seconds"].append(now - clock[0])
        clock[0] = now
        change = max(float(info.mean_change), float(info.sd_change))
        below[0] = below[0] + 1 if (change < tol and received > 0 and not refused) else 0
        if below[0] >= PATIENCE and converged_at[0] is None:
            converged_at[0] = round_index + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                change=f"{change:.3g}",
                received=f"{received}/{len(client_ids)}",
                mean=np.array2string(np.asarray(info.mean), precision=2),
            )
        stop_now[0] = below[0] >= PATIENCE and averaged >= needed
        return stop_now[0]

    init_key, run_key, final_key = jax.random.split(key, 3)
    num_clients = len(client_ids)
    if state is None:
        server_state, client_states = algorithm.init(init_key, client_data)
    else:
        server_state, client_states = state
    skips: list[SkipRecord] = []
    rounds: list = []
    sweep_data = _stack_groups(client_data)
    sweep = jax.jit(lambda k, s, c, w: _sequential_round(algorithm, None, k, s, c, sweep_data, w))

    def sequential_round(round_index, server_state, client_states):
        """One sweep of the clients in random order; returns the states and whether to stop."""
        from ..protocol import RoundRecord

        round_key = jax.random.fold_in(run_key, round_index)
        pick_key, drop_key, sweep_key = jax.random.split(round_key, 3)
        asked = asked_clients(pick_key, num_clients, settings.participation)
        dropped = asked & np.array(jax.random.uniform(drop_key, (num_clients,)) < settings.dropout)
        working = asked & ~dropped
        for i in np.flatnonzero(dropped):
            skips.append(SkipRecord(round_index, client_ids[i], "dropped out"))
        before = algorithm.broadcast(server_state)
        server_state, client_states, index, invalid, applied = sweep(
            sweep_key, server_state, client_states, jnp.asarray(working)
        )
        for i in np.asarray(index)[np.asarray(invalid)]:
            skips.append(
                SkipRecord(
                    round_index, client_ids[int(i)], "message failed the algorithm's validity check"
                )
            )
        old_mean, old_cov = _moments(before.precision, before.shift)
        mean, cov = _moments(server_state.precision, server_state.shift)
        old_sd, sd = jnp.sqrt(jnp.diag(old_cov)), jnp.sqrt(jnp.diag(cov))
        info = EPServerInfo(
            mean,
            sd,
            jnp.max(jnp.abs(mean - old_mean) / sd),
            jnp.max(jnp.abs(jnp.log(sd / old_sd))),
            jnp.min(applied),
            int(working.sum() - np.asarray(invalid).sum()),
        )
        # the sweep's smallest fraction is 0 as soon as one update was refused; the sweep
        # applied nothing only when every update that arrived was
        accepted = working[np.asarray(index)] & ~np.asarray(invalid)
        refused = bool(accepted.any() and not np.any(np.asarray(applied)[accepted] > 0))
        rec = RoundRecord(round_index, int(working.sum()), int(info.received), info)
        rounds.append(rec)
        stop = record(
            round_index,
            rec.participants,
            rec.received,
            info,
            refused,
            int(server_state.average_count),
        )
        if on_round is not None:
            on_round(rec, server_state, client_states)
        return server_state, client_states, stop

    if settings.schedule == "synchronous":
        stop = False
        if start_round == 0 and _sequential_start(settings, num_clients):
            # one assumed-density-filtering sweep first: from a wide initial approximation,
            # clients working in parallel each measure their curvature far from the fixed
            # point and their summed change overshoots (badly so for many clients)
            server_state, client_states, stop = sequential_round(0, server_state, client_states)
            start_round = 1

        def on_round_hook(rec, server_state, client_states):
            refused = rec.received > 0 and float(rec.server_info.applied_scale) == 0.0
            record(
                rec.round,
                rec.participants,
                rec.received,
                rec.server_info,
                refused,
                int(server_state.average_count),
            )
            if on_round is not None:
                on_round(rec, server_state, client_states)

        result = drive(
            driver,
            (lambda: algorithm) if make_algorithm is None else make_algorithm,
            key,
            client_data,
            client_ids=client_ids,
            num_rounds=start_round if stop else settings.num_rounds,
            participation=settings.participation,
            dropout=settings.dropout,
            corrupt=corrupt,
            state=(server_state, client_states),
            start_round=start_round,
            converged=lambda info: stop_now[0],
            on_round=on_round_hook,
            progress=False,
            final_broadcast=final_broadcast,
        )
        if bar is not None:
            bar.close()
        return EPRun(
            result.server_state,
            result.client_states,
            result.personal,
            rounds + list(result.rounds),
            skips + list(result.skips),
            history,
            converged_at[0],
        )

    # sequential schedule: the same pure functions, one client after another
    for round_index in range(start_round, settings.num_rounds):
        server_state, client_states, stop = sequential_round(
            round_index, server_state, client_states
        )
        if stop:
            break
    if bar is not None:
        bar.close()
    bc = final_broadcast(server_state)
    final_keys = jax.random.split(final_key, num_clients)
    personal = finalize_clients(
        algorithm,
        vmap_clients(algorithm.client_update),
        final_keys,
        bc,
        client_states,
        client_data,
    )
    return EPRun(server_state, client_states, personal, rounds, skips, history, converged_at[0])


def _sequential_start(settings: EPSettings, num_clients: int) -> bool:
    """Whether the synchronous schedule opens with one sequential sweep."""
    if settings.sequential_start is None:
        return num_clients >= SEQUENTIAL_START_FROM
    return bool(settings.sequential_start)


def _stack_groups(client_data):
    """Stacked client data in client order (groups padded to the widest one)."""
    if not isinstance(client_data, ClientGroups):
        return client_data
    width = max(int(d["mask"].shape[1]) for d in client_data.data)

    def pad(a, mode):
        widths = [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return jnp.pad(a, widths, mode=mode)

    parts = [
        {
            "fields": {k: pad(v, "edge") for k, v in d["fields"].items()},
            "mask": pad(d["mask"], "constant"),
        }
        for d in client_data.data
    ]
    order = jnp.asarray(np.argsort(np.concatenate(client_data.indices)))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs)[order], *parts)


def fit_ep(
    model,
    data: ClientData,
    *,
    seed: int = 0,
    progress: bool = False,
    corrupt: Callable | None = None,
    state=None,
    start_round: int = 0,
    on_round: Callable | None = None,
    driver: str = "simulate",
    **options,
) -> Fit:
    """Federated EP: ``hf.fit(model, data, method="ep", **options)``.

    Parameters
    ----------
    model : callable or ConjugateFamily
        NumPyro model with one client plate (a family's ``.model`` is used for a family).
    data : ClientData
    seed : int
    progress : bool
        Progress bar over rounds (site change, received messages, global means).
    corrupt : callable, optional
        Fault injector ``corrupt(round, messages) -> messages`` (tests, benchmarks).
    state, start_round : optional
        Resume from ``fit.diagnostics["state"]`` of an earlier fit (a checkpoint).
    on_round : callable, optional
        ``on_round(record, server_state, client_states)`` after every round
        (``client_states`` is ``None`` under Flower: they are on the nodes).
    driver : {"simulate", "flower"}
        In process, or on Flower's simulation engine with one SuperNode per client
        (:mod:`hierfl.flower`; the synchronous schedule, without the opening sequential
        sweep: ``sequential_start`` defaults to ``False`` there and ``True`` is refused).
    **options
        Fields of :class:`EPSettings`.

    Returns
    -------
    Fit
        Global draws from the final Gaussian (averaged over the last rounds for stochastic
        tilted inference, see ``average_from``; through the constraining transforms),
        personal draws from each client's final tilted inference against it;
        ``diagnostics`` holds ``history`` (per round: global means and sds of the
        unconstrained ``phi``, changes, back-off, whether the server refused every update,
        messages received, seconds), ``skips``, ``rounds``, ``converged_round``, ``state`` (a
        checkpoint), ``bytes_per_message`` and ``averaged_updates``.
    """
    from ..families import ConjugateFamily

    dims, coords = {}, {}
    if isinstance(model, ConjugateFamily):
        model.check_data(data)
        dims, coords = model.dims(), model.coords()
        options.setdefault("reparam", model.reparam_config())
        model = model.model
    settings = _options(options)
    make_algorithm = None
    if driver == "flower":
        settings = settings._replace(size_groups=1)  # every client on its own node
        if settings.sequential_start is None:
            # the opening sweep would be one round trip per client, one after another (in
            # process it costs about one parallel round); on Flower the default is none
            settings = settings._replace(sequential_start=False)
        make_algorithm = functools.partial(_prepared_algorithm, model, data, settings)
    sites, problem, client_data, algorithm = prepare(model, data, settings)
    key = jax.random.PRNGKey(seed)
    start = time.perf_counter()
    run = run_ep(
        algorithm,
        key,
        client_data,
        data.client_ids,
        settings,
        corrupt=corrupt,
        state=state,
        start_round=start_round,
        on_round=on_round,
        progress=progress,
        driver=driver,
        make_algorithm=make_algorithm,
    )
    _warn_if_not_converged(run, settings, start_round)
    personal = jax.tree_util.tree_map(np.asarray, run.personal)
    num_draws = settings.num_samples
    global_samples = {
        name: personal[name][0][None] for name in sites.global_sites if name in personal
    }
    client_samples = {}
    for name in sites.client_sites:
        if name not in personal:
            continue
        value = personal[name]  # [N, S, 1, ...]
        client_samples[name] = np.moveaxis(value[:, :, 0], 0, 1)[None]  # [1, S, N, ...]
    summaries = {k: (v[0].mean(axis=0), v[0].std(axis=0)) for k, v in client_samples.items()}
    d = problem.phi_dim
    message_bytes = 4 * (d * d + d)
    diagnostics = {
        "tilted": settings.tilted,
        "schedule": settings.schedule,
        "settings": settings,
        "rounds": len(run.rounds),
        "converged_round": run.converged_round,
        "history": run.history,
        "skips": run.skips,
        "round_records": run.rounds,
        "state": (run.server_state, run.client_states),
        "next_round": start_round + len(run.rounds),
        "bytes_per_message": message_bytes,
        "global_latent": problem.global_latent,
        "phi_dim": d,
        "num_draws": num_draws,
        "run_seconds": time.perf_counter() - start,
        "averaged_updates": int(run.server_state.average_count),
    }
    return Fit(
        "ep",
        model,
        data,
        global_samples,
        StoredClientSamples(client_samples),
        sites,
        personal=summaries,
        diagnostics=diagnostics,
        dims=dims,
        coords=coords,
        seed=seed,
    )


class EPConvergenceWarning(UserWarning):
    """EP stopped at ``num_rounds`` while its global approximation was still moving."""


def _warn_if_not_converged(run: EPRun, settings: EPSettings, start_round: int) -> None:
    """Warn when the run used every round without meeting its stopping rule: the fit is then
    where EP stood, not a fixed point (a parameter far from its prior start moves by a
    damped fraction per round)."""
    history = run.history
    if run.converged_round is not None or not history.get("mean_change"):
        return
    tol = DEFAULT_TOL[settings.tilted] if settings.tol is None else settings.tol
    change = max(history["mean_change"][-1], history["sd_change"][-1])
    if change < tol:
        return  # below tolerance, short of the patience only
    rounds = start_round + len(run.rounds)
    warnings.warn(
        f"EP did not converge in {rounds} rounds: the last round moved the global "
        f"approximation by {change:.3g} posterior sd (tolerance {tol:g}). Run more rounds, "
        f"or continue this fit: hf.fit(..., state=fit.diagnostics['state'], "
        f"start_round={rounds}, num_rounds=<a larger total>); fit.diagnostics['history'] "
        "holds the changes per round.",
        EPConvergenceWarning,
        stacklevel=3,
    )


from ..api import METHODS  # noqa: E402  (api imports this module at its end)

METHODS["ep"] = fit_ep
