"""hierfl's exact federated radon fit as a Flower App: one county per SuperNode.

Each SuperNode holds one county's homes (``node_config["partition-id"]``: the county's
position in ``radon.load().client_ids``; here read from the bundled data, where a real site
would read its own records) and sends only its sufficient statistics. The ServerApp infers
the global parameters from them, as ``hf.fit(radon.family(), radon.load(),
method="exact")`` does in process, with the same keys (:func:`hierfl.flower.run_server`);
every county then keeps its personal posterior on its node.

Run it from this folder with ``flwr run . --stream --federation-config
"num-supernodes=85"`` (see README.md); the run config ``num-counties`` takes the first few
counties only (as many SuperNodes).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hierfl import flower
from hierfl.engines.exact import exact_algorithm
from hierfl.engines.globals_inference import GlobalsSettings
from hierfl.protocol import FederatedAlgorithm
from models import radon

__all__ = ["client", "county_data", "make_algorithm", "server"]

COUNTIES = radon.load()
FAMILY = radon.family()


def make_algorithm(
    num_counties=COUNTIES.num_clients, num_warmup=1000, num_samples=1000, num_chains=4
) -> FederatedAlgorithm:
    """The exact engine for the radon family (the server runs NUTS on the statistics) over
    the first ``num_counties`` counties."""
    settings = GlobalsSettings(
        num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains
    )
    return exact_algorithm(FAMILY, server="auto", settings=settings, num_clients=num_counties)


def run_options(context: Context) -> dict:
    """``make_algorithm``'s options from the run config."""
    config = context.run_config
    return {
        "num_counties": int(config["num-counties"]),
        "num_warmup": int(config["num-warmup"]),
        "num_samples": int(config["num-samples"]),
        "num_chains": int(config["num-chains"]),
    }


def county_data(index: int) -> dict:
    """One county's rows as the exact engine's client data (no padding: a node knows only its
    own rows)."""
    rows = COUNTIES[COUNTIES.client_ids[index]]
    size = len(rows[FAMILY.required[0]])
    return {
        "fields": {k: np.asarray(rows[k], np.float32) for k in FAMILY.required},
        "mask": np.ones(size, dtype=bool),
    }


def load_client(context: Context) -> tuple[int, dict]:
    index = int(context.node_config["partition-id"])
    return index, county_data(index)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    config, options = context.run_config, run_options(context)
    num_counties = options["num_counties"]
    result = flower.run_server(
        grid,
        make_algorithm(**options),
        jax.random.PRNGKey(int(config["seed"])),
        num_clients=num_counties,
        num_rounds=1,
        client_ids=COUNTIES.client_ids[:num_counties],
    )
    draws = {k: np.asarray(v) for k, v in result.server_state.draws.items()}
    received = result.rounds[0].received
    lines = [f"hierfl radon on Flower: {received} of {num_counties} counties received"]
    for site, value in draws.items():
        mean, sd = value.mean(axis=0), value.std(axis=0)
        lines.append(f"  {site}: mean {np.round(mean, 3).tolist()}, sd {np.round(sd, 3).tolist()}")
    for skip in result.skips:
        lines.append(f"  skipped {skip.client!r} in round {skip.round}: {skip.reason}")
    print("\n".join(lines), flush=True)
    if config["output"]:
        path = Path(str(config["output"]))
        np.savez(path, **draws)
        print(f"  global posterior draws written to {path}", flush=True)


client = flower.client_app(make_algorithm, load_client, algorithm_options=run_options)
