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
from .priors import Parameter, resolve_priors, sample_globals

__all__ = [
    "BetaBinomial",
    "ConjugateFamily",
    "GammaPoisson",
    "LinearMixed",
    "NormalNormal",
]

_LOG_2PI = math.log(2.0 * math.pi)


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
        fixes the parameter.
    client_site : str
        Name of :math:`b_i` in the posterior.

    Examples
    --------
    >>> import hierfl as hf
    >>> family = hf.LinearMixed(response="log_radon", fixed=["floor"], priors={"tau": 0.0})
    >>> family.coefficient_names
    ['intercept', 'floor']
    """

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
    ):
        self.observed, self.client_site = response, client_site
        self.fixed, self.random = tuple(fixed), tuple(random)
        self.intercept, self.random_intercept = intercept, random_intercept
        self.coefficient_names = (["intercept"] if intercept else []) + list(self.fixed)
        self.effect_names = (["intercept"] if random_intercept else []) + list(self.random)
        if not self.coefficient_names:
            raise ValueError("LinearMixed needs an intercept or at least one fixed field")
        if not self.effect_names:
            raise ValueError("LinearMixed needs a random intercept or at least one random field")
        self.required = (response, *self.fixed, *self.random)
        super().__init__(priors)

    @property
    def num_coefficients(self) -> int:
        return len(self.coefficient_names)

    @property
    def num_effects(self) -> int:
        return len(self.effect_names)

    def parameters(self):
        q = self.num_effects
        return (
            Parameter("beta", "real", (self.num_coefficients,)),
            Parameter("sigma", "positive"),
            Parameter("tau", "positive", () if q == 1 else (q,)),
        )

    def default_priors(self):
        return {
            "beta": dist.Normal(0.0, 10.0),
            "sigma": dist.HalfNormal(5.0),
            "tau": dist.HalfNormal(5.0),
        }

    def dims(self):
        dims = {"beta": ["coef"]}
        if self.num_effects > 1:
            dims["tau"] = ["effect"]
            dims[self.client_site] = ["client", "effect"]
        return dims

    def coords(self):
        coords = {"coef": self.coefficient_names}
        if self.num_effects > 1:
            coords["effect"] = self.effect_names
        return coords

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

    def _woodbury(self, phi, stats):
        """Cholesky of M = I + D Z'Z D / sigma^2 and c = D Z'r, with r = y - X beta.

        With one random effect M is a scalar and the Cholesky factor its square root; the
        scalar path avoids a batched 1x1 LAPACK call per client.
        """
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
        c = d * (server_stats["zy"] - server_stats["zx"] @ beta)  # [clients, q]
        if self.num_effects == 1:
            m = 1.0 + d[0] ** 2 * server_stats["zz"][:, 0, 0] / s2
            per_client = jnp.log(m) - c[:, 0] ** 2 / (m * s2**2)
        else:
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
        if self.num_effects == 1:
            m = chol[0, 0] ** 2
            return dist.Normal(d[0] * c[0] / (m * s2), d[0] / chol[0, 0])
        # b = D u with u | y ~ N(M^{-1} c / sigma^2, M^{-1})
        mean_u = jax.scipy.linalg.cho_solve((chol, True), c) / s2
        inv_chol = jax.scipy.linalg.solve_triangular(chol, jnp.eye(self.num_effects), lower=True)
        covariance = d[:, None] * (inv_chol.T @ inv_chol) * d[None, :]
        jitter = 1e-10 * jnp.eye(self.num_effects)
        return dist.MultivariateNormal(d * mean_u, covariance_matrix=covariance + jitter)

    def prior(self, phi):
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
            else:
                theta = numpyro.sample(self.client_site, self.prior(phi))
        numpyro.deterministic("mu", self.mean(phi, theta, data))
        self._observe(phi, theta, data)

    def reparam_config(self):
        from numpyro.infer.reparam import LocScaleReparam

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
