import numpy as np
import pytest
from sklearn.metrics import label_ranking_average_precision_score

from fattag.metrics import lwlrap, per_class_lwlrap


def _random_case(seed, n=300, n_classes=20, p=0.12):
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, n_classes)) < p).astype(np.float32)
    truth[rng.random(n) < 0.1] = 0  # some clips without any label
    scores = rng.normal(size=(n, n_classes)) + 1.5 * truth  # informative but imperfect
    return truth, scores


def _sklearn_lwlrap(truth, scores):
    # sklearn scores a clip without labels as 1.0; weighted by its 0 labels it would add nothing anyway,
    # but it is dropped explicitly so the reference does not rely on that.
    keep = truth.sum(1) > 0
    return label_ranking_average_precision_score(truth[keep], scores[keep], sample_weight=truth[keep].sum(1))


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_continuous_scores(seed):
    truth, scores = _random_case(seed)
    assert (truth.sum(1) == 0).any()
    assert lwlrap(truth, scores) == pytest.approx(_sklearn_lwlrap(truth, scores), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_matches_sklearn_with_ties(seed):
    truth, _ = _random_case(seed, n_classes=8, p=0.3)
    scores = np.random.default_rng(100 + seed).integers(0, 3, truth.shape).astype(float)
    assert lwlrap(truth, scores) == pytest.approx(_sklearn_lwlrap(truth, scores), abs=1e-12)


def test_hand_worked_example():
    truth = np.array([[0, 1, 1],
                      [1, 0, 0]])
    scores = np.array([[0.9, 0.5, 0.1],
                       [0.2, 0.8, 0.3]])
    # clip 0, ranking 0 > 1 > 2: class 1 at rank 2 with 1 true label at or above -> 1/2;
    #                             class 2 at rank 3 with 2 true labels at or above -> 2/3
    # clip 1, ranking 1 > 2 > 0: class 0 at rank 3 with 1 true label at or above -> 1/3
    # lwlrap = (1/2 + 2/3 + 1/3) / 3 pairs = 1.5 / 3 = 0.5
    assert lwlrap(truth, scores) == pytest.approx(0.5, abs=1e-15)
    per_class, weights = per_class_lwlrap(truth, scores)
    np.testing.assert_allclose(per_class, [1 / 3, 1 / 2, 2 / 3])
    np.testing.assert_allclose(weights, [1 / 3, 1 / 3, 1 / 3])


def test_ties_are_ranked_pessimistically():
    # both classes tie: each counts as rank 2, with the one true label among them -> 1/2
    assert lwlrap([[1, 0]], [[0.3, 0.3]]) == pytest.approx(0.5)


def test_perfect_ranking_is_one():
    truth, _ = _random_case(7)
    scores = 2 * truth + np.random.default_rng(7).random(truth.shape)  # positives always on top
    assert lwlrap(truth, scores) == pytest.approx(1.0, abs=1e-15)
    assert lwlrap(truth.astype(bool), scores) == pytest.approx(1.0, abs=1e-15)


def test_invariant_to_monotone_transform():
    truth, logits = _random_case(3)
    probs = 1 / (1 + np.exp(-logits))
    assert lwlrap(truth, probs) == pytest.approx(lwlrap(truth, logits), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_per_class_identity(seed):
    truth, scores = _random_case(seed, n=60, n_classes=30, p=0.05)
    per_class, weights = per_class_lwlrap(truth, scores)
    empty = truth.sum(0) == 0
    assert empty.any()  # the case covers classes without positives
    assert np.isnan(per_class[empty]).all() and (weights[empty] == 0).all()
    assert np.isfinite(per_class[~empty]).all()
    assert weights.sum() == pytest.approx(1.0)
    assert np.nansum(per_class * weights) == pytest.approx(lwlrap(truth, scores), abs=1e-12)


@pytest.mark.parametrize("truth, scores, match", [
    (np.ones((3, 4)), np.zeros((3, 5)), "shape"),
    (np.ones(4), np.zeros(4), "2-D"),
    ([[1, 0]], [[np.nan, 0.1]], "non-finite"),
    ([[1, 0]], [[np.inf, 0.1]], "non-finite"),
    ([[2, 0]], [[0.5, 0.1]], "0 and 1"),
    ([[0, 0]], [[0.5, 0.1]], "no positive"),
])
def test_bad_input_raises(truth, scores, match):
    with pytest.raises(ValueError, match=match):
        lwlrap(truth, scores)
    with pytest.raises(ValueError, match=match):
        per_class_lwlrap(truth, scores)
