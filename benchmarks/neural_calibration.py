"""Where hierfl's miscalibration comes from: the posterior predictive against plug-in heads.

Fits hierfl (``method="svi"``) on one federated MNIST partition, as ``bench_neural.py``
does, then scores the same shared body with five choices of personal head, on the clients'
train and test rows, side by side:

- ``posterior``: each client's ``q_i = N(m_i, s_i^2)``, averaged over head draws (what
  ``predict`` returns);
- ``plugin``: the posterior mean ``m_i`` alone;
- ``mu``: every client on the population mean ``mu`` (no personalization);
- ``population``: every client on the prior ``N(mu, tau^2)`` (the cold-start predictive);
- ``posterior_sd_x2``: ``q_i`` with its standard deviation doubled.

If the ``mu`` head is as overconfident as the personal heads, and the train NLL is far below
the test NLL, the overconfidence is in the (point-estimated) body's features, not in the
personal posteriors.

Usage::

    python benchmarks/neural_calibration.py --clients 100 --partition dirichlet_5 \\
        --learning-rate 0.01 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np
from bench_neural import COLD_START_SHARE, model_for

from hierfl.neural import harness
from hierfl.neural.metrics import summarize
from hierfl.neural.svi import stack_client_data
from models import mnist_heads


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--partition", default="dirichlet_5")
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--body-draws",
        action="store_true",
        help="train the body on draws theta_i ~ q_i (SVISettings.body_draws)",
    )
    args = parser.parse_args(argv)

    n = args.clients
    extra = max(2, int(round(COLD_START_SHARE * n)))  # the clients bench_neural holds out
    split = mnist_heads.federated(args.partition, num_clients=n + extra, seed=args.seed)
    ids = split.train.client_ids[:n]
    model = model_for(args.partition)
    start = time.perf_counter()
    res = harness.compare(
        model,
        split.train.subset(ids),
        split.validation.subset(ids),
        split.test.subset(ids),
        num_rounds=args.rounds,
        local_steps=args.local_steps,
        seed=args.seed,
        methods=("hierfl",),
        svi_options={"learning_rate": args.learning_rate, "body_draws": args.body_draws},
    )
    fit = res["_fit"]
    print(
        f"{args.partition}, {n} clients, seed {args.seed}, body learning rate "
        f"{args.learning_rate}: fit in {time.perf_counter() - start:.0f} s, "
        f"mean tau {float(np.mean(fit.tau)):.3f}, mean |m_i - mu| "
        f"{float(np.mean(np.abs(fit.personal_mean - fit.mu))):.4f}, mean s_i "
        f"{float(np.mean(fit.personal_sd)):.3f}"
    )

    mean, sd = np.asarray(fit.personal_mean), np.asarray(fit.personal_sd)
    mu, tau = np.tile(fit.mu, (n, 1)), np.tile(fit.tau, (n, 1))
    heads = {
        "posterior": (mean, sd),
        "plugin": (mean, np.zeros_like(sd)),
        "mu": (mu, np.zeros_like(sd)),
        "population": (mu, tau),
        "posterior_sd_x2": (mean, 2 * sd),
    }
    stacked = {
        name: stack_client_data(model, getattr(split, name).subset(ids))
        for name in ("train", "test")
    }
    key = jax.random.PRNGKey(args.seed + 5)
    rows = {}
    print("| head | rows | accuracy | NLL | ECE | ECE floor |")
    print("|---|---|---|---|---|---|")
    for head, (m, s) in heads.items():
        for rows_name, st in stacked.items():
            head_fit = dataclasses.replace(fit, personal_mean=m, personal_sd=s)
            probs = harness.hierfl_probs(head_fit, st, key=key)
            labels = harness.split_probs(st["y"], st["size"])
            summary = summarize(probs, labels)
            rows[head, rows_name] = summary
            print(
                f"| {head} | {rows_name} | {summary['acc_mean']:.4f} | {summary['nll']:.3f} "
                f"| {summary['ece']:.3f} | {summary['ece_floor']:.3f} |"
            )
    return rows


if __name__ == "__main__":
    main()
