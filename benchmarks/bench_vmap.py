"""One round of ``method="svi"``: every client in one vmapped, jitted update vs a per-client
Python loop of the same jitted ``client_update``, from 20 to 1,000 clients, on whatever
device JAX runs on.

Both columns run the same function on the same padded rows (the same arithmetic); the
ratio is what batching the clients buys on the device
(:func:`hierfl.neural.harness.round_timings`). ``--parts`` also times the two halves of a
client update on their own: the E-step (``local_steps=0``: 400 ELBO steps of ``q_i`` on the
client's features) and the body steps (``elbo_steps=0``). Memory is XLA's accounting of the
compiled call (arguments, outputs and temporaries).

Workloads: ``mnist``, the bundled MNIST digits split Dirichlet(0.5) with the MLP 784-128-64
and a personal 10-way head (at most a few hundred clients: 5,000 digits); ``synthetic``,
FedProx's Synthetic(0.5, 0.5) with an MLP 60-128-64 and a personal 10-way head (any number
of clients; sizes capped at ``--max-rows``).

Writes the section between ``<!-- bench_vmap:<backend>:start -->`` and
``<!-- bench_vmap:<backend>:end -->`` of ``BENCHMARKS.md``, one section per backend (``cpu``,
``gpu``), so CPU and GPU figures are kept apart.

Usage::

    taskset -c 0 python benchmarks/bench_vmap.py --clients 20 100 1000 --parts
    python benchmarks/bench_vmap.py --clients 100 1000 --parts      # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import sys
from pathlib import Path

import jax

import hierfl as hf
from hierfl import partition
from hierfl.neural import SVISettings, harness, mlp_head_model, svi_algorithm
from hierfl.neural.svi import stack_client_data
from models import mnist_heads

PARTS = {
    "round": {},
    "E-step": {"local_steps": 0},
    "body": {"elbo_steps": 0},
}


def workload(name: str, num_clients: int, max_rows: int, seed: int):
    """``(model, stacked client data, description)``; raises ``ValueError`` or
    ``RuntimeError`` if the data cannot be split among that many clients."""
    if name == "mnist":
        split = mnist_heads.federated("dirichlet_0.5", num_clients=num_clients, seed=seed)
        model, data = mnist_heads.mlp_head(), split.train
        text = "MNIST Dirichlet 0.5, MLP 784-128-64"
    elif name == "synthetic":
        raw = partition.synthetic(0.5, 0.5, num_clients=num_clients, seed=seed, max_size=max_rows)
        data = hf.ClientData.from_dict(raw)
        model = mlp_head_model(input_dim=partition.SYNTHETIC_DIM, num_classes=10)
        text = "Synthetic(0.5, 0.5), MLP 60-128-64"
    else:
        raise ValueError(f"unknown workload {name!r}: use 'mnist' or 'synthetic'")
    return model, stack_client_data(model, data), text


def machine() -> str:
    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.platform == "cpu":
        return (
            f"CPU ({platform.machine()}, {os.cpu_count()} cores, this run on {cores}), "
            f"jax {jax.__version__}"
        )
    return f"{device.device_kind} ({device.platform}), host {cores} cores, jax {jax.__version__}"


def mib(nbytes: float) -> str:
    return "n/a" if nbytes != nbytes else f"{nbytes / 2**20:.1f}"


def report(rows, args, command, skipped) -> str:
    backend = jax.default_backend()
    start, end = f"<!-- bench_vmap:{backend}:start -->", f"<!-- bench_vmap:{backend}:end -->"
    lines = [
        start,
        "",
        f"## One svi round, vmapped vs per-client loop, on {backend.upper()} "
        "(`benchmarks/bench_vmap.py`)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- settings: {args.local_steps} body steps (batch 32), {args.elbo_steps} ELBO steps "
        "per E-step; `elbo samples` draws of `theta_i` per ELBO step (default 4); best of "
        f"{args.repeats} after a warm-up; rows padded to the largest client (Synthetic capped "
        f"at {args.max_rows})",
        "- `round` is the whole `client_update`, `E-step` the fit of `q_i` alone "
        "(`local_steps=0`), `body` the body steps alone (`elbo_steps=0`); memory is XLA's "
        "accounting (arguments + outputs + temporaries) of the vmapped call and of one "
        "looped call; `vmap chunk`: all clients in one vmap, or chunks of that many vmapped "
        "one after another (`client_batch`, `hierfl.protocol.vmap_clients`)",
        "",
        "| data | clients | padded rows | elbo samples | vmap chunk | part | vmapped s | loop s "
        "| speed-up | vmapped MiB | one looped call MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        t = row["timings"]
        lines.append(
            f"| {row['data']} | {row['clients']} | {row['rows']} | {row['samples']} | "
            f"{row['chunk']} | {row['part']} | {t['vmapped']:.3f} | {t['loop']:.3f} | "
            f"{t['speedup']:.1f}x | "
            f"{mib(t['vmapped_bytes'])} | {mib(t['loop_call_bytes'])} |"
        )
    for data, clients, reason in skipped:
        lines.append(f"\n{data} at {clients} clients not run: {reason}")
    lines += ["", end]
    return "\n".join(lines), start, end


def write(section: str, start: str, end: str, path: Path):
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 100, 1000])
    parser.add_argument("--data", nargs="+", default=["mnist", "synthetic"])
    parser.add_argument("--elbo-samples", type=int, nargs="+", default=[4])
    parser.add_argument("--parts", action="store_true", help="also time the E-step and body")
    parser.add_argument(
        "--client-batch",
        type=int,
        nargs="+",
        default=[0],
        help="vmap chunks of this many clients one after another (0: all at once)",
    )
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--elbo-steps", type=int, default=SVISettings().elbo_steps)
    parser.add_argument("--max-rows", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_vmap.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(machine(), flush=True)
    rows, skipped = [], []
    for data in args.data:
        for clients in args.clients:
            try:
                model, stacked, text = workload(data, clients, args.max_rows, args.seed)
            except (RuntimeError, ValueError) as error:
                skipped.append((data, clients, str(error).split("\n")[0]))
                print(data, clients, "not run:", error, flush=True)
                continue
            for samples, chunk in itertools.product(args.elbo_samples, args.client_batch):
                for part, overrides in PARTS.items():
                    if part != "round" and not args.parts:
                        continue
                    options = {
                        "local_steps": args.local_steps,
                        "elbo_steps": args.elbo_steps,
                        "elbo_samples": samples,
                        **overrides,
                    }
                    algorithm = svi_algorithm(model, settings=SVISettings(**options))
                    timings = harness.round_timings(
                        algorithm,
                        stacked,
                        key=jax.random.PRNGKey(args.seed),
                        repeats=args.repeats,
                        client_batch=chunk or None,
                    )
                    row = {
                        "data": text,
                        "clients": clients,
                        "rows": int(stacked["y"].shape[1]),
                        "samples": samples,
                        "chunk": chunk or "all",
                        "part": part,
                        "timings": timings,
                    }
                    rows.append(row)
                    print(
                        data,
                        clients,
                        samples,
                        chunk or "all",
                        part,
                        {k: round(v, 3) for k, v in timings.items()},
                        flush=True,
                    )
    write(*report(rows, args, command, skipped), Path(args.output))


if __name__ == "__main__":
    main()
