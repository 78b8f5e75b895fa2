"""Training: the two stages as specs of one loop, and the K curated folds.

Stage 1 learns from the large noisy set; stage 2 fine-tunes fold k of the curated set from the stage-1 weights.
Both are `fit_stage(model, train, valid, spec, deadline)`: a fastai Learner with one-cycle on random crops, the
stage's augmentation callbacks, and the callbacks of `callbacks.py` (NaN guard, best epoch by exact whole-clip
lwlrap, per-epoch checkpoint for resume, log line, deadline). Stage 1 and stage 2 differ only in their StageSpec,
made from their StageSettings (`cfg.noisy`, `cfg.curated`); the epochs and deadlines come from the run's Budget.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

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
from .config import Config, StageSettings, top_up_size
from .dataparallel import DataParallel, training_loader
from .features import Clips, CropDataset, MelStore, aggregate_windows, store_stats
from .losses import make_loss
from .metrics import chance_lwlrap, lwlrap
from .model import build_model, input_mean, to_device
from .precision import DeviceMixedPrecision, amp_dtype
from .predict import predict_clips
from .weights import model_from_state, model_meta, stage_recipe
from .world import SINGLE, World, doing

if TYPE_CHECKING:
    from .context import Run

log = logging.getLogger("fattag")
HISTORY_COLUMNS = ["epoch", "train_loss", "valid_loss", "lwlrap"]
STAGE1 = "stage 1 (noisy)"   # its name in logs, plans and timing tables


def fold_stage(k: int) -> str:
    """Stage 2 on fold k, as plans and timing tables name it."""
    return f"fold {k}"


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


def holdout_size(n: int, share: float) -> int:
    """Clips of n that a holdout of `share` takes: at least one (none of none); the cost model counts as many."""
    return max(1, int(round(n * share))) if n else 0


def holdout_split(indices: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, holdout) split of the given clip indices; the holdout has at least one clip."""
    perm = np.random.default_rng(seed).permutation(indices)
    n_hold = holdout_size(len(perm), share)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


# ---------------------------------------------------------------- one stage


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


# ---------------------------------------------------------------- the two stages


@dataclass
class TrainingData:
    """What both stages train from: the decoded sets, the class vocabulary, the curated folds."""
    classes: list[str]
    curated: MelStore
    noisy: MelStore | None
    folds: np.ndarray            # fold id per curated clip (-1: could not be decoded)
    stats: tuple[float, float]   # mean and std of the curated log-mels: the model's input normalisation
    noisy_pool: np.ndarray       # the noisy clips training may use: every decodable one, or those selection kept

    @classmethod
    def make(cls, classes: list[str], curated: MelStore, noisy: MelStore | None, cfg: Config) -> TrainingData:
        ok = np.flatnonzero(curated.ok)
        folds = np.full(len(curated.table), -1, dtype=np.int64)
        folds[ok] = make_folds(curated.table.targets[ok], cfg.folds, cfg.seed)
        pool = np.flatnonzero(noisy.ok) if noisy is not None else np.zeros(0, dtype=np.int64)
        return cls(list(classes), curated, noisy, folds, store_stats(curated, seed=cfg.seed), pool)

    def fold(self, k: int) -> tuple[Clips, Clips]:
        """(training clips, validation clips) of fold k: every decodable curated clip is in exactly one of them."""
        return (Clips(self.curated, np.flatnonzero((self.folds >= 0) & (self.folds != k))),
                Clips(self.curated, np.flatnonzero(self.folds == k)))

    def fold_training(self, k: int, share: float, seed: int) -> tuple[list[Clips], Clips]:
        """Stage 2's (training sets, validation clips) of fold k: the other folds' clips, topped up with noisy clips
        so that they are `share` of the training items."""
        train, valid = self.fold(k)
        return [train, *self.noisy_top_up(len(train), share, seed)], valid

    def noisy_top_up(self, n_curated: int, share: float, seed: int) -> list[Clips]:
        """Noisy clips to add to a stage-2 training set of `n_curated` clips so that they are `share` of it."""
        return top_up(self.noisy, self.noisy_pool, n_curated, share, seed)

    def curated_top_up(self, n_noisy: int, share: float, seed: int) -> list[Clips]:
        """Curated clips to add to stage 1's `n_noisy` training clips so that they are `share` of the items (at
        most every decodable curated clip). Stage 1 then hears every fold's clean clips, so stage 2's fold scores
        and the OOF predictions over-promise (realdev everyday: OOF 1.000)."""
        return top_up(self.curated, np.flatnonzero(self.curated.ok), n_noisy, share, seed)


