r"""Federated (partitioned) variational inference for a shared body and Bayesian personal parts.

The model (see :class:`~hierfl.neural.NeuralModel`):

.. math::
    \theta_i \mid \mu, \tau \sim N(\mu, \mathrm{diag}\,\tau^2), \qquad
    y_{in} \mid x_{in}, w, \theta_i \sim \mathrm{Categorical}(\mathrm{softmax}\,f(x_{in}; w,
    \theta_i)),

with ``w`` the shared body (a point estimate), ``theta_i`` client ``i``'s personal parameters
(a head, or normalization scale/shift) and ``(mu, tau)`` global hyperparameters.

**Variational family.** ``q_i(theta_i) = N(m_i, diag s_i^2)`` (mean field), kept by client
``i``. The evidence lower bound is a sum over clients,

.. math::
    \mathcal L(w, \mu, \tau, \{q_i\}) = \sum_i \Big( E_{q_i}\big[\textstyle\sum_n
    \log p(y_{in} \mid x_{in}, w, \theta_i)\big] - \mathrm{KL}\big(q_i \,\|\,
    N(\mu, \tau^2)\big) \Big) + \log p(\tau^2),

so every client can work on its own term (partitioned VI; Ashman et al. 2022).

**One round** (variational EM with a federated body):

1. the server broadcasts ``(w, mu, tau)``;
2. every participating client (all of them as **one** ``jax.vmap``-ed, ``jax.jit``-compiled
   update; :func:`hierfl.protocol.simulate`; one per group when client sizes differ widely,
   ``size_groups``, and chunk after chunk with ``client_batch``)

   a. computes its features ``h_in = g(x_in; w)`` once (the part of the network before the
      first personal parameter; :meth:`~hierfl.neural.NeuralModel.features`) and runs the
      **E-step** on them, with ``w`` fixed (:func:`fit_personal`): ``elbo_steps`` full-batch
      Adam steps on its ELBO term in ``(m_i, log s_i)``, warm-started from its previous
      ``q_i``. The steps touch only the small personal part, so a near-complete E-step
      costs little;
   b. takes ``local_steps`` minibatch Adam steps on the body ``w`` with ``theta_i`` fixed at
      its posterior mean ``m_i`` (the body never trains on noisy head draws);
3. client ``i`` sends its body change ``w_i - w`` with weight ``n_i``, and ``m_i``,
   ``m_i^2``, ``s_i^2`` and ``gamma_i`` (below). The server uses only *sums* of these over
   clients (secure aggregation fits); the personal posterior ``q_i`` stays on the client;
4. the server averages the body changes (FedAvg on ``w``) and updates ``(mu, tau)``
   (:func:`hyperparameter_update`). With ``K`` received clients,
   ``gamma_i = 1 - s_i^2 / tau^2`` (:func:`determined_share`: how far client ``i``'s data
   determine a coordinate) and a hyperprior ``log p(tau^2) = -(a+1) log tau^2 - b/tau^2``,

   .. math::
       \mu = \frac1K \sum_i m_i, \qquad
       \tau^2 = \frac{\sum_i (m_i - \mu)^2 + 2b}{\sum_i \gamma_i + 2a + 2}

   (the default ``hyper_update="fixed_point"``: MacKay's fixed point of the collapsed
   objective, reading each ``q_i`` as a Gaussian site times the prior; a coordinate whose
   denominator is below 1 takes the EM step instead), or the variational
   EM step ``tau^2 = (sum_i [(m_i - mu)^2 + s_i^2] + 2b) / (K + 2a + 2)``
   (``hyper_update="em"``), the exact maximizer of ``L`` in ``tau`` given the ``q_i``. Both
   have the same fixed points; EM approaches them at the rate ``s_i^2 / tau^2`` (the share
   of missing information), the fixed point in a few rounds. The hyperprior
   (:data:`TAU2_PRIOR`, ``a = -1``: flat in ``tau^2``, with ``exp(-b / tau^2)`` keeping
   ``tau`` off exactly zero) adds nothing else: ``tau`` is learned, never tuned.

When the clients' data agree, the ``m_i`` agree, ``tau`` shrinks and the heads pool (FedAvg's
shared model); when they disagree, ``tau`` grows and each client keeps its own voice.

Predictions average the class probabilities over draws ``theta_i ~ q_i``
(:func:`predictive_probs`); at the end of training every client refits ``q_i`` at the final
body (``client_finalize``). A new client (cold start) runs the same E-step on its few
examples, from the population prior ``N(mu, tau^2)`` and a Laplace start
(:func:`adapt_personal`).

**Why this E-step** (MNIST 5,000, 20 clients, 10 rounds x 10 body steps; see
``BENCHMARKS.md``). An earlier version took the local Adam steps jointly in
``(w, m_i, s_i)`` with one draw of ``theta_i`` per step from ``q_i`` started at the prior
(``s_i = tau = 1``): the body then trained on noisy heads, the partial E-step left the
``m_i`` under-dispersed and biased the M-step for ``tau`` downward, and hierfl trailed the
best baseline by 0.04-0.10 in accuracy with 3-9 times its ECE. Fitting ``q_i`` on the
features with the body fixed, and the body on ``m_i``, closed the accuracy gap (Dirichlet 5:
0.81 -> 0.92). A Laplace-only E-step (mode plus the curvature at the mode) was about as accurate
but badly underconfident (pathological: ECE 0.17): its ``s_i`` is ``tau`` wherever the
softmax saturates. The ELBO steps fixed that (ECE 0.17 -> 0.02). More ELBO steps helped on
validation data (Dirichlet 0.1 at 100 / 200 / 400 steps: 0.937 / 0.938 / 0.959); a Laplace
start in every round did not beat the warm start (mean validation accuracy over the five
partitions 0.938 vs 0.937) and runs L-BFGS line searches, which ``vmap`` turns into loops
that wait for the slowest client, so it is used only for cold start, where there is no
previous ``q`` to start from. Not used: training the body on draws of ``theta_i``
(``body_draws``; no better on validation at 20 clients, and at 100 clients on Dirichlet 5
with body learning rate 0.01 it collapses to accuracy 0.19: the body shrinks its features,
the heads go uninformed and ``tau`` grows to 0.64; see BENCHMARKS.md), a wider start
``init_tau = 3`` (worse), a larger body step size (``learning_rate = 1e-2``; no better on
validation). Earlier attempts that diverged: server-side EM on Laplace sites and a
diagonal-Newton E-step in ``(w, theta)``.

**The hyperprior and the M-step** (same benchmark; validation rows, seeds 0 and 1). The
M-step was always the exact EM update, but under the earlier hyperprior IG(1, 1e-4) on
``tau^2``. For a posterior *mode* that prior is not weak: its ``-2 log tau^2`` is worth some
18 nats near its mode ``tau ~ 0.007``, more than 20 clients' marginal likelihood varies over
``tau`` in ``[0, 1]``, so the only fixed point was ``tau ~ 0.007`` on every coordinate. EM
drifted there by ``K / (K + 4)`` in ``tau^2`` per round (the "learned" ``tau`` after 10 rounds,
0.27-0.41 on every partition, was set by the number of rounds), and the fixed-point update
got there in 3-4 rounds, which pooled every head and cost accuracy (mean validation accuracy
over the five partitions 0.919 vs EM's 0.937; Dirichlet 0.1: 0.918 vs 0.951). With a flat
hyperprior (``a = -1``) the fixed point settles within about 5 rounds on data-determined
values that order the partitions as they should (mean ``tau`` on seed 0: Dirichlet 5 0.30,
Dirichlet 0.5 0.43, Dirichlet 0.1 0.68, pathological 0.82; feature shift 0.20), with the
same validation accuracy as before (mean over four label-skew partitions x two seeds and
feature shift: 0.9445 vs 0.9449; EM under the flat hyperprior 0.9444). EM under a flat
prior on ``tau`` itself (``a = -1/2``) was nominally best (0.9478), but that prior still has
a spike at zero, which the fixed point falls into (validation 0.938 on four partitions, seed
0) and EM drifts toward, so its ``tau`` would again be set by the number of rounds; the
differences are within seed noise, and the fixed point under the flat hyperprior is the one
whose ``tau`` is a converged, data-determined value.

**Known limitations.** In the benchmark (means over 2-3 seeds, every method picking its
learning rate on validation rows) hierfl's accuracy is at or above the best baseline on 6 of
9 partitions and within 0.004 of it on the other three (Dirichlet 5 at 20 and 100 clients,
feature shift at 20), less than a single seed moves every method. Its ECE is about what a
calibrated predictor shows on that many test rows
(:func:`hierfl.neural.metrics.calibrated_ece`), not half of the best baseline's, except on
Dirichlet 5 at 100 clients, where it is overconfident (as are the baselines). There the
body's features are overconfident whatever head sits on them (the head ``mu`` alone: test
ECE 0.061, floor 0.012; ``benchmarks/neural_calibration.py``): the body is a point estimate
that the ELBO does not regularize, and averaging over ``q_i`` recovers only part of it
(0.044). A diagonal Laplace body added after training (the clients' Gauss-Newton sums and a
per-layer prior by type-II maximum likelihood) overcorrects to an underconfident ECE of
0.20: the data leave most first-layer weights at their prior sd. Because the body is a point
estimate, the scale of a head kernel's ``tau`` is not identified by the ELBO alone (scaling
the features by ``c`` and the kernel by ``1/c`` leaves it unchanged); ``tau`` relative to
the kernel's scale is what the data determine. The mean-field ``s_i`` understate the
posterior variance of correlated coordinates, which biases ``gamma_i`` up and ``tau`` down,
under either update. The E-step (``elbo_steps x elbo_samples`` passes over a client's
features) is compute-bound, as are the body steps (each client trains its own copy of the
body), so on a CPU the vmapped round runs at about the speed of a per-client loop of the
same update (1.0x at 100 clients, against the 5x of issue 4); ``vmap`` can only pay off
where the per-client work is overhead-bound, or on an accelerator (not measured: none was
lent).

References
----------
Ashman, M. et al. (2022). Partitioned variational inference: a framework for probabilistic
federated learning. arXiv:2202.12275.
Kotelevskii, N. et al. (2022). FedPop: a Bayesian approach for personalised federated learning.
Li, T. et al. (2021). Ditto: fair and robust federated learning through personalization.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..data import MIN_GROUPING_GAIN
from ..protocol import ClientGroups, FederatedAlgorithm, count_clients
from .model import NeuralModel

__all__ = [
    "TAU2_PRIOR",
    "SVIClientState",
    "SVIServerInfo",
    "SVIServerState",
    "SVISettings",
    "adapt_personal",
    "fit_personal",
    "determined_share",
    "gaussian_kl",
    "ggn_diagonal",
    "group_client_data",
    "hyperparameter_update",
    "map_objective",
    "personal_objective",
    "predictive_probs",
    "stack_client_data",
    "svi_algorithm",
]

PyTree = Any

#: (a, b) of the hyperprior p(tau^2) ~ (tau^2)^-(a + 1) exp(-b / tau^2) on every tau^2.
#: a = -1: flat in tau^2 (type-II maximum likelihood), with exp(-b / tau^2) a soft floor that
#: keeps tau off exactly zero (it matters only for tau^2 near b = 1e-4, tau ~ 0.01). An
#: inverse gamma with a > -1 (say IG(1, 1e-4)) is far from weak for a posterior *mode*: its
#: -(a + 1) log tau^2 adds some 18 nats at tau ~ 0.007, more than K = 20 clients' marginal
#: likelihood varies over tau in [0, 1], so its mode collapses every tau to b / (a + 1) (the
#: fixed point runs there in a few rounds; EM drifts there by K / (K + 2a + 2) a round)
TAU2_PRIOR = (-1.0, 1e-4)


class SVISettings(NamedTuple):
    """Options of ``method="svi"``.

    Attributes
    ----------
    num_rounds : int
        Federated rounds.
    local_steps : int
        Adam steps on the shared body per client per round.
    batch_size : int
        Minibatch size of a body step (drawn with replacement from the client's rows).
    learning_rate : float
        Adam step size for the shared body.
    laplace_steps : int
        L-BFGS iterations of a Laplace start in every round's E-step (see
        :func:`fit_personal`); 0 (default): the E-step starts from the client's previous
        ``q_i`` instead (a warm start that is as good and cheaper under ``vmap``).
    elbo_steps : int
        Adam steps of the E-step on the client's full-batch ELBO in ``q_i``, with the body
        fixed (on its features, computed once per round).
    elbo_samples : int
        Reparameterized draws of ``theta_i`` per ELBO step. One draw halves the cost of a
        round (100 clients: 0.99 s vs 2.04 s) and is as good on validation rows (mean
        accuracy over 11 partition and seed runs: 0.942 vs 0.940), but on the benchmark's
        test rows of the same seeds it lost 0.006 accuracy at 100 clients (feature shift:
        0.016 on both seeds) and added 0.003 ECE at 20 clients, so the default stays 4.
    elbo_learning_rate : float
        Adam step size of the ELBO steps (on ``m_i`` and ``log s_i``).
    body_draws : bool
        Train the body on one draw ``theta_i ~ q_i`` per step instead of on ``m_i``.
        Experimental: it can collapse (the body shrinks its features and ``tau`` grows).
    init_tau : float
        Starting value of every ``tau``; ``tau`` is then learned. It starts *wide* (a weak
        prior) so that the M-step contracts it to the clients' spread from above.
    hyper_update : {"fixed_point", "em"}
        The server's update of ``(mu, tau)`` (:func:`hyperparameter_update`):
        ``"fixed_point"`` (default) solves the stationarity condition of the collapsed
        bound for ``tau`` (MacKay's fixed point), ``"em"`` maximizes the ELBO in ``(mu, tau)``
        given the ``q_i`` (variational EM). Both have the same fixed points.
    size_groups : int
        In-process runs put clients of very different sizes into at most this many groups of
        similar size, each padded to its own largest client (:func:`group_client_data`): the
        same computation on the real rows with fewer padded rows in the full-batch E-step.
        Results agree up to float rounding, which ten rounds of training can grow as a change
        of seed would (MNIST Dirichlet 0.1, 20 clients: 0.959 vs 0.957 mean accuracy over
        three seeds). 1: one group.
    client_batch : int, optional
        In-process runs vmap chunks of this many clients one after another instead of all
        clients at once (:func:`hierfl.protocol.vmap_clients`): the same computation (equal
        up to float rounding) with the memory of one chunk (each client trains its own copy
        of the body and its Adam state).
    tau_damping : float
        Share of the server's update applied to ``log tau`` per round (1: undamped).
    predictive_samples : int
        Draws of ``theta`` averaged in the posterior predictive.
    participation, dropout : float
        Passed to :func:`hierfl.protocol.simulate`.
    adapt_steps : int
        L-BFGS iterations of the Laplace start of a cold-start adaptation (there is no
        previous ``q`` to start from), before its ``elbo_steps``.
    """

    num_rounds: int = 30
    local_steps: int = 20
    batch_size: int = 32
    learning_rate: float = 3e-3
    laplace_steps: int = 0
    elbo_steps: int = 400
    elbo_samples: int = 4
    elbo_learning_rate: float = 2e-2
    body_draws: bool = False
    init_tau: float = 1.0
    hyper_update: str = "fixed_point"
    size_groups: int = 3
    client_batch: int | None = None
    tau_damping: float = 1.0
    predictive_samples: int = 32
    participation: float = 1.0
    dropout: float = 0.0
    adapt_steps: int = 50


class SVIServerState(NamedTuple):
    """Server state: the shared body and the hyperparameters."""

    shared: PyTree  # body parameters (Flax "params")
    mu: jax.Array  # [P]
    tau: jax.Array  # [P]


class SVIClientState(NamedTuple):
    """One client's variational posterior ``N(mean, softplus(raw_scale)^2)``."""

    mean: jax.Array  # [P]
    raw_scale: jax.Array  # [P]


class SVIServerInfo(NamedTuple):
    """Diagnostics of one server update."""

    received: jax.Array  # []
    loss: jax.Array  # [] mean negative log joint per example over received clients
    tau_mean: jax.Array  # [] mean of tau over coordinates
    body_change: jax.Array  # [] norm of the applied body update


def gaussian_kl(mean, sd, prior_mean, prior_sd):
    r"""``KL(N(mean, sd^2) || N(prior_mean, prior_sd^2))`` summed over coordinates."""
    return jnp.sum(
        jnp.log(prior_sd / sd) + (sd**2 + (mean - prior_mean) ** 2) / (2 * prior_sd**2) - 0.5
    )


def _softplus_inverse(x):
    return x + jnp.log(-jnp.expm1(-x))


def _log_likelihood(model: NeuralModel, unravel, shared, theta, x, y):
    logits = model.logits(shared, unravel(theta), x)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]


