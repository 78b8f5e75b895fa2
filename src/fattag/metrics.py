"""lwlrap, the FAT2019 metric (label-weighted label-ranking average precision), exact and vectorised.

It must be computed over a whole validation set at once: an average of per-batch values weights clips
wrongly. Ties are ranked pessimistically, as sklearn's `label_ranking_average_precision_score` does, so
the two agree exactly (with `sample_weight=truth.sum(1)`) even when scores tie.
"""
from __future__ import annotations

import numpy as np

__all__ = ["lwlrap", "per_class_lwlrap"]


def _check(truth, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validated (bool truth, float64 scores); errors name what is wrong."""
    truth = np.asarray(truth)
    scores = np.asarray(scores, dtype=np.float64)
    if truth.ndim != 2 or scores.shape != truth.shape:
        raise ValueError(f"truth and scores must be 2-D (clips, classes) arrays of the same shape; "
                         f"got truth {truth.shape} and scores {scores.shape}")
    bad = int(np.size(scores) - np.count_nonzero(np.isfinite(scores)))
    if bad:
        raise ValueError(f"scores contain {bad} non-finite value(s) (NaN or inf)")
    if truth.dtype != bool:
        if not np.isin(truth, (0, 1)).all():
            raise ValueError("truth must hold only 0 and 1 (or booleans)")
        truth = truth == 1
    if not truth.any():
        raise ValueError("truth has no positive label: lwlrap is undefined")
    return truth, scores


def _label_precisions(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n, C) array: for each true (clip, class) its ranking precision, 0 where the class is not true.

    Each row is sorted once. The rank of a class is the number of classes scoring >= it (the last
    position of its tie group), and the hit count is the number of true classes within that rank.
    """
    n_classes = scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    s_sorted = np.take_along_axis(scores, order, axis=1)
    t_sorted = np.take_along_axis(truth, order, axis=1)
    # index of the last member of each position's tie group: a suffix minimum over group ends
    is_group_end = np.ones(s_sorted.shape, dtype=bool)
    is_group_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    ends = np.where(is_group_end, np.arange(n_classes), n_classes)
    ends = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]
    hits = np.cumsum(t_sorted, axis=1)
    prec_sorted = np.take_along_axis(hits, ends, axis=1) / (ends + 1.0) * t_sorted
    prec = np.empty_like(prec_sorted)
    np.put_along_axis(prec, order, prec_sorted, axis=1)
    return prec


def lwlrap(truth, scores) -> float:
    """Mean ranking precision over all (clip, true label) pairs; clips without labels add nothing."""
    truth, scores = _check(truth, scores)
    return float(_label_precisions(truth, scores).sum() / truth.sum())


def per_class_lwlrap(truth, scores) -> tuple[np.ndarray, np.ndarray]:
    """Per-class average precision (NaN for classes without positives) and each class's share of all
    true labels, so that `np.nansum(per_class * weights) == lwlrap(truth, scores)`."""
    truth, scores = _check(truth, scores)
    prec_sum = _label_precisions(truth, scores).sum(axis=0)
    positives = truth.sum(axis=0).astype(np.float64)
    per_class = np.full(positives.shape, np.nan)
    np.divide(prec_sum, positives, out=per_class, where=positives > 0)
    return per_class, positives / positives.sum()


def chance_lwlrap(truth, draws: int = 20, seed: int = 0) -> float:
    """The lwlrap that random scores get on `truth` (mean of `draws` seeded draws): the floor a model must beat."""
    truth = np.asarray(truth)
    rng = np.random.default_rng(seed)
    return float(np.mean([lwlrap(truth, rng.random(truth.shape)) for _ in range(draws)]))
