"""The Flower driver against the in-process simulator: same fit, what Flower costs.

Runs ``hf.fit`` twice per problem, side by side in one process: ``driver="simulate"`` (one
``jax.vmap`` over all clients) and ``driver="flower"`` (Flower's simulation engine, one
SuperNode per client, two worker processes; its start-up, the workers' compilation and the
records' round trips included). Reports the wall-clock ratio and how far the two fits are
apart.

- radon, ``method="exact"`` (85 counties, one round of sufficient statistics): difference of
  the global posterior means and of the county posterior means, in posterior sds;
- cbpp, ``method="ep"`` (15 herds, Laplace tilted inference, up to 10 rounds): difference of
  the global posterior means, in posterior sds;
- MNIST heads, ``method="svi"`` (20 clients, Dirichlet 0.5, 10 rounds x 10 local steps):
  mean per-client test accuracy of both fits and the largest difference of the learned
  ``tau``.

    python benchmarks/bench_flower.py               # writes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
import warnings
from pathlib import Path

import numpy as np
from bench_exact import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = "<!-- bench_flower:start -->", "<!-- bench_flower:end -->"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def radon_rows(seed: int) -> list[str]:
    import hierfl as hf
    from models import radon

    data, family = radon.load(), radon.family()
    fits, seconds = {}, {}
    for driver in ("simulate", "flower"):
        fits[driver], seconds[driver] = timed(
            lambda d=driver: hf.fit(family, data, method="exact", seed=seed, driver=d)
        )
    ref, fl = fits["simulate"], fits["flower"]
    global_gap = max(
        float(np.max(np.abs(fl.global_samples[s].mean((0, 1)) - v.mean((0, 1))) / v.std((0, 1))))
        for s, v in ref.global_samples.items()
    )
    client_gap = max(
        float(np.max(np.abs(np.asarray(fl.personal[site][0]) - mean) / sd))
        for site, (mean, sd) in ref.personal.items()
    )
    return [
        f"| radon, exact | 85 | 1 | {seconds['simulate']:.1f} | {seconds['flower']:.1f} | "
        f"{seconds['flower'] / seconds['simulate']:.1f}x | global means {global_gap:.3f} sd, "
        f"county means {client_gap:.3f} sd |"
    ]


def ep_rows(seed: int, rounds: int) -> list[str]:
    import hierfl as hf
    from models import cbpp

    data = cbpp.load()
    options = dict(method="ep", tilted="laplace", num_rounds=rounds, seed=seed)
    fits, seconds = {}, {}
    for driver in ("simulate", "flower"):
        fits[driver], seconds[driver] = timed(
            lambda d=driver: hf.fit(cbpp.model, data, driver=d, **options)
        )
    ref, fl = fits["simulate"], fits["flower"]
    gap = max(
        float(np.max(np.abs(fl.global_samples[s].mean((0, 1)) - v.mean((0, 1))) / v.std((0, 1))))
        for s, v in ref.global_samples.items()
    )
    return [
        f"| cbpp, ep (Laplace tilted) | {data.num_clients} | {ref.diagnostics['rounds']} | "
        f"{seconds['simulate']:.1f} | {seconds['flower']:.1f} | "
        f"{seconds['flower'] / seconds['simulate']:.1f}x | global means {gap:.1e} sd |"
    ]


def mnist_rows(seed: int, clients: int, rounds: int, local_steps: int) -> list[str]:
    import hierfl as hf
    from hierfl.neural import harness
    from hierfl.neural.svi import stack_client_data
    from models import mnist_heads

    split = mnist_heads.federated("dirichlet_0.5", num_clients=clients, seed=seed)
    model = mnist_heads.mlp_head()
    test = stack_client_data(model, split.test)
    labels = harness.split_probs(test["y"], test["size"])
    fits, seconds, accuracy = {}, {}, {}
    for driver in ("simulate", "flower"):
        fits[driver], seconds[driver] = timed(
            lambda d=driver: hf.fit(
                model,
                split.train,
                method="svi",
                seed=seed,
                num_rounds=rounds,
                local_steps=local_steps,
                driver=d,
            )
        )
        probs = harness.hierfl_probs(fits[driver], test)
        accuracy[driver] = float(
            np.mean([np.mean(p.argmax(-1) == y) for p, y in zip(probs, labels, strict=True)])
        )
    tau_gap = float(np.mean(np.abs(fits["flower"].tau - fits["simulate"].tau)))
    # after one round the fits differ by float rounding only; training amplifies it
    first = {
        driver: hf.fit(
            model,
            split.train,
            method="svi",
            seed=seed,
            num_rounds=1,
            local_steps=local_steps,
            driver=driver,
        )
        for driver in ("simulate", "flower")
    }
    first_gap = float(np.max(np.abs(first["flower"].tau - first["simulate"].tau)))
    return [
        f"| MNIST heads, svi | {clients} | {rounds} | {seconds['simulate']:.1f} | "
        f"{seconds['flower']:.1f} | {seconds['flower'] / seconds['simulate']:.1f}x | "
        f"after round 1: largest tau difference {first_gap:.0e}; after {rounds}: mean tau "
        f"difference {tau_gap:.4f} (mean tau {float(np.mean(fits['simulate'].tau)):.3f}), "
        f"test accuracy {accuracy['simulate']:.4f} vs {accuracy['flower']:.4f} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    lines = [
        "## Flower driver vs in-process simulator (`benchmarks/bench_flower.py`)\n",
        "Both drivers run the same pure functions with the same keys. `flower`: Flower's "
        "simulation engine, one SuperNode per client, two worker processes of one CPU each; "
        "its time includes starting the engine and compiling in every worker. Fits differ "
        "only by float rounding (each node runs its client alone; the simulator vmaps them): "
        "NUTS on the server turns it into Monte Carlo differences, and ten rounds of neural "
        "training amplify it as they would a change of seed.\n",
        "| problem | clients | rounds | simulate s | flower s | flower / simulate | agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += radon_rows(args.seed)
    print(lines[-1], flush=True)
    lines += ep_rows(args.seed, rounds=10)
    print(lines[-1], flush=True)
    lines += mnist_rows(args.seed, args.clients, args.rounds, args.local_steps)
    print(lines[-1], flush=True)
    lines.append(
        f"\nCommand: `python benchmarks/bench_flower.py`; machine: {machine()}; "
        f"{os.cpu_count()} cores shared by the engine's workers; date: "
        f"{datetime.date.today().isoformat()}.\n"
    )
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", MARK_START, MARK_END, text)


if __name__ == "__main__":
    main()
