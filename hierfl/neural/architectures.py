"""Bodies with personal parts: an MLP or a small CNN with a personal head, an MLP with
personal normalization (FedBN-style scale/shift) and a shared head, an MLP with personal
low-rank adapters and a shared head, and a small CNN with personal channel gates and a shared
head.

Every module splits at its first personal layer: ``features(x)`` is the part of the network
before it (shared parameters only) and ``personal_head(h)`` the rest, so that
``__call__(x) == personal_head(features(x))``. :class:`~hierfl.neural.NeuralModel` uses the
split to compute a client's features once per round and then fit the personal parameters on
them (the local E-step of :mod:`hierfl.neural.svi`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from .layers import PersonalAdapter, PersonalDense, PersonalGate, PersonalNorm
from .model import NeuralModel

__all__ = [
    "CNNGate",
    "CNNHead",
    "MLPAdapter",
    "MLPHead",
    "MLPNorm",
    "cnn_gate_model",
    "cnn_head_model",
    "mlp_adapter_model",
    "mlp_head_model",
    "mlp_norm_model",
]


class MLPHead(nn.Module):
    """Shared ReLU MLP body, personal linear head (``head_kernel``, ``head_bias``)."""

    hidden: Sequence[int]
    num_classes: int

    def setup(self):
        self.layers = [nn.Dense(width) for width in self.hidden]
        self.head = PersonalDense(self.num_classes)

    def features(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = nn.relu(layer(x))
        return x

    def personal_head(self, h):
        return self.head(h)

    def __call__(self, x):
        return self.personal_head(self.features(x))


class CNNHead(nn.Module):
    """Shared small CNN body (two strided 3x3 convolutions and a dense layer), personal
    linear head."""

    channels: Sequence[int]
    features_size: int
    num_classes: int

    def setup(self):
        self.convs = [nn.Conv(width, (3, 3), strides=(2, 2)) for width in self.channels]
        self.dense = nn.Dense(self.features_size)
        self.head = PersonalDense(self.num_classes)

    def features(self, x):
        for conv in self.convs:
            x = nn.relu(conv(x))
        x = x.reshape(x.shape[0], -1)
        return nn.relu(self.dense(x))

    def personal_head(self, h):
        return self.head(h)

    def __call__(self, x):
        return self.personal_head(self.features(x))


class CNNGate(nn.Module):
    """The :class:`CNNHead` body and a shared head, with personal channel gates
    (:class:`PersonalGate`, ``gate_gate``) on the last convolution's channels: each client
    turns the shared feature maps up or down. ``features`` is the last convolution's output
    (before the gates)."""

    channels: Sequence[int]
    features_size: int
    num_classes: int

    def setup(self):
        self.convs = [nn.Conv(width, (3, 3), strides=(2, 2)) for width in self.channels]
        self.gate = PersonalGate()
        self.dense = nn.Dense(self.features_size)
        self.out = nn.Dense(self.num_classes)

    def features(self, x):
        for k, conv in enumerate(self.convs):
            x = conv(x)
            if k < len(self.convs) - 1:
                x = nn.relu(x)
        return x

    def personal_head(self, h):
        h = nn.relu(self.gate(h))
        h = nn.relu(self.dense(h.reshape(h.shape[0], -1)))
        return self.out(h)

    def __call__(self, x):
        return self.personal_head(self.features(x))


class MLPNorm(nn.Module):
    """Shared MLP and head; after every hidden layer a :class:`PersonalNorm` whose scale and
    shift are personal (``norm_<k>_scale``, ``norm_<k>_shift``). ``features`` is the first
    dense layer's output (before the first personal normalization)."""

    hidden: Sequence[int]
    num_classes: int

    def setup(self):
        self.layers = [nn.Dense(width) for width in self.hidden]
        for k in range(len(self.hidden)):
            setattr(self, f"norm_{k}", PersonalNorm())
        self.out = nn.Dense(self.num_classes)

    def features(self, x):
        return self.layers[0](x.reshape(x.shape[0], -1))

    def personal_head(self, h):
        for k, layer in enumerate(self.layers):
            if k:
                h = layer(h)
            h = nn.relu(getattr(self, f"norm_{k}")(h))
        return self.out(h)

    def __call__(self, x):
        return self.personal_head(self.features(x))


class MLPAdapter(nn.Module):
    """Shared ReLU MLP and head; every hidden layer after the first is a
    :class:`PersonalAdapter` (shared dense layer plus a personal rank-``rank`` correction,
    ``adapter_<k>_down`` and ``adapter_<k>_up``). ``features`` is the first hidden layer's
    output (before the first adapter)."""

    hidden: Sequence[int]
    num_classes: int
    rank: int = 4

    def setup(self):
        if len(self.hidden) < 2:
            raise ValueError(
                f"MLPAdapter needs at least two hidden layers (got {tuple(self.hidden)}): "
                "the first is shared, the adapters sit on the others"
            )
        self.first = nn.Dense(self.hidden[0])
        for k, width in enumerate(self.hidden[1:], start=1):
            setattr(self, f"adapter_{k}", PersonalAdapter(width, self.rank))
        self.out = nn.Dense(self.num_classes)

    def features(self, x):
        return nn.relu(self.first(x.reshape(x.shape[0], -1)))

    def personal_head(self, h):
        for k in range(1, len(self.hidden)):
            h = nn.relu(getattr(self, f"adapter_{k}")(h))
        return self.out(h)

    def __call__(self, x):
        return self.personal_head(self.features(x))


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


def cnn_gate_model(
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    channels: Sequence[int] = (8, 16),
    features: int = 64,
) -> NeuralModel:
    """A :class:`CNNGate` as a :class:`NeuralModel` on images ``image_shape`` (HWC).

    Examples
    --------
    >>> cnn_gate_model(image_shape=(28, 28, 1), num_classes=10).personal_size()  # 16 gates
    16
    """
    return NeuralModel(
        CNNGate(tuple(channels), features, num_classes),
        tuple(image_shape),
        num_classes,
        name="cnn_gate",
    )


def mlp_norm_model(
    *, input_dim: int, num_classes: int, hidden: Sequence[int] = (128, 64)
) -> NeuralModel:
    """An :class:`MLPNorm` as a :class:`NeuralModel` on flat inputs ``[input_dim]``."""
    return NeuralModel(
        MLPNorm(tuple(hidden), num_classes), (input_dim,), num_classes, name="mlp_norm"
    )


def mlp_adapter_model(
    *, input_dim: int, num_classes: int, hidden: Sequence[int] = (128, 64), rank: int = 4
) -> NeuralModel:
    """An :class:`MLPAdapter` as a :class:`NeuralModel` on flat inputs ``[input_dim]``.

    Examples
    --------
    >>> model = mlp_adapter_model(input_dim=784, num_classes=10, rank=4)
    >>> model.personal_size()  # A [128, 4] and B [4, 64]
    768
    """
    return NeuralModel(
        MLPAdapter(tuple(hidden), num_classes, rank),
        (input_dim,),
        num_classes,
        name="mlp_adapter",
    )
