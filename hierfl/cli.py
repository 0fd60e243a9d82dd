"""Command line: ``hierfl radon`` runs the main job on the bundled radon data; ``hierfl
mnist`` runs the neural variant on the bundled digits.

``hierfl radon`` fits the radon model (85 Minnesota counties as clients) federatedly with the
exact engine under no, complete and partial pooling, prints a per-county summary, and writes
ArviZ plots (forest plot of the county intercepts under the three poolings, the shrinkage
plot, the global posterior) plus a CSV summary and the saved partial-pooling fit to a folder
it names.

``hierfl mnist`` (the ``neural`` extra) splits the 5,000 bundled digits among clients with
one of the partitions of :mod:`models.mnist_heads`, fits ``method="svi"`` (a shared body with
Bayesian personal heads, normalization, low-rank adapters or channel gates: ``--model``)
next to local-only training, FedAvg and FedAvg + fine-tuning with the same budget, prints
accuracy and calibration on every client's held-out rows, and writes a reliability diagram,
per-client accuracies, the learned ``tau`` per round, a forest plot of a few clients' personal
posteriors, a per-client CSV and the saved fit.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["MNIST_MODELS", "main", "run_mnist", "run_radon"]

#: ``hierfl mnist --model``: the personal parts, as functions of :mod:`models.mnist_heads`
MNIST_MODELS = {
    "head": "mlp_head",
    "cnn": "cnn_head",
    "norm": "mlp_norm",
    "adapter": "mlp_adapter",
    "gate": "cnn_gate",
}


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
    driver: str = "simulate",
    stream=None,
) -> dict:
    """The main job. Returns the per-county summary frame and the paths written.

    ``driver="flower"`` runs the three fits in Flower's simulation engine, one SuperNode per
    county (the ``flower`` extra), instead of in process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import hierfl as hf
    from models import radon

    from ._arviz import arviz
    from .plots import plot_shrinkage

    stream = sys.stdout if stream is None else stream
    if driver == "flower":
        try:
            from . import flower  # noqa: F401
        except ImportError as error:
            raise SystemExit(f"hierfl radon: {error}") from error
    az = arviz()
    out.mkdir(parents=True, exist_ok=True)
    data = radon.load()
    print(
        f"hierfl radon: {data.num_clients} counties (clients), {data.num_obs} homes; "
        "exact federated engine, one round of sufficient statistics"
        + (", on Flower (one SuperNode per county)" if driver == "flower" else ""),
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
            driver=driver,
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

    with warnings.catch_warnings():  # arviz 0.23 calls a matplotlib API deprecated in 3.11
        warnings.filterwarnings("ignore", message="Passing a dict or None as alias_mapping")
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


def run_mnist(
    out: Path,
    *,
    partition: str = "dirichlet_0.5",
    num_clients: int = 20,
    num_rounds: int = 10,
    local_steps: int = 10,
    learning_rate: float = 3e-3,
    seed: int = 0,
    num_examples: int | None = None,
    model: str = "auto",
    stream=None,
) -> dict:
    """The neural job: hierfl's ``method="svi"`` against local-only, FedAvg and FedAvg +
    fine-tuning on one MNIST partition (every method trains ``num_rounds`` x
    ``local_steps`` Adam steps at ``learning_rate``). ``model`` picks the personal parts
    (:data:`MNIST_MODELS`; ``"auto"``: ``"norm"`` on ``feature_shift``, else ``"head"``).
    Returns the per-method summary frame,
    the per-client frame, the fit and the paths written.

    Examples
    --------
    >>> from pathlib import Path; import io, tempfile
    >>> job = run_mnist(Path(tempfile.mkdtemp()), num_clients=3, num_rounds=1, local_steps=1,
    ...                 num_examples=300, stream=io.StringIO())
    >>> list(job["summary"].index)
    ['hierfl', 'local', 'fedavg', 'fedavg_ft']
    """
    try:
        from .neural import harness
        from .neural.metrics import reliability
    except ImportError as error:
        raise SystemExit(f"hierfl mnist: {error}") from error
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from models import mnist_heads

    from ._arviz import arviz

    stream = sys.stdout if stream is None else stream
    out.mkdir(parents=True, exist_ok=True)
    split = mnist_heads.federated(
        partition, num_clients=num_clients, seed=seed, num_examples=num_examples
    )
    if model == "auto":
        model = "norm" if partition == "feature_shift" else "head"
    if model not in MNIST_MODELS:
        raise ValueError(f"model must be 'auto' or one of {sorted(MNIST_MODELS)}, got {model!r}")
    model = getattr(mnist_heads, MNIST_MODELS[model])()
    sizes = split.train.sizes
    print(
        f"hierfl mnist: {num_clients} clients ({partition}), {int(sizes.sum())} training digits "
        f"({int(sizes.min())}-{int(sizes.max())} per client), model {model.name}; "
        f"{num_rounds} rounds x {local_steps} local steps at learning rate {learning_rate}",
        file=stream,
    )
    start = time.perf_counter()
    results = harness.compare(
        model,
        split.train,
        split.validation,
        split.test,
        num_rounds=num_rounds,
        local_steps=local_steps,
        seed=seed,
        methods=("hierfl", "local", "fedavg", "fedavg_ft"),
        learning_rates=(learning_rate,),
    )
    fit = results["_fit"]
    names = [name for name in results if not name.startswith("_")]
    summary = pd.DataFrame(
        {name: {**results[name].metrics, "wall_s": results[name].wall_time} for name in names}
    ).T[["acc_mean", "acc_p10", "nll", "ece", "wall_s"]]
    per_client = pd.DataFrame(
        {"n_train": sizes, **{f"acc_{name}": results[name].client_accuracy for name in names}},
        index=pd.Index(split.train.client_ids, name="client"),
    )
    with pd.option_context("display.width", 120, "display.float_format", "{:.3f}".format):
        print(
            f"\nHeld-out rows of every client (fitted in {time.perf_counter() - start:.0f} s; "
            "acc_p10: 10th percentile over clients; ECE with 15 bins):",
            file=stream,
        )
        print(summary.to_string(), file=stream)
    print(
        f"\nLearned tau (spread of the personal parameters around mu): mean "
        f"{float(np.mean(fit.tau)):.3f} over {fit.tau.size} coordinates; hierfl beats FedAvg "
        f"on {int(np.sum(per_client.acc_hierfl > per_client.acc_fedavg))} and trails it on "
        f"{int(np.sum(per_client.acc_hierfl < per_client.acc_fedavg))} of {num_clients} clients",
        file=stream,
    )

    paths = {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axis = axes[0]
    axis.plot([0, 1], [0, 1], "k--", lw=1)
    for name in ("hierfl", "fedavg", "fedavg_ft"):
        r = results[name]
        conf, acc, count = reliability(np.concatenate(r.probs), np.concatenate(r.labels))
        used = count > 0
        axis.plot(conf[used], acc[used], "o-", ms=3, label=f"{name} (ECE {r.metrics['ece']:.3f})")
    axis.set(xlabel="confidence", ylabel="accuracy", title="reliability on held-out rows")
    axis.legend(fontsize=8)
    axis = axes[1]
    for name in ("hierfl", "fedavg", "local"):
        axis.scatter(per_client.n_train, per_client[f"acc_{name}"], s=12, label=name)
    axis.set(xlabel="training rows of the client", ylabel="test accuracy", title="per client")
    axis.legend(fontsize=8)
    axis = axes[2]
    axis.plot([float(r["tau_mean"]) for r in fit.diagnostics["rounds"]], "o-")
    axis.set(xlabel="round", ylabel="mean tau", title="learned tau")
    fig.tight_layout()
    paths["plots"] = out / "mnist_personal_heads.png"
    fig.savefig(paths["plots"], dpi=110)
    plt.close("all")

    idata = fit.to_arviz(num_draws=200)
    site = min(
        (name for name in idata.posterior.data_vars if not name.startswith(("mu_", "tau_"))),
        key=lambda name: idata.posterior[name].size,
    )
    shown = list(split.train.client_ids[:4])
    first_dim = f"{site}_dim_0"
    coords = {"client": shown, first_dim: idata.posterior[first_dim].values[:10]}
    rows = len(shown) * int(np.prod([len(v) for v in coords.values()][1:]))
    arviz().plot_forest(
        idata,
        var_names=[site],
        coords=coords,
        combined=True,
        figsize=(7, 1.2 + 0.22 * rows),
        hdi_prob=0.9,
        textsize=9,
    )
    plt.gca().set_title(f"q_i of {site} (first {len(coords[first_dim])}), clients {shown}")
    paths["forest"] = out / f"forest_{site}.png"
    plt.gcf().savefig(paths["forest"], dpi=100, bbox_inches="tight")
    plt.close("all")
    paths["summary"] = out / "mnist_summary.csv"
    summary.to_csv(paths["summary"])
    paths["clients"] = out / "mnist_clients.csv"
    per_client.to_csv(paths["clients"])
    paths["fit"] = fit.save(out / "mnist_svi.hfit")
    print("\nWrote:", file=stream)
    for path in paths.values():
        print(f"  {path}", file=stream)
    return {"summary": summary, "clients": per_client, "fit": fit, "paths": paths}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hierfl`` command."""
    from models.mnist_heads import PARTITIONS

    parser = argparse.ArgumentParser(prog="hierfl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    job = commands.add_parser("radon", help="federated fit of the radon model (main job)")
    job.set_defaults(run=run_radon)
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
    job.add_argument(
        "--driver",
        choices=("simulate", "flower"),
        default="simulate",
        help="run the clients in process (default) or in Flower's simulation engine, one "
        "SuperNode per county (needs the flower extra)",
    )
    neural = commands.add_parser(
        "mnist",
        help="neural variant on the bundled digits: Bayesian personal heads vs FedAvg "
        "(needs the neural extra)",
    )
    neural.set_defaults(run=run_mnist)
    neural.add_argument("--out", type=Path, default=Path("hierfl-mnist"))
    neural.add_argument("--partition", choices=PARTITIONS, default="dirichlet_0.5")
    neural.add_argument("--clients", dest="num_clients", type=int, default=20)
    neural.add_argument("--rounds", dest="num_rounds", type=int, default=10)
    neural.add_argument("--local-steps", type=int, default=10)
    neural.add_argument("--learning-rate", type=float, default=3e-3)
    neural.add_argument("--seed", type=int, default=0)
    neural.add_argument(
        "--model",
        choices=["auto", *MNIST_MODELS],
        default="auto",
        help="personal parts: a head (MLP or CNN body), normalization (FedBN-style), "
        "low-rank adapters or CNN channel gates; auto: normalization on feature_shift, "
        "else a head",
    )
    options = vars(parser.parse_args(argv))
    options.pop("command")
    options.pop("run")(options.pop("out"), **options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