def top_up(store: MelStore | None, pool: np.ndarray, n_base: int, share: float, seed: int) -> list[Clips]:
    """Clips of `pool` (indices into `store`) to add to a training set of `n_base` clips so that they are `share` of
    the items, capped at the whole pool; drawn without replacement, seeded. [] when there is nothing to add."""
    if share <= 0 or store is None or not len(pool):
        return []
    n = top_up_size(n_base, share, len(pool))
    return [Clips(store, np.sort(np.random.default_rng(seed).choice(pool, n, replace=False)))]


@dataclass
class Stage1:
    """Stage 1's outcome: its weights (None when it was skipped or learned nothing usable) and its noisy-holdout
    lwlrap per epoch against chance (None when it did not train in this run)."""
    weights: dict | None = None
    holdout: dict | None = None


def train_stage1(run: Run, d: TrainingData) -> Stage1:
    """Stage 1 on the noisy set, watched on a small noisy holdout."""
    cfg, noisy, classes, budget = run.cfg, d.noisy, d.classes, run.budget
    epochs = budget.plan.epochs_noisy
    if noisy is None or epochs <= 0 or len(d.noisy_pool) < 2:
        log.info("stage 1 skipped (%s)", "no noisy set" if noisy is None else
                 "no epochs planned" if epochs <= 0 else "no decodable noisy clip")
        return Stage1()
    spec = StageSpec.for_stage(run, cfg.noisy, STAGE1, run.work_dir / "stage1", epochs, cfg.seed + 1000)
    # its first epochs show the machine's real speed (a throughput measurement under contention reads low): the
    # budget re-plans stage 1's epochs from them, up to the requested number
    spec = replace(spec, max_epochs=cfg.noisy.epochs, replan=budget.replan_stage1, world=run.world)
    done = spec.stage_dir.finished()
    if done is not None:
        return Stage1(done[1])
    t0 = time.time()
    train_idx, hold_idx = holdout_split(d.noisy_pool, cfg.noisy_holdout, spec.seed)
    set_seed(spec.seed, reproducible=True)  # initial weights too: the same seed gives the same run
    model = build_model(cfg, len(classes), *d.stats)
    train = [Clips(noisy, train_idx), *d.curated_top_up(len(train_idx), cfg.noisy.top_up, spec.seed)]
    res = fit_stage(model, train, Clips(noisy, hold_idx), spec, budget.stage1_deadline)
    run.record(STAGE1, time.time() - t0)
    recent = res.epoch_seconds[-3:]   # the machine as it is now prices the folds
    budget.measured("noisy_epoch", sum(recent), len(recent))
    holdout = holdout_summary(res, noisy.table.targets[hold_idx])
    if not run.world.broadcast(res.usable):
        log.warning("stage 1 produced no usable weights: stage 2 starts from scratch")
        return Stage1(None, holdout)
    if run.world.is_main:
        finish_stage(spec, model, res, model_meta(cfg, classes, stage="noisy"))
    return Stage1(model.state_dict(), holdout)


def holdout_summary(res: StageResult, truth: np.ndarray) -> dict:
    """Stage 1's noisy-holdout lwlrap per epoch against what random scores get: a dead stage 1 shows here."""
    chance = chance_lwlrap(truth)
    per_epoch = [None if v is None or not np.isfinite(v) else round(float(v), 4) for v in res.history["lwlrap"]]
    best = max((v for v in per_epoch if v is not None), default=float("nan"))
    log.info("stage 1 noisy-holdout lwlrap per epoch: %s (random scores: %.3f)",
             " ".join(f"{v:.3f}" if v is not None else "nan" for v in per_epoch), chance)
    if not best > chance + 0.05:
        log.warning("stage 1 stayed near chance on its noisy holdout (best %.3f, random %.3f): it learned little "
                    "from the noisy set", best, chance)
    return dict(per_epoch=per_epoch, best=best, chance=round(chance, 4))


@dataclass
class FoldsResult:
    folds: np.ndarray          # fold id per curated clip (-1 for clips that could not be decoded)
    models: list               # this rank's trained fold models (every fold's with one rank), in fold order
    model_folds: list          # the fold id of each of `models`
    results: list              # dict per trained fold (all ranks'): fold, rank, best_lwlrap, best_epoch, epochs_run,
    #                            seconds, OOF scores
    oof_center: np.ndarray     # OOF probabilities from one centred window (no TTA); NaN rows where not predicted
    oof_windows: np.ndarray    # OOF probabilities over whole-clip windows
    oof_tta: np.ndarray        # whole-clip windows plus augmented passes (equals oof_windows when there are none)

    @property
    def predicted(self) -> np.ndarray:
        return np.isfinite(self.oof_windows).all(1)


