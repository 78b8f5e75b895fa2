"""Whole-clip inference: every window of every clip, batched on the device, aggregated per clip.

The seed predicted from four random 2-second crops, so most of a long clip was never seen; sliding windows that
cover every frame (the winners' choice) look at all of it. Optional augmented passes add light SpecAugment.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import update_bn

from .checkpoint import load_checkpoint
from .config import INFERENCE_KEYS, Config
from .augment import spec_augment
from .features import MelStore, WindowDataset, aggregate_windows
from .model import check_classes, input_mean, model_from_state, to_device
from .precision import amp_dtype, autocast
from .progress import progress
from .submission import fill_missing, write_submission

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
    ds = WindowDataset(store, indices, cfg.crop_frames, cfg.tta_step_frac, center_only=center_only)
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


def adapt_batchnorm(model: torch.nn.Module, store: MelStore, indices, cfg: Config, device="cpu",
                    seed: int = 0) -> torch.nn.Module:
    """A copy of `model` whose batch-norm statistics are re-estimated on the windows it is about to predict
    (AdaBN): the test clips come from other recordings, rooms and backgrounds than the training clips, so their
    feature statistics differ; the weights stay as trained. torch's `update_bn` does the estimate (a cumulative
    average over shuffled batches); nothing about the labels is used."""
    ds = WindowDataset(store, np.asarray(indices), cfg.crop_frames, cfg.tta_step_frac)
    loader = torch.utils.data.DataLoader(ds, batch_size=max(cfg.batch_size * 2, 8), shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    adapted = copy.deepcopy(model).to(device)
    update_bn(loader, adapted, device=torch.device(device))
    return adapted.eval()


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


def final_weights(fold_model: Path) -> Path:
    """A fold's final weights: those after the test pseudo-label round when it ran (fold*/pseudo/), else stage 2's."""
    after_round = Path(fold_model).parent / "pseudo" / "model.pth"
    return after_round if after_round.is_file() else Path(fold_model)


def load_fold_models(weights_dir, classes: list[str]) -> list:
    """Every fold's final weights under `weights_dir` (fold*/model.pth, or fold*/pseudo/model.pth where the
    pseudo-label round ran) as (path, model, meta); a clear error when there are none or they mismatch."""
    weights_dir = Path(weights_dir)
    paths = sorted(weights_dir.glob("fold*/model.pth")) or sorted(weights_dir.glob("**/fold*/model.pth"))
    paths = [final_weights(p) for p in paths]
    if not paths:
        raise FileNotFoundError(f"no fold*/model.pth under {weights_dir}: point --weights at a training run's "
                                "work dir (or the dataset holding its fold folders)")
    loaded = []
    for path in paths:
        meta, state = load_checkpoint(path)
        check_classes(meta, classes, source=str(path))
        loaded.append((path, model_from_state(meta, state), meta))
    return loaded


def prediction_config(cfg: Config, metas: dict, explicit: dict) -> Config:
    """The settings to predict with: features, model and inference settings from the checkpoints (`metas`: path ->
    meta; every fold must agree), then the inference settings the user `--set` explicitly. Setting a feature or
    model value other than the weights' is an error: the weights are only valid with their own."""
    first_path, first = next(iter(metas.items()))
    for group in ("features", "model", "inference"):
        for path, meta in metas.items():
            diff = sorted(k for k in set(first.get(group, {})) | set(meta.get(group, {}))
                          if first.get(group, {}).get(k) != meta.get(group, {}).get(k))
            if diff:
                raise ValueError(f"the fold checkpoints disagree on {group} settings {diff}: {first_path} has "
                                 f"{ {k: first.get(group, {}).get(k) for k in diff} }, {path} has "
                                 f"{ {k: meta.get(group, {}).get(k) for k in diff} }")
    fixed = {**first["features"], **first["model"]}
    clash = {k: (fixed[k], v) for k, v in explicit.items() if k in fixed and fixed[k] != v}
    if clash:
        raise ValueError("feature settings differ from the weights (saved, --set): "
                         + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in clash.items())
                         + "; feature and model settings come from the weights")
    inference = {**first.get("inference", {}), **{k: v for k, v in explicit.items() if k in INFERENCE_KEYS}}
    return replace(cfg, **fixed, **inference)


def predict_test(models: list, store: MelStore, cfg: Config, device, aug_passes: int) -> np.ndarray:
    """Fold-ensembled whole-clip probabilities for every test clip; NaN rows for clips that could not be decoded."""
    idx = np.flatnonzero(store.ok)
    n_windows = len(WindowDataset(store, idx, cfg.crop_frames, cfg.tta_step_frac))
    per_fold = []
    for k, model in enumerate(models):
        t0 = time.time()
        if cfg.adapt_bn:
            model = adapt_batchnorm(model, store, idx, cfg, device)
        probs = predict_clips(model, store, idx, cfg, device, aug_passes=aug_passes,
                              desc=f"predict test, model {k + 1}/{len(models)}")
        took = time.time() - t0
        log.info("test predictions, model %d/%d: %d clips, %d windows x %d passes in %.1f s (%.1f clips/s, "
                 "%.0f windows/s)", k + 1, len(models), len(idx), n_windows, 1 + aug_passes, took,
                 len(idx) / max(took, 1e-9), n_windows * (1 + aug_passes) / max(took, 1e-9))
        full = np.full((len(store.mels), probs.shape[1]), np.nan)
        full[idx] = probs
        per_fold.append(full)
    probs = ensemble(per_fold, cfg.fold_ensemble)
    if cfg.class_balance:
        probs[idx] = balance_classes(probs[idx])
    return probs


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


def predict_and_submit(s, data, models: list, test: MelStore, prior: np.ndarray) -> np.ndarray:
    """Fold-ensembled whole-clip TTA on every test clip, then submission.csv: a row for every clip (the class prior
    where a clip could not be decoded, or where no model was trained in time). Returns the probabilities written."""
    t0 = time.time()
    if models:
        probs = fill_missing(predict_test(models, test, s.cfg, s.device, s.cfg.tta_aug_passes), test.ok, prior)
    else:
        probs = np.tile(prior, (len(data.test), 1))
        log.error("NO MODEL WAS TRAINED IN TIME: submission.csv holds class priors only")
    write_submission(s.work_dir / "submission.csv", data.sample_submission, data.test.fnames, data.classes, probs)
    s.record("predict test", time.time() - t0)
    return probs
