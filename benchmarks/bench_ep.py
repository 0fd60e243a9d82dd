"""EP (NUTS, Laplace, SVI tilted inference) against centralized NUTS on cbpp and hospitals.

For every dataset it fits centralized NUTS on the pooled data (the yardstick), then EP with
each tilted inference, with and without 30% of the clients dropping out at random each
round, and reports

* rounds to convergence (EP's own criterion: the largest change of a global mean, in sds,
  and of a log sd, below ``tol`` for two rounds in a row; "-" if not within the budget);
* accuracy: max |difference of means| / reference sd and the range of sd ratios, over every
  global parameter (constrained scale), and max |difference of means| / sd over every
  client's own parameters;
* wall-clock ratio EP / centralized NUTS (each including its own compilation);
* bytes each client sends per round (float32 natural-parameter changes).

The table replaces the section between ``<!-- bench_ep:start -->`` and ``<!-- bench_ep:end -->``
in ``BENCHMARKS.md`` (the rest of the file is left alone).

Usage::

    python benchmarks/bench_ep.py --hospitals 20 100 --tilted nuts laplace svi
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

import hierfl as hf
from models import cbpp, hospitals

__all__ = ["compare", "main"]

START, END = "<!-- bench_ep:start -->", "<!-- bench_ep:end -->"
DATASETS = {
    "cbpp": (cbpp.model, ("beta", "sigma"), ("b",)),
    "hospitals": (
        hospitals.model,
        ("mu_alpha", "mu_beta", "sigma_alpha", "sigma_beta"),
        ("alpha", "beta"),
    ),
}


def compare(fit: hf.Fit, reference: hf.Fit, global_names, client_names) -> dict:
    """Accuracy of ``fit`` against ``reference``: worst standardized mean difference, sd
    ratio range (global) and worst standardized mean difference (per client)."""
    z, ratios = [], []
    for name in global_names:
        a = np.asarray(reference.global_samples[name])
        b = np.asarray(fit.global_samples[name])
        a, b = a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:])
        sd = a.std(axis=0)
        z.append(np.ravel(np.abs(b.mean(axis=0) - a.mean(axis=0)) / sd))
        ratios.append(np.ravel(b.std(axis=0) / sd))
    clients = np.arange(reference.data.num_clients)
    zc = []
    for name in client_names:
        a, b = reference.client_samples(clients)[name], fit.client_samples(clients)[name]
        a, b = a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:])
        zc.append(np.ravel(np.abs(b.mean(axis=0) - a.mean(axis=0)) / a.std(axis=0)))
    ratios = np.concatenate(ratios)
    return {
        "global_z": float(np.max(np.concatenate(z))),
        "sd_min": float(ratios.min()),
        "sd_max": float(ratios.max()),
        "client_z": float(np.max(np.concatenate(zc))),
    }


def run(
    name: str,
    data,
    tilted_methods,
    *,
    rounds: int,
    dropout_rounds: int,
    seed: int,
    reference_options: dict,
    ep_options: dict,
    reference_cache: Path | None = None,
    ep_seeds: tuple[int, ...] | None = None,
) -> list[dict]:
    """Centralized NUTS (seed ``seed``, or cached) and EP with every tilted inference, with
    and without 30% dropout, for every seed of ``ep_seeds`` (default: ``seed``) against that
    one reference."""
    model, global_names, client_names = DATASETS[name]
    cached = None if reference_cache is None else reference_cache / f"{name}-{data.num_clients}"
    if cached is not None and cached.with_suffix(".pkl").exists():
        # a centralized NUTS reference fitted earlier by this script with the same settings
        # (its wall-clock was recorded then, on the same machine)
        reference = hf.load_fit(cached.with_suffix(".pkl"))
        reference_seconds = float(cached.with_suffix(".seconds").read_text())
    else:
        start = time.perf_counter()
        reference = hf.fit(model, data, method="nuts", seed=seed, **reference_options)
        reference_seconds = time.perf_counter() - start
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            reference.save(cached.with_suffix(".pkl"))
            cached.with_suffix(".seconds").write_text(repr(reference_seconds))
    rows = []
    for tilted, dropout, ep_seed in itertools.product(
        tilted_methods, (0.0, 0.3), (seed,) if ep_seeds is None else ep_seeds
    ):
        options = dict(
            ep_options.get(tilted, {}),
            tilted=tilted,
            dropout=dropout,
            num_rounds=rounds if dropout == 0 else dropout_rounds,
        )
        start = time.perf_counter()
        fit = hf.fit(model, data, method="ep", seed=ep_seed, **options)
        seconds = time.perf_counter() - start
        row = {
            "dataset": f"{name}-{data.num_clients}"
            + ("" if ep_seeds is None else f" (EP seed {ep_seed})"),
            "tilted": tilted,
            "dropout": dropout,
            "rounds": fit.diagnostics["rounds"],
            "converged": fit.diagnostics["converged_round"],
            "seconds": seconds,
            "reference_seconds": reference_seconds,
            "bytes": fit.diagnostics["bytes_per_message"],
            **compare(fit, reference, global_names, client_names),
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | tilted | dropout | rounds to conv. (run) | max abs mean diff / sd "
        "(global) | sd ratio (global) | max abs mean diff / sd (clients) | "
        "wall EP / NUTS | bytes / client / round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        converged = "-" if r["converged"] is None else str(r["converged"])
        lines.append(
            f"| {r['dataset']} | {r['tilted']} | {r['dropout']:.0%} | {converged} "
            f"({r['rounds']}) | {r['global_z']:.3f} | {r['sd_min']:.2f}-{r['sd_max']:.2f} | "
            f"{r['client_z']:.3f} | {r['seconds']:.1f} s / {r['reference_seconds']:.1f} s "
            f"= {r['seconds'] / r['reference_seconds']:.2f} | {r['bytes']} |"
        )
    return "\n".join(lines)


def seed_summary(rows: list[dict]) -> str:
    """Mean and worst accuracy over EP seeds, per dataset, tilted inference and dropout."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["dataset"].split(" (EP seed")[0], r["tilted"], r["dropout"])
        groups.setdefault(key, []).append(r)
    lines = [
        "| dataset | tilted | dropout | EP seeds | rounds run (mean) | max abs mean diff / sd "
        "(global): mean, worst | (clients): mean, worst |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (dataset, tilted, dropout), group in groups.items():
        z = np.array([r["global_z"] for r in group])
        zc = np.array([r["client_z"] for r in group])
        rounds = np.mean([r["rounds"] for r in group])
        lines.append(
            f"| {dataset} | {tilted} | {dropout:.0%} | {len(group)} | {rounds:.1f} | "
            f"{z.mean():.3f}, {z.max():.3f} | {zc.mean():.3f}, {zc.max():.3f} |"
        )
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{START}\n{text}\n{END}"
    if START in old and END in old:
        new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", type=int, nargs="*", default=[20, 100, 1000])
    parser.add_argument("--tilted", nargs="*", default=["nuts", "laplace", "svi"])
    parser.add_argument("--no-cbpp", action="store_true")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ep-seeds",
        type=int,
        nargs="*",
        default=None,
        help="run EP with each of these seeds against the one reference (default: --seed)",
    )
    parser.add_argument("--reference-chains", type=int, default=4)
    parser.add_argument("--reference-draws", type=int, default=1000)
    parser.add_argument("--ep-draws", type=int, default=1000)
    parser.add_argument("--machine", default=platform.processor() or platform.machine())
    parser.add_argument(
        "--reference-cache",
        default=None,
        help="folder for centralized NUTS references: reused when present (with the "
        "wall-clock recorded when they were fitted), saved otherwise",
    )
    parser.add_argument(
        "--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    )
    args = parser.parse_args(argv)
    reference = dict(
        num_chains=args.reference_chains,
        num_warmup=args.reference_draws,
        num_samples=args.reference_draws,
    )
    ep_options = {
        "nuts": dict(num_warmup=300, num_samples=args.ep_draws),
        "laplace": dict(num_samples=args.ep_draws),
        "svi": dict(num_samples=args.ep_draws),
    }
    common = dict(
        rounds=args.rounds,
        dropout_rounds=2 * args.rounds,
        seed=args.seed,
        reference_options=reference,
        ep_options=ep_options,
        reference_cache=None if args.reference_cache is None else Path(args.reference_cache),
        ep_seeds=None if args.ep_seeds is None else tuple(args.ep_seeds),
    )
    rows = []
    if not args.no_cbpp:
        rows += run("cbpp", cbpp.load(), args.tilted, **common)
    for size in args.hospitals:
        rows += run(
            "hospitals", hospitals.generate(size, seed=args.seed).train, args.tilted, **common
        )
    command = "python benchmarks/bench_ep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join(
        [
            "## Federated EP vs centralized NUTS (`benchmarks/bench_ep.py`)",
            "",
            f"Command: `{command}`; machine: {args.machine}; date: "
            f"{datetime.date.today().isoformat()}. Reference: centralized NUTS, "
            f"{args.reference_chains} chains x {args.reference_draws} draws. EP: at most "
            f"{args.rounds} rounds (twice that with 30% dropout), damping 0.5. Accuracy is "
            "measured on the constrained scale against the reference; both sides carry Monte "
            "Carlo error (about 0.03-0.05 sd on means).",
            "",
            table(rows),
        ]
        + ([] if args.ep_seeds is None else ["", seed_summary(rows)])
    )
    write_section(text, Path(args.output))
    print(text)


if __name__ == "__main__":
    main()
