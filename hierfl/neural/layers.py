"""Flax layers whose parameters are *personal*: they live in the ``"personal"`` collection.

A hierfl neural model is an ordinary Flax module. Parameters declared with ``self.param`` (the
``"params"`` collection) form the shared body; parameters in the ``"personal"`` collection are
each client's own ``theta_i`` and get the hierarchical prior ``N(mu, diag tau^2)``. Which
parts are personal is therefore a property of the model, not of the algorithm.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["PERSONAL", "PersonalDense", "PersonalNorm"]

#: Flax variable collection that holds the personal parameters
PERSONAL = "personal"
#: variance floor of :class:`PersonalNorm` (as in Flax's LayerNorm)
NORM_EPSILON = 1e-6


class PersonalDense(nn.Module):
    """A dense layer ``x @ kernel + bias`` with a personal kernel and bias (a personal head)."""

    features: int

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        kernel = self.variable(
            PERSONAL, "kernel", lambda: init(self.make_rng("params"), (x.shape[-1], self.features))
        ).value
        bias = self.variable(PERSONAL, "bias", lambda: jnp.zeros(self.features)).value
        return x @ kernel + bias


class PersonalNorm(nn.Module):
    """Standardize features over the last axis, then a personal scale and shift.

    ``y = scale * (x - mean(x)) / sqrt(var(x) + eps) + shift`` with ``scale`` and ``shift``
    personal: FedBN's idea (Li et al. 2021) with per-example statistics, so nothing but the
    affine parameters needs to be kept per client.
    """

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.variable(PERSONAL, "scale", lambda: jnp.ones(features)).value
        shift = self.variable(PERSONAL, "shift", lambda: jnp.zeros(features)).value
        mean = x.mean(axis=-1, keepdims=True)
        var = x.var(axis=-1, keepdims=True)
        return scale * (x - mean) / jnp.sqrt(var + NORM_EPSILON) + shift