def map_objective(model: NeuralModel, shared, personal, mu, tau, x, y):
    r"""Negative log joint of one client with ``tau`` fixed (the MAP objective):

    .. math::
        -\sum_n \log p(y_n \mid x_n, w, \theta) - \log N(\theta \mid \mu, \tau^2)
        = \sum_n \ell_n(\theta) + \tfrac12 \|(\theta - \mu)/\tau\|^2
          + \textstyle\sum_p \log \tau_p + \tfrac P2 \log 2\pi .

    With a scalar ``tau`` this is the proximal (Ditto / pFedMe) objective
    ``sum_n l_n + (lambda/2) ||theta - mu||^2`` with ``lambda = 1 / tau^2``, plus the constant
    ``P log tau + (P/2) log 2 pi`` (see :func:`hierfl.neural.baselines.proximal_objective`).
    ``personal`` is the personal pytree; ``mu`` and ``tau`` are flat ``[P]`` (or scalars).
    """
    theta, unravel = model.unravel(personal)
    loglik = _log_likelihood(model, unravel, shared, theta, x, y)
    tau = jnp.broadcast_to(tau, theta.shape)
    log_prior = jnp.sum(-0.5 * ((theta - mu) / tau) ** 2 - jnp.log(tau) - 0.5 * jnp.log(2 * jnp.pi))
    return -jnp.sum(loglik) - log_prior


