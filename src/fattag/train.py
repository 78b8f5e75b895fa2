"""Training: K folds on the curated set, one fastai Learner per stage, small callbacks for each concern.

Stage 1 learns from the large noisy set; stage 2 fine-tunes fold k of the curated set from stage-1 weights.
Every epoch each fold is scored by exact lwlrap over whole validation clips (all windows, aggregated per clip),
and the best epoch's weights are kept.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner, Metric
from fastai.losses import BCEWithLogitsLossFlat
from fastai.torch_core import set_seed
from fastcore.basics import noop

from .config import Config
from .features import CropDataset, MelStore, WindowDataset, aggregate_windows, mixup, spec_augment
from .metrics import lwlrap
from .budget import replan_fold_epochs
from .model import (atomic_torch_save, build_model, input_mean, load_checkpoint, model_from_checkpoint,
                    model_meta, save_checkpoint)
from .predict import predict_clips
from .session import Session

log = logging.getLogger("fattag")


def make_folds(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id per clip, stratified by each clip's rarest label so that every class is spread over all folds."""
    n = len(targets)
    if k < 2 or k > n:
        raise ValueError(f"folds must be between 2 and the number of clips ({n}), got {k}")
    counts = targets.sum(0)
    rarity = np.where(targets > 0, counts[None, :], np.inf)
    key = rarity.argmin(1)  # rarest label of each clip
    rng = np.random.default_rng(seed)
    folds = np.empty(n, dtype=np.int64)
    offset = 0
    for label in np.unique(key):
        members = rng.permutation(np.flatnonzero(key == label))
        folds[members] = (offset + np.arange(len(members))) % k
        offset += len(members)  # continue the round-robin so small groups do not all start at fold 0
    return folds


# ---------------------------------------------------------------- callbacks


class BatchAugment(Callback):
    """SpecAugment and mixup on each training batch, on the device (validation batches untouched)."""
    order = 60

    def __init__(self, cfg: Config, specaug: bool, mixup_alpha: float, fill: float):
        self.cfg, self.specaug, self.alpha, self.fill = cfg, specaug, mixup_alpha, fill

    def before_batch(self):
        if not self.training:
            return
        x, y = self.xb[0], self.yb[0]
        if self.specaug:
            c = self.cfg
            x = spec_augment(x, c.time_masks, c.time_mask_frac, c.freq_masks, c.freq_mask_frac, fill=self.fill)
        if self.alpha > 0:
            x, y = mixup(x, y, self.alpha)
        self.learn.xb, self.learn.yb = (x,), (y,)


class ClipLwlrap(Metric):
    """Exact lwlrap over whole validation clips: window predictions are aggregated per clip, then scored at once."""

    def __init__(self, clip_of: np.ndarray, truth: np.ndarray, how: str):
        self.clip_of, self.truth, self.how = torch.from_numpy(clip_of), truth, how
        self.last_probs = None

    def reset(self):
        self.preds = []

    def accumulate(self, learn):
        self.preds.append(torch.sigmoid(learn.pred.detach().float()).cpu())

    @property
    def value(self):
        window_probs = torch.cat(self.preds)
        self.last_probs = aggregate_windows(window_probs, self.clip_of, len(self.truth), self.how).numpy()
        if not np.isfinite(self.last_probs).all():
            return float("nan")
        return lwlrap(self.truth, self.last_probs)

    @property
    def name(self):
        return "lwlrap"


def _replayed(cb: Callback) -> bool:
    """True for epochs that a resumed run skips (they were finished before the restart)."""
    return cb.epoch < getattr(cb.learn, "resume_epoch", 0)


