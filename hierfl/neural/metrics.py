"""Classification metrics per client: accuracy, negative log-likelihood, ECE, reliability."""

from __future__ import annotations

import numpy as np

__all__ = [
    "ECE_BINS",
    "accuracy",
    "calibrated_ece",
    "expected_calibration_error",
    "nll",
    "reliability",
    "summarize",
]

#: bins of the expected calibration error (Guo et al. 2017 use 15)
ECE_BINS = 15
#: probability floor inside the log of the negative log-likelihood
PROBABILITY_FLOOR = 1e-12


def accuracy(probs, labels) -> float:
    """Share of rows whose most probable class is the label."""
    return float(np.mean(np.argmax(probs, axis=-1) == np.asarray(labels)))


def nll(probs, labels) -> float:
    """Mean negative log predictive probability of the labels."""
    picked = np.take_along_axis(np.asarray(probs), np.asarray(labels)[:, None], axis=-1)[:, 0]
    return float(-np.mean(np.log(np.maximum(picked, PROBABILITY_FLOOR))))


def reliability(probs, labels, *, bins: int = ECE_BINS):
    """Confidence histogram: ``(confidence, accuracy, count)`` per equal-width bin of the
    top-class probability (``nan`` for empty bins)."""
    probs = np.asarray(probs)
    confidence = probs.max(axis=-1)
    correct = np.argmax(probs, axis=-1) == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(which, confidence, minlength=bins) / count
        mean_accuracy = np.bincount(which, correct.astype(float), minlength=bins) / count
    return mean_confidence, mean_accuracy, count


def expected_calibration_error(probs, labels, *, bins: int = ECE_BINS) -> float:
    r"""ECE (Guo et al. 2017): :math:`\sum_b \frac{n_b}{n} |\mathrm{acc}_b - \mathrm{conf}_b|`
    over ``bins`` equal-width bins of the top-class probability."""
    confidence, acc, count = reliability(probs, labels, bins=bins)
    used = count > 0
    return float(np.sum(count[used] * np.abs(acc[used] - confidence[used])) / count.sum())


def calibrated_ece(probs, *, bins: int = ECE_BINS, draws: int = 50, seed: int = 0) -> float:
    r"""The ECE a *perfectly calibrated* predictor with these probabilities would show on this
    many rows: the mean ECE over ``draws`` label sets drawn from ``probs`` themselves
    (consistency resampling, Bröcker & Smith 2007, keeping the forecasts).

    ECE is biased upward on finite data: sparsely filled bins add their sampling error. This
    is that error alone, so an ECE near it is all the rows can resolve, and a target below it
    cannot be told apart from noise.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.tile([0.9, 0.1], (1000, 1))
    >>> round(calibrated_ece(p), 2)  # E|binomial(1000, 0.9) / 1000 - 0.9| = 0.0076
    0.01
    """
    probs = np.asarray(probs, dtype=float)
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
    out = []
    for _ in range(draws):
        u = rng.random((probs.shape[0], 1))
        labels = np.minimum((u > cumulative).sum(axis=-1), probs.shape[-1] - 1)
        out.append(expected_calibration_error(probs, labels, bins=bins))
    return float(np.mean(out))


def summarize(per_client_probs, per_client_labels) -> dict[str, float]:
    """Per-client accuracy (mean and 10th percentile), pooled NLL and ECE, and the ECE a
    calibrated predictor with the same probabilities would show (:func:`calibrated_ece`).

    ``per_client_probs`` and ``per_client_labels`` are lists with one entry per client.
    """
    accs = np.array(
        [accuracy(p, y) for p, y in zip(per_client_probs, per_client_labels, strict=True)]
    )
    probs = np.concatenate(per_client_probs)
    labels = np.concatenate(per_client_labels)
    return {
        "acc_mean": float(accs.mean()),
        "acc_p10": float(np.percentile(accs, 10)),
        "nll": nll(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "ece_floor": calibrated_ece(probs),
    }
