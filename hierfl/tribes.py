r"""Tribes: clustered personalization as a conjugate mixture family.

Clients come in a few *tribes* (groups of clients that resemble each other more than they
resemble the rest). A single Gaussian prior over the clients' parameters pulls every client
toward the grand mean, between the tribes, where no client lives; a mixture prior pulls each
client toward its own tribe:

.. math::
    w \sim \mathrm{Dirichlet}(\alpha),\quad
    \mu_1 < \dots < \mu_K,\quad \tau_k \sim p(\tau),

    \theta_i \mid \phi \sim \sum_{k=1}^K w_k\, N(\mu_k, \tau_k^2),\quad
    y_{ij} \mid \theta_i \sim N(\theta_i, \sigma_{ij}^2)

with :math:`\phi = (w, \mu, \tau)` and known :math:`\sigma_{ij}` (fields ``y`` and
``sigma``, as for :class:`~hierfl.NormalNormal`). The means are ordered, which removes label
switching: tribe 0 is the lowest.

**Exact collapsed likelihood.** With the client's precision :math:`p_i = \sum_j
\sigma_{ij}^{-2}` and precision-weighted mean :math:`\bar y_i`, integrating out
:math:`\theta_i` under component :math:`k` gives the Normal–Normal marginal
:math:`L_{ik}(\phi) = c_i\, N(\bar y_i \mid \mu_k, \tau_k^2 + 1/p_i)`, with :math:`c_i` the
within-client term (the same for every :math:`k`). So

.. math::
    \log p(D_i \mid \phi) = \log c_i + \operatorname{logsumexp}_k
        \big[\log w_k + \log N(\bar y_i \mid \mu_k, \tau_k^2 + 1/p_i)\big],

and :math:`\theta_i \mid \phi, D_i` is a mixture of the :math:`K` Normal–Normal posteriors,
weighted by the client's posterior tribe responsibilities

.. math::
    r_{ik}(\phi) = P(z_i = k \mid \phi, D_i) =
        \frac{w_k L_{ik}(\phi)}{\sum_l w_l L_{il}(\phi)}.

:func:`membership` averages :math:`r_{ik}` over the posterior draws of :math:`\phi`, which
gives :math:`P(z_i = k \mid D_1..D_N)` exactly (:math:`z_i` is independent of the other
clients' data given :math:`\phi`).

**Centralized NUTS** (``method="nuts"``) runs :meth:`NormalMixture.model`: :math:`\theta_i`
is sampled from the marginal mixture prior (``MixtureSameFamily``), the tribe assignment
:math:`z_i` summed out inside the prior's density. It is centred: a mixture has no
location-scale form to non-centre, since :math:`\theta_i` is not an affine function of a
standard draw and one (:math:`\mu, \tau`) pair. (Enumerating :math:`z_i` would need
``funsor``, and gives NUTS the same continuous target.) Clients with several rows each
inform their :math:`\theta_i` enough for the centred form to mix; with one vague row per
client expect divergences from the funnel between :math:`\tau_k` and the
:math:`\theta_i`. **It fails silently where a client's posterior is split between tribes**
(one or two vague rows): the centred chains cannot cross between the two modes of its
:math:`\theta_i`, both chains keep to the same one, and R-hat does not notice
(``benchmarks/bench_mechanisms.py``: at 400 clients 36 of the 73 split clients stay on one
side, up to 8.7 posterior sd from the exact posterior, with an ESS of 3). The exact engine
integrates :math:`\theta_i` out and draws it from its exact mixture conditional, so it has
no such problem: prefer ``method="exact"``, and treat NUTS as a reference for the globals.

**Initialization** ("clustering clients' initial-gradient directions"):
:meth:`NormalMixture.initial_globals` clusters the clients' first Newton steps away from the
pooled mean (each client's gradient of its log-likelihood there, scaled by its own
curvature), by one-dimensional k-means started at the :math:`K` quantiles. The exact engine's
server starts NUTS (and the Laplace mode search) at the origin of the unconstrained space
and has no hook for initial values, so the engines do not use it; it is offered as a
one-round, federated starting point and a hard-clustering baseline.

Examples
--------
>>> import numpy as np, numpyro.distributions as dist
>>> import hierfl as hf
>>> from hierfl.tribes import NormalMixture, membership
>>> rng = np.random.default_rng(0)
>>> centres = np.repeat([-4.0, 4.0], 6)  # two tribes of six clients
>>> data = hf.ClientData.from_dict({
...     f"c{i}": {"y": rng.normal(centre, 1.0, 5), "sigma": np.ones(5)}
...     for i, centre in enumerate(centres)
... })
>>> family = NormalMixture(num_components=2, priors={"tau": dist.HalfNormal(2.0)})
>>> family
NormalMixture(num_components=2, weights~Dirichlet, mu~OrderStatistics, tau~HalfNormal)
>>> fit = hf.fit(family, data, method="exact", num_warmup=300, num_samples=300, num_chains=1)
>>> tribe = membership(fit).idxmax(axis=1)
>>> tribe.tolist() == [0] * 6 + [1] * 6
True
>>> fit.global_samples["mu"].shape  # [chain, draw, component]; tribe 0 is the lower
(1, 300, 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from .data import ClientData, ModelData
from .families import ConjugateFamily, NormalNormal
from .priors import Parameter, PriorError

__all__ = ["COMPONENT_DIM", "NormalMixture", "membership"]

#: ArviZ dim of the per-component global parameters
COMPONENT_DIM = "component"
#: default Dirichlet concentration of the tribe weights. Above 1 the prior density vanishes
#: at w_k = 0, so no tribe is emptied without evidence and the server's sampler does not
#: chase an empty component along the edge of the simplex. Choose alpha < 1 to let
#: superfluous tribes empty instead (Rousseau & Mengersen 2011, JRSS-B 73(5)).
DIRICHLET_CONCENTRATION = 2.0
#: Lloyd iterations of the one-dimensional k-means in :meth:`NormalMixture.initial_globals`
#: (one dimension converges in a handful; this only bounds the loop)
KMEANS_ITERATIONS = 100
#: smallest tribe spread returned by :meth:`NormalMixture.initial_globals`, as a fraction of
#: the clients' median standard error (a within-cluster variance at or below the noise)
MINIMUM_SPREAD_FRACTION = 0.1


class NormalMixture(ConjugateFamily):
    r"""Normal observations with known scales; a mixture of :math:`K` Normals over client means.

    .. math::
        w \sim \mathrm{Dirichlet}(\alpha),\quad \mu_1 < \dots < \mu_K,\quad
        \tau_k \sim p(\tau),\quad
        \theta_i \sim \sum_k w_k N(\mu_k, \tau_k^2),\quad
        y_{ij} \sim N(\theta_i, \sigma_{ij}^2)

    With ``num_components=1`` it is :class:`~hierfl.NormalNormal`. The statistics and the
    per-tribe marginals and posteriors are :class:`~hierfl.NormalNormal`'s, evaluated for
    all tribes at once; see :mod:`hierfl.tribes` for the formulas.

    Parameters
    ----------
    priors : dict, optional
        On ``weights`` (support ``"simplex"``; default ``Dirichlet(2, ..., 2)``, fixed at 1
        when ``K = 1``), ``mu`` (support ``"ordered"``; a univariate real prior is read as
        :math:`K` exchangeable draws sorted into order, :class:`~hierfl.priors.OrderStatistics`;
        default ``Normal(0, 10)``) and ``tau`` (one per tribe; default ``HalfNormal(5)``), or
        ``log_tau``. A number or vector fixes a parameter; a fixed ``tau`` must be > 0.
    num_components : int
        :math:`K`, the number of tribes (keyword only).
    observed, scale : str
        Field names of the observations and their known standard deviations.
    client_site : str
        Name of :math:`\theta_i` in the posterior.

    Raises
    ------
    ValueError
        ``num_components`` is not a whole number >= 1.
    hierfl.PriorError
        An invalid prior, naming the parameter.
    """

    def __init__(
        self,
        priors: Mapping[str, Any] | None = None,
        *,
        num_components: int,
        observed: str = "y",
        scale: str = "sigma",
        client_site: str = "theta",
    ):
        if isinstance(num_components, bool) or not isinstance(num_components, int | np.integer):
            raise ValueError(f"num_components must be an int >= 1, got {num_components!r}")
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.num_components = int(num_components)
        self.observed, self.scale, self.client_site = observed, scale, client_site
        self.required = (observed, scale)
        # one tribe's Normal-Normal algebra, evaluated for every tribe at once (its own priors
        # are never used)
        self._tribe = NormalNormal(
            {"mu": 0.0, "tau": 1.0}, observed=observed, scale=scale, client_site=client_site
        )
        super().__init__(priors)
        for r in self.priors:
            if r.parameter.name == "tau" and r.site is None and np.any(r.value <= 0):
                raise PriorError(
                    f"fixed value of 'tau' must be > 0 for NormalMixture, got "
                    f"{r.value.tolist()} (tau = 0 makes theta discrete; for complete pooling "
                    "within tribes fix a small tau)"
                )

    # ------------------------------------------------------------------ declaration
    def parameters(self):
        shape = (self.num_components,)
        return (
            Parameter("weights", "simplex", shape),
            Parameter("mu", "ordered", shape),
            Parameter("tau", "positive", shape),
        )

    def default_priors(self):
        k = self.num_components
        weights = 1.0 if k == 1 else dist.Dirichlet(jnp.full((k,), DIRICHLET_CONCENTRATION))
        return {"weights": weights, "mu": dist.Normal(0.0, 10.0), "tau": dist.HalfNormal(5.0)}

    def dims(self):
        return {name: [COMPONENT_DIM] for name in ("weights", "mu", "tau", "log_tau")}

    def coords(self):
        return {COMPONENT_DIM: list(range(self.num_components))}

    def check_data(self, data) -> None:
        """Standard errors must be positive."""
        super().check_data(data)
        data.require_rows(
            self.scale, data.fields[self.scale] > 0, "must be > 0", context=type(self).__name__
        )

    def check_inputs(self, data) -> None:
        """New rows for ``predict`` need positive standard errors too."""
        data.require(self.scale, context=type(self).__name__)
        data.require_rows(
            self.scale, data.fields[self.scale] > 0, "must be > 0", context=type(self).__name__
        )

    # ------------------------------------------------------------------ per-client algebra
    def statistics(self, fields, mask):
        """:class:`~hierfl.NormalNormal`'s statistics: precision, weighted sums, log norm."""
        return self._tribe.statistics(fields, mask)

    @staticmethod
    def _tribes(phi):
        return {"mu": phi["mu"], "tau": phi["tau"]}

    def _log_joint(self, phi, stats):
        r""":math:`\log w_k + \log p(D_i \mid z_i = k, \phi)` for every tribe, shape ``[K]``."""
        return jnp.log(phi["weights"]) + self._tribe.log_marginal(self._tribes(phi), stats)

    def log_marginal(self, phi, stats):
        return jax.scipy.special.logsumexp(self._log_joint(phi, stats), axis=-1)

    def responsibilities(self, phi, stats):
        r""":math:`P(z_i = k \mid \phi, D_i)` for every tribe, shape ``[K]``."""
        return jax.nn.softmax(self._log_joint(phi, stats), axis=-1)

    def conditional(self, phi, stats):
        mixing = dist.Categorical(probs=self.responsibilities(phi, stats))
        return dist.MixtureSameFamily(mixing, self._tribe.conditional(self._tribes(phi), stats))

    def prior(self, phi):
        mixing = dist.Categorical(probs=phi["weights"])
        return dist.MixtureSameFamily(mixing, dist.Normal(phi["mu"], phi["tau"]))

    def likelihood(self, phi, theta, data: ModelData):
        return self._tribe.likelihood(phi, theta, data)

    def model(self, data: ModelData):
        r"""The NumPyro model: :math:`\theta_i` from the marginal mixture prior (centred).

        ``weights``, ``mu``, ``tau`` are global sites (``mu`` on NumPyro's ordered
        transform); ``theta`` is sampled in the ``client`` plate from ``MixtureSameFamily``.
        """
        super().model(data)

    def reparam_config(self):
        """None: a mixture prior has no non-centred (location-scale) form."""
        return {}

    def __repr__(self) -> str:
        parts = [f"num_components={self.num_components}"]
        for r in self.priors:
            if r.site is None:
                parts.append(f"{r.parameter.name}={r.value.tolist()}")
                continue
            prior = r.distribution
            while isinstance(prior, dist.Independent | dist.ExpandedDistribution):
                prior = prior.base_dist  # name the prior the user gave, not its expansion
            parts.append(f"{r.site}~{type(prior).__name__}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ------------------------------------------------------------------ initialization
    def initial_globals(self, data: ClientData) -> dict[str, np.ndarray]:
        r"""Starting values of :math:`\phi` from the clients' initial-gradient directions.

        Each client computes, at the pooled mean :math:`m = \sum_i p_i \bar y_i / \sum_i p_i`,
        the gradient of its log-likelihood :math:`g_i = p_i (\bar y_i - m)` and its Newton
        step :math:`g_i / p_i = \bar y_i - m` (its direction, scaled by its own curvature).
        The steps are clustered by one-dimensional k-means started at the :math:`K` quantiles
        (one round: each client sends :math:`p_i` and :math:`\bar y_i`, which the exact engine
        receives anyway). Then ``weights`` are the cluster fractions (add-one smoothed, so none
        is 0), ``mu`` is :math:`m` plus the sorted cluster centres, and ``tau`` the
        within-cluster spread of :math:`\bar y_i` beyond the clients' own noise. Fixed
        parameters keep their values.

        The engines have no hook for initial values (see the module docstring); use this to
        start your own sampler or as a hard-clustering baseline.

        Returns
        -------
        dict of str to ndarray
            ``{"weights": [K], "mu": [K], "tau": [K]}``.
        """
        self.check_data(data)
        fields, mask = data.padded()
        stats = jax.vmap(self.statistics)(
            {k: jnp.asarray(fields[k], jnp.result_type(float)) for k in self.required},
            jnp.asarray(mask),
        )
        precision = np.asarray(stats["precision"], np.float64)
        mean = np.asarray(stats["weighted_sum"], np.float64) / precision
        pooled = np.sum(precision * mean) / np.sum(precision)
        step = mean - pooled  # the Newton step g_i / p_i of each client at the pooled mean
        k = self.num_components
        centres = np.quantile(step, (np.arange(k) + 0.5) / k)
        labels = np.zeros(step.shape, dtype=np.int64)
        for _ in range(KMEANS_ITERATIONS):
            labels = np.argmin(np.abs(step[:, None] - centres[None, :]), axis=1)
            updated = np.array(
                [step[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(k)]
            )
            if np.allclose(updated, centres):
                break
            centres = updated
        order = np.argsort(centres)
        centres, relabel = centres[order], np.argsort(order)
        labels = relabel[labels]
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        noise = 1.0 / precision
        floor = MINIMUM_SPREAD_FRACTION * np.sqrt(np.median(noise))
        spread = np.array(
            [
                np.sqrt(max(np.var(mean[labels == j]) - np.mean(noise[labels == j]), 0.0))
                if counts[j] > 1
                else 0.0
                for j in range(k)
            ]
        )
        mu = pooled + centres
        mu = mu + np.arange(k) * np.finfo(np.float32).eps * np.maximum(1.0, np.abs(mu))  # strict
        values = {
            "weights": (counts + 1.0) / (counts.sum() + k),
            "mu": mu,
            "tau": np.maximum(spread, floor),
        }
        for r in self.priors:
            if r.site is None:
                values[r.parameter.name] = np.asarray(r.value, np.float64)
        return values


def membership(fit, *, batch_size: int = 1024):
    r"""Each client's posterior tribe membership probabilities, clients x components.

    :math:`P(z_i = k \mid D_1..D_N) = E_{\phi \mid D}[r_{ik}(\phi)]`: the tribe
    responsibilities given each posterior draw of :math:`\phi` and the client's statistics,
    averaged over the draws. Works for any engine's fit of a :class:`NormalMixture` (for
    ``nuts`` it Rao-Blackwellizes the assignment: no draw of :math:`z_i` is needed).

    Parameters
    ----------
    fit : hierfl.Fit
        A fit of a :class:`NormalMixture`.
    batch_size : int
        Clients evaluated together (memory is ``batch_size x draws x K``).

    Returns
    -------
    pandas.DataFrame
        Index ``client`` (the client ids), columns ``component`` ``0..K-1``; rows sum to 1.

    Raises
    ------
    TypeError
        The fit is not of a :class:`NormalMixture`.
    """
    import pandas as pd

    from .engines.exact import _global_params

    family = getattr(fit.model, "__self__", None)
    if not isinstance(family, NormalMixture):
        raise TypeError(
            f"membership needs a fit of a NormalMixture, got a fit of "
            f"{type(family).__name__ if family is not None else fit.model!r}"
        )
    float_type = jnp.result_type(float)
    draws = {
        name: jnp.asarray(np.reshape(value, (-1,) + np.shape(value)[2:]), float_type)
        for name, value in fit.global_samples.items()
    }
    phi = _global_params(family, draws)
    fields, mask = fit.data.padded()
    stats = jax.vmap(family.statistics)(
        {name: jnp.asarray(fields[name], float_type) for name in family.required},
        jnp.asarray(mask),
    )

    def one_client(stats_i):
        per_draw = jax.vmap(family.responsibilities, in_axes=(0, None))(phi, stats_i)
        return jnp.mean(per_draw, axis=0)

    probabilities = jax.lax.map(one_client, stats, batch_size=batch_size)
    return pd.DataFrame(
        np.asarray(probabilities, np.float64),
        index=pd.Index(fit.client_ids, name="client"),
        columns=pd.Index(range(family.num_components), name=COMPONENT_DIM),
    )
