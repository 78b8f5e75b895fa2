"""Decision thresholds on out-of-fold predictions (thresholds.py), checked against hand calculations."""
import numpy as np
import pytest

from fattag.thresholds import (DEFAULT_THRESHOLD, MIN_POSITIVES, choose_thresholds, f1_threshold, label_text,
                               oof_thresholds, threshold_scores, thresholds_for)

# 8 OOF clips, 3 classes. A and C have 5 positives each (their own threshold), B only 2 (the pooled one).
TRUTH = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 1], [1, 0, 1], [1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]])
PROBS = np.array([[0.9, 0.65, 0.1], [0.8, 0.25, 0.3], [0.7, 0.55, 0.95], [0.6, 0.05, 0.85], [0.5, 0.12, 0.15],
                  [0.4, 0.18, 0.75], [0.3, 0.02, 0.35], [0.2, 0.08, 0.62]])


def test_thresholds_on_a_constructed_oof_set_are_the_hand_calculated_ones():
    """F1 of labelling the top k (5 positives): 2 tp / (k + 5).
    A, scores high to low 0.9+ 0.8+ 0.7- 0.6+ 0.5+ 0.4- 0.3+ 0.2-: k=7 gives 10/12 = 0.833, the best (k=5: 0.8,
      k=8: 0.769): the cut is midway between 0.3 and 0.2, 0.25.
    C, 0.95+ 0.85+ 0.75+ 0.62+ 0.35- 0.3+ 0.15- 0.1-: k=6 gives 10/11 = 0.909 (k=4: 0.889): midway 0.3 / 0.15, 0.225.
    B has 2 positives (< 5): on its own it would cut after 0.65 (midway to 0.55: 0.6); it gets the pooled cut.
    Pooled, the 24 pairs (12 positives) from 0.95 down: k=15 (down to the two 0.3 positives) has 11 hits,
      F1 22/27 = 0.815, the best (k=11: 18/23 = 0.783, k=18 down to B's 0.18 positive: 24/30 = 0.8); the next
      score is B's 0.25, so the cut is 0.275."""
    assert MIN_POSITIVES == 5
    got = choose_thresholds(TRUTH, PROBS)
    np.testing.assert_allclose(got, [0.25, 0.275, 0.225], atol=1e-12)
    assert f1_threshold(TRUTH[:, 1], PROBS[:, 1]) == pytest.approx(0.6)   # B's own, which the fallback replaces
    np.testing.assert_allclose(choose_thresholds(TRUTH, PROBS, min_positives=2), [0.25, 0.6, 0.225], atol=1e-12)


def test_a_cut_never_splits_equal_scores_and_no_positive_gives_the_default():
    """0.9+ 0.6+ 0.6- 0.1-: labelling only the first 0.6 would score F1 1.0, but no threshold labels one of two
    equal scores; of the possible cuts, after both 0.6s (F1 0.8) beats after 0.9 (0.667): midway 0.6 / 0.1."""
    assert f1_threshold([1, 1, 0, 0], [0.9, 0.6, 0.6, 0.1]) == pytest.approx(0.35)
    assert f1_threshold([1, 1], [0.4, 0.2]) == pytest.approx(0.2)   # every item labelled: the lowest score
    assert f1_threshold([0, 0, 0], [0.9, 0.5, 0.1]) == DEFAULT_THRESHOLD


def test_precision_recall_f1_at_the_thresholds():
    table = threshold_scores(TRUTH, PROBS, np.array([0.25, 0.275, 0.225]))
    # A at 0.25 labels the 7 clips down to 0.3: 5 hits, 2 false; C at 0.225: 6 clips, 5 hits; B at 0.275: 0.65 and
    # 0.55: 1 hit, 1 false, one positive (0.18) missed.
    assert table["positives"].tolist() == [5, 2, 5, 12]
    np.testing.assert_allclose(table["precision"], [5 / 7, 1 / 2, 5 / 6, 11 / 15])
    np.testing.assert_allclose(table["recall"], [1, 1 / 2, 1, 11 / 12])
    np.testing.assert_allclose(table["f1"], [10 / 12, 1 / 2, 10 / 11, 22 / 27])
    none = threshold_scores(TRUTH, PROBS, np.array([1.0, 1.0, 1.0]))
    assert none["precision"].isna().iloc[:3].all() and (none["recall"].iloc[:3] == 0).all()


def test_oof_thresholds_use_only_the_predicted_rows_and_are_keyed_by_class():
    oof = np.vstack([PROBS, np.full((2, 3), np.nan)])      # two clips no fold model predicted
    targets = np.vstack([TRUTH, [[1, 1, 1], [1, 1, 1]]])
    got = oof_thresholds(["A", "B", "C"], targets, oof)
    assert list(got) == ["A", "B", "C"] and got == pytest.approx({"A": 0.25, "B": 0.275, "C": 0.225})
    assert oof_thresholds(["A", "B", "C"], targets, np.full((10, 3), np.nan)) is None


def test_weights_without_thresholds_fall_back_with_one_warning(caplog):
    with caplog.at_level("WARNING", logger="fattag"):
        got = thresholds_for(["A", "B"], None)
    assert got.tolist() == [DEFAULT_THRESHOLD] * 2
    assert len(caplog.records) == 1 and "no decision threshold for 2 of 2 classes" in caplog.text
    assert thresholds_for(["A", "B"], {"B": 0.3, "A": 0.7}).tolist() == [0.7, 0.3]


def test_label_text_lists_the_labels_at_their_thresholds_highest_first():
    classes = ["Flute", "Piano", "Bark"]
    assert label_text(np.array([0.62, 0.91, 0.2]), classes, np.array([0.6, 0.5, 0.25])) == "Piano:0.91;Flute:0.62"
    assert label_text(np.array([0.1, 0.2, 0.2]), classes, np.array([0.6, 0.5, 0.25])) == ""
    assert label_text(np.full(3, np.nan), classes, np.full(3, 0.5)) == ""
