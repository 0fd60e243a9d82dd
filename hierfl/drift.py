r"""Lifelong learning with forgetting: a personal state that drifts as a stationary AR(1).

DESIGN's lifelong-learning mechanism as a conjugate family. Each client's personal parameter
is not one value but a *state* per period :math:`t = 0..T-1`, tied to the population by a
stationary AR(1) around it:

.. math::
    d_{i,0} \sim N(0, \tau^2),\qquad
    d_{i,t} = \rho\, d_{i,t-1} + \sqrt{1 - \rho^2}\,\tau\,\varepsilon_{i,t},\quad
    \varepsilon_{i,t} \sim N(0, 1),

    y_{ij} = x_{ij}^\top \beta + d_{i,\,t_{ij}} + e_{ij},\qquad e_{ij} \sim N(0, \sigma^2),

with :math:`\beta, \tau, \rho, \sigma` global. Every state has the population's marginal
:math:`N(0, \tau^2)` and :math:`\mathrm{Cov}(d_{i,s}, d_{i,t}) = \tau^2 \rho^{|s - t|}`.

* The posterior at period :math:`t` is the prior at :math:`t + 1`: the Kalman filter that
  evaluates :math:`\log p(D_i \mid \phi)` carries exactly that (EWC is its Laplace form),
  shrunk by :math:`\rho` toward the global prior and widened by the innovation
  :math:`(1 - \rho^2)\tau^2`: that is *forgetting*.
* :math:`\rho` is the forgetting rate, learned from the federation. :math:`\rho = 1` is a
  static random intercept (nothing forgotten: ``LinearMixed``'s random-intercept model);
  :math:`\rho = 0` makes the periods independent.
* A period with no rows is a forecast: the client's conditional state there is its
  predicted personal state (the next period's prior).

Each client sends, once, per-period sums :math:`n_t, \sum y, \sum x` and the global
:math:`y^\top y, X^\top y, X^\top X` (shapes fixed by :math:`T` and the number of
coefficients); never its rows.

Examples
--------
>>> import numpy as np
>>> import hierfl as hf
>>> from hierfl.drift import DriftingNormal
>>> family = DriftingNormal(num_periods=4, fixed=["x"], priors={"rho": 1.0})
>>> family
DriftingNormal(beta~Independent, sigma~HalfNormal, tau~HalfNormal, rho=1.0)
>>> rng = np.random.default_rng(0)
>>> data = hf.ClientData.from_dict({
...     c: {"y": rng.normal(size=6), "x": rng.normal(size=6), "period": [0, 0, 1, 1, 2, 2]}
...     for c in "abc"})
>>> fit = hf.fit(family, data, num_warmup=100, num_samples=100, num_chains=1)
>>> fit.to_arviz().posterior["state"].dims
('chain', 'draw', 'client', 'period')
>>> fit.predict("a", x=[0.0], period=[3])["y"].shape  # period 3 has no rows: a forecast
(100, 1)
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
from numpyro.distributions.transforms import LowerCholeskyAffine

from .data import ModelData
from .families import ConjugateFamily
from .priors import Parameter, PriorError

__all__ = ["DriftingNormal"]

_LOG_2PI = math.log(2.0 * math.pi)


class DriftingNormal(ConjugateFamily):
    r"""Shared fixed effects and a per-client state that drifts over periods as an AR(1).

    .. math::
        y_{ij} = x_{ij}^\top\beta + d_{i,t_{ij}} + e_{ij},\quad
        d_i \sim N\!\left(0,\ [\tau^2 \rho^{|s-t|}]_{s,t=0}^{T-1}\right),\quad
        e_{ij} \sim N(0, \sigma^2)

    (the stationary AR(1) of the module docstring). With :math:`d_i` integrated out, a Kalman
    filter over the periods (``lax.scan``; "the posterior at :math:`t` is the prior at
    :math:`t+1`") gives :math:`\log p(D_i \mid \phi)` exactly, for :math:`\rho \in [0, 1]`
    and for periods without rows. Per period, with residual sum
    :math:`s_t = \sum_j (y_{tj} - x_{tj}^\top\beta)`, predicted state :math:`N(m_t, P_t)`:

    .. math::
        \log p(D_i \mid \phi) = -\tfrac12\Big[n \log(2\pi\sigma^2) + \frac{r^\top r}{\sigma^2}
        + \sum_t \log\!\big(1 + \tfrac{n_t P_t}{\sigma^2}\big)
        + \sum_t \frac{n_t m_t^2 - 2 m_t s_t}{\sigma^2}
        - \sum_t \frac{P_t (s_t - n_t m_t)^2}{\sigma^2(\sigma^2 + n_t P_t)}\Big]

    with :math:`r^\top r = y^\top y - 2\beta^\top X^\top y + \beta^\top X^\top X \beta`.
    :meth:`conditional` runs the filter backwards in time (a stationary AR(1) is reversible)
    and returns the smoothed states as a forward Gaussian Markov chain, i.e. a
    ``MultivariateNormal`` with a lower-triangular scale that stays exact at :math:`\rho = 1`
    (where the states coincide and the covariance has rank one).

    Parameters
    ----------
    num_periods : int
        :math:`T`; the ``period`` field holds whole numbers in ``[0, T)``. Periods with no
        rows are forecasts.
    response : str
        Field of the response.
    fixed : sequence of str
        Fields with fixed effects (beside the intercept).
    period : str
        Field of each row's period (it may also be a ``fixed`` field, e.g. a day number).
    intercept : bool
    priors : dict, optional
        On ``beta`` (default ``Normal(0, 10)`` per coefficient), ``sigma`` and ``tau``
        (``HalfNormal(5)``, or their ``log_`` forms) and ``rho`` (``Uniform(0, 1)``); a number
        fixes the parameter; ``rho`` may be fixed anywhere in ``[0, 1]``, ends included.
    client_site : str
        Name of the state vector :math:`d_i` in the posterior (dims ``client, period``).

    Examples
    --------
    >>> from hierfl.drift import DriftingNormal
    >>> family = DriftingNormal(num_periods=10, response="Reaction", fixed=["Days"],
    ...                         period="Days")
    >>> family.coefficient_names, family.required
    (['intercept', 'Days'], ('Reaction', 'Days'))
    """

    def __init__(
        self,
        *,
        num_periods: int,
        response: str = "y",
        fixed: Sequence[str] = (),
        period: str = "period",
        intercept: bool = True,
        priors: Mapping[str, Any] | None = None,
        client_site: str = "state",
    ):
        if isinstance(num_periods, bool) or not isinstance(num_periods, (int, np.integer)):
            raise ValueError(f"num_periods must be a whole number >= 1, got {num_periods!r}")
        if num_periods < 1:
            raise ValueError(f"num_periods must be a whole number >= 1, got {num_periods!r}")
        self.num_periods = int(num_periods)
        self.observed, self.client_site = response, client_site
        self.fixed, self.period, self.intercept = tuple(fixed), period, intercept
        self.coefficient_names = (["intercept"] if intercept else []) + list(self.fixed)
        if not self.coefficient_names:
            raise ValueError("DriftingNormal needs an intercept or at least one fixed field")
        self.required = tuple(dict.fromkeys((response, *self.fixed, period)))
        priors, endpoint = _split_rho_endpoint(priors)
        super().__init__(priors)
        if endpoint is not None:  # rho fixed at 0 or 1 (outside the open unit interval)
            self.priors = tuple(
                r._replace(value=np.asarray(endpoint, dtype=float))
                if r.parameter.name == "rho"
                else r
                for r in self.priors
            )

    @property
    def num_coefficients(self) -> int:
        return len(self.coefficient_names)

    # ------------------------------------------------------------------ declarations
    def parameters(self):
        return (
            Parameter("beta", "real", (self.num_coefficients,)),
            Parameter("sigma", "positive"),
            Parameter("tau", "positive"),
            Parameter("rho", "unit"),
        )

    def default_priors(self):
        return {
            "beta": dist.Normal(0.0, 10.0),
            "sigma": dist.HalfNormal(5.0),
            "tau": dist.HalfNormal(5.0),
            "rho": dist.Uniform(0.0, 1.0),
        }

    def dims(self):
        return {"beta": ["coef"], self.client_site: ["client", "period"]}

    def coords(self):
        return {"coef": self.coefficient_names, "period": list(range(self.num_periods))}

    def check_data(self, data) -> None:
        """Periods must be whole numbers in ``[0, num_periods)``; errors name client, field
        and row."""
        super().check_data(data)
        self._check_periods(data)

    def check_inputs(self, data) -> None:
        """New rows for ``predict`` need a valid ``period`` (a period with no rows in the fit
        is a forecast)."""
        data.require(self.period, context=type(self).__name__)
        self._check_periods(data)

    def _check_periods(self, data) -> None:
        name, values = type(self).__name__, data.fields[self.period]
        data.require_rows(
            self.period, values == np.round(values), "must be a whole number", context=name
        )
        data.require_rows(
            self.period,
            (values >= 0) & (values < self.num_periods),
            f"must lie in [0, {self.num_periods}) (num_periods={self.num_periods})",
            context=name,
        )

    # ------------------------------------------------------------------ client statistics
    def _design(self, fields, rows):
        """Fixed-effect design matrix; ``rows`` is any per-row array (it sets the shape of the
        intercept column)."""
        ones = [jnp.ones(jnp.shape(rows), dtype=jnp.result_type(float))]
        return jnp.stack((ones if self.intercept else []) + [fields[f] for f in self.fixed], -1)

    def statistics(self, fields, mask):
        """Per-period ``n`` [T], ``sum_y`` [T], ``sum_x`` [T, p]; global ``yy``, ``xy`` [p],
        ``xx`` [p, p]."""
        y = fields[self.observed]
        x = self._design(fields, y)
        in_period = (fields[self.period][:, None] == jnp.arange(self.num_periods)) & mask[:, None]
        one_hot = in_period.astype(y.dtype)  # [rows, T]
        m = mask.astype(y.dtype)
        xm = x * m[:, None]
        return {
            "n": jnp.sum(one_hot, axis=0),
            "sum_y": one_hot.T @ y,
            "sum_x": one_hot.T @ x,
            "yy": jnp.sum(m * y * y),
            "xy": xm.T @ y,
            "xx": xm.T @ x,
        }

    # ------------------------------------------------------------------ the Kalman filter
    def _filter(self, phi, count, residual_sum):
        r"""Kalman filter over periods in the given order.

        Returns, per period, the predicted mean and variance (state given earlier periods)
        and the filtered ones (given this period too), each ``[T]``. The update is written
        in covariance form, so a period without rows (``n_t = 0``) leaves the state as it
        is and :math:`\tau = 0` or :math:`\rho = 1` need no special case.
        """
        tau2, s2, rho = phi["tau"] ** 2, phi["sigma"] ** 2, phi["rho"]
        innovation = (1.0 - rho**2) * tau2

        def step(carry, period):
            mean, variance = carry  # predicted: the posterior of the previous period, aged
            n, s = period
            denominator = s2 + n * variance
            filtered_mean = mean + variance * (s - n * mean) / denominator
            filtered_variance = variance * s2 / denominator
            aged = (rho * filtered_mean, rho**2 * filtered_variance + innovation)
            return aged, (mean, variance, filtered_mean, filtered_variance)

        start = (jnp.zeros_like(tau2), tau2)
        _, out = jax.lax.scan(step, start, (count, residual_sum))
        return out

    def _period_terms(self, phi, count, residual_sum):
        """The per-period part of the log marginal (all but the global residual sum)."""
        s2 = phi["sigma"] ** 2
        mean, variance, _, _ = self._filter(phi, count, residual_sum)
        gap = residual_sum - count * mean
        quadratic = count * mean**2 - 2.0 * mean * residual_sum
        shrink = variance * gap**2 / (s2 + count * variance)
        return -0.5 * (jnp.sum(jnp.log1p(count * variance / s2)) + jnp.sum(quadratic - shrink) / s2)

    def _global_terms(self, phi, n, yy, xy, xx):
        beta, s2 = phi["beta"], phi["sigma"] ** 2
        rr = yy - 2.0 * beta @ xy + beta @ xx @ beta
        return -0.5 * (n * (_LOG_2PI + jnp.log(s2)) + rr / s2)

    def _residual_sums(self, phi, stats):
        return stats["sum_y"] - stats["sum_x"] @ phi["beta"]

    def log_marginal(self, phi, stats):
        count = stats["n"]
        return self._global_terms(
            phi, jnp.sum(count), stats["yy"], stats["xy"], stats["xx"]
        ) + self._period_terms(phi, count, self._residual_sums(phi, stats))

    def server_statistics(self, stats, received):
        """Sums of ``n, y'y, X'y, X'X`` over received clients; per client only the per-period
        ``n, sum_y, sum_x`` (zeroed for clients not received, which then contribute 0)."""
        keep = received.astype(stats["yy"].dtype)

        def total(value):
            return jnp.tensordot(keep, value, axes=(0, 0))

        def rows(value):
            return value * keep.reshape((-1,) + (1,) * (value.ndim - 1))

        return {
            "total_n": jnp.sum(total(stats["n"])),
            "yy": total(stats["yy"]),
            "xy": total(stats["xy"]),
            "xx": total(stats["xx"]),
            "n": rows(stats["n"]),
            "sum_y": rows(stats["sum_y"]),
            "sum_x": rows(stats["sum_x"]),
        }

    def total_log_marginal(self, phi, server_stats):
        residual_sum = server_stats["sum_y"] - server_stats["sum_x"] @ phi["beta"]
        per_client = jax.vmap(self._period_terms, in_axes=(None, 0, 0))(
            phi, server_stats["n"], residual_sum
        )
        return self._global_terms(
            phi, server_stats["total_n"], server_stats["yy"], server_stats["xy"], server_stats["xx"]
        ) + jnp.sum(per_client)

    # ------------------------------------------------------------------ client posterior
    def _chain(self, phi, filtered_mean, filtered_variance):
        r"""``MultivariateNormal`` of the forward Gaussian Markov chain

        .. math::
            d_0 \sim N(a_0, Q_0),\quad d_t \mid d_{t-1} \sim N\big(a_t + J_t (d_{t-1} -
            \rho a_t),\ Q_t (1-\rho^2)\tau^2 / B_t\big),\quad J_t = \rho Q_t / B_t,

        where :math:`N(a_t, Q_t)` is the state at :math:`t` given periods :math:`t..T-1`
        and :math:`B_t = \rho^2 Q_t + (1-\rho^2)\tau^2` the variance of :math:`d_{t-1}`
        given them (the backward prediction). Written as ``loc + scale_tril @ eps`` with a
        lower-triangular scale built row by row.
        """
        tau2, rho = phi["tau"] ** 2, phi["rho"]
        innovation = (1.0 - rho**2) * tau2
        backward = rho**2 * filtered_variance + innovation
        positive = backward > 0.0
        safe = jnp.where(positive, backward, 1.0)
        gain = jnp.where(positive, rho * filtered_variance / safe, 0.0)
        step_variance = jnp.where(positive, filtered_variance * innovation / safe, 0.0)
        first = jnp.arange(self.num_periods) == 0
        gain = jnp.where(first, 0.0, gain)
        step_variance = jnp.where(first, filtered_variance, step_variance)
        offset = filtered_mean - gain * rho * filtered_mean

        def step(carry, inputs):
            mean, row = carry
            g, o, sd, unit = inputs
            mean, row = o + g * mean, g * row + sd * unit
            return (mean, row), (mean, row)

        eye = jnp.eye(self.num_periods, dtype=filtered_mean.dtype)
        start = (jnp.zeros_like(filtered_mean[0]), jnp.zeros_like(eye[0]))
        _, (loc, scale) = jax.lax.scan(
            step, start, (gain, offset, jnp.sqrt(jnp.maximum(step_variance, 0.0)), eye)
        )
        # at rho = 1 (or tau = 0) the scale is singular: a valid linear map for sampling,
        # mean and covariance, but not a positive-diagonal Cholesky factor, so the
        # parameter check (which would refuse it outside jit) is off
        return dist.MultivariateNormal(loc, scale_tril=scale, validate_args=False)

    def conditional(self, phi, stats):
        """The states ``d_i | phi, D_i`` (``[T]``), periods without rows included."""
        count, residual_sum = stats["n"], self._residual_sums(phi, stats)
        # filter from the last period back to the first: the reversed AR(1) is the same chain
        _, _, mean, variance = self._filter(phi, count[::-1], residual_sum[::-1])
        return self._chain(phi, mean[::-1], variance[::-1])

    def _prior_scale(self, phi):
        r""":math:`L` with :math:`L L^\top = [\tau^2\rho^{|s-t|}]`: row :math:`t` is
        :math:`\rho` times row :math:`t-1` plus :math:`\sqrt{1-\rho^2}\,\tau` on the diagonal
        (row 0 is :math:`\tau e_0`)."""
        tau, rho = phi["tau"], phi["rho"]
        first = jnp.arange(self.num_periods) == 0
        gain = jnp.where(first, 0.0, rho)
        step_sd = jnp.where(first, tau, jnp.sqrt(jnp.maximum(1.0 - rho**2, 0.0)) * tau)
        eye = jnp.eye(self.num_periods, dtype=jnp.result_type(float))

        def step(row, inputs):
            g, sd, unit = inputs
            row = g * row + sd * unit
            return row, row

        _, scale = jax.lax.scan(step, jnp.zeros_like(eye[0]), (gain, step_sd, eye))
        return scale

    def prior(self, phi):
        """The stationary AR(1) state vector of a new client, ``[T]``."""
        return dist.MultivariateNormal(
            jnp.zeros(self.num_periods), scale_tril=self._prior_scale(phi), validate_args=False
        )

    # ------------------------------------------------------------------ the NumPyro model
    def mean(self, phi, theta, data: ModelData):
        """Linear predictor of every observation; ``nan`` where the period is not a whole
        number in ``[0, T)`` (e.g. a bad ``predict`` input), never a silently clamped state."""
        period = data.fields[self.period]
        valid = (period == jnp.round(period)) & (period >= 0) & (period < self.num_periods)
        index = jnp.where(valid, period, 0).astype(jnp.int32)
        state = theta[data.client, index]
        value = self._design(data.fields, data.client) @ phi["beta"] + state
        return jnp.where(valid, value, jnp.nan)

    def likelihood(self, phi, theta, data):
        return dist.Normal(self.mean(phi, theta, data), phi["sigma"])

    def _sample_client(self, phi):
        # the AR(1) as an affine map of independent innovations: TransformReparam makes it
        # non-centred for NUTS, and it stays a proper map at rho = 1
        innovations = dist.Normal(jnp.zeros(self.num_periods), 1.0).to_event(1)
        transform = LowerCholeskyAffine(jnp.zeros(self.num_periods), self._prior_scale(phi))
        return numpyro.sample(
            self.client_site, dist.TransformedDistribution(innovations, transform)
        )

    def model(self, data: ModelData):
        r"""The hierarchy with one client plate; the states ``[client, period]`` are latent.

        .. math::
            \phi \sim p(\phi),\quad d_i \mid \phi \sim \mathrm{AR}(1),\quad
            y_{ij} \sim N(x_{ij}^\top\beta + d_{i,t_{ij}}, \sigma^2)
        """
        phi = self.sample_globals()
        with numpyro.plate("client", data.num_clients):
            state = self._sample_client(phi)
        numpyro.deterministic("mu", self.mean(phi, state, data))
        self._observe(phi, state, data)

    def reparam_config(self):
        """Non-centred states: NUTS samples the innovations (``<client_site>_base``)."""
        from numpyro.infer.reparam import TransformReparam

        return {self.client_site: TransformReparam()}


def _split_rho_endpoint(priors):
    """``priors`` with a fixed ``rho`` of exactly 0 or 1 set aside (the shared resolver
    accepts fixed values of a unit parameter only inside (0, 1)); returns the priors to
    resolve and the endpoint (or None). Any other fixed ``rho`` outside [0, 1] is refused
    here, naming ``rho``."""
    if not isinstance(priors, Mapping) or "rho" not in priors:
        return priors, None
    value = priors["rho"]
    if isinstance(value, dist.Distribution) or isinstance(value, type):
        return priors, None
    try:
        number = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return priors, None  # the resolver names it
    if number.size != 1:
        return priors, None
    number = float(number.reshape(()))
    if not (0.0 <= number <= 1.0):
        raise PriorError(f"fixed value of 'rho' must lie in [0, 1], got {value!r}")
    if number in (0.0, 1.0):
        return {**priors, "rho": 0.5}, number
    return priors, None
