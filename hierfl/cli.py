"""Command line: ``hierfl radon`` runs the main job on the bundled radon data.

It fits the radon model (85 Minnesota counties as clients) federatedly with the exact engine
under no, complete and partial pooling, prints a per-county summary, and writes ArviZ plots
(forest plot of the county intercepts under the three poolings, the shrinkage plot, the
global posterior) plus a CSV summary and the saved partial-pooling fit to a folder it names.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "run_radon"]


def _county_idata(fit, intercepts, ids):
    from ._arviz import arviz

    return arviz().from_dict(
        posterior={"county_intercept": intercepts},
        dims={"county_intercept": ["client"]},
        coords={"client": ids},
    )


def run_radon(
    out: Path,
    *,
    seed: int = 0,
    num_samples: int = 1000,
    num_warmup: int = 1000,
    num_chains: int = 4,
    stream=sys.stdout,
) -> dict:
    """The main job. Returns the per-county summary frame and the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import hierfl as hf
    from models import radon

    from ._arviz import arviz
    from .plots import plot_shrinkage

    az = arviz()
    out.mkdir(parents=True, exist_ok=True)
    data = radon.load()
    print(
        f"hierfl radon: {data.num_clients} counties (clients), {data.num_obs} homes; "
        "exact federated engine, one round of sufficient statistics",
        file=stream,
    )
    fits, intercepts, times = {}, {}, {}
    for name, family in radon.spectrum().items():
        start = time.perf_counter()
        fits[name] = hf.fit(
            family,
            data,
            method="exact",
            seed=seed,
            num_samples=num_samples,
            num_warmup=num_warmup,
            num_chains=num_chains,
        )
        times[name] = time.perf_counter() - start
        intercepts[name] = radon.county_intercepts(fits[name])
        print(f"  {name:<17} fitted in {times[name]:5.1f} s", file=stream)
    partial = fits["partial pooling"]
    ids = list(data.client_ids)
    frame = radon.frame()
    local_mean = frame.groupby("county", sort=False)["log_radon"].mean().reindex(ids)
    summary = partial.personal_summary()[["n_obs"]].copy()
    summary.insert(1, "mean_log_radon", local_mean.to_numpy())
    for name, draws in intercepts.items():
        key = name.split()[0]
        summary[f"{key}_pooling"] = draws.mean(axis=(0, 1))
    summary["partial_sd"] = intercepts["partial pooling"].std(axis=(0, 1))
    # where partial pooling shrinks each county to: the county-level regression on uranium
    effects = partial.posterior_samples()[partial.sites.client_sites[0]]
    summary["county_regression"] = (intercepts["partial pooling"] - effects).mean(axis=(0, 1))
    import pandas as pd

    with pd.option_context(
        "display.max_rows", None, "display.width", 120, "display.float_format", "{:.3f}".format
    ):
        print(
            "\nCounty intercepts (expected log radon, basement) under no / complete / partial "
            "pooling;\npartial pooling pulls small counties toward the county-level "
            "regression on log uranium",
            file=stream,
        )
        print(summary.sort_values("n_obs").to_string(), file=stream)
    print("\nGlobal posterior (partial pooling):", file=stream)
    with pd.option_context("display.width", 120):
        print(partial.summary().to_string(), file=stream)

    paths = {}
    idatas = {name: _county_idata(fits[name], intercepts[name], ids) for name in fits}
    axes = az.plot_forest(
        list(idatas.values()),
        model_names=list(idatas),
        var_names=["county_intercept"],
        combined=True,
        figsize=(9, 26),
        hdi_prob=0.9,
    )
    axes[0].set_title("Radon: county intercepts under no, complete and partial pooling")
    paths["forest"] = out / "forest_county_intercepts.png"
    plt.gcf().savefig(paths["forest"], dpi=110, bbox_inches="tight")
    plt.close("all")

    axis = plot_shrinkage(
        summary["n_obs"].to_numpy(),
        summary["no_pooling"].to_numpy(),
        summary["partial_pooling"].to_numpy(),
        pooled=float(np.mean(summary["complete_pooling"])),
    )
    axis.set_ylabel("county intercept (log radon)")
    paths["shrinkage"] = out / "shrinkage.png"
    axis.figure.savefig(paths["shrinkage"], dpi=110, bbox_inches="tight")
    plt.close("all")

    az.plot_posterior(
        partial.to_arviz(posterior_predictive=False, log_likelihood=False),
        var_names=["beta", "sigma", "tau"],
    )
    paths["globals"] = out / "global_posterior.png"
    plt.gcf().savefig(paths["globals"], dpi=90, bbox_inches="tight")
    plt.close("all")

    paths["summary"] = out / "county_summary.csv"
    summary.to_csv(paths["summary"])
    paths["fit"] = partial.save(out / "radon_partial_pooling.hfit")
    print("\nWrote:", file=stream)
    for path in paths.values():
        print(f"  {path}", file=stream)
    return {"summary": summary, "paths": paths, "fits": fits}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hierfl`` command."""
    parser = argparse.ArgumentParser(prog="hierfl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    job = commands.add_parser("radon", help="federated fit of the radon model (main job)")
    job.add_argument(
        "--out",
        type=Path,
        default=Path("hierfl-output"),
        help="folder for plots, summary and the saved fit (default: hierfl-output)",
    )
    job.add_argument("--seed", type=int, default=0)
    job.add_argument("--num-samples", type=int, default=1000)
    job.add_argument("--num-warmup", type=int, default=1000)
    job.add_argument("--num-chains", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "radon":
        run_radon(
            args.out,
            seed=args.seed,
            num_samples=args.num_samples,
            num_warmup=args.num_warmup,
            num_chains=args.num_chains,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
