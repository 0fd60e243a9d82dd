"""The fit object: posterior of every client, ArviZ export, per-client predictions, save/load.

A :class:`Fit` is what :func:`hierfl.fit` returns, whatever the engine. It holds

* draws of the global sites, ``[chain, draw, ...]``;
* a client sampler that gives draws of the per-client sites for any set of clients,
  ``[chain, draw, client, ...]`` (stored draws for sampling engines; closed-form
  conditionals, drawn lazily, for the exact engine, so a fit with a million clients stays
  small);
* the model as a NumPyro function, which ``predict``, ``posterior_predictive`` and
  ``log_likelihood`` run with the draws substituted.

It wraps the result of the pure federated core and holds no state that changes results.
"""

from __future__ import annotations

import functools
import pickle
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from numpyro import handlers
from numpyro.infer import Predictive
from numpyro.infer.util import log_likelihood as numpyro_log_likelihood

from ._arviz import arviz
from .data import ClientData, DataError, ModelData

__all__ = ["Fit", "ModelSites", "StoredClientSamples", "inspect_model", "load_fit"]

CLIENT_DIM = "client"
OBS_DIM = "obs"


@dataclass(frozen=True)
class ModelSites:
    """Sites of a model with one client plate, found by tracing it on the data."""

    global_sites: tuple[str, ...]
    client_sites: tuple[str, ...]
    observed: dict[str, str]  # observed site -> data field
    client_plate: str
    row_sites: tuple[str, ...] = ()  # deterministic sites with one value per observation


def inspect_model(
    model: Callable, data: ModelData, *, client_plate: str | None = None
) -> ModelSites:
    """Classify the sites of ``model``: global, per-client, observed.

    The client plate is the plate named ``client_plate`` or, by default, the one plate whose
    size equals the number of clients (``"client"`` when several match).
    """
    trace = _shape_trace(model, data)
    plates = {name: s["args"][0] for name, s in trace.items() if s["type"] == "plate"}
    if client_plate is None:
        candidates = [n for n, size in plates.items() if size == data.num_clients]
        if len(candidates) > 1 and "client" in candidates:
            candidates = ["client"]
        if len(candidates) != 1:
            raise ValueError(
                f"the model must have exactly one client plate of size "
                f"{data.num_clients}; found plates {plates}. Name it with "
                "numpyro.plate('client', data.num_clients) or pass client_plate="
            )
        client_plate = candidates[0]
    elif client_plate not in plates:
        raise ValueError(f"no plate named {client_plate!r} in the model (plates: {plates})")
    global_sites, client_sites, row_sites, observed = [], [], [], {}
    longer = None  # the trace with one more row, taken only if a site needs it
    for name, site in trace.items():
        if site["type"] not in ("sample", "deterministic"):
            continue
        frames = [f.name for f in site.get("cond_indep_stack", [])]
        if site["type"] == "sample" and site["is_observed"]:
            observed[name] = _field_of(site["value"], data, name)
            continue
        if client_plate in frames:
            client_sites.append(name)
            continue
        if (
            site["type"] == "deterministic"
            and np.ndim(site["value"]) >= 1
            and np.shape(site["value"])[0] == data.num_obs
        ):
            # one entry per row, or a global that happens to have as many entries (a q x q
            # correlation on q rows): a row site grows with the rows
            longer = _shape_trace(model, _one_more_row(data)) if longer is None else longer
            if np.shape(longer[name]["value"])[0] == data.num_obs + 1:
                row_sites.append(name)
                continue
        if not frames:
            global_sites.append(name)
    if not observed:
        raise ValueError("the model observes nothing: pass obs=data.get(field) to a sample site")
    return ModelSites(
        tuple(global_sites), tuple(client_sites), observed, client_plate, tuple(row_sites)
    )


def _shape_trace(model: Callable, data: ModelData) -> dict:
    """The model's trace on ``data``, under ``eval_shape``: shapes only, nothing is computed
    or compiled."""
    captured = {}

    def probe():
        captured.update(handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(data))
        return 0

    jax.eval_shape(probe)
    return captured


def _one_more_row(data: ModelData) -> ModelData:
    """``data`` with its last row repeated: what changes shape with it is per row."""
    fields = {k: np.concatenate([v, v[-1:]]) for k, v in data.fields.items()}
    client = np.concatenate([np.asarray(data.client), np.asarray(data.client)[-1:]])
    return ModelData(fields, client, data.num_clients)