class KeepBest(Callback):
    """Keep the weights of the best-scoring epoch in memory and restore them at the end.

    An epoch whose training loss or score is NaN/inf is discarded: the best weights so far are restored at once
    and training stops, so a NaN never reaches a checkpoint or a prediction.
    """
    order = 70

    def __init__(self, best_score: float = -math.inf, best_epoch: int = -1, best_state: dict | None = None):
        self.best_score, self.best_epoch, self.best_state, self.nan_epochs = best_score, best_epoch, best_state, 0

    def after_epoch(self):
        if _replayed(self):
            return
        train_loss = float(self.recorder.log[1]) if len(self.recorder.log) > 1 else float("nan")
        score = self.recorder.log[self.recorder.metric_names.index("lwlrap")]
        if not np.isfinite(train_loss) or score is None or not np.isfinite(score):
            self.nan_epochs += 1
            log.warning("epoch %d: non-finite loss or score (loss %s, lwlrap %s): discarded, back to the best "
                        "weights (epoch %d)", self.epoch + 1, train_loss, score, self.best_epoch + 1)
            self._restore()
            raise CancelFitException()
        if score > self.best_score:
            self.best_score, self.best_epoch = float(score), self.epoch
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})

    def after_fit(self):
        self._restore()

    def _restore(self):
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


class EpochCheckpoint(Callback):
    """After every epoch: model + optimiser, best weights and progress, written atomically, for resume."""
    order = 75

    def __init__(self, out_dir: Path, keep: KeepBest, epochs: int, history: list):
        self.out_dir, self.keep, self.epochs, self.history = Path(out_dir), keep, epochs, history

    def after_epoch(self):
        if _replayed(self):
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        names = self.recorder.metric_names[1:-1]
        values = [self.epoch + 1, *map(_num, self.recorder.log[1:len(names) + 1])]
        self.history.append(dict(zip(["epoch", *names], values)))
        if self.keep.best_epoch == self.epoch:
            atomic_torch_save(self.keep.best_state, self.out_dir / "best.pth")
        atomic_torch_save({"model": self.model.state_dict(), "opt": self.opt.state_dict()}, self.out_dir / "last.pth")
        _atomic_write(self.out_dir / "progress.json", json.dumps(dict(
            epochs_done=self.epoch + 1, epochs=self.epochs, best_score=self.keep.best_score,
            best_epoch=self.keep.best_epoch, history=self.history)))


class EpochLog(Callback):
    """One plain log line per epoch (Kaggle logs have no terminal), with the epoch's wall time."""
    order = 80

    def __init__(self, label: str):
        self.label = label

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        if _replayed(self):
            return
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        vals = self.recorder.log[1:len(names) + 1]
        shown = "  ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in zip(names, vals))
        log.info("%s epoch %d/%d  %s  (%.1f s)", self.label, self.epoch + 1, self.n_epoch, shown, time.time() - self.t0)


class Deadline(Callback):
    """Stop between epochs when another epoch like the last one would not end before `deadline`."""
    order = 90

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        if _replayed(self) or not self.deadline:
            return
        if time.time() + (time.time() - self.t0) > self.deadline:
            log.warning("time budget: stopping after epoch %d of %d", self.epoch + 1, self.n_epoch)
            raise CancelFitException()


# ---------------------------------------------------------------- one stage


@dataclass
class StageResult:
    history: pd.DataFrame     # one row per epoch: epoch, train_loss, valid_loss, lwlrap
    best_score: float
    best_epoch: int           # 1-based; 0 when no epoch produced usable weights
    seconds: float
    epochs_planned: int
    nan_epochs: int = 0

    @property
    def usable(self) -> bool:
        return self.best_epoch > 0


