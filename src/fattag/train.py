"""The training steps of a run: stage 1 on the noisy set, then stage 2 on each curated fold with its OOF predictions.

Stage 1 learns from the large noisy set; stage 2 fine-tunes fold k of the curated set from the stage-1 weights.
Each trains one stage (stage.py) on its clips (splits.py); the epochs and deadlines come from the run's Budget.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from fastai.torch_core import set_seed

from .config import Config
from .context import Run
from .features import Clips
from .metrics import chance_lwlrap, lwlrap
from .model import build_model
from .predict import predict_clips
from .splits import TrainingData, holdout_split
from .stage import StageResult, StageSpec, finish_stage, fit_stage
from .stages import STAGE1, fold_stage
from .weights import model_from_state, model_meta

log = logging.getLogger("fattag")


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
    several ranks all start from rank 0's plan, each trains its share of the folds (`World.mine`) and every rank
    gets all folds' rows."""
    run.share_plan()
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
