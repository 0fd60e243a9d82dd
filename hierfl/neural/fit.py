"""``method="svi"``: fit a neural hierarchical model federatedly; :class:`NeuralFit`."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._arviz import arviz
from ..data import MIN_GROUPING_GAIN, ClientData, DataError
from ..drivers import drive
from ..fit import OBS_DIM, as_key, load_object, save_object
from .model import NeuralModel, personal_names
from .svi import (
    SVISettings,
    _head_log_probs,
    adapt_personal,
    group_client_data,
    predictive_probs,
    stack_client_data,
    svi_algorithm,
)

__all__ = ["NeuralFit", "fit_svi", "load_neural_fit"]

CLIENT_DIM = "client"


@dataclass
class NeuralFit:
    """Result of ``hf.fit(model, data, method="svi")``.

    Attributes
    ----------
    model : NeuralModel
    client_ids : tuple
    shared : pytree of ndarray
        The shared body (point estimate).
    mu, tau : ndarray, ``[P]``
        Learned hyperparameters of the personal prior ``N(mu, diag tau^2)``.
    personal_mean, personal_sd : ndarray, ``[num_clients, P]``
        Each client's ``q_i`` (computed and kept by the clients; gathered here because the
        simulator runs them all in one process).
    settings : SVISettings
    diagnostics : dict
        ``rounds`` (list of per-round server infos), ``skips``, ``simulate_time`` and
        ``state`` (a checkpoint to resume from: ``hf.fit(..., state=fit.diagnostics["state"],
        start_round=...)``).
    """

    model: NeuralModel
    client_ids: tuple
    shared: Any
    mu: np.ndarray
    tau: np.ndarray
    personal_mean: np.ndarray
    personal_sd: np.ndarray
    settings: SVISettings
    diagnostics: dict = field(default_factory=dict)
    seed: int = 0
    method: str = "svi"

    def __repr__(self) -> str:
        return (
            f"NeuralFit(method='svi', model={self.model.name!r}, "
            f"clients={len(self.client_ids)}, personal_size={self.mu.size}, "
            f"tau_mean={float(np.mean(self.tau)):.4g})"
        )

    # ------------------------------------------------------------------ posteriors
    def _unravel(self):
        _, template = jax.eval_shape(self.model.init, jax.random.PRNGKey(0))
        template = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template)
        return self.model.unravel(template)[1], template

    def personal_posterior(self, client: Hashable) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, sd)`` of ``q(theta)`` for a known client; for any other id, the
        population prior ``(mu, tau)`` (cold start)."""
        if client in self.client_ids:
            i = self.client_ids.index(client)
            return self.personal_mean[i], self.personal_sd[i]
        return self.mu, self.tau

    def _key(self, key, salt: int):
        return as_key(key, self.seed, salt)

    def _check_inputs(self, client, x) -> jnp.ndarray:
        x = np.asarray(x, dtype=float)
        expected = int(np.prod(self.model.input_shape))
        if x.ndim < 1 or x.size % expected or not np.all(np.isfinite(x)):
            raise DataError(
                f"client {client!r}, field {self.model.x_field!r}: expected finite "
                f"rows of shape {self.model.input_shape}, got shape {x.shape}"
            )
        return jnp.asarray(x.reshape(-1, expected), dtype=jnp.float32)

    def predict(
        self,
        client: Hashable,
        *,
        x,
        key=None,
        num_samples: int | None = None,
        posterior: tuple | None = None,
    ) -> dict[str, np.ndarray]:
        """Posterior predictive class probabilities for one client.

        Parameters
        ----------
        client : hashable
            A client in the fit (its ``q_i``) or any other id (the population predictive,
            ``theta ~ N(mu, tau^2)``).
        x : array, ``[rows, *input_shape]`` (or flattened rows)
        key : PRNGKey or int, optional
        num_samples : int, optional
            Draws of ``theta`` (default ``settings.predictive_samples``).
        posterior : (mean, sd), optional
            Use this personal posterior instead (e.g. from :meth:`adapt`).

        Returns
        -------
        dict
            ``{"probs": [rows, num_classes]}``; each row sums to 1.
        """
        x = self._check_inputs(client, x)
        mean, sd = self.personal_posterior(client) if posterior is None else posterior
        unravel, _ = self._unravel()
        probs = _predict_jit(self.model, unravel, num_samples or self.settings.predictive_samples)(
            self.shared, jnp.asarray(mean), jnp.asarray(sd), x, self._key(key, 1)
        )
        return {"probs": np.asarray(probs)}

    def adapt(
        self, client: Hashable = None, *, x, y, key=None, steps: int | None = None
    ) -> NeuralFit | tuple[np.ndarray, np.ndarray]:
        """Cold start: a new client's personal posterior from its few labelled examples,
        under the learned prior ``N(mu, diag tau^2)`` and the shared body, with no server
        round (:func:`hierfl.neural.svi.adapt_personal`). The fit itself is unchanged.

        Parameters
        ----------
        client : hashable
            The new client's id (not one of :attr:`client_ids`).
        x : array, ``[rows, *input_shape]``
        y : int array, ``[rows]``
            Its labelled rows.
        key : PRNGKey or int, optional
        steps : int, optional
            ELBO steps (default: the fit's ``elbo_steps``).

        Returns
        -------
        NeuralFit
            A fit holding that one client, with the same body and hyperparameters, so
            :meth:`predict`, :meth:`to_arviz` and :meth:`personal_posterior` work on it, as
            for :meth:`hierfl.Fit.adapt`. Without ``client`` (the earlier form) the
            ``(mean, sd)`` of its posterior is returned instead, for ``predict(...,
            posterior=)``; that form is deprecated.

        Examples
        --------
        ``new = fit.adapt("new clinic", x=x[:10], y=y[:10])`` then
        ``new.predict("new clinic", x=x[10:])["probs"]``.
        """
        name = "new" if client is None else client
        if client is not None and client in self.client_ids:
            raise DataError(
                f"client {client!r} is already in the fit; adapt is for a client that was not "
                "(its posterior is fit.personal_posterior(client))"
            )
        x = self._check_inputs(name, x)
        y = np.asarray(y)
        if (
            y.shape != (x.shape[0],)
            or not np.issubdtype(y.dtype, np.integer)
            or y.min() < 0
            or y.max() >= self.model.num_classes
        ):
            raise DataError(
                f"client {name!r}, field {self.model.y_field!r}: expected {x.shape[0]} integer "
                f"labels in 0..{self.model.num_classes - 1}, got shape {y.shape}"
            )
        unravel, _ = self._unravel()
        mean, sd = adapt_personal(
            self.model,
            unravel,
            self.shared,
            jnp.asarray(self.mu),
            jnp.asarray(self.tau),
            x,
            jnp.asarray(y, dtype=jnp.int32),
            self._key(key, 2),
            settings=self.settings,
            steps=steps,
        )
        mean, sd = np.asarray(mean), np.asarray(sd)
        if client is None:
            warnings.warn(
                "fit.adapt(x=, y=) without the new client's id is deprecated: "
                "fit.adapt(client, x=, y=) returns a NeuralFit for that client",
                FutureWarning,
                stacklevel=2,
            )
            return mean, sd
        return replace(
            self,
            client_ids=(client,),
            personal_mean=mean[None],
            personal_sd=sd[None],
            diagnostics={"adapted_from": repr(self), "rows": int(x.shape[0])},
        )

    # ------------------------------------------------------------------ log-likelihood
    def _personal_draws(self, num_draws: int, key) -> np.ndarray:
        """``num_draws`` draws of every client's flat ``theta_i ~ q_i``, ``[draw, client, P]``
        (the same draws for the same ``key``, so :meth:`to_arviz`'s ``posterior`` and
        ``log_likelihood`` groups share them)."""
        noise = jax.random.normal(
            self._key(key, 3), (num_draws, len(self.client_ids), self.mu.size)
        )
        return self.personal_mean[None] + self.personal_sd[None] * np.asarray(noise)

    def _check_data(self, data: ClientData) -> np.ndarray:
        """Check ``data`` against the fit and the model; return each of its clients' position
        in :attr:`client_ids`."""
        if not isinstance(data, ClientData):
            raise TypeError(
                f"data must be a hierfl.ClientData with fields {self.model.x_field!r} and "
                f"{self.model.y_field!r}, got {type(data).__name__}"
            )
        context = f"model {self.model.name!r}"
        data.require(self.model.x_field, self.model.y_field, context=context)
        position = {client: i for i, client in enumerate(self.client_ids)}
        for client in data.client_ids:
            if client not in position:
                raise DataError(
                    f"client {client!r} is not in this fit, so it has no q_i to evaluate "
                    f"field {self.model.y_field!r} under (the fit's clients: "
                    f"{list(self.client_ids)[:10]}{'...' if len(position) > 10 else ''})"
                )
        x = data.fields[self.model.x_field]
        if int(np.prod(x.shape[1:])) != int(np.prod(self.model.input_shape)):
            raise DataError(
                f"client {data.client_ids[0]!r}, field {self.model.x_field!r}: expected rows "
                f"of shape {self.model.input_shape}, got rows of shape {x.shape[1:]}"
            )
        y = data.fields[self.model.y_field]
        data.require_rows(
            self.model.y_field,
            (y == np.round(y)) & (y >= 0) & (y < self.model.num_classes),
            f"labels must be integers in 0..{self.model.num_classes - 1}",
            context=context,
        )
        return np.array([position[client] for client in data.client_ids])

    def _log_likelihood(self, data: ClientData, draws: np.ndarray) -> np.ndarray:
        """``[draw, obs]`` pointwise log-likelihood of ``data``'s rows (in its order) at
        ``draws`` ``[draw, fit client, P]``."""
        positions = self._check_data(data)
        unravel, _ = self._unravel()
        compute = _log_likelihood_jit(self.model, unravel)
        offsets = np.concatenate([[0], np.cumsum(data.sizes)])
        out = np.empty((draws.shape[0], data.num_obs), dtype=np.float32)
        # clients of similar size share one padded, vectorized call, as in training
        for group in data.size_groups(self.settings.size_groups, min_gain=MIN_GROUPING_GAIN):
            fields, mask = data.padded(clients=group)
            x = np.asarray(fields[self.model.x_field], dtype=np.float32)
            x = x.reshape(*x.shape[:2], -1)
            values = compute(
                self.shared,
                jnp.asarray(draws[:, positions[group]], dtype=jnp.float32),
                jnp.asarray(x),
                jnp.asarray(fields[self.model.y_field], dtype=jnp.int32),
            )
            rows = offsets[group][:, None] + np.arange(mask.shape[1])[None]
            out[:, rows[mask]] = np.asarray(values)[:, mask]
        return out

    def log_likelihood(
        self, data: ClientData, *, num_draws: int = 100, key=None
    ) -> dict[str, np.ndarray]:
        r"""Pointwise log-likelihood ``[chain, draw, obs]`` of the clients' rows.

        .. math::
            \log p(y_{ij} \mid x_{ij}, w, \theta_i^{(s)})
            = \log \mathrm{softmax}\big(f(x_{ij}; w, \theta_i^{(s)})\big)_{y_{ij}},
            \qquad \theta_i^{(s)} \sim q_i = N(m_i, \mathrm{diag}\, s_i^2),

        for ``num_draws`` draws ``s`` (one chain; the draws of :meth:`to_arviz` with the same
        ``key``), with the body ``w`` at its point estimate. Jitted and vectorized over clients
        and rows; draws run one after another, so memory stays at one draw's activations.

        Parameters
        ----------
        data : ClientData
            Fields ``model.x_field`` and ``model.y_field`` of any clients of the fit (the fit
            keeps no client data: in a federation it may stay on the clients). Rows appear in
            ``data``'s order.
        num_draws : int
        key : PRNGKey or int, optional

        Returns
        -------
        dict
            ``{model.y_field: [1, num_draws, data.num_obs]}``, as :meth:`hierfl.Fit.log_likelihood`.

        Examples
        --------
        >>> import numpy as np, hierfl as hf
        >>> from hierfl.neural import mlp_head_model
        >>> rng = np.random.default_rng(0)
        >>> data = hf.ClientData.from_dict({c: {"x": rng.normal(size=(20, 4)),
        ...                                     "y": rng.integers(0, 3, 20)} for c in "abc"})
        >>> fit = hf.fit(mlp_head_model(input_dim=4, num_classes=3, hidden=(8,)), data,
        ...              method="svi", num_rounds=2, local_steps=2)
        >>> fit.log_likelihood(data, num_draws=10)["y"].shape
        (1, 10, 60)
        """
        values = self._log_likelihood(data, self._personal_draws(num_draws, key))
        return {self.model.y_field: values[None]}

    # ------------------------------------------------------------------ ArviZ
    def to_arviz(self, *, data: ClientData | None = None, num_draws: int = 100, key=None):
        """Export to :class:`arviz.InferenceData`.

        ``posterior`` holds ``num_draws`` draws (one chain) of every personal site from each
        client's ``q_i`` on dim ``client`` (coordinates: the client ids), named after the Flax
        path (e.g. ``head_kernel``), and the hyperparameters ``mu_<site>`` and
        ``tau_<site>``. ``mu`` and ``tau`` are point estimates (variational EM), so their
        draws are constant. The body is a point estimate kept on :attr:`shared` and is not
        exported.

        With ``data`` (a :class:`~hierfl.ClientData` of clients of the fit; the fit keeps no
        client data), ``log_likelihood`` and ``observed_data`` hold, as for
        :meth:`hierfl.Fit.to_arviz`, one value per row of ``data`` on dim ``obs``, with the
        non-dimension coordinate ``obs_client`` naming each row's client: the
        :meth:`log_likelihood` at the same draws as ``posterior``, and the labels. Then
        ``az.loo`` works (per row), and :meth:`loo` per client.

        Examples
        --------
        >>> import numpy as np, hierfl as hf
        >>> from hierfl.neural import mlp_head_model
        >>> rng = np.random.default_rng(0)
        >>> data = hf.ClientData.from_dict({c: {"x": rng.normal(size=(20, 4)),
        ...                                     "y": rng.integers(0, 3, 20)} for c in "abc"})
        >>> fit = hf.fit(mlp_head_model(input_dim=4, num_classes=3, hidden=(8,)), data,
        ...              method="svi", num_rounds=2, local_steps=2)
        >>> idata = fit.to_arviz(data=data, num_draws=10)
        >>> idata.log_likelihood["y"].dims
        ('chain', 'draw', 'obs')
        >>> sorted(set(idata.log_likelihood["obs_client"].values.tolist()))
        ['a', 'b', 'c']
        """
        az = arviz()
        unravel, template = self._unravel()
        names = personal_names(template)
        draws = self._personal_draws(num_draws, key)
        posterior, dims = {}, {}
        coords = {CLIENT_DIM: list(self.client_ids)}
        tree_draws = jax.vmap(jax.vmap(unravel))(jnp.asarray(draws))
        mu_tree, tau_tree = unravel(jnp.asarray(self.mu)), unravel(jnp.asarray(self.tau))
        leaves = jax.tree_util.tree_leaves(tree_draws)
        mu_leaves = jax.tree_util.tree_leaves(mu_tree)
        tau_leaves = jax.tree_util.tree_leaves(tau_tree)
        for (name, shape), leaf, mu_leaf, tau_leaf in zip(
            names, leaves, mu_leaves, tau_leaves, strict=True
        ):
            axis_names = [f"{name}_dim_{j}" for j in range(len(shape))]
            posterior[name] = np.asarray(leaf)[None]
            dims[name] = [CLIENT_DIM, *axis_names]
            for prefix, value in (("mu", mu_leaf), ("tau", tau_leaf)):
                posterior[f"{prefix}_{name}"] = np.broadcast_to(
                    np.asarray(value), (1, num_draws, *shape)
                )
                dims[f"{prefix}_{name}"] = axis_names
        groups: dict[str, Any] = {"posterior": posterior}
        if data is not None:
            site = self.model.y_field
            groups["log_likelihood"] = {site: self._log_likelihood(data, draws)[None]}
            groups["observed_data"] = {site: np.asarray(data.fields[site]).astype(np.int64)}
            dims[site] = [OBS_DIM]
            coords[OBS_DIM] = np.arange(data.num_obs)
        idata = az.from_dict(
            **groups,
            dims=dims,
            coords=coords,
            attrs={"inference_library": "hierfl", "method": "svi", "model": self.model.name},
        )
        if data is not None:
            obs_client = np.asarray(data.client_ids)[data.client_index]
            for group in ("observed_data", "log_likelihood"):
                setattr(
                    idata,
                    group,
                    getattr(idata, group).assign_coords(obs_client=(OBS_DIM, obs_client)),
                )
        return idata

    def loo(
        self,
        *,
        data: ClientData | None = None,
        by: str = "client",
        num_draws: int = 100,
        key=None,
    ):
        """PSIS-LOO over the ``num_draws`` draws of :meth:`to_arviz`, as :meth:`hierfl.Fit.loo`.

        ``by="client"``: leave one *client* out (the federated unit; the pointwise values are
        each client's summed row log-likelihoods, on dim ``client``); ``by="obs"``: leave one
        row out. The body ``w`` and ``mu, tau`` stay at their point estimates.

        Read the Pareto ``k`` diagnostics: a mean-field ``q_i`` over hundreds of personal
        parameters gives heavy-tailed importance ratios. On MNIST (Dirichlet 0.5, 20
        clients, ``mnist_heads.mlp_head()``, 10 rounds) 65% of the rows had ``k > 0.5`` and
        12% ``k > 1``, and every client had ``k > 1`` when left out whole (leaving a client
        out takes away all the data its ``theta_i`` has). There the held-out log predictive
        on test rows (:meth:`predict`) is the sounder comparison.

        Parameters
        ----------
        data : ClientData
            Required: the rows to score (any clients of the fit; see :meth:`log_likelihood`).

        Examples
        --------
        >>> import warnings
        >>> import numpy as np, hierfl as hf
        >>> from hierfl.neural import mlp_head_model
        >>> rng = np.random.default_rng(0)
        >>> data = hf.ClientData.from_dict({c: {"x": rng.normal(size=(20, 4)),
        ...                                     "y": rng.integers(0, 3, 20)} for c in "abc"})
        >>> fit = hf.fit(mlp_head_model(input_dim=4, num_classes=3, hidden=(8,)), data,
        ...              method="svi", num_rounds=2, local_steps=2)
        >>> with warnings.catch_warnings():  # few draws: ArviZ may warn about Pareto k
        ...     warnings.simplefilter("ignore", UserWarning)
        ...     by_client = fit.loo(data=data, by="client")
        >>> int(by_client.n_data_points), by_client.loo_i.client.values.tolist()
        (3, ['a', 'b', 'c'])
        """
        if by not in ("client", "obs"):
            raise ValueError("by must be 'client' or 'obs'")
        if data is None:
            raise TypeError(
                "NeuralFit.loo needs data=: a NeuralFit keeps no client data (in a "
                "federation it stays on the clients); pass the ClientData it was fitted on"
            )
        az = arviz()
        idata = self.to_arviz(data=data, num_draws=num_draws, key=key)
        if by == "obs":
            return az.loo(idata)
        # each client's rows are contiguous in data order (no client is empty)
        offsets = np.concatenate([[0], np.cumsum(data.sizes)[:-1]])
        rows = idata.log_likelihood[self.model.y_field].values.astype(np.float64)
        per_client = az.InferenceData(
            posterior=idata.posterior,
            log_likelihood=az.dict_to_dataset(
                {"client_log_likelihood": np.add.reduceat(rows, offsets, axis=-1)},
                coords={CLIENT_DIM: list(data.client_ids)},
                dims={"client_log_likelihood": [CLIENT_DIM]},
            ),
        )
        return az.loo(per_client)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Save to ``path`` (pickle); the model's module must be importable to load it."""
        return save_object(self, path)