def _head_log_probs(model: NeuralModel, unravel, shared, theta, h):
    return jax.nn.log_softmax(model.head_logits(shared, unravel(theta), h))


def personal_objective(model: NeuralModel, unravel, shared, theta, h, y, mask, mu, tau):
    r"""The E-step objective: the MAP objective without its constant, on features.

    .. math::
        \sum_n \mathrm{mask}_n\, \ell_n(\theta) + \tfrac12 \|(\theta - \mu)/\tau\|^2,
        \qquad \ell_n(\theta) = -\log \mathrm{softmax}(g(h_n; w, \theta))_{y_n},

    with ``h = model.features(w, x)``. Shapes: ``theta, mu, tau: [P]``, ``h: [n, ...]``,
    ``y, mask: [n]``.
    """
    log_probs = _head_log_probs(model, unravel, shared, theta, h)
    nll = -jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0]
    return jnp.sum(mask * nll) + 0.5 * jnp.sum(((theta - mu) / tau) ** 2)


def ggn_diagonal(model: NeuralModel, unravel, shared, theta, h, mask):
    r"""Diagonal of the generalized Gauss-Newton matrix of the negative log likelihood,

    .. math::
        \mathrm{diag}\sum_n J_n^\top (\mathrm{diag}\,p_n - p_n p_n^\top) J_n
        = \sum_n \sum_c p_{nc}\, \big(\nabla_\theta \log p_{nc}\big)^2,

    with ``J_n`` the Jacobian of the logits in ``theta`` (the Fisher information; for a linear
    head, the Hessian). Returns ``[P]``.
    """

    def row_log_probs(theta, hn):
        return _head_log_probs(model, unravel, shared, theta, hn[None])[0]

    probs = jnp.exp(_head_log_probs(model, unravel, shared, theta, h))  # [n, C]

    def one_class(c):
        grads = jax.vmap(jax.grad(lambda t, hn: row_log_probs(t, hn)[c]), in_axes=(None, 0))(
            theta, h
        )  # [n, P]
        return (mask * probs[:, c]) @ grads**2

    return jax.lax.map(one_class, jnp.arange(probs.shape[-1])).sum(axis=0)


