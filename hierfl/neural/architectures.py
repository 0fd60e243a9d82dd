"""Bodies with personal parts: an MLP or a small CNN with a personal head, and an MLP with
personal normalization (FedBN-style scale/shift) and a shared head."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from .layers import PersonalDense, PersonalNorm
from .model import NeuralModel

__all__ = ["CNNHead", "MLPHead", "MLPNorm", "cnn_head_model", "mlp_head_model", "mlp_norm_model"]


class MLPHead(nn.Module):
    """Shared ReLU MLP body, personal linear head (``head_kernel``, ``head_bias``)."""

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return PersonalDense(self.num_classes, name="head")(x)


class CNNHead(nn.Module):
    """Shared small CNN body (two strided 3x3 convolutions and a dense layer), personal
    linear head."""

    channels: Sequence[int]
    features: int
    num_classes: int

    @nn.compact
    def __call__(self, x):
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.features)(x))
        return PersonalDense(self.num_classes, name="head")(x)


class MLPNorm(nn.Module):
    """Shared MLP and head; after every hidden layer a :class:`PersonalNorm` whose scale and
    shift are personal (``norm_<k>_scale``, ``norm_<k>_shift``)."""

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for k, width in enumerate(self.hidden):
            x = nn.relu(PersonalNorm(name=f"norm_{k}")(nn.Dense(width)(x)))
        return nn.Dense(self.num_classes)(x)


def mlp_head_model(
    *, input_dim: int, num_classes: int, hidden: Sequence[int] = (128, 64)
) -> NeuralModel:
    """An :class:`MLPHead` as a :class:`NeuralModel` on flat inputs ``[input_dim]``."""
    return NeuralModel(
        MLPHead(tuple(hidden), num_classes), (input_dim,), num_classes, name="mlp_head"
    )


def cnn_head_model(
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    channels: Sequence[int] = (8, 16),
    features: int = 64,
) -> NeuralModel:
    """A :class:`CNNHead` as a :class:`NeuralModel` on images ``image_shape`` (HWC)."""
    return NeuralModel(
        CNNHead(tuple(channels), features, num_classes),
        tuple(image_shape),
        num_classes,
        name="cnn_head",
    )


def mlp_norm_model(
    *, input_dim: int, num_classes: int, hidden: Sequence[int] = (128, 64)
) -> NeuralModel:
    """An :class:`MLPNorm` as a :class:`NeuralModel` on flat inputs ``[input_dim]``."""
    return NeuralModel(
        MLPNorm(tuple(hidden), num_classes), (input_dim,), num_classes, name="mlp_norm"
    )
