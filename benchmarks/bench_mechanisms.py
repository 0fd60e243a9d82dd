"""Tribes and drift, the two new conjugate mechanisms: what they buy, and exact vs NUTS.

Two parts, each compared side by side in the same run.

1. **Tribes** (:class:`hierfl.tribes.NormalMixture`).

   a. Accuracy: :func:`models.tribes.compare` on ``--tribe-seeds`` generated federations of
      ``--tribe-clients`` clients in two tribes (exact engine, the module's default draws):
      held-out RMSE, log predictive density per row, RMSE of ``theta``'s posterior mean and
      the tribe model's membership accuracy, for complete pooling, one Gaussian and tribes;
      tribes minus one Gaussian paired by seed (mean +- standard error, seeds better) and the
      ratio of the means. The no-tribes control (``means=(0, 0), spread=2``: one wide group)
      on ``--control-seeds`` seeds shows what the mixture costs when there are no tribes.
   b. The exact engine against centralized NUTS (``method="nuts"``, same family, data and
      draws) at ``--tribe-sizes`` clients.

2. **Drift** (:class:`hierfl.drift.DriftingNormal`, lifelong learning with forgetting).

   a. Sleepstudy one-step-ahead forecast (:func:`models.sleepstudy.forecast`) of days 9, 8
      and 7 (each from the days before it): RMSE and log predictive density of the drift
      model, random intercept + slope and complete pooling, the learned ``rho`` (mean, 90%
      interval), and paired per-subject differences with standard errors; pooled over the
      three days with each subject's differences averaged over the days first (the 54
      forecasts share subjects, so the standard error is over the 18 subjects).
   b. The exact engine against centralized NUTS on generated drifting data
      (:func:`generate_drift`: ``T`` periods, the last one without rows, a forecast) at
      ``--drift-sizes`` clients.

Exact vs NUTS: every fit runs in a fresh Python process (as in ``bench_exact.py``), so each
side pays its own JAX compilation; the time is the ``hf.fit`` call. Agreement, over every
global quantity and separately over every client quantity (``theta``; the drift model's
states, client x period): the max of |mean_exact - mean_nuts| / sd_nuts, the max of
|sd_exact / sd_nuts - 1|, and, for the Monte Carlo context, the max of the mean difference
over its Monte Carlo standard error ``sqrt(var_e/ESS_e + var_n/ESS_n)`` (ESS from ArviZ) with
the 95% quantile of the largest of that many independent |N(0, 1)|: a max below it is within
Monte Carlo noise.

Usage::

    taskset -c 1 python benchmarks/bench_mechanisms.py --output /tmp/mechanisms.md
    taskset -c 1 python benchmarks/bench_mechanisms.py --quick --output /tmp/quick.md
    taskset -c 1 python benchmarks/bench_mechanisms.py --output /tmp/m.md --write-benchmarks

``--write-benchmarks`` also puts the section between ``<!-- bench_mechanisms:start -->`` and
``<!-- bench_mechanisms:end -->`` of BENCHMARKS.md (appended at the end if absent).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_mechanisms:start -->", "<!-- bench_mechanisms:end -->"
#: the drift model's number of periods in the generated data (the last has no rows)
DRIFT_PERIODS = 10
#: true values of the generated drifting data
DRIFT_TRUTH = {"beta": (1.0, 0.5), "tau": 1.0, "rho": 0.7, "sigma": 0.6}
#: the tribes comparison's models, in table order
TRIBE_MODELS = ("complete pooling", "one Gaussian", "tribes")
#: tribes metrics: +1 when higher is better
TRIBE_METRICS = {"heldout_rmse": -1.0, "heldout_lpd": 1.0, "theta_rmse": -1.0}
#: a client's posterior is "split" between the tribes when more than this share of its
#: exact draws of theta lie on either side of 0
SPLIT = 0.01
DRIFT_MODELS = ("drift (AR(1) states)", "random intercept + slope", "complete pooling")

__all__ = [
    "agreement",
    "drift_forecasts",
    "engine_comparison",
    "generate_drift",
    "main",
    "report",
    "tribes_accuracy",
    "worker",
]


# ---------------------------------------------------------------------- problems
def generate_drift(num_clients: int, *, seed: int = 0, num_periods: int = DRIFT_PERIODS):
    """Clients with 0..3 rows in each of periods ``0..T-2`` (at least one row in all), none in
    the last (a forecast); states a stationary AR(1) with :data:`DRIFT_TRUTH`, one covariate
    ``x`` with a fixed effect."""
    import hierfl as hf

    beta, tau, rho, sigma = (DRIFT_TRUTH[k] for k in ("beta", "tau", "rho", "sigma"))
    rng = np.random.default_rng(seed)
    lags = np.abs(np.subtract.outer(np.arange(num_periods), np.arange(num_periods)))
    chol = np.linalg.cholesky(tau**2 * rho**lags)
    clients = {}
    for i in range(num_clients):
        state = chol @ rng.normal(size=num_periods)
        counts = rng.integers(0, 4, num_periods - 1)
        period = np.repeat(np.arange(num_periods - 1), counts)
        if period.size == 0:
            period = np.array([0])
        x = rng.normal(size=period.size)
        y = beta[0] + beta[1] * x + state[period] + rng.normal(0.0, sigma, period.size)
        clients[f"c{i:05d}"] = {"y": y, "x": x, "period": period.astype(float)}
    return hf.ClientData.from_dict(clients)


def _problem(name: str, num_clients: int):
    if name == "tribes":
        from models import tribes

        return tribes.family(), tribes.generate(num_clients, seed=0).train
    if name == "drift":
        from hierfl.drift import DriftingNormal

        return DriftingNormal(num_periods=DRIFT_PERIODS, fixed=["x"]), generate_drift(num_clients)
    raise ValueError(name)


# ---------------------------------------------------------------------- exact vs NUTS
def worker(name: str, num_clients: int, method: str, out: str, settings: str) -> None:
    """Fit once in this process; write the draws ``[chain, draw, ...]`` and a record."""
    warnings.simplefilter("ignore")
    import hierfl as hf

    family, data = _problem(name, num_clients)
    options = json.loads(settings)
    start = time.perf_counter()
    fit = hf.fit(family, data, method=method, seed=0, **options)
    seconds = time.perf_counter() - start
    sites = fit.sites.global_sites + fit.sites.client_sites
    draws = {k: np.asarray(v) for k, v in fit.posterior_samples().items() if k in sites}
    record = {
        "seconds": seconds,
        "clients": data.num_clients,
        "observations": data.num_obs,
        "server": str(fit.diagnostics.get("server", "")),
        "divergences": int(fit.diagnostics.get("divergences", 0)),
        "global_sites": list(fit.sites.global_sites),
        "client_sites": list(fit.sites.client_sites),
    }
    np.savez(out, **draws)
    Path(out + ".json").write_text(json.dumps(record))


def _run_worker(name, num_clients, method, settings, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "draws.npz")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        command = [sys.executable, __file__, "worker", name, str(num_clients), method, out]
        subprocess.run(
            command + [json.dumps(settings)], check=True, env=env, timeout=timeout, cwd=ROOT
        )
        record = json.loads(Path(out + ".json").read_text())
        with np.load(out) as draws:
            return record, {k: draws[k] for k in draws.files}


def agreement(test: dict, reference: dict, sites, select=None) -> dict:
    """Over every element of ``sites`` (or those where ``select``, flat per site, is true):
    max |mean diff| / reference sd, max |sd ratio - 1|, max |mean diff| / its Monte Carlo
    se, and that max's 95% quantile under pure noise."""
    from scipy import stats

    worst_z = worst_sd = worst_mc = 0.0
    count = 0
    ess_test, ess_ref = [], []
    for site in sites:
        a, b = test[site], reference[site]  # [chain, draw, ...]
        a = a.reshape(a.shape[:2] + (-1,))
        b = b.reshape(b.shape[:2] + (-1,))
        sd_b, sd_a = b.std(axis=(0, 1)), a.std(axis=(0, 1))
        keep = sd_b > 0  # fixed parameters (e.g. a K = 1 weight) carry no information
        if select is not None:
            keep = keep & select
        if not keep.any():
            continue
        a, b, sd_a, sd_b = a[..., keep], b[..., keep], sd_a[keep], sd_b[keep]
        diff = np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1)))
        ea, eb = _ess(a), _ess(b)
        mc_se = np.sqrt(sd_a**2 / ea + sd_b**2 / eb)
        worst_z = max(worst_z, float(np.max(diff / sd_b)))
        worst_sd = max(worst_sd, float(np.max(np.abs(sd_a / sd_b - 1.0))))
        worst_mc = max(worst_mc, float(np.max(diff / mc_se)))
        count += int(keep.sum())
        ess_test.append(ea)
        ess_ref.append(eb)
    noise = float(stats.norm.ppf(0.5 + 0.5 * 0.95 ** (1.0 / max(count, 1))))
    if not count:
        return {"quantities": 0}
    return {
        "quantities": count,
        "z": worst_z,
        "sd": worst_sd,
        "mc": worst_mc,
        "mc_noise95": noise,
        "ess_test": float(np.median(np.concatenate(ess_test))),
        "ess_ref": float(np.median(np.concatenate(ess_ref))),
        "ess_test_min": float(np.min(np.concatenate(ess_test))),
        "ess_ref_min": float(np.min(np.concatenate(ess_ref))),
    }


