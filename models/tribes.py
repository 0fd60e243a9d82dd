r"""Two tribes: generated federations whose clients form two groups, and what a mixture buys.

Each client belongs to one of two tribes, unknown to everyone. Its mean comes from its
tribe, and it holds a few noisy rows with known standard errors:

.. math::
    z_i \sim \mathrm{Categorical}(w),\quad
    \theta_i \mid z_i \sim N(m_{z_i}, s^2),\quad
    y_{ij} \mid \theta_i \sim N(\theta_i, \sigma_{ij}^2),\quad
    \sigma_{ij} \sim \mathrm{Uniform}(0.5, 1.5)\,\sigma

(defaults :math:`w = (1/2, 1/2)`, :math:`m = (-2, 2)`, :math:`s = 0.5`, :math:`\sigma = 1.5`,
1 to 6 training rows per client, and 5 held-out rows per client drawn the same way).
:func:`generate` is reproducible from its seed and returns the ground truth.

:func:`spectrum` fits three models of the same data, each by the exact engine:

* ``"complete pooling"``: one mean for everyone (:class:`~hierfl.NormalNormal`, ``tau = 0``);
* ``"one Gaussian"``: :class:`~hierfl.NormalNormal`, partial pooling toward the grand mean;
* ``"tribes"``: :class:`~hierfl.tribes.NormalMixture` with two components, partial pooling
  toward each client's own tribe.

:func:`compare` scores each on every client's held-out rows: the RMSE of the posterior-mean
prediction, the mean log predictive density per row,
:math:`\log \frac1S \sum_s N(y \mid \theta_i^{(s)}, \sigma^2)`, and the RMSE of the
posterior mean of :math:`\theta_i` against the truth. Run it with
``python -m models.tribes --seeds 5``.

Examples
--------
>>> from models import tribes
>>> sim = tribes.generate(6, seed=0)
>>> sim.train.num_clients, sorted(sim.train.field_names)
(6, ['sigma', 'y'])
>>> sim.test.client_ids == sim.train.client_ids
True
>>> sorted(sim.truth)
['theta', 'tribe']
>>> list(tribes.spectrum())
['complete pooling', 'one Gaussian', 'tribes']
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import numpy as np
import numpyro.distributions as dist
import pandas as pd
from scipy.special import logsumexp

import hierfl as hf
from hierfl.tribes import NormalMixture, membership

__all__ = [
    "PRIORS",
    "Simulation",
    "compare",
    "family",
    "generate",
    "main",
    "paired_difference",
    "score",
    "spectrum",
]

#: priors of the tribe model: means on the data's scale, spreads smaller than the gap
PRIORS = {"mu": dist.Normal(0.0, 5.0), "tau": dist.HalfNormal(2.0)}


class Simulation(NamedTuple):
    """A generated federation: training rows, held-out rows of the same clients, the truth.

    Attributes
    ----------
    train, test : hierfl.ClientData
        Fields ``y`` and ``sigma``; the same clients in the same order.
    truth : dict of str to ndarray
        ``tribe`` (0 or 1, sorted so that tribe 0 has the lower mean) and ``theta``, one per
        client.
    """

    train: hf.ClientData
    test: hf.ClientData
    truth: dict[str, np.ndarray]


def generate(
    num_clients: int = 40,
    *,
    seed: int = 0,
    means: tuple[float, ...] = (-2.0, 2.0),
    weights: tuple[float, ...] = (0.5, 0.5),
    spread: float = 0.5,
    noise: float = 1.5,
    min_rows: int = 1,
    max_rows: int = 6,
    held_out: int = 5,
) -> Simulation:
    """A federation of clients in tribes (see the module docstring); same seed, same data.

    Parameters
    ----------
    num_clients : int
    seed : int
    means, weights : tuple of float
        The tribes' means (increasing) and their shares of the clients.
    spread : float
        Sd of the clients' means within a tribe.
    noise : float
        Typical row standard error; each row's is ``Uniform(0.5, 1.5) * noise``.
    min_rows, max_rows : int
        Training rows per client, uniform on this range.
    held_out : int
        Held-out rows per client.
    """
    rng = np.random.default_rng(seed)
    tribe = rng.choice(len(means), size=num_clients, p=np.asarray(weights) / np.sum(weights))
    theta = rng.normal(np.asarray(means)[tribe], spread)
    sizes = rng.integers(min_rows, max_rows + 1, num_clients)
    train, test = {}, {}
    for i in range(num_clients):
        for store, rows in ((train, sizes[i]), (test, held_out)):
            sigma = rng.uniform(0.5, 1.5, rows) * noise
            store[f"client{i:03d}"] = {"y": rng.normal(theta[i], sigma), "sigma": sigma}
    return Simulation(
        hf.ClientData.from_dict(train),
        hf.ClientData.from_dict(test),
        {"tribe": tribe, "theta": theta},
    )


def family(num_components: int = 2, priors: dict[str, Any] | None = None) -> NormalMixture:
    """The tribe model: :class:`~hierfl.tribes.NormalMixture` with :data:`PRIORS`."""
    return NormalMixture(dict(PRIORS, **(priors or {})), num_components=num_components)


def spectrum() -> dict[str, hf.NormalNormal | NormalMixture]:
    """Complete pooling, one Gaussian (partial pooling) and two tribes, on the same priors."""
    return {
        "complete pooling": hf.NormalNormal(priors={"mu": PRIORS["mu"], "tau": 0.0}),
        "one Gaussian": hf.NormalNormal(priors=dict(PRIORS)),
        "tribes": family(),
    }


def score(fit: hf.Fit, simulation: Simulation) -> dict[str, float]:
    """Held-out RMSE and log predictive density, and the error of ``theta``'s posterior mean."""
    theta = fit.posterior_samples()[fit.sites.client_sites[0]]
    theta = np.asarray(theta, np.float64).reshape(-1, fit.data.num_clients)  # [draw, client]
    test = simulation.test
    y, sigma = test.fields["y"], test.fields["sigma"]
    index = np.asarray(test.client_index)
    mean = theta.mean(axis=0)
    draws = theta[:, index]  # [draw, row]
    log_density = -0.5 * (((y - draws) / sigma) ** 2 + np.log(2.0 * np.pi * sigma**2))
    pointwise = logsumexp(log_density, axis=0) - np.log(theta.shape[0])
    return {
        "heldout_rmse": float(np.sqrt(np.mean((y - mean[index]) ** 2))),
        "heldout_lpd": float(np.mean(pointwise)),
        "theta_rmse": float(np.sqrt(np.mean((mean - simulation.truth["theta"]) ** 2))),
    }


