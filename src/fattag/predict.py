"""Whole-clip inference: every window of every clip, batched on the device, aggregated per clip.

The seed predicted from four random 2-second crops, so most of a long clip was never seen; sliding windows that
cover every frame (the winners' choice) look at all of it. Optional augmented passes add light SpecAugment.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from .augment import spec_augment
from .config import Config
from .features import MelStore, aggregate_windows
from .model import input_mean, to_device
from .precision import amp_dtype, autocast
from .progress import progress
from .submission import fill_missing, write_submission
from .weights import save_inference
from .world import SINGLE, World

log = logging.getLogger("fattag")


@torch.inference_mode()
def predict_clips(model: torch.nn.Module, store: MelStore, indices, cfg: Config, device="cpu",
                  aug_passes: int = 0, center_only: bool = False, batch_size: int | None = None,
                  seed: int = 0, desc: str | None = None) -> np.ndarray:
    """Probabilities (len(indices), C) for the listed clips of `store`; clips must be decodable.

    Default: all windows of each clip (whole-clip TTA) plus `aug_passes` augmented passes; `center_only` scores
    one centred window per clip instead (the no-TTA baseline). With `desc`, progress is shown in windows.
    """
    device = torch.device(device)
    indices = np.asarray(indices)
    ds = store.windows(indices, cfg.crop_frames, cfg.tta_step_frac, center_only=center_only)
    bs = batch_size or max(cfg.batch_size * 2, 8)
    model = to_device(model, device, cfg.channels_last).eval()
    clip_of = torch.from_numpy(ds.clip_of).to(device)
    dtype = amp_dtype(cfg, device)
    passes = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # augmented passes are reproducible and leave the training RNG untouched
        for p in range(1 + aug_passes):
            probs = []
            batches = range(0, len(ds), bs)
            bar = progress(batches, desc=f"{desc} pass {p + 1}/{1 + aug_passes}" if desc else "", unit="batch",
                           disable=desc is None)
            for start in bar:
                x = torch.stack([ds[w][0] for w in range(start, min(start + bs, len(ds)))]).to(device)
                if p > 0:
                    x = tta_augment(x, cfg, fill=input_mean(model))
                with autocast(device, dtype):
                    probs.append(torch.sigmoid(model(x).float()))
            window_probs = torch.cat(probs) if probs else torch.zeros(0, n_outputs(model), device=device)
            passes.append(aggregate_windows(window_probs, clip_of, len(indices), cfg.tta_aggregate))
    return torch.stack(passes).mean(0).cpu().numpy().astype(np.float64)


def tta_augment(x: torch.Tensor, cfg: Config, fill: float) -> torch.Tensor:
    """The light augmentation of an augmented TTA pass: one time and one frequency stripe, half the training width."""
    return spec_augment(x, 1, int(x.shape[-1] * cfg.time_mask_frac / 2), 1, int(x.shape[-2] * cfg.freq_mask_frac / 2),
                        fill)


def n_outputs(model: torch.nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def ensemble(fold_probs: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """Combine per-fold probabilities: arithmetic mean, or geometric mean (rewards agreement between folds)."""
    stack = np.stack(fold_probs)
    if how == "mean":
        return stack.mean(0)
    if how == "geomean":
        return np.exp(np.log(np.clip(stack, 1e-7, 1.0)).mean(0))
    raise ValueError(f"unknown fold ensemble {how!r}: mean or geomean")


def predict_test(models: list, store: MelStore, cfg: Config, device, aug_passes: int,
                 world: World = SINGLE, folds: list | None = None, desc: str | None = "predict test") -> np.ndarray:
    """Fold-ensembled whole-clip probabilities for every clip of `store`; NaN rows for clips that could not be
    decoded. No class balancing (a submission's step: predict_and_submit). `folds`: the fold id of each of `models`
    (default: their positions), the order the ensemble takes them in. With several ranks, `models` are this rank's:
    every rank's predictions are gathered and ensembled in fold order. `desc` None: no progress bar, and each
    model's timing at debug level (a caller predicting many small sets reports its own progress)."""
    folds = list(range(len(models))) if folds is None else folds
    idx = np.flatnonzero(store.ok)
    n_windows = len(store.windows(idx, cfg.crop_frames, cfg.tta_step_frac))
    per_fold = []
    for k, model in enumerate(models):
        t0 = time.time()
        probs = predict_clips(model, store, idx, cfg, device, aug_passes=aug_passes,
                              desc=desc and f"{desc}, model {k + 1}/{len(models)}")
        took = time.time() - t0
        (log.info if desc else log.debug)(
            "%s, model %d/%d: %d clips, %d windows x %d passes in %.1f s (%.1f clips/s, %.0f windows/s)",
            desc or "predictions", k + 1, len(models), len(idx), n_windows, 1 + aug_passes, took,
            len(idx) / max(took, 1e-9), n_windows * (1 + aug_passes) / max(took, 1e-9))
        full = np.full((len(store.mels), probs.shape[1]), np.nan)
        full[idx] = probs
        per_fold.append((folds[k], full))
    gathered = sorted((p for rank in world.gather(per_fold) for p in rank), key=lambda p: p[0])
    return ensemble([p for _, p in gathered], cfg.fold_ensemble)


BALANCE_MIN_CLIPS = 50  # fewer test clips than this: a class's mean score says too little to correct it by


def balance_classes(probs: np.ndarray) -> np.ndarray:
    """Each class's scores divided by its mean score over the test clips, then one common scale into [0, 1].

    lwlrap ranks the classes of each clip, so a class the model scores high everywhere (a bias from its training
    sources, the noisy set's label mix or the mixing) outranks the true labels of many clips. Dividing by the
    class's mean over the test set ranks p(class | clip) / p(class) instead: the evidence this clip adds. It assumes
    no class dominates the test set, as in FAT2019's test set; it needs no labels."""
    if len(probs) < BALANCE_MIN_CLIPS:
        log.info("class balancing skipped: %d test clips (needs %d)", len(probs), BALANCE_MIN_CLIPS)
        return probs
    ratio = probs / np.maximum(probs.mean(0, keepdims=True), 1e-12)
    return ratio / max(float(ratio.max()), 1e-12)


def predict_and_submit(run, cfg: Config, data, models: list, test: MelStore, prior: np.ndarray,
                       folds: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fold-ensembled whole-clip TTA on every test clip with `cfg`'s inference settings (written to
    inference.json), then submission.csv: a row for every clip (the class prior where a clip could not be decoded,
    or where no model was trained in time). `folds`: the fold id of each of this rank's `models` (predict_test).
    Returns the probabilities written and the ensemble's probabilities before class balancing (NaN rows for clips
    that could not be decoded), which show the model's own bias."""
    t0 = time.time()
    if sum(run.world.gather(len(models))):
        unbalanced = predict_test(models, test, cfg, run.device, cfg.tta_aug_passes, run.world, folds)
        probs = unbalanced.copy()
        if cfg.class_balance:
            probs[test.ok] = balance_classes(unbalanced[test.ok])
        probs = fill_missing(probs, test.ok, prior)
    else:
        probs = unbalanced = np.tile(prior, (len(data.test), 1))
        log.error("NO MODEL WAS TRAINED IN TIME: submission.csv holds class priors only")
    if run.world.is_main:
        write_submission(run.work_dir / "submission.csv", data.sample_submission, data.test.fnames, data.classes,
                         probs)
        save_inference(run.work_dir, cfg)
    run.record("predict test", time.time() - t0)
    return probs, unbalanced


def submit_fold_models(run, data, folds, test: MelStore, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The test step of a training run: this rank's fold models (`folds`, train.FoldsResult, after the pseudo-label
    round) predict every test clip with as many augmented passes as the time left allows (budget.test_passes for
    all the trained folds; rank 0's decision on every rank), then submission.csv (predict_and_submit, whose two
    results it returns)."""
    passes = run.world.broadcast(run.budget.test_passes(len(folds.results)))
    return predict_and_submit(run, replace(run.cfg, tta_aug_passes=passes), data, folds.models, test, prior,
                              folds.model_folds)
