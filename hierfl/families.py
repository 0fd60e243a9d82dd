r"""Conjugate families: hierarchical models whose client parameters integrate out exactly.

Each family is a frozen object that holds its priors on the global parameters ``phi`` and
gives the exact engine four pure, per-client functions (vmapped over clients by the engine):

``statistics(fields, mask)``
    The client's sufficient statistics, from its own padded rows.
``log_marginal(phi, stats)``
    :math:`\log p(D_i \mid \phi)` with :math:`\theta_i` integrated out in closed form.
``conditional(phi, stats)``
    The NumPyro distribution of :math:`\theta_i \mid \phi, D_i`.
``prior(phi)``
    The distribution of :math:`\theta_{new} \mid \phi`, for an unseen client.

and one NumPyro model, :meth:`model`, that writes the same hierarchy with an explicit client
plate; ``method="nuts"`` runs it on the pooled data, and ``predict`` and the ArviZ
conversion run it too. So the exact engine and the reference share the model by
construction.

All families take ``priors``: a dict of NumPyro distributions (or fixed values, or
``log_<name>`` priors) on the global parameters; see :mod:`hierfl.priors`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import betaln, gammaln

from .data import ModelData
from .priors import Parameter, PriorError, resolve_priors, sample_globals

__all__ = [
    "BetaBinomial",
    "ConjugateFamily",
    "GammaPoisson",
    "LinearMixed",
    "NormalNormal",
]

_LOG_2PI = math.log(2.0 * math.pi)
#: added to the diagonal of a conditional covariance of several random effects: it stays
#: positive definite where a spread is 0 (complete pooling; an sd of 1e-5 in those units)
CONDITIONAL_JITTER = 1e-10
#: concentration of :class:`LinearMixed`'s default LKJ prior on the random effects'
#: correlation, density proportional to :math:`\det(\Omega)^{\eta - 1}`: 2 mildly favours weak
#: correlations over strong ones (the weakly informative default of Stan's manual and
#: brms; 1 is uniform over correlation matrices)
LKJ_CONCENTRATION = 2.0


class ConjugateFamily:
    """Base of the conjugate families (abstract; the concrete families are final)."""

    #: name of the per-client sample site
    client_site: str = "theta"
    #: names of the fields the family reads (the observed one included)
    required: tuple[str, ...] = ()
    #: name of the observed field and sample site
    observed: str = "y"

    def __init__(self, priors: Mapping[str, Any] | None = None):
        self.priors = resolve_priors(self.parameters(), self.default_priors(), priors)

    # ------------------------------------------------------------------ declared by families
    def parameters(self) -> tuple[Parameter, ...]:
        raise NotImplementedError  # abstract

    def default_priors(self) -> dict[str, Any]:
        raise NotImplementedError  # abstract

    def statistics(self, fields: Mapping[str, Any], mask) -> dict[str, Any]:
        raise NotImplementedError  # abstract

    def log_marginal(self, phi: Mapping[str, Any], stats: Mapping[str, Any]):
        raise NotImplementedError  # abstract

    def conditional(self, phi: Mapping[str, Any], stats: Mapping[str, Any]):
        raise NotImplementedError  # abstract

    def prior(self, phi: Mapping[str, Any]):
        raise NotImplementedError  # abstract

    def likelihood(self, phi: Mapping[str, Any], theta, data: ModelData):
        """Distribution of every observation given ``theta`` indexed per observation."""
        raise NotImplementedError  # abstract

    # ------------------------------------------------------------------ shared
    def server_statistics(self, stats: Mapping[str, Any], received) -> dict[str, Any]:
        """What the server keeps of the clients' statistics (rows not received are dropped
        from every sum). Families whose collapsed likelihood has summable parts pre-sum them
        here, once, so each evaluation of :meth:`total_log_marginal` touches less per client.
        """
        return {"clients": stats, "received": received}

    def total_log_marginal(self, phi: Mapping[str, Any], server_stats: Mapping[str, Any]):
        r""":math:`\sum_i \log p(D_i \mid \phi)` over the received clients."""
        terms = jax.vmap(self.log_marginal, in_axes=(None, 0))(phi, server_stats["clients"])
        return jnp.sum(jnp.where(server_stats["received"], terms, 0.0))

    def dims(self) -> dict[str, list[str]]:
        """ArviZ dims of the sites (beyond ``chain``/``draw``)."""
        return {}

    def coords(self) -> dict[str, list]:
        """ArviZ coordinates of the dims in :meth:`dims` (the client dim excluded)."""
        return {}

    def sample_globals(self) -> dict[str, Any]:
        """Sample ``phi`` inside a NumPyro model, with this family's priors."""
        return sample_globals(self.priors)

    @property
    def global_sites(self) -> tuple[str, ...]:
        """Names of the global parameters that are inferred (not fixed)."""
        return tuple(r.parameter.name for r in self.priors if r.site is not None)

    def check_data(self, data) -> None:
        """Raise a :class:`~hierfl.data.DataError` naming what the data lack."""
        data.require(*self.required, context=type(self).__name__)

    def check_inputs(self, data) -> None:
        """Check the input fields of new rows (``Fit.predict``; the response is absent):
        raise a :class:`~hierfl.data.DataError` naming the client, field and row. The
        default checks nothing beyond what ``predict`` checks for every model (finite values,
        equal lengths)."""

    def model(self, data: ModelData):
        """The family as a NumPyro model with one client plate (the centralized reference)."""
        phi = self.sample_globals()
        with numpyro.plate("client", data.num_clients):
            theta = self._sample_client(phi)
        self._observe(phi, theta, data)

    def _spread_fixed_at_zero(self) -> bool:
        """True when the client spread ``tau`` is fixed at 0 (complete pooling)."""
        return any(
            r.parameter.name == "tau" and r.site is None and not np.any(r.value)
            for r in self.priors
        )

    def _sample_client(self, phi):
        return numpyro.sample(self.client_site, self.prior(phi))

    def _observe(self, phi, theta, data: ModelData):
        with numpyro.plate("obs", data.num_obs):
            numpyro.sample(
                self.observed, self.likelihood(phi, theta, data), obs=data.get(self.observed)
            )

    def reparam_config(self) -> dict[str, Any]:
        """Reparameterizations that make centralized NUTS mix well (non-centred clients)."""
        return {}

    def __repr__(self) -> str:
        parts = []
        for r in self.priors:
            if r.site is None:
                parts.append(f"{r.parameter.name}={r.value.tolist()}")
            else:
                parts.append(f"{r.site}~{type(r.distribution).__name__}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _masked_sum(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0), axis=0)


class NormalNormal(ConjugateFamily):
    r"""Normal observations with known scales, Normal client means.

    .. math::
        \mu \sim p(\mu),\quad \tau \sim p(\tau),\quad
        \theta_i \mid \mu,\tau \sim N(\mu, \tau^2),\quad
        y_{ij} \mid \theta_i \sim N(\theta_i, \sigma_{ij}^2)

    with :math:`\sigma_{ij}` known (field ``sigma``). Eight schools is the case of one
    observation per client.

    Parameters
    ----------
    priors : dict, optional
        On ``mu`` (default ``Normal(0, 10)``) and ``tau`` (default ``HalfCauchy(5)``), or
        ``log_tau``.
    observed, scale : str
        Field names of the observations and their known standard deviations.
    client_site : str
        Name of :math:`\theta_i` in the posterior.

    Examples
    --------
    >>> import numpyro.distributions as dist
    >>> import hierfl as hf
    >>> hf.NormalNormal(priors={"mu": dist.Normal(0, 5), "tau": dist.HalfCauchy(5)})
    NormalNormal(mu~Normal, tau~HalfCauchy)
    """

    def __init__(
        self, priors=None, *, observed: str = "y", scale: str = "sigma", client_site: str = "theta"
    ):
        self.observed, self.scale, self.client_site = observed, scale, client_site
        self.required = (observed, scale)
        super().__init__(priors)

    def check_data(self, data) -> None:
        """Standard errors must be positive."""
        super().check_data(data)
        data.require_rows(
            self.scale, data.fields[self.scale] > 0, "must be > 0", context=type(self).__name__
        )

    def parameters(self):
        return (Parameter("mu", "real"), Parameter("tau", "positive"))

    def default_priors(self):
        return {"mu": dist.Normal(0.0, 10.0), "tau": dist.HalfCauchy(5.0)}

    def statistics(self, fields, mask):
        y, s = fields[self.observed], fields[self.scale]
        w = jnp.where(mask, 1.0 / s**2, 0.0)
        return {
            "precision": jnp.sum(w),
            "weighted_sum": jnp.sum(w * y),
            "weighted_square": jnp.sum(w * y**2),
            "log_norm": _masked_sum(jnp.log(2.0 * jnp.pi * s**2), mask),
        }

    def log_marginal(self, phi, stats):
        p, ws = stats["precision"], stats["weighted_sum"]
        ybar = ws / p
        residual = stats["weighted_square"] - ws * ybar
        return (
            -0.5 * stats["log_norm"]
            - 0.5 * residual
            + 0.5 * (_LOG_2PI - jnp.log(p))
            + dist.Normal(phi["mu"], jnp.sqrt(phi["tau"] ** 2 + 1.0 / p)).log_prob(ybar)
        )

    def conditional(self, phi, stats):
        t2 = phi["tau"] ** 2
        p, ws = stats["precision"], stats["weighted_sum"]
        denominator = 1.0 + t2 * p
        return dist.Normal((phi["mu"] + t2 * ws) / denominator, jnp.sqrt(t2 / denominator))

    def prior(self, phi):
        return dist.Normal(phi["mu"], phi["tau"])

    def likelihood(self, phi, theta, data):
        return dist.Normal(theta[data.client], data[self.scale])

    def model(self, data: ModelData):
        phi = self.sample_globals()
        with numpyro.plate("client", data.num_clients):
            if self._spread_fixed_at_zero():  # complete pooling: every client is the population
                theta = numpyro.deterministic(
                    self.client_site, jnp.broadcast_to(phi["mu"], (data.num_clients,))
                )
            else:
                theta = self._sample_client(phi)
        self._observe(phi, theta, data)

    def reparam_config(self):
        from numpyro.infer.reparam import LocScaleReparam

        return {self.client_site: LocScaleReparam(centered=0)}


class LinearMixed(ConjugateFamily):
    r"""Linear mixed model: shared fixed effects, per-client random effects, unknown noise.

    .. math::
        y_{ij} = x_{ij}^\top \beta + z_{ij}^\top b_i + \varepsilon_{ij},\quad
        b_i \sim N(0, \mathrm{diag}(\tau^2)),\quad \varepsilon_{ij} \sim N(0, \sigma^2)

    :math:`x` holds an intercept and the ``fixed`` fields (client-level covariates such as a
    county's log uranium are fixed effects repeated over the client's rows); :math:`z` holds
    an intercept (``random_intercept=True``) and the ``random`` fields (random slopes).
    With :math:`b_i` integrated out, :math:`y_i \sim N(X_i\beta, \sigma^2 I + Z_i D^2
    Z_i^\top)`, :math:`D = \mathrm{diag}(\tau)`; the engine evaluates it from the client's
    statistics :math:`n, y^\top y, X^\top y, X^\top X, Z^\top y, Z^\top X, Z^\top Z` with the
    Woodbury identity, in a form that stays exact at :math:`\tau = 0` (complete pooling).

    **Correlated random effects** (``correlated=True``; lme4's ``(x | g)``, where the default
    is lme4's ``(x || g)``):

    .. math::
        b_i \sim N(0, G),\quad G = \mathrm{diag}(\tau)\,\Omega\,\mathrm{diag}(\tau),\quad
        \Omega = L L^\top,\quad L \sim \mathrm{LKJCholesky}(q, \eta)

    with :math:`L` the lower Cholesky factor of the correlation matrix :math:`\Omega` (global
    site ``correlation_cholesky``; :math:`\Omega` is recorded as the deterministic site
    ``correlation``, both on dims ``effect_row`` x ``effect_column``). With the factor
    :math:`F = \mathrm{diag}(\tau) L` (so :math:`G = F F^\top`) and :math:`r_i = y_i - X_i
    \beta`, the Woodbury identity gives

    .. math::
        \log p(y_i \mid \phi) = -\tfrac12\Big(n_i \log 2\pi\sigma^2 + \log\det M_i
            + \frac{r_i^\top r_i}{\sigma^2} - \frac{c_i^\top M_i^{-1} c_i}{\sigma^4}\Big),
        \quad M_i = I + \frac{F^\top Z_i^\top Z_i F}{\sigma^2},\quad c_i = F^\top Z_i^\top r_i

    and :math:`b_i \mid \phi, y_i = F u_i`, :math:`u_i \sim N(M_i^{-1} c_i / \sigma^2,
    M_i^{-1})`. The diagonal model is the case :math:`L = I`.

    Parameters
    ----------
    response : str
        Field of the response.
    fixed, random : sequence of str
        Fields with fixed effects, and fields with random slopes.
    intercept, random_intercept : bool
    priors : dict, optional
        On ``beta`` (default ``Normal(0, 10)`` per coefficient), ``sigma`` (``HalfNormal(5)``)
        and ``tau`` (``HalfNormal(5)`` per random effect), or their ``log_`` forms; a number
        fixes the parameter. With ``correlated=True`` also on ``correlation_cholesky``
        (default ``LKJCholesky(q, 2.0)``, :data:`LKJ_CONCENTRATION`; a fixed value is a lower
        Cholesky factor of a correlation matrix, e.g. ``numpy.eye(q)``).
    client_site : str
        Name of :math:`b_i` in the posterior.
    correlated : bool
        Correlated random effects (above); needs at least two of them.

    Examples
    --------
    >>> import hierfl as hf
    >>> family = hf.LinearMixed(response="log_radon", fixed=["floor"], priors={"tau": 0.0})
    >>> family.coefficient_names
    ['intercept', 'floor']
    >>> hf.LinearMixed(fixed=["x"], random=["x"], correlated=True).global_sites
    ('beta', 'sigma', 'tau', 'correlation_cholesky')
    """

    #: the global site of the correlation's lower Cholesky factor (``correlated=True``)
    correlation_cholesky_site = "correlation_cholesky"
    #: the deterministic site of the correlation matrix (``correlated=True``)
    correlation_site = "correlation"
    #: ArviZ dims of the (effect x effect) correlation and its Cholesky factor
    correlation_dims = ("effect_row", "effect_column")

    def __init__(
        self,
        *,
        response: str = "y",
        fixed: Sequence[str] = (),
        random: Sequence[str] = (),
        intercept: bool = True,
        random_intercept: bool = True,
        priors=None,
        client_site: str = "b",
        correlated: bool = False,
    ):
        self.observed, self.client_site = response, client_site
        self.correlated = bool(correlated)
        self.fixed, self.random = tuple(fixed), tuple(random)
        self.intercept, self.random_intercept = intercept, random_intercept
        self.coefficient_names = (["intercept"] if intercept else []) + list(self.fixed)
        self.effect_names = (["intercept"] if random_intercept else []) + list(self.random)
        if not self.coefficient_names:
            raise ValueError("LinearMixed needs an intercept or at least one fixed field")
        if not self.effect_names:
            raise ValueError("LinearMixed needs a random intercept or at least one random field")
        if self.correlated and len(self.effect_names) < 2:
            raise ValueError(
                f"LinearMixed(correlated=True) needs at least two random effects; this model "
                f"has one ({self.effect_names[0]!r}), so there is no correlation to model: "
                "leave correlated out, or add a random field (random=[...])"
            )
        self.required = (response, *self.fixed, *self.random)
        if not self.correlated and isinstance(priors, Mapping):
            if self.correlation_cholesky_site in priors:
                raise PriorError(
                    f"prior for {self.correlation_cholesky_site!r}: the random effects are "
                    "uncorrelated unless LinearMixed(..., correlated=True)"
                )
        super().__init__(priors)

    @property
    def num_coefficients(self) -> int:
        return len(self.coefficient_names)

    @property
    def num_effects(self) -> int:
        return len(self.effect_names)

    def parameters(self):
        q = self.num_effects
        parameters = (
            Parameter("beta", "real", (self.num_coefficients,)),
            Parameter("sigma", "positive"),
            Parameter("tau", "positive", () if q == 1 else (q,)),
        )
        if self.correlated:
            parameters += (Parameter(self.correlation_cholesky_site, "corr_cholesky", (q, q)),)
        return parameters

    def default_priors(self):
        priors = {
            "beta": dist.Normal(0.0, 10.0),
            "sigma": dist.HalfNormal(5.0),
            "tau": dist.HalfNormal(5.0),
        }
        if self.correlated:
            priors[self.correlation_cholesky_site] = dist.LKJCholesky(
                self.num_effects, LKJ_CONCENTRATION
            )
        return priors

    def dims(self):
        dims = {"beta": ["coef"]}
        if self.num_effects > 1:
            dims["tau"] = ["effect"]
            dims[self.client_site] = ["client", "effect"]
        if self.correlated:
            dims[self.correlation_cholesky_site] = list(self.correlation_dims)
            dims[self.correlation_site] = list(self.correlation_dims)
        return dims

    def coords(self):
        coords = {"coef": self.coefficient_names}
        if self.num_effects > 1:
            coords["effect"] = self.effect_names
        if self.correlated:
            coords.update(dict.fromkeys(self.correlation_dims, self.effect_names))
        return coords

    def sample_globals(self):
        r"""Sample ``phi``; with ``correlated=True`` and an inferred correlation, also record
        :math:`\Omega = L L^\top` as the deterministic site ``correlation``."""
        phi = super().sample_globals()
        if self.correlated and self.correlation_cholesky_site in self.global_sites:
            cholesky = phi[self.correlation_cholesky_site]
            numpyro.deterministic(self.correlation_site, cholesky @ jnp.swapaxes(cholesky, -1, -2))
        return phi

    def _design(self, fields, rows):
        """Fixed and random design matrices from per-row fields; ``rows`` is any per-row array
        (it sets the intercept column's shape, so the response is not needed to predict)."""
        ones = [jnp.ones(jnp.shape(rows), dtype=jnp.result_type(float))]
        x = jnp.stack((ones if self.intercept else []) + [fields[f] for f in self.fixed], -1)
        z = jnp.stack(
            (ones if self.random_intercept else []) + [fields[f] for f in self.random], -1
        )
        return x, z

    def statistics(self, fields, mask):
        y = fields[self.observed]
        x, z = self._design(fields, y)
        m = mask.astype(y.dtype)
        xm, zm, ym = x * m[:, None], z * m[:, None], y * m
        return {
            "n": jnp.sum(m),
            "yy": jnp.sum(ym * y),
            "xy": xm.T @ y,
            "xx": xm.T @ x,
            "zy": zm.T @ y,
            "zx": zm.T @ x,
            "zz": zm.T @ z,
        }

    def _scales(self, phi):
        return jnp.broadcast_to(phi["tau"], (self.num_effects,))

    def covariance_factor(self, phi):
        r"""The random effects' covariance factor :math:`F`, :math:`G = F F^\top`, ``[q, q]``:
        :math:`\mathrm{diag}(\tau) L` (``correlated=True``), else :math:`\mathrm{diag}(\tau)`."""
        d = self._scales(phi)
        if not self.correlated:
            return jnp.diag(d)
        return d[:, None] * phi[self.correlation_cholesky_site]

    def _woodbury(self, phi, stats):
        """Cholesky of M = I + D Z'Z D / sigma^2 and c = D Z'r, with r = y - X beta.

        With one random effect M is a scalar and the Cholesky factor its square root; the
        scalar path avoids a batched 1x1 LAPACK call per client. With correlated effects D is
        the factor F = diag(tau) L: M = I + F'Z'Z F / sigma^2, c = F'Z'r (and F is returned
        in place of the scales).
        """
        if self.correlated:
            factor = self.covariance_factor(phi)
            s2 = phi["sigma"] ** 2
            c = factor.T @ (stats["zy"] - stats["zx"] @ phi["beta"])
            m = jnp.eye(self.num_effects) + factor.T @ stats["zz"] @ factor / s2
            return jnp.linalg.cholesky(m), c, s2, factor
        d = self._scales(phi)
        s2 = phi["sigma"] ** 2
        c = d * (stats["zy"] - stats["zx"] @ phi["beta"])
        if self.num_effects == 1:
            chol = jnp.sqrt(1.0 + d[0] ** 2 * stats["zz"][0, 0] / s2)[None, None]
            return chol, c, s2, d
        m = jnp.eye(self.num_effects) + d[:, None] * stats["zz"] * d[None, :] / s2
        return jnp.linalg.cholesky(m), c, s2, d

    def log_marginal(self, phi, stats):
        beta = phi["beta"]
        chol, c, s2, _ = self._woodbury(phi, stats)
        rr = stats["yy"] - 2.0 * beta @ stats["xy"] + beta @ stats["xx"] @ beta
        if self.num_effects == 1:
            v = c / chol[0, 0]
        else:
            v = jax.scipy.linalg.solve_triangular(chol, c, lower=True)
        quad = rr / s2 - (v @ v) / s2**2
        logdet = stats["n"] * jnp.log(s2) + 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
        return -0.5 * (stats["n"] * _LOG_2PI + logdet + quad)

    def server_statistics(self, stats, received):
        """Sums of ``n, y'y, X'y, X'X`` over received clients, and per client only ``Z'y,
        Z'X, Z'Z`` (zeroed for clients not received, which then contribute exactly 0)."""
        keep = received.astype(stats["n"].dtype)

        def total(name):
            value = stats[name]
            return jnp.tensordot(keep, value, axes=(0, 0))

        def rows(name):
            value = stats[name]
            return value * keep.reshape((-1,) + (1,) * (value.ndim - 1))

        return {
            "n": total("n"),
            "yy": total("yy"),
            "xy": total("xy"),
            "xx": total("xx"),
            "zy": rows("zy"),
            "zx": rows("zx"),
            "zz": rows("zz"),
        }

    def total_log_marginal(self, phi, server_stats):
        beta, s2 = phi["beta"], phi["sigma"] ** 2
        d = self._scales(phi)
        rr = server_stats["yy"] - 2.0 * beta @ server_stats["xy"] + beta @ server_stats["xx"] @ beta
        residual = server_stats["zy"] - server_stats["zx"] @ beta  # Z_i'r_i, [clients, q]
        if self.num_effects == 1:  # scalar M_i (correlated needs two effects)
            c = d * residual
            m = 1.0 + d[0] ** 2 * server_stats["zz"][:, 0, 0] / s2
            per_client = jnp.log(m) - c[:, 0] ** 2 / (m * s2**2)
        else:
            if self.correlated:  # F = diag(tau) L: c_i = F' Z_i'r_i, M_i = I + F'Z_i'Z_i F / s2
                factor = self.covariance_factor(phi)
                c = residual @ factor
                m = jnp.eye(self.num_effects) + factor.T @ server_stats["zz"] @ factor / s2
            else:
                c = d * residual
                m = jnp.eye(self.num_effects) + d[:, None] * server_stats["zz"] * d[None, :] / s2
            chol = jnp.linalg.cholesky(m)
            v = jax.scipy.linalg.solve_triangular(chol, c[..., None], lower=True)[..., 0]
            per_client = (
                2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
                - jnp.sum(v**2, -1) / s2**2
            )
        n = server_stats["n"]
        return -0.5 * (n * (_LOG_2PI + jnp.log(s2)) + rr / s2 + jnp.sum(per_client))

    def conditional(self, phi, stats):
        chol, c, s2, d = self._woodbury(phi, stats)
        if self.correlated:  # b = F u with u | y ~ N(M^{-1} c / sigma^2, M^{-1}); d is F
            mean_u = jax.scipy.linalg.cho_solve((chol, True), c) / s2
            inv_chol = jax.scipy.linalg.solve_triangular(
                chol, jnp.eye(self.num_effects), lower=True
            )
            root = d @ inv_chol.T  # F M^{-1} F' = root root'
            jitter = CONDITIONAL_JITTER * jnp.eye(self.num_effects)
            return dist.MultivariateNormal(d @ mean_u, covariance_matrix=root @ root.T + jitter)
        if self.num_effects == 1:
            m = chol[0, 0] ** 2
            return dist.Normal(d[0] * c[0] / (m * s2), d[0] / chol[0, 0])
        # b = D u with u | y ~ N(M^{-1} c / sigma^2, M^{-1})
        mean_u = jax.scipy.linalg.cho_solve((chol, True), c) / s2
        inv_chol = jax.scipy.linalg.solve_triangular(chol, jnp.eye(self.num_effects), lower=True)
        covariance = d[:, None] * (inv_chol.T @ inv_chol) * d[None, :]
        jitter = CONDITIONAL_JITTER * jnp.eye(self.num_effects)
        return dist.MultivariateNormal(d * mean_u, covariance_matrix=covariance + jitter)

    def prior(self, phi):
        if self.correlated:
            q = self.num_effects
            return dist.MultivariateNormal(jnp.zeros(q), scale_tril=self.covariance_factor(phi))
        d = self._scales(phi)
        if self.num_effects == 1:
            return dist.Normal(0.0, d[0])
        return dist.Normal(jnp.zeros(self.num_effects), d).to_event(1)

    def mean(self, phi, theta, data: ModelData):
        """Linear predictor of every observation."""
        x, z = self._design(data.fields, data.client)
        b = theta[data.client]
        if self.num_effects == 1:
            b = b[..., None]
        return x @ phi["beta"] + jnp.sum(z * b, axis=-1)

    def likelihood(self, phi, theta, data):
        return dist.Normal(self.mean(phi, theta, data), phi["sigma"])

    def model(self, data: ModelData):
        phi = self.sample_globals()
        with numpyro.plate("client", data.num_clients):
            if self._spread_fixed_at_zero():  # complete pooling: no client effect at all
                shape = (
                    (data.num_clients,)
                    if self.num_effects == 1
                    else (data.num_clients, self.num_effects)
                )
                theta = numpyro.deterministic(self.client_site, jnp.zeros(shape))
            elif self.correlated:
                theta = numpyro.sample(self.client_site, self._affine_prior(phi))
            else:
                theta = numpyro.sample(self.client_site, self.prior(phi))
        numpyro.deterministic("mu", self.mean(phi, theta, data))
        self._observe(phi, theta, data)

    def _affine_prior(self, phi):
        """:meth:`prior` of correlated effects written as ``b = F u``, ``u ~ N(0, I)``: the
        same distribution, in the form NumPyro's ``TransformReparam`` makes non-centred."""
        q = self.num_effects
        return dist.TransformedDistribution(
            dist.Normal(jnp.zeros(q), 1.0).to_event(1),
            dist.transforms.LowerCholeskyAffine(jnp.zeros(q), self.covariance_factor(phi)),
        )

    def reparam_config(self):
        """Non-centred random effects for NUTS: ``b = D u`` (``LocScaleReparam``; site
        ``<client_site>_decentered``), or with ``correlated=True`` ``b = F u``
        (``TransformReparam``; site ``<client_site>_base``), ``u ~ N(0, I)``."""
        from numpyro.infer.reparam import LocScaleReparam, TransformReparam

        if self.correlated:
            return {self.client_site: TransformReparam()}
        return {self.client_site: LocScaleReparam(centered=0)}


class BetaBinomial(ConjugateFamily):
    r"""Binomial counts with a Beta prior on each client's probability.

    .. math::
        p_i \sim \mathrm{Beta}(m\kappa, (1-m)\kappa),\quad
        y_{ij} \sim \mathrm{Binomial}(n_{ij}, p_i)

    with population mean :math:`m` and concentration :math:`\kappa`.

    Parameters
    ----------
    priors : dict, optional
        On ``mean`` (default ``Uniform(0, 1)``) and ``concentration`` (default
        ``LogNormal(2, 1.5)``), or ``log_concentration``.
    observed, trials : str
        Fields of successes and trials.
    """

    def __init__(
        self, priors=None, *, observed: str = "y", trials: str = "trials", client_site: str = "p"
    ):
        self.observed, self.trials, self.client_site = observed, trials, client_site
        self.required = (observed, trials)
        super().__init__(priors)

    def check_data(self, data) -> None:
        """Successes and trials must be whole numbers with ``0 <= y <= trials``."""
        super().check_data(data)
        name = type(self).__name__
        y, n = data.fields[self.observed], data.fields[self.trials]
        for field, values in ((self.trials, n), (self.observed, y)):
            data.require_rows(
                field,
                (values >= 0) & (values == np.round(values)),
                "must be a whole number >= 0",
                context=name,
            )
        data.require_rows(self.observed, y <= n, f"must be <= {self.trials!r}", context=name)

    def parameters(self):
        return (Parameter("mean", "unit"), Parameter("concentration", "positive"))

    def default_priors(self):
        return {"mean": dist.Uniform(0.0, 1.0), "concentration": dist.LogNormal(2.0, 1.5)}

    def _ab(self, phi):
        return phi["mean"] * phi["concentration"], (1.0 - phi["mean"]) * phi["concentration"]

    def statistics(self, fields, mask):
        y, n = fields[self.observed], fields[self.trials]
        log_choose = gammaln(n + 1.0) - gammaln(y + 1.0) - gammaln(n - y + 1.0)
        return {
            "successes": _masked_sum(y, mask),
            "trials": _masked_sum(n, mask),
            "log_choose": _masked_sum(log_choose, mask),
        }

    def log_marginal(self, phi, stats):
        a, b = self._ab(phi)
        k, n = stats["successes"], stats["trials"]
        return stats["log_choose"] + betaln(a + k, b + n - k) - betaln(a, b)

    def conditional(self, phi, stats):
        a, b = self._ab(phi)
        k, n = stats["successes"], stats["trials"]
        return dist.Beta(a + k, b + n - k)

    def prior(self, phi):
        return dist.Beta(*self._ab(phi))

    def likelihood(self, phi, theta, data):
        return dist.Binomial(data[self.trials].astype(jnp.int32), probs=theta[data.client])


class GammaPoisson(ConjugateFamily):
    r"""Poisson counts with a Gamma prior on each client's rate.

    .. math::
        \lambda_i \sim \mathrm{Gamma}(\alpha, \alpha / m),\quad
        y_{ij} \sim \mathrm{Poisson}(\lambda_i e_{ij})

    with population mean rate :math:`m`, shape :math:`\alpha` and exposure :math:`e` (field
    ``exposure``; all ones when ``exposure=None``).

    Parameters
    ----------
    priors : dict, optional
        On ``mean`` (default ``LogNormal(0, 2)``) and ``shape`` (default ``LogNormal(1, 1.5)``).
    """

    def __init__(
        self,
        priors=None,
        *,
        observed: str = "y",
        exposure: str | None = "exposure",
        client_site: str = "rate",
    ):
        self.observed, self.exposure, self.client_site = observed, exposure, client_site
        self.required = (observed,) if exposure is None else (observed, exposure)
        super().__init__(priors)

    def check_data(self, data) -> None:
        """Counts must be whole numbers ``>= 0`` and exposures positive."""
        super().check_data(data)
        name, y = type(self).__name__, data.fields[self.observed]
        data.require_rows(
            self.observed,
            (y >= 0) & (y == np.round(y)),
            "must be a whole number >= 0",
            context=name,
        )
        if self.exposure is not None:
            data.require_rows(
                self.exposure, data.fields[self.exposure] > 0, "must be > 0", context=name
            )

    def parameters(self):
        return (Parameter("mean", "positive"), Parameter("shape", "positive"))

    def default_priors(self):
        return {"mean": dist.LogNormal(0.0, 2.0), "shape": dist.LogNormal(1.0, 1.5)}

    def _exposure(self, fields):
        y = fields[self.observed]
        return jnp.ones_like(y) if self.exposure is None else fields[self.exposure]

    def statistics(self, fields, mask):
        y, e = fields[self.observed], self._exposure(fields)
        return {
            "count": _masked_sum(y, mask),
            "exposure": _masked_sum(e, mask),
            "log_norm": _masked_sum(y * jnp.log(e) - gammaln(y + 1.0), mask),
        }

    def log_marginal(self, phi, stats):
        alpha = phi["shape"]
        rate = alpha / phi["mean"]
        k, e = stats["count"], stats["exposure"]
        return (
            stats["log_norm"]
            + alpha * jnp.log(rate)
            - gammaln(alpha)
            + gammaln(alpha + k)
            - (alpha + k) * jnp.log(rate + e)
        )

    def conditional(self, phi, stats):
        alpha = phi["shape"]
        return dist.Gamma(alpha + stats["count"], alpha / phi["mean"] + stats["exposure"])

    def prior(self, phi):
        return dist.Gamma(phi["shape"], phi["shape"] / phi["mean"])

    def likelihood(self, phi, theta, data):
        return dist.Poisson(theta[data.client] * self._exposure(data.fields))