def compare(
    seeds=range(5),
    *,
    num_clients: int = 40,
    settings: dict[str, int] | None = None,
    models: dict | None = None,
    **generator,
) -> pd.DataFrame:
    """Score the :func:`spectrum` (or ``models``, e.g. the same objects already fitted, whose
    compiled programs are then reused) on one generated federation per seed (exact engine).

    Returns a frame with one row per seed and model: the :func:`score` figures, and for the
    tribe model ``membership_accuracy`` (share of clients whose most probable tribe is their
    true one).
    """
    settings = dict(settings or {"num_warmup": 500, "num_samples": 1000, "num_chains": 2})
    models = spectrum() if models is None else models  # the same objects for every seed
    rows = []
    for seed in seeds:
        simulation = generate(num_clients, seed=seed, **generator)
        for name, model in models.items():
            fit = hf.fit(model, simulation.train, method="exact", seed=seed, **settings)
            row = {"seed": seed, "model": name, **score(fit, simulation)}
            if isinstance(model, NormalMixture):
                tribe = membership(fit).to_numpy().argmax(axis=1)
                row["membership_accuracy"] = float(np.mean(tribe == simulation.truth["tribe"]))
            rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    """``python -m models.tribes [--seeds 5] [--clients 40]``: print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=40)
    arguments = parser.parse_args(argv)
    frame = compare(range(arguments.seeds), num_clients=arguments.clients)
    pd.set_option("display.width", 120)
    print(frame.round(4).to_string(index=False))
    summary = frame.groupby("model", sort=False).agg(["mean", "std"]).drop(columns="seed")
    print("\nmean (sd) over seeds")
    print(summary.round(4).to_string())
    print("\ntribes minus one Gaussian, paired by seed (lower RMSE and higher lpd are better)")
    print(paired_difference(frame).round(4).to_string())
    return frame


def paired_difference(
    frame: pd.DataFrame, *, model: str = "tribes", baseline: str = "one Gaussian"
) -> pd.DataFrame:
    """Per-metric difference ``model - baseline`` paired by seed: mean, sd, and the number of
    seeds on which ``model`` is better."""
    metrics = {"heldout_rmse": -1.0, "heldout_lpd": 1.0, "theta_rmse": -1.0}  # +1: higher better
    wide = frame.set_index(["seed", "model"])[list(metrics)].unstack("model")
    rows = {}
    for metric, better in metrics.items():
        difference = wide[metric][model] - wide[metric][baseline]
        rows[metric] = {
            "mean": difference.mean(),
            "sd": difference.std(),
            "better_on": f"{int(np.sum(better * difference > 0))}/{difference.size}",
        }
    return pd.DataFrame(rows).T


if __name__ == "__main__":
    main()