def fit_stage(model: torch.nn.Module, train: MelStore, train_idx, valid: MelStore, valid_idx, cfg: Config, *,
              epochs: int, lr: float, mixup_alpha: float, specaug: bool, label: str, device, seed: int,
              out_dir: Path, deadline: float | None = None, extra_cbs=()) -> StageResult:
    """Train `model` in place with one-cycle on random crops; keep the epoch with the best whole-clip lwlrap.

    Progress is checkpointed in `out_dir` after every epoch; a restarted run continues after the last finished
    epoch with the same schedule.
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    set_seed(seed, reproducible=True)
    train_ds = CropDataset(train, train_idx, cfg.crop_frames, seed=seed)
    valid_ds = WindowDataset(valid, valid_idx, cfg.crop_frames, cfg.tta_step_frac)
    bs = min(cfg.batch_size, len(train_ds))
    dls = DataLoaders(
        DataLoader(train_ds, bs=bs, shuffle=True, drop_last=len(train_ds) > bs, num_workers=cfg.num_workers,
                   device=device),
        DataLoader(valid_ds, bs=cfg.batch_size * 2, shuffle=False, num_workers=cfg.num_workers, device=device),
        device=device)
    resume = _load_progress(out_dir)
    if resume:
        epochs = resume["epochs"]  # keep the interrupted run's schedule
        best = None
        if resume["best_epoch"] >= 0:
            best = torch.load(out_dir / "best.pth", map_location="cpu", weights_only=True)
        keep = KeepBest(resume["best_score"], resume["best_epoch"], best)
        history = list(resume["history"])
    else:
        keep, history = KeepBest(), []
    metric = ClipLwlrap(valid_ds.clip_of, valid.table.targets[np.asarray(valid_idx)], cfg.tta_aggregate)
    cbs = [BatchAugment(cfg, specaug, mixup_alpha, input_mean(model)), keep,
           EpochCheckpoint(out_dir, keep, epochs, history),
           EpochLog(label), Deadline(deadline), *extra_cbs]
    learn = Learner(dls, model, loss_func=BCEWithLogitsLossFlat(), metrics=[metric], wd=cfg.wd, cbs=cbs)
    learn.logger = noop  # EpochLog writes the per-epoch lines
    if not sys.stderr.isatty():
        learn.remove_cb(ProgressCallback)
    if device.type == "cuda":
        learn.to_fp16()
    learn.resume_epoch = 0
    if resume:
        learn.create_opt()
        state = torch.load(out_dir / "last.pth", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        learn.opt.load_state_dict(state["opt"])
        learn.resume_epoch = resume["epochs_done"]
        log.info("%s: resuming after epoch %d of %d (best lwlrap so far %.4f)", label, resume["epochs_done"],
                 epochs, resume["best_score"])
    t0 = time.time()
    log.info("%s: %d training clips, %d validation clips (%d windows), %d epochs, lr %.2g, mixup %s, specaug %s",
             label, len(train_ds), len(valid_idx), len(valid_ds), epochs, lr, mixup_alpha or "off",
             "on" if specaug else "off")
    if learn.resume_epoch < epochs:
        learn.fit_one_cycle(epochs, lr, start_epoch=learn.resume_epoch)
    model.to("cpu")
    cols = ["epoch", "train_loss", "valid_loss", "lwlrap"]
    return StageResult(pd.DataFrame(history, columns=cols), keep.best_score, keep.best_epoch + 1, time.time() - t0,
                       epochs, keep.nan_epochs)


def _load_progress(out_dir: Path) -> dict | None:
    """The progress of an interrupted stage, if its checkpoint files are all there and readable."""
    try:
        progress = json.loads((out_dir / "progress.json").read_text())
        if not (out_dir / "last.pth").exists():
            return None
        if progress["best_epoch"] >= 0 and not (out_dir / "best.pth").exists():
            return None
        return progress
    except (OSError, ValueError, KeyError):
        return None


def _num(v):
    return None if v is None else float(v)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the two stages, with their outputs on disk


def holdout_split(indices: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, holdout) split of the given clip indices; the holdout has at least one clip."""
    perm = np.random.default_rng(seed).permutation(indices)
    n_hold = max(1, int(round(len(perm) * share)))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def train_stage1(s: Session, noisy: MelStore | None, classes: list[str], mean: float, std: float,
                 out_dir: Path | None = None, seed_offset: int = 0, deadline: float | None = None) -> dict | None:
    """Stage 1 on the noisy set (watched on a small noisy holdout); returns its weights, or None when skipped."""
    cfg = s.cfg
    if noisy is None or cfg.epochs_noisy <= 0 or not noisy.ok.any():
        log.info("stage 1 skipped (%s)", "no noisy set" if noisy is None else
                 "epochs_noisy=0" if cfg.epochs_noisy <= 0 else "no decodable noisy clip")
        return None
    out_dir = out_dir or s.work_dir / "stage1"
    done = _finished(out_dir, "stage 1")
    if done is not None:
        return done
    t0 = time.time()
    seed = cfg.seed + 1000 + seed_offset
    train_idx, hold_idx = holdout_split(np.flatnonzero(noisy.ok), cfg.noisy_holdout, seed)
    set_seed(seed, reproducible=True)  # initial weights too: the same seed gives the same run
    model = build_model(cfg, len(classes), mean, std)
    res = fit_stage(model, noisy, train_idx, noisy, hold_idx, cfg, epochs=cfg.epochs_noisy, lr=cfg.lr_noisy,
                    mixup_alpha=cfg.mixup_noisy, specaug=cfg.specaug_noisy, label="stage 1 (noisy)",
                    device=s.device, seed=seed, out_dir=out_dir, deadline=deadline or s.deadline)
    s.record("stage 1 (noisy)" + (f" fold {seed_offset}" if cfg.stage1_per_fold else ""), time.time() - t0)
    if not res.usable:
        log.warning("stage 1 produced no usable weights: stage 2 starts from scratch")
        return None
    _save_stage(out_dir, model, res, model_meta(cfg, classes, stage="noisy", score=res.best_score))
    return model.state_dict()