def load_neural_fit(path: str | Path) -> NeuralFit:
    """Load a fit saved with :meth:`NeuralFit.save`."""
    return load_object(path, NeuralFit)


_PREDICT_CACHE: dict = {}


def _predict_jit(model, unravel, num_samples):
    cache_key = (id(model), num_samples)
    if cache_key not in _PREDICT_CACHE:
        _PREDICT_CACHE[cache_key] = jax.jit(
            lambda shared, mean, sd, x, key: predictive_probs(
                model, unravel, shared, mean, sd, x, key, num_samples
            )
        )
    return _PREDICT_CACHE[cache_key]


_LOG_LIKELIHOOD_CACHE: dict = {}


def _log_likelihood_jit(model, unravel):
    """Jitted ``(shared, theta [S, C, P], x [C, n, D], y [C, n]) -> [S, C, n]``: the log
    probability of each label under each draw of its client's ``theta``. The features
    ``h = g(x; w)`` are computed once; draws run under ``lax.map``, clients and rows in one
    vectorized call per draw."""
    cached = _LOG_LIKELIHOOD_CACHE.get(id(model))
    if cached is not None and cached[0] is model:
        return cached[1]

    def log_likelihood(shared, theta, x, y):
        h = jax.vmap(model.features, in_axes=(None, 0))(shared, x)

        def one_client(theta_i, h_i, y_i):
            log_probs = _head_log_probs(model, unravel, shared, theta_i, h_i)
            return jnp.take_along_axis(log_probs, y_i[:, None], axis=-1)[:, 0]

        return jax.lax.map(lambda theta_s: jax.vmap(one_client)(theta_s, h, y), theta)

    compiled = jax.jit(log_likelihood)
    _LOG_LIKELIHOOD_CACHE[id(model)] = (model, compiled)
    return compiled


