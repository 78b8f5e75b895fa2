"""The fastai callbacks of a training stage, one concern each: NaN guard, best epoch, weight averaging,
checkpoints, log, deadline, and the epoch plan that a re-plan may change while the stage trains.

Augmentations of training batches are callbacks too; they live in `augment.py`.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import TrackerCallback
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import Resume, StageDir, cpu_state

log = logging.getLogger("fattag")


class StageCallback(Callback):
    """Base of the per-epoch callbacks. A resumed stage replays its finished epochs (fastai's `start_epoch` skips
    their batches but still runs `after_epoch`); those must not be scored, checkpointed or logged again, so a
    subclass's `after_epoch` does not run for them (as fastai's `run` flag switches a callback off)."""

    @property
    def replayed(self) -> bool:
        return self.epoch < getattr(self.learn, "resume_epoch", 0)

    def __call__(self, event_name):
        if event_name == "after_epoch" and self.replayed:
            return None
        return super().__call__(event_name)

    def epoch_values(self) -> dict:
        """This epoch's recorded values by name: train_loss, valid_loss, lwlrap."""
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        return {n: (None if v is None else float(v)) for n, v in zip(names, self.recorder.log[1:len(names) + 1])}

    def agree(self, value):
        """`value` as every rank of a data-parallel stage sees it (rank 0's: dataparallel.DataParallel); as is on
        one rank."""
        agree = getattr(self.learn, "agree", None)
        return value if agree is None else agree(value)


class NanGuard(StageCallback):
    """Stop at the first epoch whose training loss or score is NaN/inf. KeepBest then restores the best weights, so a
    NaN never reaches a checkpoint or a prediction."""
    order = 55  # after the Recorder (50), before KeepBest and the checkpoint

    def __init__(self):
        self.nan_epochs = 0

    def after_epoch(self):
        v = self.epoch_values()
        if not self.agree(all(x is not None and np.isfinite(x) for x in (v.get("train_loss"), v.get("lwlrap")))):
            self.nan_epochs += 1
            log.warning("epoch %d: non-finite loss or score (%s): discarded, back to the best weights",
                        self.epoch + 1, v)
            raise CancelFitException()


class KeepBest(StageCallback, TrackerCallback):
    """fastai's tracker on whole-clip lwlrap, keeping the best epoch's weights in memory and restoring them at the
    end (SaveModelCallback without the disk round trip: files are EpochCheckpoint's job)."""
    order = TrackerCallback.order + 1

    def __init__(self, resume: Resume):
        TrackerCallback.__init__(self, monitor="lwlrap", comp=np.greater, reset_on_fit=False)
        self.best, self.best_epoch, self.best_state = resume.best_score, resume.best_epoch, resume.best_state
        self.new_best = False

    def after_epoch(self):
        self.new_best = False
        super().after_epoch()
        if self.new_best:
            self.best, self.best_epoch, self.best_state = float(self.best), self.epoch, cpu_state(self.model)

    def after_fit(self):
        super().after_fit()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


class WeightAverage(StageCallback):
    """An exponential moving average of the weights (torch's AveragedModel, batch-norm statistics included), updated
    after every training step. Validation, the best-epoch choice and so the saved model use the averaged weights;
    training goes on from the raw ones. `epochs` is the averaging horizon (the EMA decay per step follows from it)."""
    order = KeepBest.order + 4  # after_epoch: once KeepBest has taken the averaged weights, the raw ones come back

    def __init__(self, epochs: float, state: dict | None = None):
        self.horizon, self.state, self.averaged, self.raw = epochs, state, None, None

    def before_fit(self):
        decay = math.exp(-1.0 / max(self.horizon * len(self.dls.train), 1.0))
        self.averaged = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        if self.state is not None:  # a resumed stage continues its average
            self.averaged.load_state_dict(self.state)

    def after_step(self):
        self.averaged.update_parameters(self.model)

    def before_validate(self):
        self.raw = cpu_state(self.model)
        self.model.load_state_dict(self.averaged.module.state_dict())

    def after_epoch(self):
        if self.raw is not None:
            self.model.load_state_dict(self.raw)
            self.raw = None


class MeanTeacher(StageCallback):
    """Consistency with a mean teacher (Tarvainen & Valpola 2017; DCASE 2018 Task 4's winner): an exponential moving
    average of the model scores its own augmented view of each training crop, and the loss gains `weight` times the
    mean squared difference of the student's and the teacher's probabilities. The teacher's view is the batch after
    mixing and before the student's SpecAugment (order 68), with stripes of its own (`view`); it needs no labels, so
    the noisy clips' audio teaches beyond their labels. The teacher is not saved: a resumed stage starts a new one."""
    order = 68

    def __init__(self, weight: float, decay: float, view):
        self.weight, self.decay, self.view, self.teacher, self.teacher_x = weight, decay, view, None, None

    def before_fit(self):
        self.teacher = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.teacher.eval()

    def before_batch(self):
        if self.training:
            self.teacher_x = self.view(self.xb[0].clone())

    def after_loss(self):
        if not self.training or self.teacher_x is None:
            return
        with torch.no_grad():
            target = torch.sigmoid(self.teacher(self.teacher_x).float())     # (B, C): the main head in eval mode
        student = torch.sigmoid(self.pred[:, :target.shape[1]].float())
        self.learn.loss_grad = self.loss_grad + self.weight * F.mse_loss(student, target)
        self.learn.loss = self.loss_grad.clone()
        self.teacher_x = None

    def after_step(self):
        self.teacher.update_parameters(self.model)