@dataclass
class FoldsResult:
    folds: np.ndarray          # fold id per curated clip (-1 for clips that could not be decoded)
    model_paths: list          # one checkpoint per trained fold
    results: list              # dict per trained fold: fold, best_lwlrap, best_epoch, epochs_run, seconds
    oof_center: np.ndarray     # OOF probabilities from one centred window (no TTA); NaN rows where not predicted
    oof_windows: np.ndarray    # OOF probabilities over whole-clip windows
    oof_tta: np.ndarray        # whole-clip windows plus augmented passes (equals oof_windows when there are none)

    @property
    def predicted(self) -> np.ndarray:
        return np.isfinite(self.oof_windows).all(1)


def train_folds(s: Session, curated: MelStore, noisy: MelStore | None, classes: list[str], mean: float, std: float,
                shared_stage1: dict | None, folds_to_train: int | None = None,
                predict_reserve_s: float = 0.0) -> FoldsResult:
    """Stage 2 on each curated fold, warm-started from stage 1; writes fold weights and out-of-fold predictions.

    With a time budget, the epochs of the remaining folds are re-planned from the measured epoch time before each
    fold, and training stops early enough that `predict_reserve_s` per trained fold is left for test inference.
    """
    cfg = s.cfg
    ok = np.flatnonzero(curated.ok)
    folds = np.full(len(curated.table), -1, dtype=np.int64)
    folds[ok] = make_folds(curated.table.targets[ok], cfg.folds, cfg.seed)
    n, c = len(curated.table), len(classes)
    oof = {name: np.full((n, c), np.nan) for name in ("center", "windows", "tta")}
    paths, results = [], []
    folds_to_train = folds_to_train or cfg.folds
    epochs, epoch_s, fixed_s = cfg.epochs_curated, None, 0.0
    for k in range(folds_to_train):
        t0 = time.time()
        train_idx, valid_idx = np.flatnonzero((folds >= 0) & (folds != k)), np.flatnonzero(folds == k)
        out_dir = s.work_dir / f"fold{k}"
        train_deadline = None
        if s.deadline:
            train_deadline = s.deadline - predict_reserve_s * (k + 1)
            if epoch_s is not None:
                epochs = replan_fold_epochs(train_deadline - time.time(), folds_to_train - k, epoch_s, fixed_s,
                                            cfg.epochs_curated)
                if epochs < cfg.epochs_curated:
                    log.warning("time budget: behind plan, fold %d gets %d epochs (planned %d)", k, epochs,
                                cfg.epochs_curated)
            if time.time() + (epoch_s or 0) > train_deadline and k > 0:
                log.warning("time budget: no time left to train fold %d; %d of %d folds trained", k, k, cfg.folds)
                break
        model = _finished_model(out_dir, cfg, classes)
        if model is None:
            init = shared_stage1
            if cfg.stage1_per_fold:
                init = train_stage1(s, noisy, classes, mean, std, out_dir / "stage1", seed_offset=k,
                                    deadline=train_deadline)
            set_seed(cfg.seed + k, reproducible=True)
            model = build_model(cfg, len(classes), mean, std)
            if init is not None:
                model.load_state_dict(init)
            res = fit_stage(model, curated, train_idx, curated, valid_idx, cfg, epochs=epochs, lr=cfg.lr_curated,
                            mixup_alpha=cfg.mixup_curated, specaug=cfg.specaug_curated, label=f"fold {k} (curated)",
                            device=s.device, seed=cfg.seed + k, out_dir=out_dir, deadline=train_deadline)
            if not res.usable:
                log.warning("fold %d produced no usable weights: left out of the ensemble", k)
                continue
            _save_stage(out_dir, model, res, model_meta(cfg, classes, stage="curated", fold=k,
                                                         score=res.best_score, warm_start=init is not None))
            epoch_s = res.seconds / max(len(res.history), 1)
        t_pred = time.time()
        oof["center"][valid_idx] = predict_clips(model, curated, valid_idx, cfg, s.device, center_only=True)
        oof["windows"][valid_idx] = predict_clips(model, curated, valid_idx, cfg, s.device)
        oof["tta"][valid_idx] = (oof["windows"][valid_idx] if cfg.tta_aug_passes == 0 else
                                 predict_clips(model, curated, valid_idx, cfg, s.device, aug_passes=cfg.tta_aug_passes))
        fixed_s = time.time() - t_pred + predict_reserve_s
        meta = load_checkpoint(out_dir / "model.pth")[0]
        truth = curated.table.targets[valid_idx]
        results.append(dict(fold=k, best_lwlrap=meta["score"], best_epoch=meta["best_epoch"],
                            epochs_run=meta["epochs_run"], seconds=meta["seconds"],
                            oof_windows=lwlrap(truth, oof["windows"][valid_idx]),
                            oof_center=lwlrap(truth, oof["center"][valid_idx])))
        log.info("fold %d: best lwlrap %.4f at epoch %d; OOF whole-clip windows %.4f, centre crop %.4f", k,
                 meta["score"], meta["best_epoch"], results[-1]["oof_windows"], results[-1]["oof_center"])
        s.record(f"fold {k}", time.time() - t0)
        paths.append(out_dir / "model.pth")
    return FoldsResult(folds, paths, results, oof["center"], oof["windows"], oof["tta"])


