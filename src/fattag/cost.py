"""The cost model and the planner: pure functions from sizes and measured speed to seconds, and to a plan.

Kaggle kills a kernel at its limit (FAT2019: 1 h on GPU) and DCASE 2019 teams were disqualified for running
over. So a run prices its recipe from the measured throughput (throughput.py) and the sizes of its sets, and fits
it into the time it has, cutting in this order: the test pseudo-label round (it only gets time that the rest of the
recipe leaves), epochs of both stages (proportionally, down to a floor), augmented TTA passes, the number of folds
trained, and finally stage 1. Nothing here reads the clock: budget.py re-plans with these functions as the run
goes. With N devices (`Throughput.devices`) stage 1 trains at the measured data-parallel rate (its validation is
not shared), and folds, their test TTA and pseudo-label epochs run N at a time (`rounds`); a stage-1 epoch's real
cost replaces the estimate after its first epoch (budget.replan_stage1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import Config
from .stages import ROUND_STAGE, SELECT_HOLDOUT, SELECT_STAGE, STAGE1, fold_stage, holdout_size, rounds, top_up_size

OVERHEAD = 1.15          # data loading, callbacks and logging on top of the measured model time
MIN_EPOCHS_CURATED = 3   # fewer than this and a fold model is little better than stage 1 alone
MIN_EPOCHS_NOISY = 1


@dataclass(frozen=True)
class Workload:
    """Sizes the plan depends on, counted from the decoded stores."""
    noisy_train: int            # stage-1 training clips (0 = no stage 1)
    noisy_holdout_windows: int  # stage-1 validation windows per epoch
    curated: int                # decodable curated clips
    curated_windows: int        # whole-clip windows over all curated clips
    test_windows: int           # whole-clip windows over all test clips
    noisy_windows: int = 0      # whole-clip windows over all noisy clips (scored once by noisy-clip selection)
    test_clips: int = 0         # decodable test clips (trained on in the pseudo-label round)
    noisy_clips: int = 0        # the noisy clips stage 2 tops its batches up from (training and holdout clips)


@dataclass
class Throughput:
    """This machine's speed, as throughput.measure_throughput times it on the real model."""
    train_s_per_clip: float     # forward + backward + optimiser step, per training crop
    infer_s_per_window: float   # forward pass, per inference window
    device: str
    devices: int = 1            # devices of this speed the run has: stage 1 data-parallel, folds in rounds of them
    ddp_train_s_per_clip: float = 0.0   # a data-parallel training step over all devices, per crop (0: not measured)

    @property
    def stage1_train_s_per_clip(self) -> float:
        """Stage 1's training cost per crop: measured through DDP, else one device's shared by all."""
        return self.ddp_train_s_per_clip or self.train_s_per_clip / self.devices

    def describe(self) -> str:
        ddp = (f"; {self.devices} devices data-parallel: {1 / self.stage1_train_s_per_clip:.0f} clips/s"
               if self.devices > 1 else "")
        return (f"{self.device}: training {1 / self.train_s_per_clip:.0f} clips/s, "
                f"inference {1 / self.infer_s_per_window:.0f} windows/s{ddp}")


def count_workload(cfg: Config, noisy, curated, test) -> Workload:
    """Clips and windows of each stage, from the decoded stores (features.MelStore; noisy may be None)."""
    def windows(store, idx):
        return len(store.windows(idx, cfg.crop_frames, cfg.tta_step_frac)) if len(idx) else 0

    noisy_ok = np.flatnonzero(noisy.ok) if noisy is not None else np.array([], dtype=int)
    n_hold = holdout_size(len(noisy_ok), cfg.noisy_holdout)
    return Workload(noisy_train=len(noisy_ok) - n_hold, noisy_holdout_windows=windows(noisy, noisy_ok[:n_hold]),
                    curated=int(curated.ok.sum()), curated_windows=windows(curated, np.flatnonzero(curated.ok)),
                    test_windows=windows(test, np.flatnonzero(test.ok)), test_clips=int(test.ok.sum()),
                    noisy_windows=windows(noisy, noisy_ok) if cfg.select_noisy else 0, noisy_clips=len(noisy_ok))


