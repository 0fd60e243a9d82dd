"""Plots where a picture says more than a table (matplotlib; ArviZ covers the rest)."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_shrinkage", "plot_ep_convergence"]


def plot_shrinkage(sizes, local, partial, *, pooled: float | None = None, ax=None):
    """Borrowing strength at a glance: each client's local (no pooling) estimate and its
    partial-pooling posterior mean, against the client's number of observations.

    Small clients move most toward the population; large clients keep their own voice.

    Parameters
    ----------
    sizes, local, partial : array, ``[num_clients]``
    pooled : float, optional
        The complete-pooling estimate, drawn as a horizontal line.

    Returns
    -------
    matplotlib Axes
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    sizes, local, partial = map(np.asarray, (sizes, local, partial))
    jitter = np.exp(np.random.default_rng(0).uniform(-0.06, 0.06, sizes.shape))
    x = sizes * jitter
    ax.vlines(x, local, partial, color="0.75", lw=0.8, zorder=1)
    ax.scatter(x, local, s=14, color="tab:orange", label="no pooling (local)", zorder=2)
    ax.scatter(x, partial, s=14, color="tab:blue", label="partial pooling (hierfl)", zorder=3)
    if pooled is not None:
        ax.axhline(pooled, color="k", ls="--", lw=1, label="complete pooling")
    ax.set_xscale("log")
    ax.set_xlabel("observations per client (log scale)")
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("Shrinkage: small clients borrow the most strength")
    return ax


def plot_ep_convergence(fit, *, names=None, axes=None):
    """EP convergence over rounds: the global mean +/- sd of each unconstrained global
    parameter, and the per-round change (max |change of mean| / sd and max |change of log
    sd|, log scale) with the messages received.

    Parameters
    ----------
    fit : Fit
        A fit from ``method="ep"`` (reads ``fit.diagnostics["history"]``).
    names : list of str, optional
        Labels of the unconstrained dimensions (default ``z[0]``, ``z[1]``, ...).

    Returns
    -------
    array of two matplotlib Axes
    """
    import matplotlib.pyplot as plt

    history = fit.diagnostics["history"]
    rounds = np.asarray(history["round"]) + 1
    mean, sd = np.asarray(history["mean"]), np.asarray(history["sd"])
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = names or [f"z[{j}]" for j in range(mean.shape[1])]
    for j, name in enumerate(names):
        line = axes[0].plot(rounds, mean[:, j], marker="o", ms=3, label=name)[0]
        axes[0].fill_between(
            rounds, mean[:, j] - sd[:, j], mean[:, j] + sd[:, j], color=line.get_color(), alpha=0.15
        )
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("global mean +/- sd (unconstrained)")
    axes[0].legend(frameon=False, fontsize=7, ncol=2)
    axes[1].semilogy(
        rounds,
        np.maximum(history["mean_change"], 1e-8),
        marker="o",
        ms=3,
        label="max |change of mean| / sd",
    )
    axes[1].semilogy(
        rounds,
        np.maximum(history["sd_change"], 1e-8),
        marker="s",
        ms=3,
        label="max |change of log sd|",
    )
    for r, received, asked in zip(
        rounds, history["received"], history["participants"], strict=True
    ):
        if received < asked:
            axes[1].axvline(r, color="0.85", lw=3, zorder=0)
    axes[1].set_xlabel("round (grey: some messages skipped)")
    axes[1].legend(frameon=False, fontsize=8)
    return axes
