"""Partitioners: reproducible from a seed, and shaped as documented."""

import numpy as np
import pytest

from hierfl import partition

LABELS = np.repeat(np.arange(10), 30)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 5.0])
def test_dirichlet_reproducible_and_complete(alpha):
    a = partition.dirichlet_label_skew(LABELS, 8, alpha, seed=3, min_size=5)
    b = partition.dirichlet_label_skew(LABELS, 8, alpha, seed=3, min_size=5)
    c = partition.dirichlet_label_skew(LABELS, 8, alpha, seed=4, min_size=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    together = np.sort(np.concatenate(a))
    np.testing.assert_array_equal(together, np.arange(LABELS.size))  # a partition
    assert min(len(p) for p in a) >= 5


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_classes(alpha):
        parts = partition.dirichlet_label_skew(LABELS, 10, alpha, seed=0, min_size=5)
        return np.mean([np.sum(np.bincount(LABELS[p], minlength=10) > 0) for p in parts])

    assert mean_classes(0.1) < mean_classes(5.0)


def test_pathological_two_classes_each():
    parts = partition.pathological(LABELS, 10, classes_per_client=2, seed=1)
    again = partition.pathological(LABELS, 10, classes_per_client=2, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
    for p in parts:
        assert np.unique(LABELS[p]).size == 2
    together = np.concatenate(parts)
    assert np.unique(together).size == together.size  # no example given twice


def test_train_test_split_reproducible_and_disjoint():
    parts = partition.dirichlet_label_skew(LABELS, 5, 0.5, seed=0)
    train, test = partition.train_test_split(parts, 0.25, seed=2)
    train2, test2 = partition.train_test_split(parts, 0.25, seed=2)
    for p, tr, te, tr2, te2 in zip(parts, train, test, train2, test2, strict=True):
        np.testing.assert_array_equal(tr, tr2)
        np.testing.assert_array_equal(te, te2)
        assert np.intersect1d(tr, te).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), p)
        assert len(te) >= 1 and len(tr) >= 1


def test_feature_shift_changes_images_reproducibly():
    shifts = partition.feature_shift(4, seed=0)
    assert shifts == partition.feature_shift(4, seed=0)
    images = np.random.default_rng(0).uniform(size=(3, 28, 28))
    out = partition.apply_feature_shift(images, shifts[0])
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    identity = partition.apply_feature_shift(images, partition.FeatureShift(0.0, 1.0, 0.0))
    np.testing.assert_allclose(identity, images)
    blurred = partition.apply_feature_shift(images, partition.FeatureShift(0.0, 1.0, 1.0))
    assert blurred.std() < images.std()  # blur smooths


def test_synthetic_reproducible():
    a = partition.synthetic(0.5, 0.5, num_clients=4, seed=0, max_size=200)
    b = partition.synthetic(0.5, 0.5, num_clients=4, seed=0, max_size=200)
    assert sorted(a) == [0, 1, 2, 3]
    for k in a:
        np.testing.assert_array_equal(a[k]["x"], b[k]["x"])
        assert a[k]["x"].shape[1] == partition.SYNTHETIC_DIM
        assert a[k]["y"].min() >= 0 and a[k]["y"].max() < partition.SYNTHETIC_CLASSES
        assert partition.SYNTHETIC_MIN_SIZE <= a[k]["x"].shape[0] <= 200


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="alpha"):
        partition.dirichlet_label_skew(LABELS, 3, 0.0, seed=0)
    with pytest.raises(ValueError, match="classes_per_client"):
        partition.pathological(LABELS, 3, classes_per_client=11, seed=0)