def _field_of(value, data: ModelData, site: str) -> str:
    if site in data.fields:
        return site
    for name, array in data.fields.items():
        if np.shape(array) == np.shape(value) and np.array_equal(
            np.asarray(array), np.asarray(value)
        ):
            return name
    raise ValueError(f"observed site {site!r} is not a data field; observe a field of the data")


class StoredClientSamples:
    """Client sampler over stored draws ``{site: [chain, draw, client, ...]}``."""

    def __init__(self, samples: Mapping[str, np.ndarray]):
        self.samples = {k: np.asarray(v) for k, v in samples.items()}

    def __call__(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        return {k: v[:, :, indices] for k, v in self.samples.items()}


@functools.lru_cache(maxsize=64)
def _compiled_predictive(model, return_sites: tuple[str, ...], num_clients: int):
    """``Predictive(model, ...)`` as one compiled program per model, sites and shapes: a
    second ``predict`` with inputs of the same shapes reuses it (0.33 s -> a few ms on radon)
    instead of dispatching the model's operations one by one again."""

    def run(key, samples, fields, client):
        predictive = Predictive(model, posterior_samples=samples, return_sites=list(return_sites))
        return predictive(key, ModelData(fields, client, num_clients))

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def _compiled_log_likelihood(model, num_clients: int):
    """NumPyro's pointwise ``log_likelihood`` as one compiled program per model and shapes."""

    def run(samples, fields, client):
        return numpyro_log_likelihood(model, samples, ModelData(fields, client, num_clients))

    return jax.jit(run)


def as_key(key, seed: int, salt: int):
    """A PRNG key from ``key`` (a key, an int seed, or None: ``fold_in(PRNGKey(seed), salt)``)."""
    if key is None:
        return jax.random.fold_in(jax.random.PRNGKey(seed), salt)
    if isinstance(key, int):
        return jax.random.PRNGKey(key)
    return key


def _flatten_draws(samples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v).reshape((-1,) + np.shape(v)[2:]) for k, v in samples.items()}