def fit_personal(
    model: NeuralModel,
    unravel,
    shared,
    h,
    y,
    mask,
    mu,
    tau,
    init,
    *,
    laplace_steps: int,
    init_sd=None,
    elbo_steps: int = 0,
    elbo_samples: int = 4,
    elbo_learning_rate: float = 1e-2,
    key=None,
):
    r"""The local E-step: client ``i``'s mean-field ``q_i = N(m, diag s^2)`` with the body
    fixed, on the client's features ``h = model.features(w, x)`` (computed once).

    1. *Laplace start* (if ``laplace_steps > 0``): ``m`` minimizes :func:`personal_objective`
       (``laplace_steps`` L-BFGS iterations from ``init``; convex for a linear head) and
       ``s^2 = 1 / (diag G(m) + 1/tau^2)``, with ``G`` the Gauss-Newton matrix
       (:func:`ggn_diagonal`). For a Gaussian posterior with precision ``Lambda``,
       ``N(m, diag(1/diag Lambda))`` is the mean-field ``q`` that maximizes the ELBO, so this
       is mean-field VI on the Laplace approximation. Otherwise ``(m, s) = (init, init_sd)``.
    2. *ELBO steps*: ``elbo_steps`` Adam steps (step size ``elbo_learning_rate``) in
       ``(m, log s)`` on the full-batch negative ELBO
       ``E_q[sum_n mask_n l_n(theta)] + KL(q || N(mu, tau^2))``, with ``elbo_samples``
       reparameterized draws per step. The Laplace ``s`` comes from the curvature at the
       mode only; where the softmax saturates that curvature vanishes and ``s`` falls back to
       ``tau`` although a draw that wide would flip predictions (an underconfident
       predictive). The ELBO sees that and narrows ``s``.

    Returns ``(mean, sd)``, each ``[P]``.
    """

    def objective(theta):
        return personal_objective(model, unravel, shared, theta, h, y, mask, mu, tau)

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry, _):
        theta, state = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = optimizer.update(
            grad, state, theta, value=value, grad=grad, value_fn=objective
        )
        return (optax.apply_updates(theta, updates), state), value

    if laplace_steps:
        (mean, _), _ = jax.lax.scan(step, (init, optimizer.init(init)), None, length=laplace_steps)
        precision = ggn_diagonal(model, unravel, shared, mean, h, mask) + 1.0 / tau**2
        sd = jax.lax.rsqrt(precision)
    else:
        mean, sd = init, init_sd
    if not elbo_steps:
        return mean, sd

    def negative_elbo(params, step_key):
        eps = jax.random.normal(step_key, (elbo_samples, mean.size))
        sd = jnp.exp(params["log_sd"])

        def nll(e):
            log_probs = _head_log_probs(model, unravel, shared, params["mean"] + sd * e, h)
            return -jnp.sum(mask * jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0])

        return jnp.mean(jax.vmap(nll)(eps)) + gaussian_kl(params["mean"], sd, mu, tau)

    adam = optax.adam(elbo_learning_rate)

    def elbo_step(carry, step_key):
        params, state = carry
        grads = jax.grad(negative_elbo)(params, step_key)
        updates, state = adam.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    params = {"mean": mean, "log_sd": jnp.log(sd)}
    (params, _), _ = jax.lax.scan(
        elbo_step, (params, adam.init(params)), jax.random.split(key, elbo_steps)
    )
    return params["mean"], jnp.exp(params["log_sd"])


