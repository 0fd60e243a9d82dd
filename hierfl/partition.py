r"""Non-IID client partitions, reproducible from a seed, and FedProx's Synthetic data.

Every partitioner takes an explicit ``seed`` (a :class:`numpy.random.Generator` is built from
it; no global RNG) and returns plain NumPy index arrays, one per client, so the same seed
always gives the same split.

* :func:`dirichlet_label_skew` — for every class, the class's examples are shared among the
  clients in proportions :math:`p_c \sim \mathrm{Dirichlet}(\alpha \mathbf 1)` (Hsu et al.
  2019, *Measuring the effects of non-identical data distribution*). Small ``alpha``
  (0.1) gives clients dominated by one or two labels; large ``alpha`` (5) is nearly IID.
* :func:`pathological` — every client holds exactly ``classes_per_client`` labels (McMahan
  et al. 2017's pathological non-IID split).
* :func:`train_test_split` — a per-client split of each client's indices.
* :func:`feature_shift` — every client sees all digits, but through its own brightness,
  contrast and blur (the FedBN setting, Li et al. 2021).
* :func:`synthetic` — FedProx's Synthetic(alpha, beta) generator (Li et al. 2020,
  *Federated optimization in heterogeneous networks*, section 5.1).

Examples
--------
>>> import numpy as np
>>> from hierfl.partition import dirichlet_label_skew
>>> labels = np.repeat(np.arange(3), 20)
>>> parts = dirichlet_label_skew(labels, 4, alpha=0.5, seed=0)
>>> sum(len(p) for p in parts), len(parts)
(60, 4)
>>> all(np.array_equal(a, b) for a, b in
...     zip(parts, dirichlet_label_skew(labels, 4, alpha=0.5, seed=0)))
True
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "FeatureShift",
    "apply_feature_shift",
    "dirichlet_label_skew",
    "feature_shift",
    "pathological",
    "synthetic",
    "train_test_split",
]

#: a Dirichlet split is redrawn until every client holds at least this many examples
DEFAULT_MIN_SIZE = 10
#: redraws allowed before giving up (a split with ``alpha`` tiny and many clients may fail)
MAX_REDRAWS = 1000


def dirichlet_label_skew(
    labels, num_clients: int, alpha: float, *, seed: int, min_size: int = DEFAULT_MIN_SIZE
) -> list[np.ndarray]:
    r"""Split example indices among clients with Dirichlet label skew.

    For each class :math:`c`, draw :math:`p_c \sim \mathrm{Dirichlet}(\alpha\,\mathbf 1_K)`
    over the :math:`K` clients and deal the (shuffled) examples of class :math:`c` in those
    proportions. The draw is repeated until every client has at least ``min_size`` examples.

    Parameters
    ----------
    labels : array of int, ``[num_examples]``
    num_clients : int
    alpha : float
        Concentration; smaller is more skewed.
    seed : int
    min_size : int
        Minimum examples per client.

    Returns
    -------
    list of ndarray of int
        Example indices of each client (sorted within a client).
    """
    labels = np.asarray(labels)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if num_clients * min_size > labels.size:
        raise ValueError(
            f"{labels.size} examples cannot give {num_clients} clients {min_size} examples each"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_REDRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(int)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise RuntimeError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {num_clients} "
        f"clients {min_size} examples in {MAX_REDRAWS} draws; lower min_size"
    )


def pathological(
    labels, num_clients: int, *, classes_per_client: int = 2, seed: int
) -> list[np.ndarray]:
    """Split so that every client holds exactly ``classes_per_client`` labels.

    The examples of each class are cut into equal shards; client ``k`` gets one shard of each
    of its classes. Classes are assigned round-robin over a seeded permutation, so every class
    is used by (about) the same number of clients.

    Parameters
    ----------
    labels : array of int, ``[num_examples]``
    num_clients : int
    classes_per_client : int
    seed : int

    Returns
    -------
    list of ndarray of int
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if classes_per_client > classes.size:
        raise ValueError(
            f"classes_per_client={classes_per_client} exceeds the {classes.size} classes"
        )
    order = np.concatenate(
        [
            rng.permutation(classes)
            for _ in range(-(-num_clients * classes_per_client // classes.size))
        ]
    )
    assigned = order[: num_clients * classes_per_client].reshape(num_clients, classes_per_client)
    # a client must not get the same class twice: repair duplicates by swapping
    for k in range(num_clients):
        while np.unique(assigned[k]).size < classes_per_client:
            missing = rng.choice(np.setdiff1d(classes, assigned[k]))
            _, first = np.unique(assigned[k], return_index=True)
            duplicate = np.setdiff1d(np.arange(classes_per_client), first)[0]
            assigned[k, duplicate] = missing
    shards = {}
    for c in classes:
        users = np.flatnonzero((assigned == c).any(axis=1))
        members = rng.permutation(np.flatnonzero(labels == c))
        for user, chunk in zip(users, np.array_split(members, max(len(users), 1)), strict=False):
            shards[(c, user)] = chunk
    return [
        np.sort(np.concatenate([shards[(c, k)] for c in assigned[k]])) for k in range(num_clients)
    ]


def train_test_split(
    parts, test_fraction: float, *, seed: int, min_test: int = 1
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's indices into train and test, reproducibly.

    Parameters
    ----------
    parts : list of ndarray of int
    test_fraction : float
        Share of every client's examples held out (at least ``min_test`` and at least one
        example kept for training).
    seed : int

    Returns
    -------
    train, test : list of ndarray of int
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k, indices in enumerate(parts):
        if len(indices) < 2:
            raise ValueError(f"client {k} has {len(indices)} example(s); a split needs two")
        shuffled = rng.permutation(indices)
        size = min(max(int(round(test_fraction * len(indices))), min_test), len(indices) - 1)
        test.append(np.sort(shuffled[:size]))
        train.append(np.sort(shuffled[size:]))
    return train, test


class FeatureShift(NamedTuple):
    """One client's imaging conditions.

    ``brightness`` is added to pixel intensities in ``[0, 1]``; ``contrast`` scales them about
    0.5; ``blur`` is the standard deviation (in pixels) of a Gaussian blur (0: none).
    """

    brightness: float
    contrast: float
    blur: float


#: ranges of the per-client conditions of :func:`feature_shift` (daylight to dim room)
BRIGHTNESS_RANGE = (-0.3, 0.3)
CONTRAST_RANGE = (0.4, 1.6)
BLUR_RANGE = (0.0, 1.5)


def feature_shift(num_clients: int, *, seed: int) -> list[FeatureShift]:
    """Draw every client's brightness, contrast and blur uniformly from
    :data:`BRIGHTNESS_RANGE`, :data:`CONTRAST_RANGE` and :data:`BLUR_RANGE`."""
    rng = np.random.default_rng(seed)
    return [
        FeatureShift(
            float(rng.uniform(*BRIGHTNESS_RANGE)),
            float(rng.uniform(*CONTRAST_RANGE)),
            float(rng.uniform(*BLUR_RANGE)),
        )
        for _ in range(num_clients)
    ]


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(int(np.ceil(3 * sigma)), 1)
    grid = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (grid / sigma) ** 2)
    return kernel / kernel.sum()


def apply_feature_shift(images, shift: FeatureShift) -> np.ndarray:
    """Apply one client's conditions to images ``[n, height, width]`` with values in
    ``[0, 1]``: blur (separable Gaussian), then contrast about 0.5, then brightness; the
    result is clipped to ``[0, 1]``."""
    out = np.asarray(images, dtype=np.float64)
    if shift.blur > 0:
        kernel = _gaussian_kernel(shift.blur)
        radius = kernel.size // 2
        for axis in (1, 2):
            pad = [(0, 0)] * 3
            pad[axis] = (radius, radius)
            padded = np.pad(out, pad)
            out = sum(
                w * np.take(padded, np.arange(j, j + out.shape[axis]), axis=axis)
                for j, w in enumerate(kernel)
            )
    out = (out - 0.5) * shift.contrast + 0.5 + shift.brightness
    return np.clip(out, 0.0, 1.0)


#: FedProx Synthetic: input dimension, classes, and the log-normal client sizes
SYNTHETIC_DIM = 60
SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZE_LOGNORMAL = (4.0, 2.0)
SYNTHETIC_MIN_SIZE = 50


def synthetic(
    alpha: float,
    beta: float,
    *,
    num_clients: int,
    seed: int,
    dim: int = SYNTHETIC_DIM,
    num_classes: int = SYNTHETIC_CLASSES,
    max_size: int | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    r"""FedProx's Synthetic(alpha, beta) data (Li et al. 2020, section 5.1).

    For client :math:`k`: :math:`u_k \sim N(0, \alpha^2)`, :math:`W_k, b_k \sim N(u_k, 1)`
    (model heterogeneity); :math:`B_k \sim N(0, \beta^2)`, :math:`v_k \sim N(B_k, 1)`,
    :math:`x \sim N(v_k, \Sigma)` with :math:`\Sigma = \mathrm{diag}(j^{-1.2})` (feature
    heterogeneity); :math:`y = \arg\max \mathrm{softmax}(W_k x + b_k)`. Client sizes follow the
    reference code: ``lognormal(4, 2) + 50`` (optionally capped at ``max_size``). As in the
    reference code, ``alpha`` and ``beta`` are standard deviations.

    Returns
    -------
    dict
        ``{client: {"x": [n_k, dim], "y": [n_k]}}``, ready for
        :meth:`hierfl.ClientData.from_dict`.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(*SYNTHETIC_SIZE_LOGNORMAL, num_clients).astype(int) + SYNTHETIC_MIN_SIZE
    if max_size is not None:
        sizes = np.minimum(sizes, max_size)
    scale = np.arange(1, dim + 1) ** -1.2
    out = {}
    for k in range(num_clients):
        u = rng.normal(0.0, alpha)
        big_b = rng.normal(0.0, beta)
        weights = rng.normal(u, 1.0, (dim, num_classes))
        bias = rng.normal(u, 1.0, num_classes)
        center = rng.normal(big_b, 1.0, dim)
        x = center + rng.normal(size=(sizes[k], dim)) * np.sqrt(scale)
        y = np.argmax(x @ weights + bias, axis=1)
        out[k] = {"x": x, "y": y.astype(np.int32)}
    return out