@dataclass(frozen=True)
class Plan:
    epochs_noisy: int
    epochs_curated: int
    folds_trained: int
    tta_aug_passes: int
    available_s: float
    stages: tuple = ()           # (stage name, planned seconds)
    notes: tuple = ()            # what was cut, and why
    epochs_pseudo: int = 0       # the test pseudo-label round, per fold model (pseudo.py)
    devices: int = 1             # ranks: stage 1 data-parallel over all, folds side by side

    @classmethod
    def requested(cls, cfg: Config) -> Plan:
        """The recipe as asked for, before anything is measured or cut."""
        return cls(cfg.noisy.epochs, cfg.curated.epochs, cfg.folds, cfg.tta_aug_passes, float("inf"),
                   epochs_pseudo=cfg.pseudo_epochs)

    @property
    def total_s(self) -> float:
        """Wall seconds of the planned stages: folds side by side in rounds of `devices`."""
        folds = [secs for name, secs in self.stages if name.startswith("fold")]
        rest = sum(secs for name, secs in self.stages if not name.startswith("fold"))
        return rest + sum(max(folds[i:i + self.devices]) for i in range(0, len(folds), self.devices))

    def table(self) -> str:
        rows = [f"{'stage':<22}{'planned':>10}"]
        rows += [f"{name:<22}{secs:>9.0f}s" for name, secs in self.stages]
        rows.append(f"{'total':<22}{self.total_s:>9.0f}s  (available {self.available_s:.0f}s)")
        head = (f"plan: stage 1 {self.epochs_noisy} epochs, stage 2 {self.epochs_curated} epochs x "
                f"{self.folds_trained} folds, " + (f"{self.epochs_pseudo} pseudo-label epochs per fold, "
                                                   if self.epochs_pseudo else "")
                + f"{self.tta_aug_passes} augmented TTA passes"
                + (f"; {self.devices} devices: stage 1 data-parallel, folds {self.devices} at a time"
                   if self.devices > 1 else ""))
        return "\n".join([head, *rows, *self.notes])

    def to_dict(self) -> dict:
        return dict(epochs_noisy=self.epochs_noisy, epochs_curated=self.epochs_curated,
                    epochs_pseudo=self.epochs_pseudo, folds_trained=self.folds_trained,
                    tta_aug_passes=self.tta_aug_passes, devices=self.devices,
                    available_s=None if math.isinf(self.available_s) else round(self.available_s, 1),
                    stages=[[name, round(secs, 1)] for name, secs in self.stages], notes=list(self.notes))


def stage_costs(cfg: Config, w: Workload, tp: Throughput, passes: int, scale: dict | None = None) -> dict:
    """Seconds per unit of work, from the measured throughput (times `scale[kind]`, the measured/predicted ratio
    of work already done): a stage-1 epoch, a fold epoch, one fold's OOF predictions, one model's test TTA, and for
    the pseudo-label round one model's labelling pass over the test clips and one of its epochs. Both stages'
    training sets include their top-up from the other set (`stages.top_up_size`, as splits.top_up draws it)."""
    k = cfg.folds
    infer = tp.infer_s_per_window * OVERHEAD
    train = tp.train_s_per_clip * OVERHEAD
    per_fold_windows = w.curated_windows / k
    fold_curated = w.curated * (k - 1) / k
    fold_train = fold_curated + top_up_size(fold_curated, cfg.curated.top_up, w.noisy_clips)
    stage1_train = w.noisy_train + top_up_size(w.noisy_train, cfg.noisy.top_up, w.curated)   # 0 without stage 1
    selecting = cfg.select_noisy and w.noisy_train > 0
    base = dict(
        noisy_epoch=stage1_train * (tp.stage1_train_s_per_clip * OVERHEAD) + w.noisy_holdout_windows * infer,
        fold_epoch=fold_train * train + per_fold_windows * infer,
        pseudo_epoch=(fold_train + w.test_clips) * train + per_fold_windows * infer,
        teacher_predict=w.test_windows * infer,
        oof_predict=(w.curated / k + per_fold_windows * (1 + passes)) * infer,   # centre crop + windows (+ passes)
        test_predict=w.test_windows * (1 + passes) * infer,
        # noisy-clip selection: a scorer trained on the curated clips, then one pass over every noisy clip
        select=(cfg.select_epochs * (w.curated * train + w.curated_windows * SELECT_HOLDOUT * infer)
                + w.noisy_windows * infer) if selecting else 0.0,
    )
    scale = dict(scale or {})
    default = _geomean(list(scale.values())) if scale else 1.0
    if "oof_predict" in scale:   # test TTA is the same kind of work as OOF prediction: windows through the model
        scale.setdefault("test_predict", scale["oof_predict"])
    return {kind: secs * scale.get(kind, default) for kind, secs in base.items()}