def _ess(draws: np.ndarray) -> np.ndarray:
    """Bulk ESS of every column of ``[chain, draw, k]`` (ArviZ)."""
    import arviz as az

    value = az.ess(az.convert_to_dataset({"x": draws}))["x"]
    return np.asarray(value, np.float64).reshape(-1)


def engine_comparison(name: str, sizes, settings: dict, args):
    """Exact vs NUTS on ``name`` at every size (NUTS skipped above ``args.nuts_up_to`` and
    abandoned after ``args.nuts_timeout`` seconds)."""
    rows = []
    for size in sizes:
        exact_record, exact_draws = _run_worker(name, size, "exact", settings, args.timeout)
        row = {"name": name, "clients": size, "exact": exact_record}
        print(f"{name} {size}: exact {exact_record['seconds']:.1f} s", flush=True)
        if size > args.nuts_up_to:
            row["skipped"] = f"not run (above --nuts-up-to {args.nuts_up_to:,})"
        else:
            try:
                nuts_record, nuts_draws = _run_worker(
                    name, size, "nuts", settings, args.nuts_timeout
                )
            except subprocess.TimeoutExpired:
                row["skipped"] = f"stopped after {args.nuts_timeout:.0f} s (--nuts-timeout)"
                print(f"{name} {size}: nuts {row['skipped']}", flush=True)
            else:
                print(f"{name} {size}: nuts {nuts_record['seconds']:.1f} s", flush=True)
                row["nuts"] = nuts_record
                row["global"] = agreement(exact_draws, nuts_draws, nuts_record["global_sites"])
                row["client"] = agreement(exact_draws, nuts_draws, nuts_record["client_sites"])
                if name == "tribes":
                    row.update(_tribe_modes(exact_draws["theta"], nuts_draws["theta"]))
                    for part, select in (("clear", ~row["ambiguous"]), ("split", row["ambiguous"])):
                        row[part] = agreement(exact_draws, nuts_draws, ["theta"], select)
        rows.append(row)
    return rows


