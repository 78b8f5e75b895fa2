"""Time budget: measure what a training step and an inference window really cost here, then plan epochs.

Kaggle kills a kernel at its limit (FAT2019: 1 h on GPU) and DCASE 2019 teams were disqualified for running
over. So the run measures its own speed on a few warmed-up batches and fits the preset's recipe into what is
left of the budget, cutting in this order: the test pseudo-label round (it only gets time that the rest of the
recipe leaves), epochs of both stages (proportionally, down to a floor), augmented TTA passes, the number of folds
trained, and finally stage 1. During training the plan is redone from the measured epoch times, and a deadline
guard stops training early so test inference always fits.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .config import Config, top_up_size
from .features import WindowDataset
from .model import build_model, to_device
from .precision import amp_dtype, autocast, grad_scaler

OVERHEAD = 1.15          # data loading, callbacks and logging on top of the measured model time
MIN_EPOCHS_CURATED = 3   # fewer than this and a fold model is little better than stage 1 alone
MIN_EPOCHS_NOISY = 1
SELECT_HOLDOUT = 0.1     # share of the curated clips that watch the selection scorer
PSEUDO_STAGE = "pseudo-label round"  # its name in plans and timing tables


@dataclass
class Throughput:
    train_s_per_clip: float     # forward + backward + optimiser step, per training crop
    infer_s_per_window: float   # forward pass, per inference window
    device: str

    def describe(self) -> str:
        return (f"{self.device}: training {1 / self.train_s_per_clip:.0f} clips/s, "
                f"inference {1 / self.infer_s_per_window:.0f} windows/s")


def measure_throughput(cfg: Config, n_classes: int, device, max_seconds: float | None = None,
                       runs: int = 4) -> Throughput:
    """Time training steps and inference batches of the real model on random input of the crop size.

    The first run of each warms up and is not used, unless the next would take the measurement past
    `max_seconds` (a small share of the budget: a slow CPU step is then measured once, and the stages' measured
    times correct the estimate later).
    """
    device = torch.device(device)
    model = to_device(build_model(cfg, n_classes), device, cfg.channels_last)
    bs = cfg.batch_size
    x = torch.randn(bs, 1, cfg.n_mels, cfg.crop_frames, device=device).half()
    y = (torch.rand(bs, n_classes, device=device) < 0.05).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    dtype = amp_dtype(cfg, device)  # as training and prediction run (stage_learner, predict_clips)
    scaler = grad_scaler(device, dtype)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    spent = [0.0]

    def train_step():
        with autocast(device, dtype):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def infer():
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    def timed(fn, share: float) -> float:
        times = []
        while len(times) < runs:
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            spent[0] += times[-1]
            if max_seconds and spent[0] + times[-1] > max_seconds * share:
                break
        return min(times[1:] or times)

    model.train()
    t_train = timed(train_step, 0.7) / bs
    model.eval()
    t_infer = timed(infer, 1.0) / bs
    return Throughput(t_train, t_infer, str(device))


@dataclass
class Workload:
    """Sizes the plan depends on, counted from the decoded stores."""
    noisy_train: int            # stage-1 training clips (0 = no stage 1)
    noisy_holdout_windows: int  # stage-1 validation windows per epoch
    curated: int                # decodable curated clips
    curated_windows: int        # whole-clip windows over all curated clips
    test_windows: int           # whole-clip windows over all test clips
    noisy_windows: int = 0      # whole-clip windows over all noisy clips (scored once by noisy-clip selection)
    test_clips: int = 0         # decodable test clips (trained on in the pseudo-label round)


@dataclass
class Plan:
    epochs_noisy: int
    epochs_curated: int
    folds_trained: int
    tta_aug_passes: int
    available_s: float
    stages: list = field(default_factory=list)   # (stage name, planned seconds)
    notes: list = field(default_factory=list)    # what was cut, and why
    epochs_pseudo: int = 0                       # the test pseudo-label round, per fold model (pseudo.py)

    @property
    def total_s(self) -> float:
        return sum(s for _, s in self.stages)

    def table(self) -> str:
        rows = [f"{'stage':<22}{'planned':>10}"]
        rows += [f"{name:<22}{secs:>9.0f}s" for name, secs in self.stages]
        rows.append(f"{'total':<22}{self.total_s:>9.0f}s  (available {self.available_s:.0f}s)")
        head = (f"plan: stage 1 {self.epochs_noisy} epochs, stage 2 {self.epochs_curated} epochs x "
                f"{self.folds_trained} folds, " + (f"{self.epochs_pseudo} pseudo-label epochs per fold, "
                                                   if self.epochs_pseudo else "")
                + f"{self.tta_aug_passes} augmented TTA passes")
        return "\n".join([head, *rows, *self.notes])

    def to_dict(self) -> dict:
        return dict(epochs_noisy=self.epochs_noisy, epochs_curated=self.epochs_curated,
                    epochs_pseudo=self.epochs_pseudo, folds_trained=self.folds_trained,
                    tta_aug_passes=self.tta_aug_passes,
                    available_s=None if math.isinf(self.available_s) else round(self.available_s, 1),
                    stages=[[name, round(secs, 1)] for name, secs in self.stages], notes=list(self.notes))


def stage_costs(cfg: Config, w: Workload, tp: Throughput, passes: int, scale: dict | None = None) -> dict:
    """Seconds per unit of work, from the measured throughput (times `scale[kind]`, the measured/predicted ratio
    of work already done): a stage-1 epoch, a fold epoch, one fold's OOF predictions, one model's test TTA, and for
    the pseudo-label round one model's labelling pass over the test clips and one of its epochs."""
    k = cfg.folds
    infer = tp.infer_s_per_window * OVERHEAD
    train = tp.train_s_per_clip * OVERHEAD
    per_fold_windows = w.curated_windows / k
    share = cfg.noisy_share_curated if w.noisy_train else 0.0   # stage-2 batches topped up with noisy clips
    selecting = cfg.select_noisy and w.noisy_train > 0
    fold_train = w.curated * (k - 1) / k / (1 - share)   # a fold's training clips, noisy top-up included
    stage1_share = cfg.curated_share_noisy if w.noisy_train else 0.0   # stage-1 batches topped up with curated clips
    stage1_train = w.noisy_train + top_up_size(w.noisy_train, stage1_share, w.curated)
    base = dict(
        noisy_epoch=stage1_train * train + w.noisy_holdout_windows * infer,
        fold_epoch=fold_train * train + per_fold_windows * infer,
        pseudo_epoch=(fold_train + w.test_clips) * train + per_fold_windows * infer,
        teacher_predict=w.test_windows * infer,
        oof_predict=(w.curated / k + per_fold_windows * (1 + passes)) * infer,   # centre crop + windows (+ passes)
        test_predict=w.test_windows * (1 + passes + cfg.adapt_bn) * infer,   # AdaBN: one more pass per model
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
    def total_with(ep):
        def total(e1, e2, folds, passes):
            c = stage_costs(cfg, w, tp, passes, scale)
            return c["select"] + e1 * c["noisy_epoch"] + folds * fold_s(c, e2, ep)
        return total

    e1 = cfg.epochs_noisy if w.noisy_train else 0
    recipe = (e1, cfg.epochs_curated, cfg.folds, cfg.tta_aug_passes)
    ep = fit_pseudo(cfg.pseudo_epochs, lambda p: total_with(p)(*recipe), available_s)
    e1, e2, folds, passes, notes = fit_recipe(*recipe, total_with(ep), available_s)
    if ep < cfg.pseudo_epochs:
        notes.insert(0, f"pseudo-label round cut to fit the budget: {cfg.pseudo_epochs} -> {ep} epochs")
    c = stage_costs(cfg, w, tp, passes, scale)
    stages = [("select noisy clips", c["select"])] if c["select"] and e1 else []
    stages += [("stage 1 (noisy)", e1 * c["noisy_epoch"])] if e1 else []
    stages += [(f"fold {k}", fold_s(c, e2)) for k in range(folds)]
    stages += [(PSEUDO_STAGE, folds * pseudo_s(c, ep))] if ep else []
    return Plan(e1, e2, folds, passes, float("inf") if available_s is None else available_s, stages, notes, ep)


def _scaled(epochs: int, scale: float, floor: int) -> int:
    if epochs <= 0:
        return 0
    return max(min(floor, epochs), int(math.floor(epochs * scale)))


class Budget:
    """The run's time plan in one place: what stage 1 and each fold may spend, and when each must stop.

    It starts from a plan made with the measured throughput, and after every stage it re-plans the work still to
    do from the seconds that stage really took, upward as well as downward: epochs and folds that were cut come
    back when the stages run faster than predicted, and go when they run slower. It never plans more than the
    requested recipe (the preset, with any --set). Without a deadline nothing is ever cut.
    """

    def __init__(self, requested: Config, workload: Workload, tp: Throughput, deadline: float | None):
        self.requested, self.workload, self.tp, self.deadline = requested, workload, tp, deadline
        self.scale: dict = {}               # measured / predicted seconds, per kind of work done so far
        self.folds_done = 0
        self.plan = plan_run(requested, workload, tp, self.remaining())
        self.first_plan = self.plan

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def costs(self, passes: int | None = None) -> dict:
        passes = self.plan.tta_aug_passes if passes is None else passes
        return stage_costs(self.requested, self.workload, self.tp, passes, self.scale)

    def measured(self, kind: str, seconds: float, units: float) -> None:
        """Record that `units` of work of `kind` (e.g. 4 fold epochs) took `seconds`: later costs follow it."""
        predicted = stage_costs(self.requested, self.workload, self.tp, self.plan.tta_aug_passes)[kind] * units
        if units > 0 and predicted > 0 and seconds > 0:
            self.scale[kind] = seconds / predicted

    def stage1_deadline(self) -> float | None:
        """Stage 1 must stop in time to leave the planned folds their planned time."""
        if self.deadline is None:
            return None
        return self.deadline - self.plan.folds_trained * fold_s(self.costs(), self.plan.epochs_curated,
                                                                 self.plan.epochs_pseudo)

    def select_deadline(self) -> float | None:
        """Noisy-clip selection must stop in time to leave stage 1 and the folds their planned time."""
        if self.deadline is None:
            return None
        return self.stage1_deadline() - self.plan.epochs_noisy * self.costs()["noisy_epoch"]

    def noisy_kept(self, n_train: int) -> None:
        """Stage 1 trains on fewer noisy clips than counted (selection kept `n_train`): its epochs cost less."""
        self.workload = replace(self.workload, noisy_train=n_train)

    def epochs_for(self, k: int) -> int:
        """Re-plan folds k.. from the time left, and return fold k's epochs (0: no time for fold k)."""
        self.plan = self._replan_folds(k)
        return self.plan.epochs_curated if k < self.plan.folds_trained else 0

    def fold_deadline(self, k: int) -> float | None:
        """Fold k trains until: the deadline, less its OOF predictions, test TTA and the pseudo-label round for the
        k + 1 models trained by then, and the planned later folds at their floor."""
        if self.deadline is None:
            return None
        c = self.costs()
        later = max(self.plan.folds_trained - k - 1, 0) * fold_s(c, MIN_EPOCHS_CURATED)
        return (self.deadline - c["oof_predict"] - (k + 1) * (c["test_predict"] + pseudo_s(c, self.plan.epochs_pseudo))
                - later)

    def fold_done(self, k: int) -> None:
        self.folds_done = k + 1

    def _replan_folds(self, k: int) -> Plan:
        """The folds from k on, fitted into the time left after test TTA for the k folds already trained."""
        req = self.requested

        def total_with(ep):
            def total(e1, e2, folds, passes):  # the folds trained so far still need their test TTA and pseudo round
                c = self.costs(passes)
                return self.folds_done * (c["test_predict"] + pseudo_s(c, ep)) + folds * fold_s(c, e2, ep)
            return total

        recipe = (0, req.epochs_curated, req.folds - k, req.tta_aug_passes)
        ep = fit_pseudo(req.pseudo_epochs, lambda p: total_with(p)(*recipe), self.remaining())
        _, e2, n, passes, notes = fit_recipe(*recipe, total_with(ep), self.remaining(), min_folds=1 if k == 0 else 0)
        c = self.costs(passes)
        kept = [(name, secs) for name, secs in self.plan.stages if not name.startswith("fold") and name != PSEUDO_STAGE]
        done = [(f"fold {j}", secs) for j, (name, secs) in enumerate(
            [st for st in self.plan.stages if st[0].startswith("fold")]) if j < k]
        stages = kept + done + [(f"fold {j}", fold_s(c, e2)) for j in range(k, k + n)]
        stages += [(PSEUDO_STAGE, (k + n) * pseudo_s(c, ep))] if ep else []
        return Plan(self.plan.epochs_noisy, e2, k + n, passes, self.plan.available_s, stages, self.plan.notes + [
            f"re-planned before fold {k} from measured times: {n} more fold(s) of {e2} epochs"
            + (f" ({'; '.join(notes)})" if notes else "")], ep)

    def pseudo_epochs(self, n_models: int) -> int:
        """Epochs of the pseudo-label round for each of `n_models` fold models, decided when stage 2 is over: the
        plan's, fewer when they no longer fit before the plain test pass, more (up to the requested number) when
        time is left; 0 when not even one epoch fits."""
        if n_models == 0 or self.requested.pseudo_epochs <= 0:
            return 0
        if self.deadline is None:
            return self.requested.pseudo_epochs
        planned, c = self.plan.epochs_pseudo, self.costs(0)
        epochs = fit_pseudo(self.requested.pseudo_epochs, lambda p: n_models * (c["test_predict"] + pseudo_s(c, p)),
                            self.remaining())
        if epochs != planned:
            self.plan.notes.append(f"pseudo-label round: {epochs} epochs per model (planned {planned}) fit the time "
                                   "left")
        self.plan.epochs_pseudo = epochs
        return epochs

    def pseudo_deadline(self, k: int, n_models: int) -> float | None:
        """Model k's pseudo-label epochs stop in time for the later models' one epoch each and the plain test pass."""
        if self.deadline is None:
            return None
        c = self.costs(0)
        return self.deadline - n_models * c["test_predict"] - (n_models - k - 1) * c["pseudo_epoch"]

    def test_passes(self, n_models: int) -> int:
        """Augmented TTA passes for the test set, decided when training is over: the plan's, fewer if they no longer
        fit, more (up to `tta_fill_passes`) when time is left over, so that time is not wasted."""
        planned = self.plan.tta_aug_passes
        if self.deadline is None or n_models == 0:
            return planned
        per_pass = n_models * self.costs(0)["test_predict"]
        fit = int(self.remaining() // max(per_pass, 1e-9)) - 2   # the plain pass, and one spare for the estimate
        passes = max(0, min(fit, max(planned, self.requested.tta_fill_passes)))
        if passes != planned:
            self.plan.notes.append(f"test TTA: {passes} augmented passes (planned {planned}) fit the time left")
        self.plan.tta_aug_passes = passes
        return passes


def apply_plan(cfg: Config, plan: Plan, **more) -> Config:
    """The config with the plan's epochs and TTA passes (and any `more` values): what the run actually uses."""
    return replace(cfg, **{**dict(epochs_noisy=plan.epochs_noisy, epochs_curated=plan.epochs_curated,
                                  pseudo_epochs=plan.epochs_pseudo, tta_aug_passes=plan.tta_aug_passes), **more})


def count_workload(cfg: Config, noisy, curated, test) -> Workload:
    """Clips and windows of each stage, from the decoded stores (noisy may be None)."""
    def windows(store, idx):
        return len(WindowDataset(store, idx, cfg.crop_frames, cfg.tta_step_frac)) if len(idx) else 0

    noisy_ok = np.flatnonzero(noisy.ok) if noisy is not None else np.array([], dtype=int)
    n_hold = max(1, int(round(len(noisy_ok) * cfg.noisy_holdout))) if len(noisy_ok) else 0
    return Workload(noisy_train=len(noisy_ok) - n_hold, noisy_holdout_windows=windows(noisy, noisy_ok[:n_hold]),
                    curated=int(curated.ok.sum()), curated_windows=windows(curated, np.flatnonzero(curated.ok)),
                    test_windows=windows(test, np.flatnonzero(test.ok)), test_clips=int(test.ok.sum()),
                    noisy_windows=windows(noisy, noisy_ok) if cfg.select_noisy else 0)
