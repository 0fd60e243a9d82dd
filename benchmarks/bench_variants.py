"""hierfl's personal parts side by side: a personal head (or normalization) vs personal
low-rank adapters, and the adapters' point-estimate counterparts, on the MNIST partitions.

For every partition and seed, in one run, on the same split and budget as
``bench_neural.py`` (10 rounds x 10 local steps, learning rate chosen on validation rows):

- ``hierfl`` with the model ``bench_neural.py`` uses (:func:`bench_neural.model_for`: a
  personal head, or personal normalization on the feature-shift split);
- ``hierfl`` with :func:`models.mnist_heads.mlp_adapter` (a personal rank-4 adapter on the
  second hidden layer under the hierarchical prior, shared head);
- FedAvg and ``local adapters`` on the adapter model (:mod:`hierfl.neural.baselines`'
  ``fedbn``: the personal collection, here the adapters, kept local and the rest averaged).

Reports mean per-client test accuracy, ECE (15 bins) and its calibrated floor, and the
adapter's accuracy minus each of the others, per seed and on average. Writes the section
between ``<!-- bench_variants:start -->`` and ``<!-- bench_variants:end -->`` of
``BENCHMARKS.md``.

Usage::

    taskset -c 1 python benchmarks/bench_variants.py --seeds 0 1 --clients 20
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
from bench_neural import model_for
from bench_vmap import machine, write

from hierfl.neural import harness
from models import mnist_heads

LEARNING_RATES = (3e-3, 1e-2)
START, END = "<!-- bench_variants:start -->", "<!-- bench_variants:end -->"
COLUMNS = ("hierfl (head/norm)", "hierfl (adapter)", "fedavg", "local adapters")


def run(partition: str, num_clients: int, seed: int, args) -> dict:
    split = mnist_heads.federated(partition, num_clients=num_clients, seed=seed)
    sets = (split.train, split.validation, split.test)
    options = dict(
        num_rounds=args.rounds,
        local_steps=args.local_steps,
        seed=seed,
        learning_rates=LEARNING_RATES,
    )
    out = {}
    start = time.perf_counter()
    base = harness.compare(model_for(partition), *sets, methods=("hierfl",), **options)
    out["hierfl (head/norm)"] = (base["hierfl"], time.perf_counter() - start)
    start = time.perf_counter()
    adapter = harness.compare(
        mnist_heads.mlp_adapter(), *sets, methods=("hierfl", "fedavg", "fedbn"), **options
    )
    wall = time.perf_counter() - start
    out["hierfl (adapter)"] = (adapter["hierfl"], adapter["hierfl"].wall_time)
    out["fedavg"] = (adapter["fedavg"], adapter["fedavg"].wall_time)
    out["local adapters"] = (adapter["fedbn"], adapter["fedbn"].wall_time)
    print(
        partition,
        num_clients,
        seed,
        {k: round(v[0].metrics["acc_mean"], 4) for k, v in out.items()},
        f"{wall:.0f} s",
        flush=True,
    )
    return out


def report(results: dict, args, command: str) -> str:
    lines = [
        START,
        "",
        "## Personal heads vs personal low-rank adapters (`benchmarks/bench_variants.py`)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- settings: {args.clients} clients, {args.rounds} rounds x {args.local_steps} local "
        f"steps, learning rate chosen on validation rows from {list(LEARNING_RATES)}, seeds "
        f"{args.seeds}; `hierfl (head/norm)` is the model of `bench_neural.py` (personal head; "
        "personal normalization on feature_shift); the adapter model is "
        "`mnist_heads.mlp_adapter()` (784-128-64 MLP, a personal rank-4 adapter on the "
        "64-unit layer, 768 personal parameters, shared head); `local adapters` keeps the "
        "adapters local and averages the rest (the `fedbn` baseline on that model)",
        "- accuracy: mean per-client test accuracy (mean over seeds; per seed in brackets); "
        "ECE over the pooled test rows (15 bins), with the ECE a calibrated predictor would "
        "show on those rows (`floor`); `adapter - x`: the adapter's accuracy minus x's, mean "
        "over seeds +- its standard error",
        "",
        "| partition | method | accuracy | ECE | ECE floor | wall s | adapter - x |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for partition, by_seed in results.items():
        adapter = np.array([r["hierfl (adapter)"][0].metrics["acc_mean"] for r in by_seed])
        for name in COLUMNS:
            rows = [r[name] for r in by_seed]
            acc = np.array([m.metrics["acc_mean"] for m, _ in rows])
            ece = np.mean([m.metrics["ece"] for m, _ in rows])
            floor = np.mean([m.metrics["ece_floor"] for m, _ in rows])
            wall = np.mean([w for _, w in rows])
            diff = adapter - acc
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            gap = "" if name == "hierfl (adapter)" else f"{diff.mean():+.3f} +- {se:.3f}"
            seeds = " / ".join(f"{a:.3f}" for a in acc)
            lines.append(
                f"| {partition} | {name} | {acc.mean():.3f} ({seeds}) | {ece:.3f} | "
                f"{floor:.3f} | {wall:.0f} | {gap} |"
            )
    lines += ["", END]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--partitions", nargs="+", default=list(mnist_heads.PARTITIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument(
        "--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_variants.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    results = {
        partition: [run(partition, args.clients, seed, args) for seed in args.seeds]
        for partition in args.partitions
    }
    section = report(results, args, command)
    print(section)
    write(section, START, END, Path(args.output))


if __name__ == "__main__":
    main()