def _geomean(values: list) -> float:
    return float(np.exp(np.mean(np.log(np.clip(values, 1e-3, 1e3)))))


def fold_s(c: dict, epochs: int, pseudo: int = 0) -> float:
    """One fold: its epochs, its OOF predictions, its model's share of test TTA and of the pseudo-label round."""
    return epochs * c["fold_epoch"] + c["oof_predict"] + c["test_predict"] + pseudo_s(c, pseudo)


def pseudo_s(c: dict, epochs: int) -> float:
    """One model's part of the pseudo-label round: labelling the test clips, then `epochs` epochs (0: no round)."""
    return c["teacher_predict"] + epochs * c["pseudo_epoch"] if epochs > 0 else 0.0


def recipe_total(cfg: Config, w: Workload, tp: Throughput, scale: dict | None, pseudo: int,
                 folds_done: int | None = None):
    """total(e1, e2, folds, passes): the seconds of the work still to do with `pseudo` pseudo-label epochs per
    model. From the start (`folds_done` None): noisy-clip selection, stage 1 and the folds. Once `folds_done`
    folds are trained: their models' test TTA and pseudo-label round, and `folds` more folds."""
    def total(e1, e2, folds, passes):
        c = stage_costs(cfg, w, tp, passes, scale)
        start = c["select"] + e1 * c["noisy_epoch"] if folds_done is None else 0.0
        models = folds + (folds_done or 0)   # every model's test TTA and pseudo-label round; N side by side
        return (start + rounds(folds, tp.devices) * (e2 * c["fold_epoch"] + c["oof_predict"])
                + rounds(models, tp.devices) * (c["test_predict"] + pseudo_s(c, pseudo)))
    return total


def fit_pseudo(requested: int, total_with, available_s: float | None) -> int:
    """The most pseudo-label epochs (up to `requested`) with which `total_with(epochs)`, the whole recipe's time, fits
    `available_s`; 0 when the recipe does not fit even without the round. The round is cut first: on realdev it
    gained less under the budget than the stage epochs it would have taken."""
    if available_s is None or requested <= 0:
        return max(requested, 0)
    return next((p for p in range(requested, 0, -1) if total_with(p) <= available_s), 0)


def fit_recipe(e1: int, e2: int, folds: int, passes: int, total, available_s: float | None, min_folds: int = 1):
    """Cut (e1, e2, folds, passes) until total(e1, e2, folds, passes) <= available_s, in this order: both stages'
    epochs in proportion (down to their floors), augmented TTA passes, folds (down to `min_folds`: a run trains at
    least one, a re-plan after a trained fold may add none), then stage 1. Returns the cut values and notes saying
    what was cut."""
    notes = []
    if available_s is None or total(e1, e2, folds, passes) <= available_s:
        return e1, e2, folds, passes, notes

    def fits(a, b, f, p):
        return total(a, b, f, p) <= available_s

    lo, hi = 0.0, 1.0  # the largest common scale of both stages' epochs that fits, above their floors
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(_scaled(e1, mid, MIN_EPOCHS_NOISY), _scaled(e2, mid, MIN_EPOCHS_CURATED),
                                   folds, passes) else (lo, mid)
    a, b = _scaled(e1, lo, MIN_EPOCHS_NOISY), _scaled(e2, lo, MIN_EPOCHS_CURATED)
    if fits(a, b, folds, passes):
        notes.append(f"epochs cut to fit the budget: stage 1 {e1} -> {a}, stage 2 {e2} -> {b}")
        return a, b, folds, passes, notes
    requested_folds = folds
    e1, e2 = _scaled(e1, 0, MIN_EPOCHS_NOISY), min(e2, MIN_EPOCHS_CURATED)
    if passes and not fits(e1, e2, folds, passes):
        notes.append(f"augmented TTA passes cut {passes} -> 0")
        passes = 0
    while folds > min_folds and not fits(e1, e2, folds, passes):
        folds -= 1
    if folds == 0:
        notes.append("no time for another fold at its floor")
    elif folds < requested_folds:
        notes.append(f"only {folds} of {requested_folds} folds fit the budget (the others are not trained)")
    if e1 and not fits(e1, e2, folds, passes):
        notes.append("stage 1 dropped: it does not fit the budget")
        e1 = 0
    notes.append(f"epochs at their floor: stage 1 {e1}, stage 2 {e2}")
    if not fits(e1, e2, folds, passes):
        notes.append("WARNING: even the smallest plan exceeds the budget; the deadline guard will stop training early")
    return e1, e2, folds, passes, notes