def determined_share(sd, tau):
    r"""How far client data determine each personal coordinate:
    ``gamma = 1 - s^2 / tau^2``, clipped to ``[0, 1]``.

    For a Gaussian (or Laplace) site of precision ``lambda`` times the prior
    ``N(mu, tau^2)``, ``s^2 = 1 / (lambda + 1/tau^2)`` and ``gamma = lambda tau^2 /
    (1 + lambda tau^2)``: 0 where the data say nothing (``s = tau``), 1 where they pin the
    coordinate down (MacKay's "well-determined parameters", 1992). The clip absorbs the
    Monte Carlo noise of the E-step, which can leave ``s`` slightly above ``tau``.
    Shapes: ``sd, tau: [P]``; returns ``[P]``.
    """
    return jnp.clip(1.0 - (sd / tau) ** 2, 0.0, 1.0)


def hyperparameter_update(
    mu,
    tau,
    *,
    count,
    mean_sum,
    mean_square_sum,
    variance_sum,
    determined_sum,
    rule: str = "fixed_point",
    prior: tuple[float, float] = TAU2_PRIOR,
):
    r"""The server's update of the hierarchical prior ``(mu, tau)`` from sums over the ``K``
    received clients' ``q_i = N(m_i, s_i^2)`` (per coordinate; secure aggregation fits).

    The objective is the ELBO's prior part plus the hyperprior
    ``log p(tau^2) = -(a + 1) log tau^2 - b / tau^2`` (``(a, b) = prior``,
    :data:`TAU2_PRIOR`). With :math:`\bar m = \frac1K \sum_i m_i` and
    :math:`S = \sum_i (m_i - \bar m)^2`:

    * ``rule="em"`` (variational EM): the maximizer of
      ``sum_i E_{q_i}[log N(theta_i | mu, tau^2)] + log p(tau^2)``,

      .. math::
          \mu = \bar m, \qquad
          \tau^2 = \frac{S + \sum_i s_i^2 + 2b}{K + 2a + 2}.

    * ``rule="fixed_point"`` (MacKay 1992; Tipping 2001): read every ``q_i`` as a Gaussian
      site ``N(d_i, 1/lambda_i)`` times the prior, so ``m_i - mu = gamma_i (d_i - mu)`` and
      ``s_i^2 = (1 - gamma_i) tau^2`` with ``gamma_i = 1 - s_i^2/tau^2``
      (:func:`determined_share`). Setting the derivative of the collapsed objective
      ``sum_i log N(d_i | mu, tau^2 + 1/lambda_i) + log p(tau^2)`` in ``tau^2`` to zero gives
      ``tau^2 (gamma + 2a + 2) = S + 2b`` with ``gamma = sum_i gamma_i``, so

      .. math::
          \mu = \bar m, \qquad
          \tau^2 = \frac{S + 2b}{\sum_i \gamma_i + 2a + 2},

      on every coordinate whose denominator is at least 1 (the clients together determine
      it at least as well as one observation would); elsewhere ``tau`` is barely
      identified, dividing by the small denominator would amplify the E-step's Monte
      Carlo noise, and the coordinate takes the EM step instead.

    Substituting ``s_i^2 = (1 - gamma_i) tau^2`` shows both rules share their fixed points
    (the stationary points of the collapsed objective). EM approaches them at the rate
    ``s_i^2 / tau^2`` (the share of missing information), so it crawls on coordinates the
    data inform little; the fixed point gets there in a few rounds.

    Parameters
    ----------
    mu, tau : array ``[P]``
        Current hyperparameters (``q_i`` were fitted under them).
    count : array ``[]``
        Number of received clients ``K``.
    mean_sum, mean_square_sum, variance_sum, determined_sum : array ``[P]``
        :math:`\sum_i m_i`, :math:`\sum_i m_i^2`, :math:`\sum_i s_i^2` and
        :math:`\sum_i \gamma_i`.
    rule : {"fixed_point", "em"}
    prior : (float, float)
        ``(a, b)`` of the hyperprior on ``tau^2``.

    Returns
    -------
    (mu, tau), each ``[P]``. With no client received the result is meaningless; callers
    keep their previous values then.

    Examples
    --------
    Three clients with ``m_i = 0, 1, 2`` and ``s_i = 0.5`` under ``tau = 1``
    (``gamma_i = 0.75``; ``S = 2``):

    >>> import jax.numpy as jnp
    >>> m, s = jnp.array([[0.0], [1.0], [2.0]]), jnp.full((3, 1), 0.5)
    >>> sums = dict(count=jnp.float32(3), mean_sum=m.sum(0), mean_square_sum=(m**2).sum(0),
    ...             variance_sum=(s**2).sum(0),
    ...             determined_sum=determined_share(s, jnp.ones(1)).sum(0))
    >>> for rule in ("em", "fixed_point"):  # tau^2 = (2 + 0.75) / 3, 2 / 2.25 (b ~ 0)
    ...     mu, tau = hyperparameter_update(jnp.zeros(1), jnp.ones(1), rule=rule, **sums)
    ...     print(rule, round(float(mu[0]), 3), round(float(tau[0]), 3))
    em 1.0 0.957
    fixed_point 1.0 0.943

    References
    ----------
    MacKay, D. J. C. (1992). Bayesian interpolation. Neural Computation 4(3).
    Tipping, M. E. (2001). Sparse Bayesian learning and the relevance vector machine. JMLR 1.
    """
    shape, scale = prior
    safe = jnp.maximum(count, 1.0)
    mean = mean_sum / safe
    spread = jnp.maximum(mean_square_sum - count * mean**2, 0.0)
    em = (spread + variance_sum + 2 * scale) / jnp.maximum(count + 2 * shape + 2, 1.0)
    if rule == "em":
        tau2 = em
    elif rule == "fixed_point":
        denominator = determined_sum + 2 * shape + 2
        tau2 = jnp.where(
            denominator >= 1.0, (spread + 2 * scale) / jnp.maximum(denominator, 1.0), em
        )
    else:
        raise ValueError(f"hyper_update must be 'fixed_point' or 'em', got {rule!r}")
    del mu, tau
    return mean, jnp.sqrt(tau2)


