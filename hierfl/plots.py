"""Plots where a picture says more than a table (matplotlib; ArviZ covers the rest)."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_shrinkage"]


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
