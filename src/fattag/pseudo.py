"""Test pseudo-labels: the fold ensemble labels the test clips, then every fold model trains on them as well.

The test clips come from sources no training clip uses (other sample banks, game packages, speakers), and that
shift is most of what the models lose on them (OOF 0.95, test 0.65-0.70 on realdev). One round of self-training
lets each model hear those sources: the ensemble's plain (unaugmented) predictions give every test clip its top
class (after class balancing, as the submission ranks them) plus any class scored at least `pseudo_threshold`;
then each fold model trains `pseudo_epochs` more epochs on its own training clips plus the labelled test clips,
with stage 2's augmentation (`cfg.curated`) and validation (its fold; the best epoch is kept). No test label is
ever read: this is transductive learning, which a Kaggle kernel may do because it holds the test audio. Under a
time budget the round gets only the time the rest of the recipe leaves (budget.py). Measured on realdev:
docs/ablation.md.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time

import numpy as np
import pandas as pd

from .checkpoint import atomic_write
from .context import Run
from .data import ClipTable
from .features import Clips, MelStore
from .predict import balance_classes, predict_test
from .splits import TrainingData
from .stage import StageSpec, finish_stage, fit_stage
from .stages import ROUND_STAGE
from .train import FoldsResult
from .weights import model_meta, stage_recipe

log = logging.getLogger("fattag")


def pseudo_labels(probs: np.ndarray, threshold: float, balance: bool) -> np.ndarray:
    """Targets (n, C) float32: 1 for each clip's top class (by the class-balanced scores when `balance`) and for
    every class whose probability is at least `threshold`; 0 for the others."""
    labels = (probs >= threshold).astype(np.float32)
    ranked = balance_classes(probs) if balance else probs
    labels[np.arange(len(probs)), ranked.argmax(1)] = 1.0
    return labels


def labelled_test(test: MelStore, labels: np.ndarray) -> Clips:
    """The decodable test clips with `labels` (one row per decodable clip, in store order) as their targets."""
    ok = np.flatnonzero(test.ok)
    targets = np.zeros((len(test.table), labels.shape[1]), dtype=np.float32)
    targets[ok] = labels
    table = ClipTable(f"{test.table.name} (pseudo-labelled)", test.table.fnames, test.table.paths, targets)
    return Clips(MelStore(table, test.mels, test.errors, test.seconds), ok)


def pseudo_label_round(run: Run, d: TrainingData, folds: FoldsResult, test: MelStore) -> FoldsResult:
    """`folds` with this rank's fold models after their pseudo-label epochs (the models as they were where a round is
    off or not possible) and their rows updated; the labels go to pseudo_labels.csv in the work dir. With several
    ranks the teacher's predictions are gathered from all of them and each rank trains its own fold models."""
    models, n_models = folds.models, len(folds.results)
    if run.cfg.test_round_epochs <= 0:
        if run.cfg.pseudo_epochs > 0:
            log.info("test pseudo-labels off: train_on_test=false keeps the test audio out of training")
        return folds
    epochs = run.world.broadcast(run.budget.pseudo_epochs(n_models))
    if not n_models or epochs <= 0 or not test.ok.any():
        log.info("test pseudo-labels skipped (%s)", "no fold model" if not n_models else
                 "no time for an epoch" if epochs <= 0 else "no decodable test clip")
        return folds
    t0, cfg = time.time(), run.cfg
    probs = predict_test(models, test, cfg, run.device, aug_passes=0, world=run.world,   # before any balancing
                         folds=folds.model_folds)[test.ok]
    labels = pseudo_labels(probs, cfg.pseudo_threshold, cfg.class_balance)
    if run.world.is_main:
        write_labels(run.work_dir / "pseudo_labels.csv", test, labels, d.classes)
    log.info("test pseudo-labels: %d clips, %.2f labels per clip (top class + probability >= %.2f); %d epochs "
             "per fold model", len(labels), (labels >= 1).sum(1).mean(), cfg.pseudo_threshold, epochs)
    pseudo = labelled_test(test, labels)
    row_of = {row["fold"]: row for row in folds.results}
    out = [train_on_pseudo(run, d, row_of[k], model, pseudo, epochs, n_models)
           for k, model in zip(folds.model_folds, models)]
    for rows in run.world.gather({k: row_of[k] for k in folds.model_folds}):   # the ranks' rows, updated
        for k, row in rows.items():
            row_of[k].update(row)
    run.record(ROUND_STAGE, time.time() - t0)
    return dataclasses.replace(folds, models=out)


def train_on_pseudo(run: Run, d: TrainingData, row: dict, model, pseudo: Clips, epochs: int, n_models: int):
    """Fold `row['fold']`'s model trained on its training clips, a noisy top-up and the pseudo-labelled test clips,
    with stage 2's loss and augmentation at the round's learning rate."""
    cfg, k = run.cfg, row["fold"]
    spec = StageSpec.for_stage(run, cfg.curated, f"fold {k} + test pseudo-labels",
                               run.work_dir / f"fold{k}" / "pseudo", epochs, cfg.seed + 3000 + k)
    spec = dataclasses.replace(spec, lr=cfg.lr_pseudo, recipe=stage_recipe(cfg, run.data_dir, pseudo_round=True))
    student = copy.deepcopy(model)   # the stage-2 model stays as it is if the round fails
    done = spec.stage_dir.finished()
    if done is not None:
        student.load_state_dict(done[1])
        return student
    train, valid = d.fold_training(k, cfg.curated.top_up, spec.seed)
    parts = [*train, pseudo]   # stage 2's training sets of this fold, plus the pseudo-labelled test clips
    res = fit_stage(student, parts, valid, spec, run.budget.pseudo_deadline(k, n_models))
    run.budget.measured("pseudo_epoch", res.seconds, len(res.history))
    if not res.usable:
        log.warning("fold %d: the pseudo-label epochs produced no usable weights; its stage-2 model is kept", k)
        return model
    finish_stage(spec, student, res, model_meta(cfg, d.classes, stage="pseudo", fold=k))
    row.update(pseudo_lwlrap=res.best_score, pseudo_epoch=res.best_epoch)
    log.info("fold %d after the pseudo-label epochs: best lwlrap %.4f at epoch %d (stage 2: %.4f)", k,
             res.best_score, res.best_epoch, row["best_lwlrap"])
    return student


def write_labels(path, test: MelStore, labels: np.ndarray, classes: list[str]) -> None:
    names = np.array(classes)
    rows = [(test.table.fnames[i], ",".join(names[lab >= 1])) for i, lab in zip(np.flatnonzero(test.ok), labels)]
    atomic_write(path, lambda tmp: pd.DataFrame(rows, columns=["fname", "labels"]).to_csv(tmp, index=False))