def _tribe_modes(exact: np.ndarray, nuts: np.ndarray) -> dict:
    """Clients whose exact posterior of ``theta`` is split between the tribes (between
    :data:`SPLIT` and ``1 - SPLIT`` of its draws above 0, the midpoint of the generator's
    tribe means), and how many of them NUTS keeps on one side (at most ``SPLIT`` of its draws
    on the other) in every chain."""
    above_exact = np.mean(exact > 0.0, axis=(0, 1))
    ambiguous = (above_exact > SPLIT) & (above_exact < 1.0 - SPLIT)
    above_nuts = np.mean(nuts > 0.0, axis=1)  # [chain, client]
    one_sided = np.all((above_nuts <= SPLIT) | (above_nuts >= 1.0 - SPLIT), axis=0)
    return {"ambiguous": ambiguous, "stuck": int(np.sum(ambiguous & one_sided))}


# ---------------------------------------------------------------------- tribes accuracy
def _paired(difference: np.ndarray, better: float) -> dict:
    n = difference.size
    return {
        "mean": float(difference.mean()),
        "se": float(difference.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "better": int(np.sum(better * difference > 0)),
        "n": n,
    }


def tribes_accuracy(seeds, num_clients: int, settings: dict | None, **generator) -> dict:
    """:func:`models.tribes.compare`, its per-model means and tribes - one Gaussian, paired."""
    from models import tribes

    frame = tribes.compare(seeds, num_clients=num_clients, settings=settings, **generator)
    means = frame.groupby("model", sort=False).mean().drop(columns="seed")
    wide = frame.set_index(["seed", "model"])[list(TRIBE_METRICS)].unstack("model")
    paired = {
        metric: _paired((wide[metric]["tribes"] - wide[metric]["one Gaussian"]).to_numpy(), better)
        for metric, better in TRIBE_METRICS.items()
    }
    membership = frame.loc[frame["model"] == "tribes", "membership_accuracy"].to_numpy()
    return {"frame": frame, "means": means, "paired": paired, "membership": membership}


# ---------------------------------------------------------------------- drift forecasts
def drift_forecasts(days, settings: dict | None) -> dict:
    """:func:`models.sleepstudy.forecast` for each held-out day."""
    from models import sleepstudy

    results = {}
    for day in days:
        start = time.perf_counter()
        result = sleepstudy.forecast(day=day, seed=0, **(settings or {}))
        print(f"forecast day {day}: {time.perf_counter() - start:.1f} s", flush=True)
        results[day] = {"table": result.table, "rho": result.rho, "per_subject": result.per_subject}
    return results


def _forecast_paired(per_subject, model: str, baseline: str) -> dict:
    """``model - baseline`` per subject: squared error (ms^2; negative is better) and log
    density (positive is better)."""
    squared = per_subject["error"] ** 2
    a, b = squared.xs(model, level="model"), squared.xs(baseline, level="model")
    la = per_subject["log_density"].xs(model, level="model")
    lb = per_subject["log_density"].xs(baseline, level="model")
    return {
        "squared_error": _paired((a - b).to_numpy(), -1.0),
        "log_density": _paired((la - lb).to_numpy(), 1.0),
    }


def _pooled_per_subject(results):
    """Per subject and model, the mean over the days of squared error and log density (the
    subject-level unit of the pooled comparison), with ``error`` as the root of the former."""
    import pandas as pd

    stacked = pd.concat(
        {day: r["per_subject"] for day, r in results.items()}, names=["day"]
    ).reset_index()
    stacked["squared"] = stacked["error"] ** 2
    per = stacked.groupby(["model", "Subject"])[["squared", "log_density"]].mean()
    per["error"] = np.sqrt(per["squared"])
    return stacked, per[["error", "log_density"]]


# ---------------------------------------------------------------------- report
def machine() -> str:
    import jax

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU, this run on {cores} core(s) "
        f"(taskset); Python {platform.python_version()}, jax {jax.__version__}"
    )


