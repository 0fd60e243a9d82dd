"""Cold start with a few rows on radon: a county left out of the fit predicts its homes from
the population predictive (k = 0 homes of its own) and then from ``Fit.adapt`` on its first
k homes, against complete pooling (``global``) and no pooling (``local``), all in one run.

Protocol (seeded): counties with at least ``--min-homes`` homes are held out, split at random
into ``--folds`` folds. For each fold every model is fitted once with ``method="exact"`` on
the other counties. Each held-out county's homes are shuffled; its last ``n - max(ks)`` homes
are its test rows (the same for every k) and its first k homes its own rows. Methods:

* ``hierfl + uranium``: :func:`models.radon.family` with ``fixed=("floor", "log_uranium")``
  (partial pooling; the county's log uranium sets its prior mean). k = 0:
  ``fit.predict(county, ...)`` (random intercept drawn from N(0, tau^2)); k >= 1:
  ``fit.adapt(county, **first_k_rows).predict(county, ...)``.
* ``hierfl``: the same with ``fixed=("floor",)`` (no county metadata).
* ``global``: complete pooling (``tau = 0``, the FedAvg-like model), ``fixed=("floor",)``;
  ``adapt`` runs on it too (the county's k homes only reweight the shared ``beta, sigma``).
* ``local``: each county alone (k >= 1): intercept = mean over its k homes of
  ``log_radon - beta_floor * floor``, with ``beta_floor`` and ``sigma`` the ``global`` fit's
  posterior means; predictive ``N(intercept + beta_floor * floor, sigma^2 (1 + 1/k))``.

Metrics over all held-out counties' test rows (pooled over folds): RMSE of the posterior
predictive mean (for the pooled models the mean over draws of the linear predictor ``mu``,
the predictive mean without the noise draws' Monte Carlo error) and the mean log predictive
density per home. For the pooled models it is computed from the predictive draws'
parameters, ``log mean_s N(y | mu_s, sigma_s)`` over the posterior draws ``s`` with
:func:`scipy.special.logsumexp` (``mu_s`` from ``predict``'s ``mu`` site, ``sigma_s`` the
fit's matching draw), not from a Gaussian fitted to the draws. The RMSE ratios of
``hierfl + uranium`` to ``global`` and to ``local`` come with a 90% percentile interval from
a paired bootstrap over held-out counties (:func:`scipy.stats.bootstrap`).

Timing, side by side: for the first ``--timing-counties`` held-out counties, one
``adapt`` call on ``max(ks)`` rows (after a first, untimed call) against one refit of the
exact engine with the county and those rows included (``hf.fit``, tracing and compilation
included, as a refit pays them); and their agreement on the county's random intercept ``b``:
``|mean_adapt - mean_refit| / sd_refit`` and ``sd_adapt / sd_refit`` from the fits'
``personal["b"]``.

Writes the section between ``<!-- bench_coldstart:start -->`` and
``<!-- bench_coldstart:end -->`` of ``--output`` (appended if absent).

Usage::

    taskset -c 1 python benchmarks/bench_coldstart.py --output /tmp/coldstart.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from bench_vmap import machine, write
from scipy import special, stats

import hierfl as hf
from models import radon

__all__ = ["evaluate", "main", "report", "run"]

START, END = "<!-- bench_coldstart:start -->", "<!-- bench_coldstart:end -->"
RESPONSE = "log_radon"
#: the pooled models: (priors, fixed effects)
MODELS = {
    "hierfl + uranium": (None, ("floor", "log_uranium")),
    "hierfl": (None, ("floor",)),
    "global": ({"tau": 0.0}, ("floor",)),
}
METHODS = (*MODELS, "local")
#: confidence level of the bootstrap intervals of the RMSE ratios
CONFIDENCE = 0.9


def pooled_prediction(fit: hf.Fit, county, fixed, own: pd.DataFrame, test: pd.DataFrame):
    """Predictive mean and log predictive density of the test rows, and the adaptation's
    diagnostics (``None`` at k = 0): population predictive with no rows of its own,
    ``fit.adapt`` on ``own`` otherwise."""
    inputs = {name: test[name].to_numpy() for name in fixed}
    if len(own):
        rows = {name: own[name].to_numpy() for name in (RESPONSE, *fixed)}
        fit = fit.adapt(county, **rows)
        diagnostics = fit.diagnostics
    else:
        diagnostics = None
    mu = np.asarray(fit.predict(county, **inputs)["mu"], np.float64)  # [draws, rows]
    sigma = np.asarray(fit.global_samples["sigma"], np.float64).reshape(-1, 1)
    log_density = stats.norm.logpdf(test[RESPONSE].to_numpy(), mu, sigma)
    lpd = special.logsumexp(log_density, axis=0) - np.log(mu.shape[0])
    return mu.mean(axis=0), lpd, diagnostics


def local_prediction(beta_floor: float, sigma: float, own: pd.DataFrame, test: pd.DataFrame):
    """No pooling: the county's intercept from its own k homes, floor slope and noise from
    the ``global`` fit."""
    k = len(own)
    intercept = np.mean(own[RESPONSE].to_numpy() - beta_floor * own["floor"].to_numpy())
    mean = intercept + beta_floor * test["floor"].to_numpy()
    lpd = stats.norm.logpdf(test[RESPONSE].to_numpy(), mean, sigma * np.sqrt(1.0 + 1.0 / k))
    return mean, lpd


def options_of(args) -> dict:
    """The NUTS settings of the exact engine's server, passed through ``hf.fit``."""
    return dict(
        num_samples=args.num_samples, num_warmup=args.num_warmup, num_chains=args.num_chains
    )


