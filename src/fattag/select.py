"""Noisy-clip selection: keep the noisy clips whose labels a curated-trained model agrees with.

About a third of a FAT-style noisy set is mislabelled. One extra pass, before stage 1: a scorer model is trained on
the curated clips (a small curated holdout watches it), every noisy clip is predicted whole (all windows), and a
clip is kept when each of its n labels is among the scorer's top n + margin classes. Stage 1 then learns from the
kept clips only, and stage 2 may top its batches up with them (`curated.top_up`). The 1st place of FAT2019
kept 1,745 of 19,815 noisy clips this way; the 3rd and 6th used selected noisy clips too.

The scorer has seen every curated clip, so the choice of noisy clips depends a little on each fold's validation
clips; no fold model trains on its own validation clips (see tests/test_train.py).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from .checkpoint import atomic_write
from .context import Run
from .features import Clips
from .model import build_model
from .predict import predict_clips
from .splits import TrainingData, holdout_split
from .stage import StageSpec, fit_stage
from .stages import SELECT_HOLDOUT, SELECT_STAGE

log = logging.getLogger("fattag")


def agreeing(probs: np.ndarray, labels: np.ndarray, margin: int) -> np.ndarray:
    """Per clip: True when each of its n labels ranks among the top n + margin classes of `probs`."""
    rank = (-probs).argsort(1).argsort(1)            # 0 = the highest score
    n = labels.sum(1, keepdims=True)
    worst = np.where(labels > 0, rank, -1).max(1)    # the rank of the clip's lowest-ranked label
    return (n[:, 0] > 0) & (worst < n[:, 0] + margin)


def select_noisy_pool(run: Run, d: TrainingData) -> None:
    """The selection as a step of the run, where it is asked for and stage 1 has epochs planned: the noisy clips
    training may use (`d.noisy_pool`) become the kept ones (rank 0's choice, on every rank), and the budget prices
    stage 1 on them."""
    if not (run.cfg.select_noisy and run.budget.plan.epochs_noisy and len(d.noisy_pool)):
        return
    d.noisy_pool = run.world.broadcast(select_noisy(run, d))
    run.budget.noisy_kept(len(d.noisy_pool))


def select_noisy(run: Run, d: TrainingData) -> np.ndarray:
    """Indices of the noisy clips to keep (all decodable ones when selection finds too few). The scorer trains
    with stage 2's learning rate, loss and augmentation: like a fold model, on curated clips."""
    cfg, pool = run.cfg, np.flatnonzero(d.noisy.ok)
    spec = StageSpec.for_stage(run, cfg.curated, "selection scorer (curated)", run.work_dir / "select",
                               cfg.select_epochs, cfg.seed + 2000)
    kept_file = spec.out_dir / "kept.csv"
    if kept_file.exists() and spec.stage_dir.finished() is not None:  # a restarted run reuses its selection
        return np.sort(pd.read_csv(kept_file)["index"].to_numpy())
    t0 = time.time()
    train_idx, hold_idx = holdout_split(np.flatnonzero(d.curated.ok), SELECT_HOLDOUT, spec.seed)
    model = build_model(cfg, len(d.classes), *d.stats)
    res = fit_stage(model, Clips(d.curated, train_idx), Clips(d.curated, hold_idx), spec,
                    run.budget.select_deadline())
    if not res.usable:
        log.warning("noisy-clip selection: the scorer produced no usable weights; keeping every noisy clip")
        return pool
    probs = predict_clips(model, d.noisy, pool, cfg, run.device, desc="score noisy clips")
    keep = agreeing(probs, d.noisy.table.targets[pool], cfg.select_margin)
    kept = pool[keep] if keep.sum() >= max(10, 0.05 * len(pool)) else pool
    spec.stage_dir.finish(model, {"stage": "select", "score": res.best_score}, res.history)
    atomic_write(kept_file, lambda tmp: pd.DataFrame({"index": kept, "fname": [d.noisy.table.fnames[i] for i in kept]})
                 .to_csv(tmp, index=False))
    run.record(SELECT_STAGE, time.time() - t0)
    log.info("noisy-clip selection: kept %d of %d noisy clips whose labels the curated scorer (holdout lwlrap %.4f) "
             "agrees with", len(kept), len(pool), res.best_score)
    return kept
