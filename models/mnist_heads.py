r"""MNIST digits with a shared body and Bayesian personal parts (issue 4's model zoo entry).

Five models (:mod:`hierfl.neural.architectures`), each with the hierarchical prior
:math:`\theta_i \sim N(\mu, \mathrm{diag}\,\tau^2)` on its personal parts:

* :func:`mlp_head` — a ReLU MLP body (784-128-64) and a personal linear head (64 -> 10);
* :func:`cnn_head` — a small CNN body (two strided 3x3 convolutions, 8 and 16 channels, then
  a 64-unit dense layer) and a personal linear head;
* :func:`mlp_norm` — an MLP whose hidden layers are followed by per-client normalization
  scale/shift (FedBN-style) under the hierarchical prior, and a shared head;
* :func:`mlp_adapter` — the same MLP with a personal low-rank (LoRA) adapter on its second
  hidden layer under the hierarchical prior, and a shared head;
* :func:`cnn_gate` — the small CNN with personal gates on its last convolution's channels
  (squeeze-and-excitation-style gating) under the hierarchical prior, and a shared head.

The pooling spectrum is the choice of ``tau``: ``tau -> 0`` is FedAvg's single model (the
personal parts pooled), ``tau -> infinity`` is local-only heads, and ``method="svi"`` learns
``tau`` (partial pooling). The baselines of :mod:`hierfl.neural.baselines` cover both ends.

Data: ``data/mnist_5000.npz`` (5,000 digits, 500 per class, rows sorted by label; see
``data/PROVENANCE.md``). :func:`load` shuffles them with a seeded generator;
:func:`federated` splits them among clients with one of :data:`PARTITIONS`.

Examples
--------
>>> from models import mnist_heads
>>> split = mnist_heads.federated("dirichlet_0.5", num_clients=5, seed=0)
>>> split.train.num_clients, split.train.fields["x"].shape[1]
(5, 784)
"""

from __future__ import annotations

from importlib import resources
from typing import NamedTuple

import numpy as np

import hierfl as hf
from hierfl import partition

__all__ = [
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "PARTITIONS",
    "FederatedSplit",
    "cnn_gate",
    "cnn_head",
    "federated",
    "load",
    "mlp_adapter",
    "mlp_head",
    "mlp_norm",
]

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
#: partitions of :func:`federated`: Dirichlet label skew, pathological, feature shift
PARTITIONS = ("dirichlet_0.1", "dirichlet_0.5", "dirichlet_5", "pathological", "feature_shift")
#: default shares of each client's examples held out for test and for validation
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2


def load(*, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[5000, 784]`` (float32 in ``[0, 1]``) and labels ``[5000]`` (int32), shuffled
    by ``numpy.random.default_rng(seed)`` (the file is sorted by label)."""
    with resources.files("models").joinpath("data/mnist_5000.npz").open("rb") as stream:
        with np.load(stream) as archive:
            images, labels = archive["images"], archive["labels"]
    order = np.random.default_rng(seed).permutation(labels.size)
    return (images[order].astype(np.float32) / 255.0, labels[order].astype(np.int32))


class FederatedSplit(NamedTuple):
    """Per-client train, validation and test data (the same client ids in each)."""

    train: hf.ClientData
    validation: hf.ClientData
    test: hf.ClientData
    shifts: list | None  # per-client FeatureShift for "feature_shift", else None


def _client_data(images, labels, parts) -> hf.ClientData:
    return hf.ClientData.from_dict(
        {k: {"x": images[p], "y": labels[p]} for k, p in enumerate(parts)}
    )


def federated(
    kind: str,
    *,
    num_clients: int,
    seed: int,
    num_examples: int | None = None,
    test_fraction: float = TEST_FRACTION,
    validation_fraction: float = VALIDATION_FRACTION,
) -> FederatedSplit:
    """Split the digits among ``num_clients`` clients, reproducibly from ``seed``.

    Parameters
    ----------
    kind : str
        ``"dirichlet_<alpha>"`` (label skew), ``"pathological"`` (two classes per client) or
        ``"feature_shift"`` (IID labels; every client has its own brightness, contrast and
        blur).
    num_clients : int
    seed : int
    num_examples : int, optional
        Use only the first ``num_examples`` shuffled digits (for tiny runs).
    test_fraction, validation_fraction : float
        Per-client shares held out for test, then for validation (from the rest).
    """
    images, labels = load(seed=seed)
    if num_examples is not None:
        images, labels = images[:num_examples], labels[:num_examples]
    shifts = None
    if kind.startswith("dirichlet_"):
        parts = partition.dirichlet_label_skew(
            labels, num_clients, float(kind.split("_", 1)[1]), seed=seed
        )
    elif kind == "pathological":
        parts = partition.pathological(labels, num_clients, classes_per_client=2, seed=seed)
    elif kind == "feature_shift":
        parts = np.array_split(np.random.default_rng(seed).permutation(labels.size), num_clients)
        shifts = partition.feature_shift(num_clients, seed=seed)
        images = images.copy()
        for part, shift in zip(parts, shifts, strict=True):
            shifted = partition.apply_feature_shift(images[part].reshape(-1, 28, 28), shift)
            images[part] = shifted.reshape(-1, 784).astype(np.float32)
    else:
        raise ValueError(f"unknown partition {kind!r}; choose from {PARTITIONS}")
    rest, test = partition.train_test_split(parts, test_fraction, seed=seed + 1)
    train, validation = partition.train_test_split(rest, validation_fraction, seed=seed + 2)
    return FederatedSplit(
        _client_data(images, labels, train),
        _client_data(images, labels, validation),
        _client_data(images, labels, test),
        shifts,
    )


def mlp_head(hidden=(128, 64)):
    """MLP body with a Bayesian personal head (needs the ``neural`` extra)."""
    from hierfl.neural import mlp_head_model

    return mlp_head_model(input_dim=784, num_classes=NUM_CLASSES, hidden=hidden)


def cnn_head(channels=(8, 16), features=64):
    """Small CNN body with a Bayesian personal head (needs the ``neural`` extra)."""
    from hierfl.neural import cnn_head_model

    return cnn_head_model(
        image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES, channels=channels, features=features
    )


def mlp_norm(hidden=(128, 64)):
    """MLP with per-client normalization scale/shift under the hierarchical prior."""
    from hierfl.neural import mlp_norm_model

    return mlp_norm_model(input_dim=784, num_classes=NUM_CLASSES, hidden=hidden)


def mlp_adapter(hidden=(128, 64), rank=4):
    """MLP with a personal rank-``rank`` adapter on its second hidden layer and a shared head,
    under the hierarchical prior (needs the ``neural`` extra)."""
    from hierfl.neural import mlp_adapter_model

    return mlp_adapter_model(input_dim=784, num_classes=NUM_CLASSES, hidden=hidden, rank=rank)


def cnn_gate(channels=(8, 16), features=64):
    """Small CNN with personal channel gates on its last convolution and a shared head, under
    the hierarchical prior (needs the ``neural`` extra)."""
    from hierfl.neural import cnn_gate_model

    return cnn_gate_model(
        image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES, channels=channels, features=features
    )