@dataclass
class Fit:
    """Posterior of a hierarchical model fitted federatedly (or centrally, for ``nuts``).

    Attributes
    ----------
    method : str
        Engine that produced the fit.
    model : callable
        NumPyro model with one client plate (a family's :meth:`model` for conjugate families).
    data : ClientData
    global_samples : dict of str to ndarray
        ``[chain, draw, ...]`` for each global site.
    client_samples : callable
        ``client_samples(indices) -> {site: [chain, draw, len(indices), ...]}``.
    personal : dict
        Per-client posterior summaries computed by the clients: ``{site: (mean, sd)}``.
    diagnostics : dict
        Engine diagnostics (server inference, rounds, skipped clients, timings).
    sites : ModelSites
    dims, coords : dict
        Extra ArviZ dims and coordinates for sites.
    """

    method: str
    model: Callable
    data: ClientData
    global_samples: dict[str, np.ndarray]
    client_samples: Callable[[Any], dict[str, np.ndarray]]
    sites: ModelSites
    personal: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    dims: dict[str, list[str]] = field(default_factory=dict)
    coords: dict[str, list] = field(default_factory=dict)
    seed: int = 0

    # ------------------------------------------------------------------ basic access
    @property
    def client_ids(self) -> tuple:
        return self.data.client_ids

    @property
    def num_draws(self) -> int:
        first = next(iter(self.global_samples.values()))
        return int(first.shape[0] * first.shape[1])

    def _key(self, key, salt: int):
        return as_key(key, self.seed, salt)

    def posterior_samples(self, clients: Sequence[Hashable] | None = None) -> dict[str, np.ndarray]:
        """Global and per-client draws, ``[chain, draw, ...]`` (clients on axis 2)."""
        indices = (
            np.arange(self.data.num_clients)
            if clients is None
            else np.array([self.data.index_of(c) for c in clients])
        )
        out = dict(self.global_samples)
        out.update(self.client_samples(indices))
        return out

    def __repr__(self) -> str:
        return (
            f"Fit(method={self.method!r}, clients={self.data.num_clients}, "
            f"draws={self.num_draws}, global={list(self.global_samples)}, "
            f"client={list(self.sites.client_sites)})"
        )

    # ------------------------------------------------------------------ predictions
    def _inputs(self, client, inputs: Mapping[str, Any]) -> ModelData:
        if not inputs:
            raise DataError(
                f"client {client!r}: predict needs the model's input fields "
                "(e.g. covariates) as keyword arguments"
            )
        fields, size = {}, None
        for name, value in inputs.items():
            array = np.atleast_1d(np.asarray(value, dtype=float))
            if not np.all(np.isfinite(array)):
                raise DataError(f"client {client!r}, field {name!r}: non-finite input")
            if size is not None and array.shape[0] != size:
                raise DataError(
                    f"client {client!r}, field {name!r}: {array.shape[0]} rows, "
                    f"other inputs have {size}"
                )
            size = array.shape[0]
            fields[name] = array
        return ModelData(fields, np.zeros(size, dtype=np.int32), 1)

    def predict(
        self, client: Hashable, *, key=None, num_samples: int | None = None, **inputs
    ) -> dict[str, np.ndarray]:
        """Posterior predictive draws for one client.

        For a client in the fit the draws use its personal posterior; for any other id they
        use the population (cold-start) predictive: a new ``theta`` is drawn from
        ``p(theta | phi)`` for each draw of ``phi``.

        Parameters
        ----------
        client : hashable
            Client id (known or new).
        key : jax PRNGKey or int, optional
        num_samples : int, optional
            Use the first ``num_samples`` posterior draws (default: all).
        **inputs
            The model's input fields for the new rows (e.g. ``floor=[0, 1]``).

        Returns
        -------
        dict of str to ndarray
            ``[num_samples, rows]`` for the observed sites and per-row deterministic sites.

        Examples
        --------
        >>> import numpy as np, hierfl as hf
        >>> data = hf.ClientData.from_dict({c: {"y": np.array([v]), "sigma": np.array([1.0])}
        ...                                 for c, v in zip("abcd", [0.0, 1.0, 2.0, 3.0])})
        >>> fit = hf.fit(hf.NormalNormal(), data, num_samples=100, num_warmup=100, num_chains=1)
        >>> fit.predict("a", sigma=[1.0, 1.0])["y"].shape
        (100, 2)
        >>> fit.predict("new", sigma=[1.0])["y"].shape  # population predictive
        (100, 1)
        """
        model_data = self._inputs(client, inputs)
        family = getattr(self.model, "__self__", None)  # a conjugate family's own checks
        if hasattr(family, "check_inputs"):
            family.check_inputs(ClientData.from_dict({client: model_data.fields}))
        samples = _flatten_draws(self.global_samples)
        if client in self.data:
            index = self.data.index_of(client)
            for name, value in self.client_samples([index]).items():
                samples[name] = np.asarray(value).reshape((-1,) + np.shape(value)[2:])
        if num_samples is not None:
            samples = {k: v[:num_samples] for k, v in samples.items()}
        sites = tuple(self.sites.observed) + tuple(self.sites.row_sites)
        predictive = _compiled_predictive(self.model, sites, model_data.num_clients)
        try:
            out = predictive(self._key(key, 1), samples, model_data.fields, model_data.client)
        except KeyError as error:
            raise DataError(f"client {client!r}: predict needs field {error.args[0]!r}") from None
        return {k: np.asarray(v) for k, v in out.items()}

    def adapt(self, client: Hashable, *, key=None, **fields) -> Fit:
        """Cold start with a few rows: the personal posterior of a client not in the fit.

        The client runs the engine's client step against the final global state on its own
        rows; no server round runs, and the fit is left as it is (:mod:`hierfl.adapt`).
        ``exact`` fits give the posterior a fit including the client would give (importance
        weights on ``phi``; ``diagnostics["pareto_k"]`` checks them); ``ep`` fits run the
        client's tilted inference with ``q(phi)`` as its cavity.

        Parameters
        ----------
        client : hashable
            A new client id.
        key : jax PRNGKey or int, optional
        **fields
            The client's rows, every field the model needs (as in ``ClientData``).

        Returns
        -------
        Fit
            A fit holding that one client (``predict``, ``to_arviz``, ``personal_summary``).

        Examples
        --------
        >>> import numpy as np, hierfl as hf
        >>> data = hf.ClientData.from_dict({c: {"y": np.array([v]), "sigma": np.array([1.0])}
        ...                                 for c, v in zip("abcd", [0.0, 1.0, 2.0, 3.0])})
        >>> fit = hf.fit(hf.NormalNormal(), data, num_samples=200, num_warmup=200, num_chains=1)
        >>> new = fit.adapt("e", y=[4.0, 5.0], sigma=[1.0, 1.0])
        >>> new.client_ids, new.predict("e", sigma=[1.0])["y"].shape
        (('e',), (200, 1))
        """
        from .adapt import adapt

        return adapt(self, client, key=key, **fields)

    def log_likelihood(self, clients: Sequence[Hashable] | None = None) -> dict[str, np.ndarray]:
        """Pointwise log-likelihood ``[chain, draw, obs]`` of the clients' observations."""
        ids = list(self.client_ids if clients is None else clients)
        indices = [self.data.index_of(c) for c in ids]
        samples = self._client_indexed_samples(indices)
        batch = _subset_batch(self.data, indices)
        values = _compiled_log_likelihood(self.model, batch.num_clients)(
            _flatten_draws(samples), batch.fields, batch.client
        )
        chains, draws = next(iter(self.global_samples.values())).shape[:2]
        return {k: np.asarray(v).reshape(chains, draws, -1) for k, v in values.items()}

    def _client_indexed_samples(self, indices):
        samples = dict(self.global_samples)
        samples.update(self.client_samples(indices))
        return samples

    def posterior_predictive(
        self, clients: Sequence[Hashable] | None = None, *, key=None
    ) -> dict[str, np.ndarray]:
        """Replicated observations ``[chain, draw, obs]`` for the clients' rows."""
        ids = list(self.client_ids if clients is None else clients)
        indices = [self.data.index_of(c) for c in ids]
        batch = _subset_batch(self.data, indices)
        fields = {k: v for k, v in batch.fields.items() if k not in self.sites.observed.values()}
        samples = _flatten_draws(self._client_indexed_samples(indices))
        predictive = _compiled_predictive(self.model, tuple(self.sites.observed), batch.num_clients)
        out = predictive(self._key(key, 2), samples, fields, batch.client)
        chains, draws = next(iter(self.global_samples.values())).shape[:2]
        return {k: np.asarray(v).reshape(chains, draws, -1) for k, v in out.items()}

    # ------------------------------------------------------------------ ArviZ
    def to_arviz(
        self,
        clients: Sequence[Hashable] | None = None,
        *,
        posterior_predictive: bool = True,
        log_likelihood: bool = True,
    ):
        """Export to :class:`arviz.InferenceData`.

        Groups: ``posterior`` (global sites, and per-client sites on dim ``client`` with the
        client ids as coordinates), ``posterior_predictive`` and ``log_likelihood`` (one row
        per observation on dim ``obs``, with the non-dimension coordinate ``obs_client``
        naming each row's client), ``observed_data``, and ``sample_stats`` where the engine
        has them.

        Parameters
        ----------
        clients : sequence of ids, optional
            Export only these clients (default all; with a million clients, pick some).
        """
        az = arviz()
        ids = list(self.client_ids if clients is None else clients)
        indices = np.array([self.data.index_of(c) for c in ids])
        posterior = dict(self.global_samples)
        posterior.update(self.client_samples(indices))
        dims = {}
        for name in self.sites.client_sites:
            if name in posterior:
                extra = self.dims.get(name, [CLIENT_DIM])
                dims[name] = extra if extra[:1] == [CLIENT_DIM] else [CLIENT_DIM, *extra]
        for name in self.sites.global_sites:
            if name in self.dims:
                dims[name] = self.dims[name]
        coords = dict(self.coords)
        coords[CLIENT_DIM] = ids
        batch = _subset_batch(self.data, indices)
        groups: dict[str, Any] = {"posterior": posterior}
        observed = {site: np.asarray(batch.fields[f]) for site, f in self.sites.observed.items()}
        groups["observed_data"] = observed
        if log_likelihood:
            groups["log_likelihood"] = self.log_likelihood(ids)
        if posterior_predictive:
            groups["posterior_predictive"] = self.posterior_predictive(ids)
        for site in self.sites.observed:
            dims[site] = [OBS_DIM]
        coords[OBS_DIM] = np.arange(batch.num_obs)
        sample_stats = self.diagnostics.get("sample_stats")
        if sample_stats:
            groups["sample_stats"] = sample_stats
        idata = az.from_dict(**groups, coords=coords, dims=dims)
        from . import __version__

        for group in idata.groups():
            getattr(idata, group).attrs.update(
                inference_library="hierfl",
                inference_library_version=__version__,
                method=self.method,
            )
        obs_client = np.asarray(ids)[np.asarray(batch.client)]
        for group in ("observed_data", "log_likelihood", "posterior_predictive"):
            if group in idata.groups():
                setattr(
                    idata,
                    group,
                    getattr(idata, group).assign_coords(obs_client=(OBS_DIM, obs_client)),
                )
        return idata

    def loo(self, *, by: str = "client"):
        """PSIS-LOO. ``by="client"``: leave one *client* out (the federated unit);
        ``by="obs"``: leave one observation out."""
        az = arviz()
        idata = self.to_arviz(posterior_predictive=False)
        if by == "obs":
            return az.loo(idata)
        if by != "client":
            raise ValueError("by must be 'client' or 'obs'")
        ll = idata.log_likelihood
        order = list(self.client_ids)
        summed = {
            name: ll[name]
            .groupby("obs_client")
            .sum()
            .sel(obs_client=order)
            .rename(obs_client=CLIENT_DIM)
            for name in ll.data_vars
        }
        total = sum(summed.values())
        per_client = idata.copy()
        per_client.log_likelihood = total.to_dataset(name="client_log_likelihood")
        return az.loo(per_client)

    def summary(self, var_names: Sequence[str] | None = None, **kwargs):
        """:func:`arviz.summary` of the global sites (or of ``var_names``)."""
        az = arviz()
        idata = (
            self.to_arviz(posterior_predictive=False, log_likelihood=False)
            if var_names and set(var_names) & set(self.sites.client_sites)
            else az.from_dict(
                posterior=self.global_samples,
                dims={k: v for k, v in self.dims.items() if k in self.global_samples},
                coords=self.coords,
            )
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            return az.summary(idata, var_names=list(var_names or self.global_samples), **kwargs)

    def personal_summary(self):
        """Per-client posterior mean and sd of each client site, as a pandas frame."""
        import pandas as pd

        frames = []
        for site, (mean, sd) in self.personal.items():
            mean, sd = np.asarray(mean), np.asarray(sd)
            if mean.ndim == 1:
                frames.append(pd.DataFrame({f"{site}_mean": mean, f"{site}_sd": sd}))
            else:
                names = self.coords.get(
                    self.dims.get(site, [CLIENT_DIM, "k"])[-1], range(mean.shape[1])
                )
                for j, label in enumerate(names):
                    frames.append(
                        pd.DataFrame(
                            {f"{site}[{label}]_mean": mean[:, j], f"{site}[{label}]_sd": sd[:, j]}
                        )
                    )
        frame = pd.concat(frames, axis=1) if frames else pd.DataFrame()
        frame.insert(0, "n_obs", self.data.sizes)
        frame.index = pd.Index(self.client_ids, name=CLIENT_DIM)
        return frame

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Save to ``path`` (pickle). The model function must be importable to load it."""
        return save_object(self, path)


def save_object(fit, path: str | Path) -> Path:
    """Pickle a fit (any engine's) to ``path``; returns the path."""
    path = Path(path)
    with path.open("wb") as stream:
        pickle.dump(fit, stream, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def load_object(path: str | Path, kind: type):
    """Unpickle a fit saved by :func:`save_object`, checking that it is a ``kind``."""
    with Path(path).open("rb") as stream:
        fit = pickle.load(stream)
    if not isinstance(fit, kind):
        raise TypeError(f"{path} does not hold a hierfl {kind.__name__}")
    return fit


def load_fit(path: str | Path) -> Fit:
    """Load a fit saved with :meth:`Fit.save`, or a neural one (``method="svi"``) saved with
    :meth:`hierfl.neural.NeuralFit.save` (which needs the ``neural`` extra to load)."""
    fit = load_object(path, object)
    neural = sys.modules.get("hierfl.neural.fit")  # imported by unpickling a NeuralFit
    if isinstance(fit, Fit) or (neural is not None and isinstance(fit, neural.NeuralFit)):
        return fit
    raise TypeError(f"{path} does not hold a hierfl Fit or NeuralFit")


def _subset_batch(data: ClientData, indices) -> ModelData:
    """Rows of the given clients, re-indexed ``0..len(indices)-1`` in that order."""
    indices = np.asarray(indices, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(data.sizes)])
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in indices])
    client = np.repeat(np.arange(len(indices), dtype=np.int32), data.sizes[indices])
    return ModelData({k: v[rows] for k, v in data.fields.items()}, client, len(indices))
