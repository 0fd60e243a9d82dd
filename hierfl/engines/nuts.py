"""Centralized NUTS on the pooled data: the yardstick, not a federated method.

Every federated engine is measured against this on the same model and data. For a conjugate
family it runs the family's NumPyro model with its non-centred reparameterization; for any
other model it runs the model as written.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from numpyro import handlers
from numpyro.infer import MCMC, NUTS

from ..data import ClientData
from ..fit import Fit, StoredClientSamples, inspect_model

__all__ = ["fit_nuts"]


def fit_nuts(
    key,
    model,
    data: ClientData,
    *,
    reparam: dict[str, Any] | None = None,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
    target_accept: float = 0.9,
    progress: bool = False,
    dims=None,
    coords=None,
    seed: int = 0,
) -> Fit:
    """Centralized NUTS on ``model`` with all clients' data pooled."""
    batch = data.batch()
    sites = inspect_model(model, batch)
    run_model = handlers.reparam(model, config=reparam) if reparam else model
    mcmc = MCMC(
        NUTS(run_model, target_accept_prob=target_accept),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="sequential",
        progress_bar=progress,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*There are not enough devices.*")
        mcmc.run(key, batch, extra_fields=("diverging",))
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    diverging = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["diverging"])
    global_samples = {k: samples[k] for k in sites.global_sites if k in samples}
    client_samples = {k: samples[k] for k in sites.client_sites if k in samples}
    diagnostics = {"divergences": int(diverging.sum()), "sample_stats": {"diverging": diverging}}
    personal = {k: (v.mean(axis=(0, 1)), v.std(axis=(0, 1))) for k, v in client_samples.items()}
    return Fit(
        "nuts",
        model,
        data,
        global_samples,
        StoredClientSamples(client_samples),
        sites,
        personal=personal,
        diagnostics=diagnostics,
        dims=dict(dims or {}),
        coords=dict(coords or {}),
        seed=seed,
    )
