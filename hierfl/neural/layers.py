"""Flax layers whose parameters are *personal*: they live in the ``"personal"`` collection.

A hierfl neural model is an ordinary Flax module. Parameters declared with ``self.param`` (the
``"params"`` collection) form the shared body; parameters in the ``"personal"`` collection are
each client's own ``theta_i`` and get the hierarchical prior ``N(mu, diag tau^2)``. Which
parts are personal is therefore a property of the model, not of the algorithm.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["PERSONAL", "PersonalAdapter", "PersonalDense", "PersonalGate", "PersonalNorm"]

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


class PersonalAdapter(nn.Module):
    r"""A shared dense layer with a personal low-rank adapter (LoRA, Hu et al. 2022):

    .. math:: y = x \left(W + \frac{A_i B_i}{\sqrt{\mathrm{in} \cdot r}}\right) + b,

    with ``W`` ``[in, features]`` and ``b`` shared (``dense_kernel``, ``dense_bias`` in the
    ``"params"`` collection) and each client's ``A_i`` ``[in, r]`` (``down``) and ``B_i``
    ``[r, features]`` (``up``) personal, under the hierarchical prior. ``A`` starts as
    standard normal draws and ``B`` at zero, so every client starts at the shared layer; the
    scales sit in the layer, so the parameters are of unit scale (``tau ~ 1`` is as wide
    as the initialization). The learned ``tau`` of ``A`` and ``B`` is the shrinkage: how
    far each client's adapter may move from the population's.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> layer = PersonalAdapter(features=3, rank=2)
    >>> variables = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 5)))
    >>> {k: v.shape for k, v in variables["personal"].items()}
    {'down': (5, 2), 'up': (2, 3)}
    >>> y = layer.apply(variables, jnp.ones((4, 5)))  # B = 0: the shared layer alone
    >>> dense = variables["params"]["dense"]
    >>> bool(jnp.allclose(y, jnp.ones((4, 5)) @ dense["kernel"] + dense["bias"]))
    True
    """

    features: int
    rank: int = 4

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(self.features, name="dense")(x)
        fan_in = x.shape[-1]
        down = self.variable(
            PERSONAL,
            "down",
            lambda: jax.random.normal(self.make_rng("params"), (fan_in, self.rank)),
        ).value
        up = self.variable(PERSONAL, "up", lambda: jnp.zeros((self.rank, self.features))).value
        # unit-scale parameters (the scales sit in the layer), so that tau ~ 1 is as wide
        # as the initialization, as for the other personal layers
        return shared + ((x @ down) / math.sqrt(fan_in)) @ up / math.sqrt(self.rank)


class PersonalGate(nn.Module):
    r"""Personal channel gates (a squeeze-and-excitation gate without the squeeze): every
    channel (last axis) of the input is scaled by ``2 sigmoid(g_c)``, with ``g`` personal
    (``gate``, one value per channel, starting at 0: a gate of 1, the shared network).

    Under the hierarchical prior, ``mu`` is the population's gating and ``tau`` how far a
    client may turn its own channels up (to 2x) or off.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> layer = PersonalGate()
    >>> variables = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 3)))
    >>> variables["personal"]["gate"].shape
    (3,)
    >>> x = jnp.ones((2, 4, 4, 3))
    >>> bool(jnp.allclose(layer.apply(variables, x), x))  # gates start at 1
    True
    >>> off = {"personal": {"gate": jnp.array([-30.0, 0.0, 30.0])}}
    >>> layer.apply(off, x)[0, 0, 0].round(3).tolist()
    [0.0, 1.0, 2.0]
    """

    @nn.compact
    def __call__(self, x):
        gate = self.variable(PERSONAL, "gate", lambda: jnp.zeros(x.shape[-1])).value
        return x * (2.0 * jax.nn.sigmoid(gate))