def run(args) -> dict:
    """Every fold, county, k and method; returns per-row results, diagnostics and timings."""
    df = radon.frame()
    sizes = df.groupby("county").size()
    eligible = np.array(sorted(sizes[sizes >= args.min_homes].index))
    rng = np.random.default_rng(args.seed)
    folds = np.array_split(rng.permutation(eligible), args.folds)
    holdout = max(args.ks)
    options = options_of(args)
    records, adaptations, timings, spreads = [], [], [], []
    for fold, counties in enumerate(folds):
        train = df[~df["county"].isin(counties)]
        start = time.perf_counter()
        fits = {
            name: hf.fit(
                radon.family(priors, fixed=fixed),
                radon.load(train),
                method="exact",
                seed=args.seed,
                **options,
            )
            for name, (priors, fixed) in MODELS.items()
        }
        spreads += [
            {
                "method": name,
                "tau": float(np.mean(fit.global_samples.get("tau", 0.0))),
                "sigma": float(np.mean(fit.global_samples["sigma"])),
            }
            for name, fit in fits.items()
        ]
        pooled = fits["global"]
        beta_floor = float(np.mean(pooled.global_samples["beta"][..., 1]))
        sigma = float(np.mean(pooled.global_samples["sigma"]))
        print(
            f"fold {fold}: {len(counties)} counties held out, "
            f"{len(MODELS)} fits in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        for county in counties:
            homes = df[df["county"] == county]
            order = np.random.default_rng([args.seed, int(homes["county_id"].iloc[0])])
            homes = homes.iloc[order.permutation(len(homes))]
            test = homes.iloc[holdout:]
            for k in args.ks:
                own = homes.iloc[:k]
                predictions = {}
                for name, (_, fixed) in MODELS.items():
                    mean, lpd, diagnostics = pooled_prediction(fits[name], county, fixed, own, test)
                    predictions[name] = (mean, lpd)
                    if diagnostics is not None:
                        adaptations.append(
                            {
                                "method": name,
                                "county": county,
                                "k": k,
                                "pareto_k": diagnostics["pareto_k"],
                                "ess": diagnostics["ess"],
                            }
                        )
                if k >= 1:
                    predictions["local"] = local_prediction(beta_floor, sigma, own, test)
                for name, (mean, lpd) in predictions.items():
                    records.append(
                        pd.DataFrame(
                            {
                                "fold": fold,
                                "county": county,
                                "k": k,
                                "method": name,
                                "error": mean - test[RESPONSE].to_numpy(),
                                "lpd": lpd,
                            }
                        )
                    )
            print(
                f"  {county}: {len(homes)} homes, {len(test)} test rows, ks {list(args.ks)}",
                flush=True,
            )
        for county in counties[: max(args.timing_counties - len(timings), 0)]:
            timings.append(time_adapt_and_refit(fits["hierfl + uranium"], train, df, county, args))
            print(f"  timing {county}: {timings[-1]}", flush=True)
    return {
        "results": pd.concat(records, ignore_index=True),
        "adaptations": pd.DataFrame(adaptations),
        "timings": pd.DataFrame(timings),
        "spreads": pd.DataFrame(spreads).groupby("method", sort=False).mean(),
        "counties": len(eligible),
    }


def time_adapt_and_refit(fit: hf.Fit, train: pd.DataFrame, df: pd.DataFrame, county, args):
    """One ``adapt`` call (after an untimed first one) vs one exact refit with the county's
    first ``max(ks)`` homes included; their agreement on the county's ``b``."""
    priors, fixed = MODELS["hierfl + uranium"]
    homes = df[df["county"] == county]
    order = np.random.default_rng([args.seed, int(homes["county_id"].iloc[0])])
    own = homes.iloc[order.permutation(len(homes))].iloc[: max(args.ks)]
    rows = {name: own[name].to_numpy() for name in (RESPONSE, *fixed)}
    fit.adapt(county, **rows)
    start = time.perf_counter()
    adapted = fit.adapt(county, **rows)
    adapt_seconds = time.perf_counter() - start
    start = time.perf_counter()
    refit = hf.fit(
        radon.family(priors, fixed=fixed),
        radon.load(pd.concat([train, own])),
        method="exact",
        seed=args.seed,
        **options_of(args),
    )
    refit_seconds = time.perf_counter() - start
    mean, sd = (float(v[0]) for v in adapted.personal["b"])
    index = refit.data.index_of(county)
    ref_mean, ref_sd = (float(v[index]) for v in refit.personal["b"])
    return {
        "county": str(county),
        "adapt_s": adapt_seconds,
        "refit_s": refit_seconds,
        "z": abs(mean - ref_mean) / ref_sd,
        "sd_ratio": sd / ref_sd,
    }


def evaluate(results: pd.DataFrame) -> pd.DataFrame:
    """RMSE, mean log predictive density and row count per (method, k)."""
    grouped = results.groupby(["method", "k"])
    return pd.DataFrame(
        {
            "rmse": grouped["error"].apply(lambda e: float(np.sqrt(np.mean(e**2)))),
            "lpd": grouped["lpd"].mean(),
            "rows": grouped.size(),
            "counties": grouped["county"].nunique(),
        }
    )


def rmse_ratio(results: pd.DataFrame, k: int, baseline: str, seed: int):
    """RMSE of ``hierfl + uranium`` / RMSE of ``baseline`` at ``k`` and its paired bootstrap
    interval over counties; ``None`` where the baseline has no prediction."""
    at_k = results[results["k"] == k]
    per_county = (
        at_k.assign(squared=at_k["error"] ** 2)
        .groupby(["county", "method"])["squared"]
        .agg(["sum", "size"])
        .unstack("method")
    )
    if ("sum", baseline) not in per_county or per_county[("sum", baseline)].isna().any():
        return None
    ours, theirs = per_county[("sum", "hierfl + uranium")], per_county[("sum", baseline)]
    counts = per_county[("size", baseline)]

    def ratio(a, b, n):
        return np.sqrt(np.sum(a) / np.sum(n)) / np.sqrt(np.sum(b) / np.sum(n))

    interval = stats.bootstrap(
        (ours.to_numpy(), theirs.to_numpy(), counts.to_numpy()),
        ratio,
        paired=True,
        vectorized=False,
        confidence_level=CONFIDENCE,
        method="percentile",
        n_resamples=2000,
        random_state=seed,
    ).confidence_interval
    return ratio(ours, theirs, counts), interval.low, interval.high


def report(run_output: dict, args, command: str) -> str:
    results, adaptations, timings = (
        run_output[key] for key in ("results", "adaptations", "timings")
    )
    table = evaluate(results)
    ks = list(args.ks)
    header = "| method | " + " | ".join(f"k = {k}" for k in ks) + " |"
    rule = "| --- |" + " ---: |" * len(ks)

    def metric_rows(column: str, digits: int):
        lines = [header, rule]
        for method in METHODS:
            cells = [
                f"{table.loc[(method, k), column]:.{digits}f}"
                if (method, k) in table.index
                else "-"
                for k in ks
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return lines

    first = table.xs(ks[0], level="k").iloc[0]
    spreads = run_output["spreads"]
    worst = adaptations.loc[adaptations["pareto_k"].idxmax()]
    by_method = adaptations.groupby("method")["pareto_k"].max()
    lines = [
        START,
        "",
        "## Cold start with a few rows on radon (`benchmarks/bench_coldstart.py`)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {datetime.datetime.now(datetime.UTC).date().isoformat()}",
        f"- protocol: the {run_output['counties']} counties with at least {args.min_homes} homes "
        f"held out in {args.folds} random folds (seed {args.seed}); every model fitted with "
        f'`method="exact"` once per fold on the other counties ({args.num_chains} chains x '
        f"{args.num_samples} draws, {args.num_warmup} warmup); each held-out county's homes "
        f"shuffled, its last n - {max(ks)} homes are its test rows at every k "
        f"({int(first['counties'])} counties, {int(first['rows'])} test homes), its first k homes "
        "its own rows; k = 0 is the population predictive `fit.predict(county, ...)`, k >= 1 "
        "`fit.adapt(county, **first_k_rows).predict(county, ...)`",
        "- methods: `hierfl + uranium` partial pooling with floor and the county's log uranium "
        "as fixed effects; `hierfl` partial pooling with floor only; `global` complete pooling "
        "(tau = 0, floor only; `adapt` runs on it, its k homes only reweight the shared "
        "coefficients); `local` no pooling, intercept = mean of the k homes' log radon minus "
        "floor effect, floor slope and sigma from the `global` fit, predictive sd "
        "sigma sqrt(1 + 1/k)",
        "- posterior means of the county spread tau and the noise sd sigma (mean over folds): "
        + "; ".join(
            f"`{name}` tau {row['tau']:.3f}, sigma {row['sigma']:.3f}"
            for name, row in spreads.iterrows()
        ),
        "",
        "RMSE of the posterior predictive mean (log radon, pooled over the test homes):",
        "",
        *metric_rows("rmse", 3),
        "",
        "Mean log predictive density per test home (higher is better):",
        "",
        *metric_rows("lpd", 3),
        "",
        f"RMSE ratio `hierfl + uranium` / baseline, with a {CONFIDENCE:.0%} paired bootstrap "
        "interval over counties:",
        "",
        header,
        rule,
    ]
    for baseline in ("global", "local"):
        cells = []
        for k in ks:
            value = rmse_ratio(results, k, baseline, args.seed)
            cells.append(
                "-" if value is None else f"{value[0]:.3f} ({value[1]:.3f}-{value[2]:.3f})"
            )
        lines.append(f"| / {baseline} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Pareto k of the adaptations' importance weights: max {worst['pareto_k']:.3f} "
        f"({worst['method']}, {worst['county']}, k = {worst['k']}); per model "
        + ", ".join(f"{name} {value:.3f}" for name, value in by_method.items())
        + f"; smallest ESS {adaptations['ess'].min():.0f} of "
        f"{args.num_chains * args.num_samples} draws ({len(adaptations)} adaptations).",
        "",
        f"`adapt` vs exact refit with the county's first {max(ks)} homes included "
        f"(`hierfl + uranium`, {len(timings)} counties: "
        + ", ".join(str(c) for c in timings["county"])
        + "):",
        "",
        "| | adapt | refit | refit / adapt |",
        "| --- | ---: | ---: | ---: |",
        f"| median wall-clock | {timings['adapt_s'].median() * 1e3:.1f} ms | "
        f"{timings['refit_s'].median():.2f} s | "
        f"{timings['refit_s'].median() / timings['adapt_s'].median():.0f}x |",
        "",
        f"Agreement on the county's `b`: max |mean_adapt - mean_refit| / sd_refit "
        f"{timings['z'].max():.3f}; sd_adapt / sd_refit from {timings['sd_ratio'].min():.3f} "
        f"to {timings['sd_ratio'].max():.3f}.",
        "",
        END,
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 5])
    parser.add_argument("--min-homes", type=int, default=8)
    parser.add_argument("--timing-counties", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-warmup", type=int, default=1000)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument(
        "--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    )
    args = parser.parse_args(argv)
    if min(args.ks) < 0 or max(args.ks) >= args.min_homes:
        parser.error("every k must be in [0, min-homes): a county keeps test homes at every k")
    args.ks = sorted(set(args.ks))
    command = "python benchmarks/bench_coldstart.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # a Pareto k warning is shown once
        output = run(args)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    section = report(output, args, command)
    print(section)
    write(section, START, END, Path(args.output))


if __name__ == "__main__":
    main()
