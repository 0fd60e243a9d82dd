"""``method="svi"``: fit a neural hierarchical model federatedly; :class:`NeuralFit`."""

from __future__ import annotations

import functools
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._arviz import arviz
from ..data import ClientData, DataError
from ..drivers import drive
from ..fit import as_key, load_object, save_object
from .model import NeuralModel, personal_names
from .svi import (
    SVISettings,
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

    def adapt(self, *, x, y, key=None, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cold start: a new client's personal posterior from its few labelled examples,
        under the learned prior, with no server round (see
        :func:`hierfl.neural.svi.adapt_personal`). Pass the result as ``posterior=`` to
        :meth:`predict`."""
        x = self._check_inputs("new", x)
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or y.min() < 0 or y.max() >= self.model.num_classes:
            raise DataError(
                f"field {self.model.y_field!r}: expected {x.shape[0]} labels in "
                f"0..{self.model.num_classes - 1}"
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
        return np.asarray(mean), np.asarray(sd)

    # ------------------------------------------------------------------ ArviZ
    def to_arviz(self, *, num_draws: int = 100, key=None):
        """Export to :class:`arviz.InferenceData`.

        ``posterior`` holds ``num_draws`` draws (one chain) of every personal site from each
        client's ``q_i`` on dim ``client`` (coordinates: the client ids), named after the Flax
        path (e.g. ``head_kernel``), and the hyperparameters ``mu_<site>`` and
        ``tau_<site>``. ``mu`` and ``tau`` are point estimates (variational EM), so their
        draws are constant. The body is a point estimate kept on :attr:`shared` and is not
        exported.
        """
        az = arviz()
        unravel, template = self._unravel()
        names = personal_names(template)
        key = self._key(key, 3)
        num_clients = len(self.client_ids)
        noise = np.asarray(jax.random.normal(key, (num_draws, num_clients, self.mu.size)))
        draws = self.personal_mean[None] + self.personal_sd[None] * noise
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
        return az.from_dict(
            posterior=posterior,
            dims=dims,
            coords=coords,
            attrs={"inference_library": "hierfl", "method": "svi", "model": self.model.name},
        )

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