def _pm(value: dict, digits: int = 3) -> str:
    return f"{value['mean']:+.{digits}f} +- {value['se']:.{digits}f}"


def _engine_lines(rows, settings, client_label: str) -> list[str]:
    draws = settings["num_chains"] * settings["num_samples"]
    lines = [
        f"Same family, data and draws for both ({settings['num_chains']} chain(s) x "
        f"{settings['num_samples']} draws after {settings['num_warmup']} warmup = {draws} "
        "draws); each fit in a fresh process, compilation included. Agreement: max over the "
        "quantities of |mean_exact - mean_NUTS| / sd_NUTS and of |sd_exact / sd_NUTS - 1|; "
        "`MC z` is the max of |mean diff| over its Monte Carlo se sqrt(var_e/ESS_e + "
        "var_n/ESS_n), `noise 95%` the 95% quantile of the max of that many independent "
        "|N(0, 1)| (a max below it is within Monte Carlo noise); ESS median (min) over the "
        "quantities, exact / NUTS.",
        "",
        "| clients | obs | exact server | exact s | NUTS s | NUTS / exact | NUTS divergences |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        exact = row["exact"]
        if "nuts" in row:
            nuts = row["nuts"]
            cells = (
                f"{nuts['seconds']:.1f} | {nuts['seconds'] / exact['seconds']:.1f}x | "
                f"{nuts['divergences']}"
            )
        else:
            cells = f"{row['skipped']} | - | -"
        lines.append(
            f"| {row['clients']:,} | {exact['observations']:,} | {exact['server']} | "
            f"{exact['seconds']:.1f} | {cells} |"
        )
    lines += [
        "",
        "| clients | quantities | max abs(mean diff)/sd | max abs(sd ratio - 1) | MC z "
        "| noise 95% | ESS exact | ESS NUTS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if "nuts" not in row:
            continue
        parts = [("global", "globals"), ("client", client_label)]
        if "ambiguous" in row:
            parts += [
                ("clear", f"{client_label}, clients with one tribe"),
                ("split", f"{client_label}, clients split between tribes"),
            ]
        for part, label in parts:
            a = row[part]
            if not a["quantities"]:
                continue
            lines.append(
                f"| {row['clients']:,}: {label} | {a['quantities']:,} | {a['z']:.3f} | "
                f"{a['sd']:.3f} | {a['mc']:.2f} | {a['mc_noise95']:.2f} | "
                f"{a['ess_test']:.0f} ({a['ess_test_min']:.0f}) | "
                f"{a['ess_ref']:.0f} ({a['ess_ref_min']:.0f}) |"
            )
    return lines


def _tribe_lines(result, title: str, membership: bool = True) -> list[str]:
    means, paired = result["means"], result["paired"]
    seeds = paired["heldout_rmse"]["n"]
    lines = [
        title,
        "",
        "| model | held-out RMSE | held-out lpd per row | theta RMSE |"
        + (" membership accuracy |" if membership else ""),
        "| --- | ---: | ---: | ---: |" + (" ---: |" if membership else ""),
    ]
    for model in TRIBE_MODELS:
        row = means.loc[model]
        cell = ""
        if membership:
            cell = f" {row['membership_accuracy']:.3f} |" if model == "tribes" else " - |"
        lines.append(
            f"| {model} | {row['heldout_rmse']:.4f} | {row['heldout_lpd']:.4f} | "
            f"{row['theta_rmse']:.4f} |" + cell
        )
    ratio = {m: means.loc["tribes", m] / means.loc["one Gaussian", m] for m in TRIBE_METRICS}
    lines += [
        "",
        f"tribes - one Gaussian, paired by seed (mean +- se over {seeds} seeds; seeds on which "
        "tribes is better) and tribes / one Gaussian (ratio of the means):",
        "",
        "| | held-out RMSE | held-out lpd per row | theta RMSE |",
        "| --- | ---: | ---: | ---: |",
        "| difference | " + " | ".join(_pm(paired[m], 4) for m in TRIBE_METRICS) + " |",
        "| tribes better on | "
        + " | ".join(f"{paired[m]['better']}/{paired[m]['n']}" for m in TRIBE_METRICS)
        + " |",
        "| ratio | " + " | ".join(f"{ratio[m]:.3f}" for m in TRIBE_METRICS) + " |",
    ]
    return lines


def _forecast_lines(results) -> tuple[list[str], dict]:
    days = list(results)
    lines = [
        "| held-out day | model | RMSE (ms) | lpd per subject (nats) |",
        "| ---: | --- | ---: | ---: |",
    ]
    for day in days:
        table = results[day]["table"]
        for model in DRIFT_MODELS:
            lines.append(
                f"| {day} | {model} | {table.loc[model, 'rmse']:.1f} | "
                f"{table.loc[model, 'log_predictive_density']:.3f} |"
            )
    stacked, per = _pooled_per_subject(results)
    pooled_rmse = stacked.groupby("model")["squared"].mean() ** 0.5
    pooled_lpd = stacked.groupby("model")["log_density"].mean()
    for model in DRIFT_MODELS:
        lines.append(
            f"| {', '.join(map(str, days))} pooled | {model} | {pooled_rmse[model]:.1f} | "
            f"{pooled_lpd[model]:.3f} |"
        )
    lines += [
        "",
        "Learned forgetting rate `rho` of the drift model (posterior mean, 90% interval): "
        + "; ".join(
            f"day {day}: {r['rho']['mean']:.3f} ({r['rho']['lower']:.3f}-{r['rho']['upper']:.3f})"
            for day, r in results.items()
        )
        + ".",
        "",
        "Drift minus baseline, paired by subject (mean +- se over the 18 subjects; subjects on "
        "which drift is better): squared forecast error (ms^2, negative is better) and log "
        "predictive density (nats, positive is better); RMSE ratio drift / baseline. Pooled: "
        "each subject's differences averaged over the days first, se over the 18 subjects.",
        "",
        "| held-out day | baseline | squared error diff | better | lpd diff | better "
        "| RMSE ratio |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    summary = {}
    for baseline in DRIFT_MODELS[1:]:
        sources = [(str(day), results[day]["per_subject"]) for day in days]
        sources.append((f"{', '.join(map(str, days))} pooled", per))
        for label, frame in sources:
            d = _forecast_paired(frame, DRIFT_MODELS[0], baseline)
            rmse = (frame["error"] ** 2).groupby(level="model").mean() ** 0.5
            ratio = rmse[DRIFT_MODELS[0]] / rmse[baseline]
            summary[(label, baseline)] = (d, ratio)
            lines.append(
                f"| {label} | {baseline} | {_pm(d['squared_error'], 0)} | "
                f"{d['squared_error']['better']}/{d['squared_error']['n']} | "
                f"{_pm(d['log_density'], 3)} | "
                f"{d['log_density']['better']}/{d['log_density']['n']} | {ratio:.3f} |"
            )
    return lines, summary


def report(output: dict, args, command: str, wall: float) -> str:
    tribe_settings = output["tribe_settings"]
    lines = [
        START,
        "",
        "## Tribes and drift: what they buy, and exact vs NUTS (`benchmarks/bench_mechanisms.py`)",
        "",
        f"- command: `{command}`; wall time {wall / 60:.1f} min",
        f"- machine: {output['machine']}",
        f"- date: {output['date']}",
        "",
        "### Tribes (`hf.NormalMixture`, two components)",
        "",
        f"Generated federations (`models.tribes.generate`: two tribes at -2 and 2, spread 0.5, "
        f"row noise 1.5, 1-6 training rows and 5 held-out rows per client), "
        f"{args.tribe_clients} clients, one federation per seed; every model fitted with "
        f'`method="exact"` ({tribe_settings}). Held-out lpd: mean log predictive density per '
        "held-out row; theta RMSE: posterior mean against the true client mean; membership "
        "accuracy: share of clients whose most probable tribe (`hf.membership`) is their own.",
        "",
    ]
    if "tribes" in output:
        lines += _tribe_lines(
            output["tribes"],
            f"**Two tribes** (means over {len(args_seeds(args.tribe_seeds))} seeds):",
        )
    if "control" in output:
        lines += [""] + _tribe_lines(
            output["control"],
            f"**No-tribes control** (`means=(0.0, 0.0), spread=2.0`: one wide group; means over "
            f"{args.control_seeds} seeds; membership accuracy is meaningless here):",
            membership=False,
        )
    if "tribe_engines" in output:
        lines += [
            "",
            "**Exact engine vs centralized NUTS** (`models.tribes.family()`, "
            "`models.tribes.generate(N, seed=0)`; NUTS runs the centred mixture model):",
            "",
        ]
        lines += _engine_lines(output["tribe_engines"], output["engine_settings"], "theta")
        split = [r for r in output["tribe_engines"] if "ambiguous" in r]
        if split:
            lines += [
                "",
                f"Clients whose exact posterior of theta is split between the tribes (more than "
                f"{SPLIT:.0%} of its draws on each side of 0, the midpoint of the tribe means), "
                "and how many of them NUTS keeps on one side (at most "
                f"{SPLIT:.0%} of its draws on the other) in every chain: "
                + "; ".join(
                    f"{r['clients']:,} clients: {int(r['ambiguous'].sum())} split, "
                    f"{r['stuck']} kept on one side by NUTS"
                    for r in split
                )
                + ".",
            ]
    lines += ["", "### Drift (`hf.DriftingNormal`, lifelong learning with forgetting)", ""]
    if "forecasts" in output:
        lines += [
            "Sleepstudy, one step ahead (`models.sleepstudy.forecast(day=d)`: fitted with "
            '`method="exact"` on days 0..d-1, each subject\'s day d forecast; '
            f"{output['forecast_settings']}). lpd: log predictive density of the subject's "
            "held-out reaction time, mean over the 18 subjects.",
            "",
        ]
        forecast_lines, _ = _forecast_lines(output["forecasts"])
        lines += forecast_lines
    if "drift_engines" in output:
        t = DRIFT_TRUTH
        lines += [
            "",
            "**Exact engine vs centralized NUTS** (`DriftingNormal(num_periods="
            f'{DRIFT_PERIODS}, fixed=["x"])` with its default priors; `generate_drift(N, '
            f"seed=0)`: 0-3 rows in each of periods 0-{DRIFT_PERIODS - 2}, none in period "
            f"{DRIFT_PERIODS - 1} (a forecast), beta = {t['beta']}, tau = {t['tau']}, "
            f"rho = {t['rho']}, sigma = {t['sigma']}; globals `beta`, `sigma`, `tau`, `rho`; "
            "client quantities: every client's state in every period):",
            "",
        ]
        lines += _engine_lines(output["drift_engines"], output["engine_settings"], "states")
    lines += ["", "Reading: " + output.get("reading", "(to be written from the figures)"), ""]
    lines.append(END)
    return "\n".join(lines)


def args_seeds(count: int):
    return range(count)


def write(section: str, path: Path) -> None:
    """Replace the marked section of ``path``, or append it at the end."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------- main
def _render_options(args) -> dict:
    """The options a re-render may change."""
    return {
        k: getattr(args, k) for k in ("output", "reading", "write_benchmarks", "render", "command")
    }


def run(args, save=lambda output: None) -> dict:
    warnings.simplefilter("ignore")
    output = {"machine": machine(), "date": args.date}
    tribe_settings = None
    if args.quick:
        tribe_settings = {"num_warmup": 200, "num_samples": 200, "num_chains": 1}
    output["tribe_settings"] = (
        "2 chains x 1000 draws after 500 warmup, `compare`'s default"
        if tribe_settings is None
        else f"{tribe_settings['num_chains']} chain(s) x {tribe_settings['num_samples']} draws "
        f"after {tribe_settings['num_warmup']} warmup"
    )
    engine = {
        "num_warmup": args.num_warmup,
        "num_samples": args.num_samples,
        "num_chains": args.num_chains,
    }
    output["engine_settings"] = engine
    forecast_settings = engine if args.quick else None
    output["forecast_settings"] = (
        "`hf.fit` defaults: 4 chains x 1000 draws after 1000 warmup"
        if forecast_settings is None
        else f"{engine['num_chains']} chain(s) x {engine['num_samples']} draws after "
        f"{engine['num_warmup']} warmup"
    )
    parts = set(args.parts)
    start = time.perf_counter()
    if "tribes" in parts:
        output["tribes"] = tribes_accuracy(
            args_seeds(args.tribe_seeds), args.tribe_clients, tribe_settings
        )
        print(f"tribes accuracy done {time.perf_counter() - start:.0f} s", flush=True)
        output["control"] = tribes_accuracy(
            args_seeds(args.control_seeds),
            args.tribe_clients,
            tribe_settings,
            means=(0.0, 0.0),
            spread=2.0,
        )
        print(f"tribes control done {time.perf_counter() - start:.0f} s", flush=True)
        save(output)
    if "forecast" in parts:
        output["forecasts"] = drift_forecasts(args.days, forecast_settings)
        save(output)
    if "drift-engines" in parts:
        output["drift_engines"] = engine_comparison("drift", args.drift_sizes, engine, args)
        save(output)
    if "tribe-engines" in parts:
        output["tribe_engines"] = engine_comparison("tribes", args.tribe_sizes, engine, args)
        save(output)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few draws")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["tribes", "tribe-engines", "forecast", "drift-engines"],
        choices=["tribes", "tribe-engines", "forecast", "drift-engines"],
    )
    parser.add_argument("--tribe-seeds", type=int, default=10)
    parser.add_argument("--control-seeds", type=int, default=5)
    parser.add_argument("--tribe-clients", type=int, default=40)
    parser.add_argument("--tribe-sizes", type=int, nargs="+", default=[40, 400, 4000])
    parser.add_argument("--drift-sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--days", type=int, nargs="+", default=[9, 8, 7])
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument(
        "--nuts-up-to", type=int, default=10**9, help="skip NUTS above this many clients"
    )
    parser.add_argument(
        "--nuts-timeout", type=float, default=600.0, help="abandon a NUTS fit after this (s)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per fit, seconds")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--command", default=None, help="command line to print in the section")
    parser.add_argument("--reading", default=None, help="file with the Reading paragraph")
    parser.add_argument("--output", required=True, help="markdown file for the section")
    parser.add_argument(
        "--render",
        nargs="+",
        default=None,
        help="render the section from a saved run (OUTPUT.pkl, written by every run) instead",
    )
    parser.add_argument("--write-benchmarks", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.tribe_seeds, args.control_seeds, args.tribe_clients = 2, 2, 12
        args.tribe_sizes, args.drift_sizes, args.days = [12, 40], [10, 30], [9, 8]
        args.num_warmup, args.num_samples, args.num_chains = 200, 200, 1
    if args.render:  # re-render saved runs (e.g. with the Reading); later parts override
        output, wall, commands, saved_args = {}, 0.0, [], {}
        for path in args.render:
            with open(path, "rb") as stream:
                saved = pickle.load(stream)
            output.update(saved["output"])
            wall += saved["wall"]
            commands.append(saved["command"])
            saved_args.update(vars(saved["args"]))
        command = args.command or "; ".join(commands)
        args = argparse.Namespace(**{**saved_args, **_render_options(args)})
    else:
        command = args.command or "python benchmarks/bench_mechanisms.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        start = time.perf_counter()

        def save(output):  # after every part, so that a stopped run keeps its figures
            wall = time.perf_counter() - start
            with open(args.output + ".pkl", "wb") as stream:
                record = {"output": output, "wall": wall, "command": command, "args": args}
                pickle.dump(record, stream)

        output = run(args, save)
        wall = time.perf_counter() - start
        save(output)
    if args.reading:
        output["reading"] = Path(args.reading).read_text().strip()
    section = report(output, args, command, wall)
    print(section)
    print(f"total {wall:.0f} s", flush=True)
    Path(args.output).write_text(section + "\n")
    if args.write_benchmarks:
        write(section, ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
    else:
        main()
