"""A neural model for hierfl: a Flax module with a shared body and personal parameters."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .layers import PERSONAL

__all__ = ["NeuralModel", "personal_names"]

PyTree = Any


@dataclass(frozen=True)
class NeuralModel:
    r"""A classifier ``p(y | x, w, theta_i) = softmax(f(x; w, theta_i))``.

    ``module`` is a Flax module mapping a batch of inputs ``[batch, *input_shape]`` to logits
    ``[batch, num_classes]``. Its ``"params"`` collection is the shared body ``w`` (a point
    estimate, updated by the server); its ``"personal"`` collection (see
    :mod:`hierfl.neural.layers`) is each client's ``theta_i``, flattened to a vector of length
    ``P`` with the hierarchical prior

    .. math:: \theta_i \mid \mu, \tau \sim N(\mu, \mathrm{diag}\,\tau^2).

    Parameters
    ----------
    module : flax.linen.Module
    input_shape : tuple of int
        Shape of one input (e.g. ``(784,)`` or ``(28, 28, 1)``); rows of the ``x`` field are
        reshaped to it.
    num_classes : int
    name : str
        A short name for reports.
    x_field, y_field : str
        Names of the input and label fields of the client data.
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    name: str = "neural"
    x_field: str = "x"
    y_field: str = "y"

    def init(self, key) -> tuple[PyTree, PyTree]:
        """Initial ``(shared, personal)`` parameter pytrees."""
        try:  # one compiled call instead of one eager dispatch per initializer
            init = _jitted_init(self.module, tuple(self.input_shape))
        except TypeError:  # an unhashable module
            init = jax.jit(_module_init(self.module, tuple(self.input_shape)))
        variables = init(key)
        if PERSONAL not in variables:
            raise ValueError(
                f"model {self.name!r} declares no personal parameters: use "
                "hierfl.neural.PersonalDense or PersonalNorm (the 'personal' "
                "collection)"
            )
        return variables["params"], variables[PERSONAL]

    def logits(self, shared: PyTree, personal: PyTree, x) -> jax.Array:
        """Logits ``[batch, num_classes]`` for inputs ``[batch, ...]`` (reshaped)."""
        x = jnp.reshape(x, (x.shape[0], *self.input_shape))
        return self.module.apply({"params": shared, PERSONAL: personal}, x)

    @property
    def splits(self) -> bool:
        """Whether the module has ``features`` and ``personal_head`` methods (see
        :mod:`hierfl.neural.architectures`)."""
        return hasattr(self.module, "features") and hasattr(self.module, "personal_head")

    def features(self, shared: PyTree, x) -> jax.Array:
        """The part of the network before the first personal parameter, ``h = g(x; w)``
        (``x`` reshaped, unchanged, for a module without the split)."""
        x = jnp.reshape(x, (x.shape[0], *self.input_shape))
        if not self.splits:
            return x
        return self.module.apply({"params": shared}, x, method="features")

    def head_logits(self, shared: PyTree, personal: PyTree, h) -> jax.Array:
        """Logits from features ``h`` of :meth:`features`: ``logits(w, theta, x) ==
        head_logits(w, theta, features(w, x))``."""
        if not self.splits:
            return self.logits(shared, personal, h)
        return self.module.apply({"params": shared, PERSONAL: personal}, h, method="personal_head")

    def personal_size(self, key=None) -> int:
        """``P``, the length of the flattened personal vector."""
        _, personal = jax.eval_shape(self.init, jax.random.PRNGKey(0) if key is None else key)
        return sum(
            int(jnp.size(jnp.zeros(leaf.shape))) for leaf in jax.tree_util.tree_leaves(personal)
        )

    def unravel(self, personal_template: PyTree):
        """``(flat, unravel)`` for the personal pytree (see ``jax.flatten_util``)."""
        return ravel_pytree(personal_template)


def _module_init(module: nn.Module, input_shape: tuple[int, ...]):
    return lambda key: module.init({"params": key}, jnp.zeros((1, *input_shape)))


@functools.lru_cache(maxsize=16)
def _jitted_init(module: nn.Module, input_shape: tuple[int, ...]):
    return jax.jit(_module_init(module, input_shape))


def personal_names(personal: PyTree) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every personal leaf, in flattening order; names join the Flax
    module path with ``_`` (e.g. ``head_kernel``)."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(personal):
        parts = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
        out.append(("_".join(str(p) for p in parts), tuple(jnp.shape(leaf))))
    return out