def plan_run(cfg: Config, w: Workload, tp: Throughput, available_s: float | None,
             scale: dict | None = None) -> Plan:
    """Fit the preset's epochs, TTA passes and folds into `available_s` seconds (None: no budget, no cuts)."""
    e1 = cfg.noisy.epochs if w.noisy_train else 0
    recipe = (e1, cfg.curated.epochs, cfg.folds, cfg.tta_aug_passes)
    ep = fit_pseudo(cfg.pseudo_epochs, lambda p: recipe_total(cfg, w, tp, scale, p)(*recipe), available_s)
    e1, e2, folds, passes, notes = fit_recipe(*recipe, recipe_total(cfg, w, tp, scale, ep), available_s)
    if ep < cfg.pseudo_epochs:
        notes.insert(0, f"pseudo-label round cut to fit the budget: {cfg.pseudo_epochs} -> {ep} epochs")
    c = stage_costs(cfg, w, tp, passes, scale)
    stages = [(SELECT_STAGE, c["select"])] if c["select"] and e1 else []
    stages += [(STAGE1, e1 * c["noisy_epoch"])] if e1 else []
    stages += [(fold_stage(k), fold_s(c, e2)) for k in range(folds)]
    stages += [(ROUND_STAGE, rounds(folds, tp.devices) * pseudo_s(c, ep))] if ep else []
    return Plan(e1, e2, folds, passes, float("inf") if available_s is None else available_s, tuple(stages),
                tuple(notes), ep, tp.devices)


def replan_folds(cfg: Config, w: Workload, tp: Throughput, scale: dict, plan: Plan, k: int, folds_done: int,
                 available_s: float | None) -> Plan:
    """`plan` with folds k.. fitted into `available_s`, after test TTA for the `folds_done` folds already trained."""
    recipe = (0, cfg.curated.epochs, cfg.folds - k, cfg.tta_aug_passes)
    ep = fit_pseudo(cfg.pseudo_epochs, lambda p: recipe_total(cfg, w, tp, scale, p, folds_done)(*recipe),
                    available_s)
    _, e2, n, passes, notes = fit_recipe(*recipe, recipe_total(cfg, w, tp, scale, ep, folds_done), available_s,
                                         min_folds=1 if k == 0 else 0)
    c = stage_costs(cfg, w, tp, passes, scale)
    folds = [st for st in plan.stages if st[0].startswith("fold")]
    kept = [st for st in plan.stages if not st[0].startswith("fold") and st[0] != ROUND_STAGE]
    stages = kept + [(fold_stage(j), secs) for j, (_, secs) in enumerate(folds) if j < k]
    stages += [(fold_stage(j), fold_s(c, e2)) for j in range(k, k + n)]
    stages += [(ROUND_STAGE, rounds(k + n, tp.devices) * pseudo_s(c, ep))] if ep else []
    note = (f"re-planned before fold {k} from measured times: {n} more fold(s) of {e2} epochs"
            + (f" ({'; '.join(notes)})" if notes else ""))
    return Plan(plan.epochs_noisy, e2, k + n, passes, plan.available_s, tuple(stages), (*plan.notes, note), ep,
                tp.devices)


def _scaled(epochs: int, scale: float, floor: int) -> int:
    if epochs <= 0:
        return 0
    return max(min(floor, epochs), int(math.floor(epochs * scale)))