def fit_svi(
    model: NeuralModel,
    data: ClientData,
    *,
    seed: int = 0,
    progress: bool = False,
    driver: str = "simulate",
    state=None,
    start_round: int = 0,
    on_round=None,
    **options,
) -> NeuralFit:
    """Run federated VI (see :mod:`hierfl.neural.svi`) with :func:`hierfl.protocol.simulate`
    (``driver="simulate"``) or in Flower's simulation engine (``driver="flower"``,
    :mod:`hierfl.flower`).

    ``options`` are the fields of :class:`SVISettings`. ``state`` (``fit.diagnostics["state"]``
    of an earlier fit: the server state and every client's ``q_i``) and ``start_round`` resume
    a run, which then continues as the uninterrupted run would (rounds use
    ``fold_in(key, round)``); ``on_round(record, server_state, client_states)`` is called
    after every round (e.g. to checkpoint; ``client_states`` is ``None`` under Flower).

    Examples
    --------
    >>> import numpy as np, hierfl as hf
    >>> from hierfl.neural import mlp_head_model
    >>> rng = np.random.default_rng(0)
    >>> data = hf.ClientData.from_dict({c: {"x": rng.normal(size=(20, 4)),
    ...                                     "y": rng.integers(0, 3, 20)} for c in "abc"})
    >>> fit = hf.fit(mlp_head_model(input_dim=4, num_classes=3, hidden=(8,)), data,
    ...              method="svi", num_rounds=2, local_steps=2)
    >>> fit.predict("a", x=np.zeros((5, 4)))["probs"].shape
    (5, 3)
    >>> fit.to_arviz().posterior["head_kernel"].dims
    ('chain', 'draw', 'client', 'head_kernel_dim_0', 'head_kernel_dim_1')
    """
    if not isinstance(model, NeuralModel):
        raise TypeError(
            f"method='svi' needs a hierfl.neural.NeuralModel, got {type(model).__name__}"
        )
    unknown = set(options) - set(SVISettings._fields)
    if unknown:
        raise TypeError(
            f"unknown options for method='svi': {sorted(unknown)}; known: "
            f"{list(SVISettings._fields)}"
        )
    settings = SVISettings(**options)
    in_process = {}
    if driver == "simulate":  # a Flower node holds one client: nothing to group or chunk
        stacked = group_client_data(model, data, max_groups=settings.size_groups)
        in_process = {"client_batch": settings.client_batch}
    else:
        stacked = stack_client_data(model, data)
    start = time.perf_counter()
    result = drive(
        driver,
        functools.partial(svi_algorithm, model, settings=settings),
        jax.random.PRNGKey(seed),
        stacked,
        client_ids=data.client_ids,
        num_rounds=settings.num_rounds,
        participation=settings.participation,
        dropout=settings.dropout,
        progress="svi: rounds" if progress else False,
        state=state,
        start_round=start_round,
        on_round=on_round,
        **in_process,
    )
    mean, sd = result.personal
    state = result.server_state
    rounds = [jax.tree_util.tree_map(np.asarray, r.server_info)._asdict() for r in result.rounds]
    return NeuralFit(
        model,
        data.client_ids,
        jax.tree_util.tree_map(np.asarray, state.shared),
        np.asarray(state.mu),
        np.asarray(state.tau),
        np.asarray(mean),
        np.asarray(sd),
        settings,
        {
            "rounds": rounds,
            "skips": result.skips,
            "simulate_time": time.perf_counter() - start,
            "state": jax.tree_util.tree_map(
                np.asarray, (result.server_state, result.client_states)
            ),
        },
        seed,
    )
