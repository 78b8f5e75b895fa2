"""submission.csv: validated against sample_submission.csv, written atomically, a row for every test clip."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import atomic_write

log = logging.getLogger("fattag")


class SubmissionError(ValueError):
    pass


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame) -> None:
    """The header must equal sample_submission's, rows in its order, every value a probability in [0, 1]."""
    if list(sub.columns) != list(sample.columns):
        raise SubmissionError(f"columns differ from sample_submission.csv: got {list(sub.columns)[:4]}..., "
                              f"expected {list(sample.columns)[:4]}... ({len(sample.columns)} columns)")
    if len(sub) != len(sample) or list(sub["fname"]) != list(sample["fname"]):
        raise SubmissionError(f"rows differ from sample_submission.csv ({len(sub)} vs {len(sample)} rows, "
                              "or another order)")
    values = sub.iloc[:, 1:].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise SubmissionError(f"{int((~np.isfinite(values)).sum())} non-finite values")
    if values.min() < 0 or values.max() > 1:
        raise SubmissionError(f"values outside [0, 1]: min {values.min()}, max {values.max()}")


def fill_missing(probs: np.ndarray, ok: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Rows of clips that could not be decoded (or not predicted) get the class prior: a row, never a hole."""
    out = np.array(probs, dtype=np.float64, copy=True)
    bad = ~ok | ~np.isfinite(out).all(1)
    out[bad] = prior[None, :]
    if bad.any():
        log.warning("%d test clips could not be predicted: they get the class prior", int(bad.sum()))
    return out


def class_prior(targets: np.ndarray) -> np.ndarray:
    """Share of clips carrying each class: the best guess for a clip we cannot hear."""
    if targets is None or len(targets) == 0:
        raise ValueError("no training targets to derive a prior from")
    return np.clip(targets.mean(0), 1e-4, 1.0)


def write_submission(path, sample_submission, fnames: list[str], classes: list[str], probs: np.ndarray) -> Path:
    """Validate, then write to a temporary file and rename: a partial submission.csv never remains."""
    path = Path(path)
    sample = pd.read_csv(sample_submission)
    sub = pd.DataFrame(np.clip(probs, 0.0, 1.0), columns=classes)
    sub.insert(0, "fname", list(fnames))
    validate_submission(sub, sample)
    atomic_write(path, lambda tmp: sub.to_csv(tmp, index=False, float_format="%.6f"))
    log.info("wrote %s (%d clips x %d classes)", path, len(sub), len(classes))
    return path


def write_oof(path, fnames: list[str], classes: list[str], probs: np.ndarray) -> Path:
    """Out-of-fold probabilities in submission layout, for the clips that were predicted (finite rows)."""
    path = Path(path)
    rows = np.isfinite(probs).all(1)
    df = pd.DataFrame(probs[rows], columns=classes)
    df.insert(0, "fname", [f for f, r in zip(fnames, rows) if r])
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6f"))
    return path