def svi_algorithm(
    model: NeuralModel, *, settings: SVISettings | None = None, key=None
) -> FederatedAlgorithm:
    """The federated VI algorithm as a :class:`hierfl.protocol.FederatedAlgorithm`.

    Client data (stacked on the client axis by the driver): ``{"x": [max_n, ...],
    "y": [max_n] int32, "size": [] int32}`` with each client's real rows first.

    Parameters
    ----------
    model : NeuralModel
    settings : SVISettings
    key : jax PRNGKey, optional
        Used only to trace the personal structure (the initial values come from ``init``).

    Returns
    -------
    FederatedAlgorithm
        ``client_finalize`` refits ``q_i`` at the final body and hyperparameters and returns
        ``(mean, sd)``, each ``[P]``.
    """
    settings = SVISettings() if settings is None else settings
    if key is None:
        # the same model and settings give the same functions, so that the jitted round
        # compiled for one fit serves the next (hierfl.protocol.vmap_clients keeps it)
        try:
            return _cached_svi_algorithm(model, _algorithm_settings(settings))
        except TypeError:  # an unhashable model or setting
            pass
    return _svi_algorithm(model, settings, key)


#: settings that the algorithm's functions do not read (the driver's); they are reset to
#: their defaults in the key of the cache of :func:`svi_algorithm`
DRIVER_SETTINGS = (
    "num_rounds",
    "size_groups",
    "client_batch",
    "predictive_samples",
    "participation",
    "dropout",
    "adapt_steps",
)


