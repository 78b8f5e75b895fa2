"""One training stage: a fastai Learner on random crops with the stage's callbacks, fitted and saved.

Stage 1, each fold of stage 2, the selection scorer and the pseudo-label round are all `fit_stage(model, train,
valid, spec, deadline)`: one-cycle on random crops, the stage's augmentation callbacks, and the callbacks of
`callbacks.py` (NaN guard, best epoch by exact whole-clip lwlrap, per-epoch checkpoint for resume, log line,
deadline, epoch plan). They differ only in their StageSpec, made from their StageSettings (`cfg.noisy`,
`cfg.curated`).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner, Metric
from fastai.torch_core import set_seed
from fastcore.basics import noop

from .augment import augment_policy
from .callbacks import Deadline, EpochCheckpoint, EpochLog, EpochPlan, KeepBest, NanGuard, WeightAverage
from .checkpoint import Resume, StageDir
from .config import Config, StageSettings
from .context import Run
from .dataparallel import DataParallel, training_loader
from .features import Clips, CropDataset, aggregate_windows
from .losses import make_loss
from .metrics import lwlrap
from .model import input_mean, to_device
from .precision import DeviceMixedPrecision, amp_dtype
from .weights import stage_recipe
from .world import SINGLE, World, doing

log = logging.getLogger("fattag")
HISTORY_COLUMNS = ["epoch", "train_loss", "valid_loss", "lwlrap"]


@dataclass
class StageSpec:
    """One training run's recipe. Stage 1 and stage 2 (and the folds) differ only here."""
    label: str           # "stage 1 (noisy)", "fold 2 (curated)": log lines and reports
    augment: StageSettings  # the augmentation policy's settings (cfg.noisy or cfg.curated)
    out_dir: Path        # checkpoints, resume files, history.csv
    epochs: int
    lr: float
    loss: str            # see losses.make_loss
    seed: int            # crops, augmentation and initial weights
    cfg: Config          # shared settings: batch size, weight decay, crop and validation windows, device
    device: str = "cpu"
    recipe: dict = field(default_factory=dict)  # what the saved weights must match to be reused (checkpoint.py)
    max_epochs: int = 0  # the most epochs a re-plan may give the stage while it trains (0: `epochs`, no re-plan)
    replan: Callable[[int, float], int] | None = None  # (epochs done, fastest epoch s) -> epochs (EpochPlan)
    world: World = SINGLE  # the ranks that train this stage together (data-parallel); one for a fold

    @property
    def stage_dir(self) -> StageDir:
        return StageDir(self.out_dir, self.recipe)

    @classmethod
    def for_stage(cls, run: Run, stage: StageSettings, label: str, out_dir, epochs: int, seed: int) -> StageSpec:
        """The spec of a training run of this run with `stage`'s learning rate, loss and augmentation."""
        return cls(label, stage, Path(out_dir), epochs, stage.lr, stage.loss, seed, run.cfg, str(run.device),
                   recipe=stage_recipe(run.cfg, run.data_dir))


@dataclass
class StageResult:
    history: pd.DataFrame     # one row per epoch: epoch, train_loss, valid_loss, lwlrap
    best_score: float
    best_epoch: int           # 1-based; 0 when no epoch produced usable weights
    seconds: float
    epochs_planned: int
    nan_epochs: int = 0
    epoch_seconds: list = field(default_factory=list)  # wall time of each epoch trained in this fit

    @property
    def usable(self) -> bool:
        return self.best_epoch > 0


class ClipLwlrap(Metric):
    """Exact lwlrap over whole validation clips: window predictions are aggregated per clip, then scored at once."""

    def __init__(self, clip_of: np.ndarray, truth: np.ndarray, how: str):
        self.clip_of, self.truth, self.how = torch.from_numpy(clip_of), truth, how

    def reset(self):
        self.preds = []

    def accumulate(self, learn):
        self.preds.append(torch.sigmoid(learn.pred.detach().float()).cpu())

    @property
    def value(self):
        probs = aggregate_windows(torch.cat(self.preds), self.clip_of, len(self.truth), self.how).numpy()
        return lwlrap(self.truth, probs) if np.isfinite(probs).all() else float("nan")

    @property
    def name(self):
        return "lwlrap"


