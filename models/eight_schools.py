r"""Eight schools (Rubin 1981): the smallest case of borrowing strength.

Each school is a client holding one estimated coaching effect :math:`y_i` with a known
standard error :math:`\sigma_i`:

.. math::
    \mu \sim N(0, 5^2),\quad \tau \sim \mathrm{HalfCauchy}(5),\quad
    \theta_i \sim N(\mu, \tau^2),\quad y_i \sim N(\theta_i, \sigma_i^2)

The pooling spectrum: ``tau = 0`` (complete pooling: one effect for all), a very large
``tau`` (no pooling: each school alone) and ``tau`` learned (partial pooling).

Data: ``data/eight_schools.csv`` (see ``data/PROVENANCE.md``).
"""

from __future__ import annotations

from importlib import resources

import numpyro.distributions as dist
import pandas as pd

import hierfl as hf

__all__ = ["PRIORS", "family", "frame", "load", "spectrum"]

#: the standard priors (Gelman et al., BDA3 section 5.5; NumPyro's example)
PRIORS = {"mu": dist.Normal(0.0, 5.0), "tau": dist.HalfCauchy(5.0)}
#: tau standing in for "no pooling": far wider than any school's standard error
NO_POOLING_TAU = 1000.0


def frame() -> pd.DataFrame:
    """The eight schools as a frame: ``school``, ``y``, ``sigma``."""
    with resources.files("models").joinpath("data/eight_schools.csv").open() as stream:
        return pd.read_csv(stream)


def load() -> hf.ClientData:
    """Client data: one client per school, fields ``y`` and ``sigma``."""
    return hf.ClientData.from_frame(frame(), client="school", fields=["y", "sigma"])


def family(priors=None) -> hf.NormalNormal:
    """Partial pooling: the Normal–Normal family with :data:`PRIORS` (or ``priors``)."""
    return hf.NormalNormal(priors=dict(PRIORS, **(priors or {})))


def spectrum() -> dict[str, hf.NormalNormal]:
    """No, complete and partial pooling as three families."""
    return {
        "no pooling": family({"tau": NO_POOLING_TAU}),
        "complete pooling": family({"tau": 0.0}),
        "partial pooling": family(),
    }