def _algorithm_settings(settings: SVISettings) -> SVISettings:
    defaults = SVISettings()
    return settings._replace(**{name: getattr(defaults, name) for name in DRIVER_SETTINGS})


def _svi_algorithm(model: NeuralModel, settings: SVISettings, key) -> FederatedAlgorithm:
    _, template = jax.eval_shape(model.init, jax.random.PRNGKey(0) if key is None else key)
    template = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template)
    _, unravel = model.unravel(template)
    optimizer = optax.adam(settings.learning_rate)

    def init(key, client_data):
        shared, personal = model.init(key)
        mu, _ = model.unravel(personal)
        tau = jnp.full_like(mu, settings.init_tau)
        num_clients = count_clients(client_data)
        clients = SVIClientState(
            jnp.tile(mu, (num_clients, 1)),
            jnp.full(
                (num_clients, mu.size),
                _softplus_inverse(jnp.asarray(settings.init_tau)),
                dtype=mu.dtype,
            ),
        )
        return SVIServerState(shared, mu, tau), clients

    def broadcast(server_state):
        return server_state

    def e_step(key, broadcast, client_state, client_data):
        x, y, size = client_data["x"], client_data["y"], client_data["size"]
        mask = (jnp.arange(y.shape[0]) < size).astype(broadcast.mu.dtype)
        h = model.features(broadcast.shared, x)
        mean, sd = fit_personal(
            model,
            unravel,
            broadcast.shared,
            h,
            y,
            mask,
            broadcast.mu,
            broadcast.tau,
            client_state.mean,
            laplace_steps=settings.laplace_steps,
            init_sd=jax.nn.softplus(client_state.raw_scale),
            elbo_steps=settings.elbo_steps,
            elbo_samples=settings.elbo_samples,
            elbo_learning_rate=settings.elbo_learning_rate,
            key=key,
        )
        value = personal_objective(
            model, unravel, broadcast.shared, mean, h, y, mask, broadcast.mu, broadcast.tau
        )
        return mean, sd, value / jnp.maximum(size, 1)

    def client_update(key, broadcast, client_state, client_data):
        size = client_data["size"]
        key, e_key = jax.random.split(key)
        mean, sd, value = e_step(e_key, broadcast, client_state, client_data)

        def loss(shared, step_key):
            row_key, noise_key = jax.random.split(step_key)
            rows = jax.random.randint(row_key, (settings.batch_size,), 0, size)
            theta = mean
            if settings.body_draws:
                theta = mean + sd * jax.random.normal(noise_key, mean.shape)
            return -jnp.mean(
                _log_likelihood(
                    model, unravel, shared, theta, client_data["x"][rows], client_data["y"][rows]
                )
            )

        def step(carry, step_key):
            shared, opt_state = carry
            grads = jax.grad(loss)(shared, step_key)
            updates, opt_state = optimizer.update(grads, opt_state, shared)
            return (optax.apply_updates(shared, updates), opt_state), None

        (shared, _), _ = jax.lax.scan(
            step,
            (broadcast.shared, optimizer.init(broadcast.shared)),
            jax.random.split(key, settings.local_steps),
        )
        message = {
            "shared_delta": jax.tree_util.tree_map(jnp.subtract, shared, broadcast.shared),
            "weight": size.astype(mean.dtype),
            "mean": mean,
            "mean_square": mean**2,
            "variance": sd**2,
            "determined": determined_share(sd, broadcast.tau),
            "loss": value,
        }
        return SVIClientState(mean, _softplus_inverse(sd)), message, {"loss": value}

    def server_update(key, server_state, messages, received):
        del key
        got = received.astype(server_state.mu.dtype)
        count = got.sum()
        weights = got * messages["weight"]
        total = jnp.maximum(weights.sum(), 1.0)
        delta = jax.tree_util.tree_map(
            lambda d: jnp.tensordot(weights, d, axes=1) / total, messages["shared_delta"]
        )
        shared = jax.tree_util.tree_map(jnp.add, server_state.shared, delta)
        mu, tau = hyperparameter_update(
            server_state.mu,
            server_state.tau,
            count=count,
            mean_sum=got @ messages["mean"],
            mean_square_sum=got @ messages["mean_square"],
            variance_sum=got @ messages["variance"],
            determined_sum=got @ messages["determined"],
            rule=settings.hyper_update,
        )
        tau = server_state.tau * (tau / server_state.tau) ** settings.tau_damping
        any_received = count > 0
        new = SVIServerState(
            jax.tree_util.tree_map(
                lambda a, b: jnp.where(any_received, a, b), shared, server_state.shared
            ),
            jnp.where(any_received, mu, server_state.mu),
            jnp.where(any_received, tau, server_state.tau),
        )
        change = jnp.sqrt(sum(jnp.sum(d**2) for d in jax.tree_util.tree_leaves(delta)))
        safe = jnp.maximum(count, 1.0)
        info = SVIServerInfo(count, got @ messages["loss"] / safe, new.tau.mean(), change)
        return new, info

    def client_finalize(key, broadcast, client_state, client_data):
        mean, sd, _ = e_step(key, broadcast, client_state, client_data)
        return mean, sd

    def progress_info(info):
        return {"loss": f"{float(info.loss):.3f}", "tau": f"{float(info.tau_mean):.3f}"}

    return FederatedAlgorithm(
        init,
        broadcast,
        client_update,
        jax.jit(server_update),  # one compiled call a round, not an eager dispatch per op
        client_finalize,
        progress_info=progress_info,
    )


