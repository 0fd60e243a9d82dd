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

``--laplace-body`` also scores a Gaussian body made after the fact: a diagonal Laplace
approximation ``N(w, diag s^2)`` of the body's posterior, with ``1/s^2`` the clients' summed
Gauss-Newton diagonal (at their ``m_i``) plus a per-layer prior precision set by type-II
maximum likelihood (EM on the prior variance), and predictions averaged over joint draws of
the body and the heads, either through the network linearized in the body (``glm``; Immer
et al. 2021) or through the network itself (``sampled``).

Usage::

    python benchmarks/neural_calibration.py --clients 100 --partition dirichlet_5 \\
        --learning-rate 0.01 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
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
    parser.add_argument(
        "--laplace-body",
        action="store_true",
        help="also score a diagonal Laplace (Gaussian) body, linearized and sampled",
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
    if args.laplace_body:
        body_sd = laplace_body_sd(fit, stacked["train"])
        for mode in ("glm", "sampled"):
            for rows_name, st in stacked.items():
                probs = laplace_body_probs(fit, body_sd, st, key, mode)
                labels = harness.split_probs(st["y"], st["size"])
                summary = summarize(probs, labels)
                rows[f"laplace_body_{mode}", rows_name] = summary
                print(
                    f"| laplace_body_{mode} | {rows_name} | {summary['acc_mean']:.4f} | "
                    f"{summary['nll']:.3f} | {summary['ece']:.3f} | {summary['ece_floor']:.3f} |"
                )
    return rows


def laplace_body_sd(fit, train, *, prior_iterations: int = 100):
    """Posterior sds of a diagonal Laplace body: ``1 / s^2 = G + 1 / sigma_l^2`` with ``G`` the
    Gauss-Newton diagonal summed over every client's train rows (head at ``m_i``) and
    ``sigma_l^2`` each layer's prior variance, set by EM (``sigma_l^2 = mean(w^2 + s^2)``)."""
    model, (unravel, _) = fit.model, fit._unravel()
    shared = jax.tree_util.tree_map(jnp.asarray, fit.shared)

    def client_ggn(theta, x, y, size):
        mask = (jnp.arange(y.shape[0]) < size).astype(jnp.float32)

        def row(xr, weight):
            def log_probs(w):
                return jax.nn.log_softmax(model.logits(w, unravel(theta), xr[None])[0])

            probs = jnp.exp(log_probs(shared))
            jacobian = jax.jacrev(log_probs)(shared)  # per class
            return jax.tree_util.tree_map(
                lambda j: weight * jnp.tensordot(probs, j**2, axes=1), jacobian
            )

        return jax.tree_util.tree_map(lambda a: a.sum(0), jax.lax.map(lambda a: row(*a), (x, mask)))

    per_client = jax.lax.map(
        lambda a: client_ggn(*a),
        (jnp.asarray(fit.personal_mean), train["x"], train["y"], train["size"]),
    )
    ggn = jax.tree_util.tree_map(lambda a: a.sum(0), per_client)

    def layer_sd(w, g):
        variance = jnp.mean(w**2)
        for _ in range(prior_iterations):
            variance = jnp.mean(w**2 + 1.0 / (g + 1.0 / variance))
        return jnp.sqrt(1.0 / (g + 1.0 / variance))

    return jax.tree_util.tree_map(layer_sd, shared, ggn)


def laplace_body_probs(fit, body_sd, stacked, key, mode):
    """Per-client predictive probabilities averaged over joint draws of the body
    ``N(w, diag s^2)`` and the head ``q_i``; ``mode="glm"`` linearizes the network in the
    body, ``"sampled"`` evaluates it at the drawn body."""
    model, (unravel, _) = fit.model, fit._unravel()
    shared = jax.tree_util.tree_map(jnp.asarray, fit.shared)
    leaves, treedef = jax.tree_util.tree_flatten(body_sd)

    def client(mean, sd, x, client_key):
        def draw(draw_key):
            head_key, body_key = jax.random.split(draw_key)
            theta = unravel(mean + sd * jax.random.normal(head_key, mean.shape))
            keys = jax.random.split(body_key, len(leaves))
            delta = jax.tree_util.tree_unflatten(
                treedef,
                [s * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves, strict=True)],
            )
            if mode == "glm":
                logits, change = jax.jvp(lambda w: model.logits(w, theta, x), (shared,), (delta,))
                return jax.nn.softmax(logits + change)
            return jax.nn.softmax(
                model.logits(jax.tree_util.tree_map(jnp.add, shared, delta), theta, x)
            )

        return jax.lax.map(
            draw, jax.random.split(client_key, fit.settings.predictive_samples)
        ).mean(0)

    num = stacked["size"].shape[0]
    probs = jax.jit(jax.vmap(client))(
        jnp.asarray(fit.personal_mean),
        jnp.asarray(fit.personal_sd),
        stacked["x"],
        jax.random.split(key, num),
    )
    return harness.split_probs(probs, stacked["size"])


if __name__ == "__main__":
    main()