def train_fold(run: Run, k: int, d: TrainingData, init: dict | None) -> tuple[torch.nn.Module, dict] | None:
    """Stage 2 on fold k: train on the other folds from the stage-1 weights (`init`), validate on fold k.

    Returns (model, meta) with the fold's score, or None when it was not trained (no time, or no usable epoch).
    """
    cfg, budget = run.cfg, run.budget
    epochs = budget.epochs_for(k)
    spec = StageSpec.for_stage(run, cfg.curated, f"fold {k} (curated)", run.work_dir / f"fold{k}", epochs,
                               cfg.seed + k)
    done = spec.stage_dir.finished()
    if done is not None:
        return model_from_state(*done), done[0]
    if epochs <= 0:
        return None
    set_seed(spec.seed, reproducible=True)
    model = build_model(cfg, len(d.classes), *d.stats)
    if init is not None:
        model.load_state_dict(init)
    train, valid = d.fold_training(k, cfg.curated.top_up, spec.seed)
    res = fit_stage(model, train, valid, spec, budget.fold_deadline(k))
    budget.measured("fold_epoch", res.seconds, len(res.history))
    if not res.usable:
        log.warning("fold %d produced no usable weights: left out of the ensemble", k)
        return None
    meta = model_meta(cfg, d.classes, stage="curated", fold=k, warm_start=init is not None)
    finish_stage(spec, model, res, meta)
    return model, {**meta, "score": res.best_score, "best_epoch": res.best_epoch, "epochs_run": len(res.history),
                   "seconds": res.seconds}


def predict_oof(model: torch.nn.Module, clips: Clips, cfg: Config, device, passes: int) -> dict:
    """Out-of-fold probabilities of a fold model on its own validation clips: centre crop, windows, windows +
    `passes` augmented passes."""
    center = predict_clips(model, clips.store, clips.indices, cfg, device, center_only=True)
    windows = predict_clips(model, clips.store, clips.indices, cfg, device)
    tta = windows if passes == 0 else predict_clips(model, clips.store, clips.indices, cfg, device,
                                                    aug_passes=passes)
    return dict(center=center, windows=windows, tta=tta)


def train_folds(run: Run, d: TrainingData, stage1: dict | None) -> FoldsResult:
    """Stage 2 on as many curated folds as the budget allows, each followed by its out-of-fold predictions. With
    several ranks each trains its share of the folds (fold k on rank k % N) and every rank gets all folds' rows."""
    models, model_folds, mine, budget = [], [], [], run.budget
    for k in run.world.mine(range(run.cfg.folds)):
        t0 = time.time()
        trained = train_fold(run, k, d, stage1)
        if trained is None:
            if budget.plan.folds_trained <= k:
                log.warning("time budget: %d of %d folds trained", len(models), run.cfg.folds)
                break
            continue
        model, meta = trained
        t_pred, valid = time.time(), d.fold(k)[1]
        oof = predict_oof(model, valid, run.cfg, run.device, budget.plan.tta_aug_passes)
        budget.measured("oof_predict", time.time() - t_pred, 1)
        budget.fold_done(k, meta["epochs_run"])
        summary = dict(fold_summary(k, meta, valid.targets, oof["windows"], oof["center"]), rank=run.world.rank)
        mine.append(dict(rows=valid.indices, summary=summary, **oof))
        run.record(fold_stage(k), time.time() - t0)
        models.append(model)
        model_folds.append(k)
    everyone = sorted((f for rank in run.world.gather(mine) for f in rank), key=lambda f: f["summary"]["fold"])
    oof = {name: np.full((len(d.curated.table), len(d.classes)), np.nan) for name in ("center", "windows", "tta")}
    for f in everyone:
        for name in oof:
            oof[name][f["rows"]] = f[name]
    return FoldsResult(d.folds, models, model_folds, [f["summary"] for f in everyone], oof["center"],
                       oof["windows"], oof["tta"])


def fold_summary(k: int, meta: dict, truth: np.ndarray, windows: np.ndarray, center: np.ndarray) -> dict:
    row = dict(fold=k, best_lwlrap=meta["score"], best_epoch=meta["best_epoch"], epochs_run=meta["epochs_run"],
               seconds=meta["seconds"], oof_windows=lwlrap(truth, windows), oof_center=lwlrap(truth, center))
    log.info("fold %d: best lwlrap %.4f at epoch %d; OOF whole-clip windows %.4f, centre crop %.4f", k,
             row["best_lwlrap"], row["best_epoch"], row["oof_windows"], row["oof_center"])
    return row