@functools.lru_cache(maxsize=8)
def _cached_svi_algorithm(model: NeuralModel, settings: SVISettings) -> FederatedAlgorithm:
    return _svi_algorithm(model, settings, None)


def predictive_probs(model: NeuralModel, unravel, shared, mean, sd, x, key, num_samples: int):
    r"""Posterior predictive class probabilities ``[rows, classes]``:
    ``(1/S) sum_s softmax(f(x; w, theta_s))`` with ``theta_s ~ N(mean, diag sd^2)``."""
    noise = jax.random.normal(key, (num_samples, mean.size))
    h = model.features(shared, x)

    def probs(eps):
        return jax.nn.softmax(model.head_logits(shared, unravel(mean + sd * eps), h))

    return jax.lax.map(probs, noise).mean(axis=0)


def adapt_personal(
    model: NeuralModel,
    unravel,
    shared,
    mu,
    tau,
    x,
    y,
    key,
    *,
    settings: SVISettings | None = None,
    steps: int | None = None,
):
    r"""Cold start: ``q(theta) = N(m, s^2)`` for a new client from its few examples, under
    the learned prior ``N(mu, tau^2)``, with the body fixed and no server round.

    The local E-step of training (:func:`fit_personal` with the E-step options of
    ``settings``), started from the prior mean, with ``steps`` (default
    ``settings.adapt_steps``) L-BFGS iterations. Returns ``(mean, sd)``, each ``[P]``.
    """
    settings = SVISettings() if settings is None else settings
    h = model.features(shared, x)
    mask = jnp.ones(y.shape, dtype=mu.dtype)
    return fit_personal(
        model,
        unravel,
        shared,
        h,
        y,
        mask,
        mu,
        tau,
        mu,
        laplace_steps=settings.adapt_steps if steps is None else steps,
        init_sd=tau,
        elbo_steps=settings.elbo_steps,
        elbo_samples=settings.elbo_samples,
        elbo_learning_rate=settings.elbo_learning_rate,
        key=key,
    )


def group_client_data(model: NeuralModel, data, *, max_groups: int, dtype=jnp.float32):
    """Client data for :func:`svi_algorithm`: :func:`stack_client_data` of all clients, or,
    when clients differ much in size, :class:`~hierfl.protocol.ClientGroups` of at most
    ``max_groups`` groups of similar size, each padded to its own largest client (when that
    cuts the padded rows at least :data:`hierfl.data.MIN_GROUPING_GAIN` times).

    The E-step is full-batch over a client's (padded) rows, so its cost follows the padded
    rows: on MNIST split Dirichlet(0.5) among 100 clients, the largest client has 85 rows and
    the mean 32. The arithmetic on real rows is the same either way (the fit equal up to float
    rounding).
    """
    groups = [np.arange(data.num_clients)]
    if max_groups > 1:
        groups = data.size_groups(max_groups, min_gain=MIN_GROUPING_GAIN)
    if len(groups) == 1:
        return stack_client_data(model, data, dtype=dtype)
    return ClientGroups(
        tuple(groups),
        tuple(stack_client_data(model, data, dtype=dtype, clients=g) for g in groups),
    )


def stack_client_data(model: NeuralModel, data, *, dtype=jnp.float32, clients=None) -> dict:
    """``{"x", "y", "size"}`` stacked on the client axis from a :class:`hierfl.ClientData`
    holding fields ``model.x_field`` and ``model.y_field`` (padding rows after the real ones);
    ``clients`` (positions) stacks only those clients."""
    data.require(model.x_field, model.y_field, context=f"model {model.name!r}")
    clients = np.arange(data.num_clients) if clients is None else np.asarray(clients)
    padded, _ = data.padded(clients=clients)
    labels = np.asarray(padded[model.y_field])
    if (
        not np.all(labels == np.round(labels))
        or labels.min() < 0
        or labels.max() >= model.num_classes
    ):
        bad = int(
            np.argwhere(
                (labels < 0) | (labels >= model.num_classes) | (labels != np.round(labels))
            )[0, 0]
        )
        raise ValueError(
            f"client {data.client_ids[clients[bad]]!r}, field {model.y_field!r}: labels "
            f"must be integers in 0..{model.num_classes - 1}"
        )
    x = np.asarray(padded[model.x_field])
    expected = int(np.prod(model.input_shape))
    if int(np.prod(x.shape[2:])) != expected:
        raise ValueError(
            f"field {model.x_field!r}: rows of shape {x.shape[2:]} do not fit the "
            f"model's input shape {model.input_shape}"
        )
    return {
        "x": jnp.asarray(x, dtype=dtype),
        "y": jnp.asarray(labels, dtype=jnp.int32),
        "size": jnp.asarray(np.asarray(data.sizes)[clients], dtype=jnp.int32),
    }