def _finished(out_dir: Path, label: str) -> dict | None:
    """Weights of a stage that a previous run already finished (restart with the same --work-dir)."""
    if not (out_dir / "model.pth").exists():
        return None
    log.info("%s: already finished in %s, reusing its weights", label, out_dir)
    return load_checkpoint(out_dir / "model.pth")[1]


def _finished_model(out_dir: Path, cfg: Config, classes: list[str]) -> torch.nn.Module | None:
    if not (out_dir / "model.pth").exists():
        return None
    log.info("%s: already finished, reusing its weights", out_dir.name)
    return model_from_checkpoint(out_dir / "model.pth", cfg, classes)[0]


def _save_stage(out_dir: Path, model: torch.nn.Module, res: StageResult, meta: dict) -> None:
    """The finished stage's best weights (model.pth marks the stage done), its history; resume files go."""
    out_dir.mkdir(parents=True, exist_ok=True)
    res.history.to_csv(out_dir / "history.csv", index=False)
    meta = {**meta, "best_epoch": res.best_epoch, "seconds": res.seconds, "epochs_run": len(res.history),
            "epochs_planned": res.epochs_planned}
    save_checkpoint(out_dir / "model.pth", model, meta)
    for name in ("last.pth", "best.pth", "progress.json"):
        (out_dir / name).unlink(missing_ok=True)
