"""Curated folds: properties that must hold on FAT-like label matrices (long tail, some multi-label clips)."""
import numpy as np
import pytest

from fattag.splits import make_folds


def fat_like_labels(seed: int, n_classes: int = 80, n_clips: int = 2000, multi_share: float = 0.2) -> np.ndarray:
    """A FAT2019-shaped multi-hot matrix: uneven class sizes (a long tail down to a few clips), ~1.2 labels/clip,
    second labels drawn from the popular classes (as 'Speech' or 'Music'-like labels co-occur with others)."""
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.5, n_classes) + 0.2
    primary = rng.choice(n_classes, n_clips, p=weights / weights.sum())
    y = np.zeros((n_clips, n_classes), dtype=np.float32)
    y[np.arange(n_clips), primary] = 1
    popular = np.argsort(-weights)[:10]
    extra = rng.random(n_clips) < multi_share
    y[np.flatnonzero(extra), rng.choice(popular, extra.sum())] = 1
    return y


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [3, 5])
def test_every_class_with_k_positives_is_in_every_fold(seed, k):
    y = fat_like_labels(seed)
    folds = make_folds(y, k, seed)
    counts = y.sum(0)
    assert (counts < k).any() and (counts > 100).any(), "the matrix should have a tail and a head"
    for c in np.flatnonzero(counts >= k):
        present = np.unique(folds[y[:, c] > 0])
        assert len(present) == k, f"class {c} ({int(counts[c])} clips) is missing from folds " \
                                  f"{sorted(set(range(k)) - set(present))}"


@pytest.mark.parametrize("seed", range(3))
def test_folds_are_non_empty_and_within_one_clip_in_size(seed):
    y = fat_like_labels(seed, n_clips=1003)
    folds = make_folds(y, 5, seed)
    assert folds.shape == (len(y),) and set(folds) == set(range(5))
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1, sizes


def test_classes_are_spread_evenly_over_folds():
    """Stratified: the clips whose rarest label is c are split within one clip; each class overall stays near n/k."""
    y = fat_like_labels(7)
    k = 5
    folds = make_folds(y, k, 0)
    counts = y.sum(0)
    rarest = np.where(y > 0, counts[None, :], np.inf).argmin(1)
    for c in range(y.shape[1]):
        group = np.bincount(folds[rarest == c], minlength=k)
        assert group.max() - group.min() <= 1, (c, group)
        if counts[c] >= 8 * k:
            per_fold = np.bincount(folds[y[:, c] > 0], minlength=k)
            assert per_fold.min() >= 0.7 * counts[c] / k and per_fold.max() <= 1.3 * counts[c] / k, (c, per_fold)


def test_folds_are_seeded():
    y = fat_like_labels(1)
    a, b, c = make_folds(y, 5, 11), make_folds(y, 5, 11), make_folds(y, 5, 12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_k_is_an_error():
    y = fat_like_labels(0, n_clips=10)
    with pytest.raises(ValueError, match="folds"):
        make_folds(y, 1, 0)
    with pytest.raises(ValueError, match="folds"):
        make_folds(y, 11, 0)
