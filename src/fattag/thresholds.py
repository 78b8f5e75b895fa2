"""Decision thresholds: when a class's probability means "this clip carries it", chosen on out-of-fold predictions.

A ranking metric (lwlrap) needs no threshold, but a user asking "which sounds are in this file" does. Each class
gets the threshold that maximises its F1 on the training run's out-of-fold predictions (every clip scored by the
fold model that did not train on it). A class with fewer than MIN_POSITIVES positive OOF clips says too little to
place its own threshold: it gets the one that maximises F1 over every class's (clip, class) pairs pooled (micro-F1).
The thresholds are saved with the weights (weights.save_thresholds) and used by the tag mode's `labels` column.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger("fattag")

MIN_POSITIVES = 5        # fewer positive OOF clips than this: the class gets the pooled threshold
DEFAULT_THRESHOLD = 0.5  # for weights saved without thresholds (runs older than them)


def f1_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """The threshold t that maximises F1 of `scores >= t` against `truth` (1-D, 1 = positive).

    Cuts fall between distinct scores: t is midway between the lowest score labelled and the next lower one (the
    lowest score itself when every item is labelled), so a score tied with another is never split. Among cuts of
    equal F1 the highest wins (fewer labels). No positive at all: DEFAULT_THRESHOLD."""
    truth, scores = np.asarray(truth).ravel() > 0, np.asarray(scores, dtype=np.float64).ravel()
    positives = int(truth.sum())
    if positives == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], np.cumsum(truth[order])
    labelled = np.arange(1, len(ranked) + 1)
    f1 = 2 * hits / (labelled + positives)
    cut = np.append(ranked[:-1] > ranked[1:], True)   # the last item of each run of equal scores
    best = int(np.flatnonzero(cut)[np.argmax(f1[cut])])
    return float(ranked[best] if best == len(ranked) - 1 else (ranked[best] + ranked[best + 1]) / 2)


def choose_thresholds(truth: np.ndarray, probs: np.ndarray, min_positives: int = MIN_POSITIVES) -> np.ndarray:
    """Per class (columns of `truth` and `probs`, one row per OOF clip): its F1-optimal threshold, or the pooled
    micro-F1 threshold for a class with fewer than `min_positives` positives."""
    truth, probs = np.asarray(truth) > 0, np.asarray(probs, dtype=np.float64)
    pooled = f1_threshold(truth, probs)
    return np.array([f1_threshold(truth[:, c], probs[:, c]) if truth[:, c].sum() >= min_positives else pooled
                     for c in range(truth.shape[1])])


def oof_thresholds(classes: list[str], targets: np.ndarray, oof: np.ndarray) -> dict | None:
    """{class: threshold} chosen on the OOF rows that were predicted (finite rows of `oof`); None when none were."""
    rows = np.isfinite(oof).all(1)
    if not rows.any():
        return None
    thresholds = choose_thresholds(targets[rows], oof[rows])
    pooled = int(((targets[rows] > 0).sum(0) < MIN_POSITIVES).sum())
    log.info("decision thresholds (F1-optimal on %d OOF clips): median %.3f, range %.3f-%.3f; %d class(es) with "
             "fewer than %d positives take the pooled one", int(rows.sum()), np.median(thresholds), thresholds.min(),
             thresholds.max(), pooled, MIN_POSITIVES)
    return {c: round(float(t), 6) for c, t in zip(classes, thresholds)}


def threshold_scores(truth: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    """Per class, labelling `probs >= thresholds`: positives, precision, recall and F1 against `truth` (NaN where
    a ratio has nothing to count), plus a last row `all` over every (clip, class) pair (micro-averaged)."""
    truth, said = np.asarray(truth) > 0, np.asarray(probs) >= np.asarray(thresholds)[None, :]
    tp, fp, fn = (truth & said).sum(0), (~truth & said).sum(0), (truth & ~said).sum(0)
    tp, fp, fn = (np.append(x, x.sum()).astype(np.float64) for x in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(dict(positives=(tp + fn).astype(int), precision=tp / (tp + fp), recall=tp / (tp + fn),
                                 f1=2 * tp / (2 * tp + fp + fn)))


def thresholds_for(classes: list[str], saved: dict | None, source: str = "the weights") -> np.ndarray:
    """The saved {class: threshold} in `classes`' order; DEFAULT_THRESHOLD, with one warning line, for weights
    saved without them (or without some class)."""
    saved = saved or {}
    missing = [c for c in classes if c not in saved]
    if missing:
        log.warning("%s carry no decision threshold for %d of %d classes (a run older than them): labelling at "
                    "probability >= %.2f there", source, len(missing), len(classes), DEFAULT_THRESHOLD)
    return np.array([float(saved.get(c, DEFAULT_THRESHOLD)) for c in classes])


def label_text(probs: np.ndarray, classes: list[str], thresholds: np.ndarray) -> str:
    """The labels one clip carries, each with its probability, highest first: "Piano:0.91;Flute:0.62" ("" if none)."""
    order = np.argsort(-np.asarray(probs), kind="stable")
    return ";".join(f"{classes[c]}:{probs[c]:.2f}" for c in order if probs[c] >= thresholds[c])


__all__ = ["DEFAULT_THRESHOLD", "MIN_POSITIVES", "choose_thresholds", "f1_threshold", "label_text",
           "oof_thresholds", "threshold_scores", "thresholds_for"]