def stage_learner(model: torch.nn.Module, train: Clips | list[Clips], valid: Clips, spec: StageSpec, resume: Resume,
                  deadline) -> Learner:
    """A fastai Learner on random training crops and whole-clip validation windows, with the stage's callbacks."""
    cfg, device = spec.cfg, torch.device(spec.device)
    to_device(model, device, cfg.channels_last)  # the device's fastest layout; fastai's move to the device keeps it
    train_ds = CropDataset(train, cfg.crop_frames, seed=spec.seed)
    valid_ds = valid.store.windows(valid.indices, cfg.crop_frames, cfg.tta_step_frac)
    bs = min(cfg.batch_size, len(train_ds))
    dls = DataLoaders(
        training_loader(train_ds, bs, spec.world, shuffle=True, num_workers=cfg.num_workers, device=device),
        DataLoader(valid_ds, bs=cfg.batch_size * 2, shuffle=False, num_workers=cfg.num_workers, device=device),
        device=device)
    keep = KeepBest(resume)
    cbs = [*augment_policy(cfg, spec.augment, input_mean(model)), NanGuard(), keep,
           EpochCheckpoint(spec.stage_dir, keep, spec.epochs, list(resume.history), write=spec.world.is_main),
           EpochLog(spec.label), Deadline(deadline), EpochPlan(spec.epochs, spec.replan)]
    if spec.world.size > 1:
        cbs.append(DataParallel(spec.world))
    if cfg.average_epochs > 0:
        cbs.append(WeightAverage(cfg.average_epochs, (resume.last or {}).get("average")))
    learn = Learner(dls, model, loss_func=make_loss(spec.loss), wd=cfg.wd, cbs=cbs,
                    metrics=[ClipLwlrap(valid_ds.clip_of, valid.targets, cfg.tta_aggregate)])
    learn.logger = noop  # EpochLog writes the per-epoch lines
    if not sys.stderr.isatty():
        learn.remove_cb(ProgressCallback)
    dtype = amp_dtype(cfg, device)
    if dtype is not None:
        learn.add_cb(DeviceMixedPrecision(dtype))
    learn.resume_epoch = resume.epochs_done
    if resume.last is not None:  # continue an interrupted stage: its weights, optimiser state and schedule
        learn.create_opt()
        model.load_state_dict(resume.last["model"])
        learn.opt.load_state_dict(resume.last["opt"])
    return learn


def fit_stage(model: torch.nn.Module, train: Clips | list[Clips], valid: Clips, spec: StageSpec,
              deadline=None) -> StageResult:
    """Train `model` in place with one-cycle; keep the epoch with the best whole-clip lwlrap on `valid`.

    Progress is checkpointed in `spec.out_dir` after every epoch; a restarted run continues after the last
    finished epoch with the interrupted run's schedule. `deadline`: a wall-clock time, a function returning one,
    or None (callbacks.Deadline).
    """
    doing(spec.label)
    set_seed(spec.seed, reproducible=True)
    resume = spec.stage_dir.resume()
    epochs = resume.epochs or spec.epochs  # a resumed stage keeps the interrupted run's schedule
    spec = StageSpec(**{**spec.__dict__, "epochs": epochs})
    learn = stage_learner(model, train, valid, spec, resume, deadline)
    if resume.epochs_done:
        log.info("%s: resuming after epoch %d of %d (best lwlrap so far %.4f)", spec.label, resume.epochs_done,
                 epochs, resume.best_score)
    log.info("%s: %d training clips, %d validation clips (%d windows), %d epochs, lr %.2g, loss %s, augment: %s",
             spec.label, len(learn.dls.train.dataset), len(valid), len(learn.dls.valid.dataset), epochs, spec.lr,
             spec.loss,
             ", ".join(type(cb).__name__ for cb in augment_policy(spec.cfg, spec.augment, 0.0)) or "none")
    t0 = time.time()
    if learn.resume_epoch < epochs:   # the loop may run up to max_epochs; EpochPlan ends it at the plan's count
        learn.fit_one_cycle(max(epochs, spec.max_epochs), spec.lr, start_epoch=learn.resume_epoch)
    model.to("cpu")
    keep, checkpoint, guard, plan = (next(cb for cb in learn.cbs if isinstance(cb, t))
                                     for t in (KeepBest, EpochCheckpoint, NanGuard, EpochPlan))
    return StageResult(pd.DataFrame(checkpoint.history, columns=HISTORY_COLUMNS), keep.best, keep.best_epoch + 1,
                       time.time() - t0, plan.epochs, guard.nan_epochs, plan.seconds)


def finish_stage(spec: StageSpec, model: torch.nn.Module, res: StageResult, meta: dict) -> None:
    """Save the finished stage's best weights with what prediction needs to know (model.pth marks it done)."""
    meta = {**meta, "score": res.best_score, "best_epoch": res.best_epoch, "seconds": res.seconds,
            "epochs_run": len(res.history), "epochs_planned": res.epochs_planned}
    spec.stage_dir.finish(model, meta, res.history)