class EpochCheckpoint(StageCallback):
    """After every new epoch: its history row, and the resume files (model + optimiser (+ weight average), best
    weights, progress)."""
    order = KeepBest.order + 10

    def __init__(self, stage_dir: StageDir, keep: KeepBest, epochs: int, history: list, write: bool = True):
        self.stage_dir, self.keep, self.epochs, self.history, self.write = stage_dir, keep, epochs, history, write

    def after_epoch(self):
        self.history.append({"epoch": self.epoch + 1, **self.epoch_values()})
        if not self.write:   # a data-parallel stage's other ranks: rank 0 writes the stage's files
            return
        epochs = getattr(self.learn, "epochs_planned", self.epochs)   # the plan as it stands (EpochPlan)
        state = Resume(self.epoch + 1, epochs, self.keep.best, self.keep.best_epoch, self.keep.best_state,
                       self.history)
        average = next((cb.averaged for cb in self.learn.cbs if isinstance(cb, WeightAverage)), None)
        extra = {"average": average.state_dict()} if average is not None else {}
        self.stage_dir.save_epoch(state, self.model, self.opt.state_dict(), new_best=self.keep.new_best, **extra)


class EpochLog(StageCallback):
    """One plain log line per epoch (Kaggle logs have no terminal), with the epoch's wall time."""
    order = EpochCheckpoint.order + 5

    def __init__(self, label: str):
        self.label = label

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        shown = "  ".join(f"{n} {v:.4f}" for n, v in self.epoch_values().items() if v is not None)
        log.info("%s epoch %d/%d  %s  (%.1f s)", self.label, self.epoch + 1, getattr(self.learn, "epochs_planned",
                 self.n_epoch), shown, time.time() - self.t0)


class Deadline(StageCallback):
    """Stop between epochs when another epoch like the last one would not end before the deadline: a wall-clock
    time from the run's Budget, or a function returning it (re-planned while the stage trains); None: no deadline."""
    order = EpochLog.order + 5

    def __init__(self, deadline: float | Callable[[], float | None] | None):
        self.deadline = deadline

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        deadline = self.deadline() if callable(self.deadline) else self.deadline
        if not deadline:
            return
        now = time.time()
        if self.agree(now + (now - self.t0) > deadline):
            log.warning("time budget: stopping after epoch %d of %d", self.epoch + 1,
                        getattr(self.learn, "epochs_planned", self.n_epoch))
            raise CancelFitException()


class EpochPlan(StageCallback):
    """The stage's one-cycle schedule spread over `epochs`, a number a re-plan may change between epochs, while
    fastai's loop runs up to its `n_epoch` (the most the stage may get). After every epoch `replan(epochs_done,
    fastest_epoch_s)` may return a new count: the rest of the schedule, from where it stands, is stretched or
    squeezed over the epochs left (no epoch is lost, the learning rate stays continuous) and the stage ends when the
    count is reached. While the count equals `n_epoch` nothing differs from fastai's own schedule."""
    order = Deadline.order + 5   # last: the epoch is scored, saved and logged before the stage may end

    def __init__(self, epochs: int, replan: Callable[[int, float], int] | None = None):
        self.epochs, self.replan, self.seconds = epochs, replan, []   # seconds: each epoch of this fit
        self.from_epoch, self.from_pct = 0, 0.0   # where the schedule stood at the last re-plan

    def pct(self, epochs_done: float) -> float:
        """The schedule's position after `epochs_done` epochs: the rest spread evenly over the epochs left."""
        left = (epochs_done - self.from_epoch) / max(self.epochs - self.from_epoch, 1)
        return min(self.from_pct + (1.0 - self.from_pct) * left, 1.0)

    def before_fit(self):
        self.learn.epochs_planned = self.epochs

    def before_epoch(self):
        self.t0 = time.time()

    def before_train(self):
        if self.epochs != self.n_epoch:
            self.learn.pct_train = self.pct(self.epoch)

    def after_batch(self):
        if self.training and self.epochs != self.n_epoch:
            self.learn.pct_train = self.pct(self.epoch + (self.iter + 1) / self.n_iter)

    def after_epoch(self):
        self.seconds.append(time.time() - self.t0)
        if self.replan is not None:   # the fastest epoch: contention only ever slows an epoch down
            epochs = min(max(self.replan(self.epoch + 1, min(self.seconds)), self.epoch + 1), self.n_epoch)
            epochs = self.agree(epochs)
            if epochs != self.epochs:
                self.from_epoch, self.from_pct = self.epoch + 1, self.pct(self.epoch + 1)
                self.epochs = self.learn.epochs_planned = epochs
        if self.epochs < self.n_epoch and self.epoch + 1 >= self.epochs:
            raise CancelFitException()
