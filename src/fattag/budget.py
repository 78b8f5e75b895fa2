"""Time budget: measure what a training step and an inference window really cost here, then plan epochs.

Kaggle kills a kernel at its limit (FAT2019: 1 h on GPU) and DCASE 2019 teams were disqualified for running
over. So the run measures its own speed on a few warmed-up batches and fits the preset's recipe into what is
left of the budget, cutting in this order: epochs of both stages (proportionally, down to a floor), augmented
TTA passes, the number of folds trained, and finally stage 1. During training the plan is redone from the
measured epoch times, and a deadline guard stops training early so test inference always fits.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .config import Config
from .features import WindowDataset
from .model import build_model

OVERHEAD = 1.15          # data loading, callbacks and logging on top of the measured model time
MIN_EPOCHS_CURATED = 3   # fewer than this and a fold model is little better than stage 1 alone
MIN_EPOCHS_NOISY = 1


@dataclass
class Throughput:
    train_s_per_clip: float     # forward + backward + optimiser step, per training crop
    infer_s_per_window: float   # forward pass, per inference window
    device: str

    def describe(self) -> str:
        return (f"{self.device}: training {1 / self.train_s_per_clip:.0f} clips/s, "
                f"inference {1 / self.infer_s_per_window:.0f} windows/s")


def measure_throughput(cfg: Config, n_classes: int, device, steps: int = 3, warmup: int = 2) -> Throughput:
    """Time a few training steps and inference batches of the real model on random input of the crop size."""
    device = torch.device(device)
    model = build_model(cfg, n_classes).to(device)
    bs = cfg.batch_size
    x = torch.randn(bs, 1, cfg.n_mels, cfg.crop_frames, device=device).half()
    y = (torch.rand(bs, n_classes, device=device) < 0.05).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def timed(fn, n):
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    model.train()
    t_train = timed(train_step, steps) / bs
    model.eval()
    xi = torch.cat([x, x])

    def infer():
        with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
            model(xi)

    t_infer = timed(infer, steps) / len(xi)
    return Throughput(t_train, t_infer, str(device))


@dataclass
class Workload:
    """Sizes the plan depends on, counted from the decoded stores."""
    noisy_train: int            # stage-1 training clips (0 = no stage 1)
    noisy_holdout_windows: int  # stage-1 validation windows per epoch
    curated: int                # decodable curated clips
    curated_windows: int        # whole-clip windows over all curated clips
    test_windows: int           # whole-clip windows over all test clips


@dataclass
class Plan:
    epochs_noisy: int
    epochs_curated: int
    folds_trained: int
    tta_aug_passes: int
    available_s: float
    stages: list = field(default_factory=list)   # (stage name, planned seconds)
    notes: list = field(default_factory=list)    # what was cut, and why
    predict_test_s: float = 0.0                  # test inference per fold model, kept free by the deadline guard

    @property
    def total_s(self) -> float:
        return sum(s for _, s in self.stages)

    @property
    def folds_s(self) -> float:
        """Planned seconds of all stage-2 folds: stage 1 must stop in time to leave them this much."""
        return sum(s for name, s in self.stages if name.startswith("fold"))

    def table(self) -> str:
        rows = [f"{'stage':<22}{'planned':>10}"]
        rows += [f"{name:<22}{secs:>9.0f}s" for name, secs in self.stages]
        rows.append(f"{'total':<22}{self.total_s:>9.0f}s  (available {self.available_s:.0f}s)")
        head = (f"plan: stage 1 {self.epochs_noisy} epochs, stage 2 {self.epochs_curated} epochs x "
                f"{self.folds_trained} folds, {self.tta_aug_passes} augmented TTA passes")
        return "\n".join([head, *rows, *self.notes])


def stage_costs(cfg: Config, w: Workload, tp: Throughput, passes: int) -> dict:
    """Seconds per unit of work: one stage-1 epoch, one fold epoch, and the fixed per-fold prediction work."""
    k = cfg.folds
    infer = tp.infer_s_per_window * OVERHEAD
    train = tp.train_s_per_clip * OVERHEAD
    per_fold_windows = w.curated_windows / k
    return dict(
        noisy_epoch=w.noisy_train * train + w.noisy_holdout_windows * infer,
        fold_epoch=w.curated * (k - 1) / k * train + per_fold_windows * infer,
        # OOF: centre crop + windows (+ augmented passes); test: windows x (1 + passes)
        fold_predict=(w.curated / k + per_fold_windows * (1 + passes)) * infer + w.test_windows * (1 + passes) * infer,
    )


def _total(cfg, w, tp, e1, e2, folds, passes) -> float:
    c = stage_costs(cfg, w, tp, passes)
    return e1 * c["noisy_epoch"] + folds * (e2 * c["fold_epoch"] + c["fold_predict"])


def plan_run(cfg: Config, w: Workload, tp: Throughput, available_s: float | None) -> Plan:
    """Fit the preset's epochs, TTA passes and folds into `available_s` seconds (None: no budget, no cuts)."""
    e1 = cfg.epochs_noisy if w.noisy_train else 0
    e2, folds, passes = cfg.epochs_curated, cfg.folds, cfg.tta_aug_passes
    notes = []
    if available_s is not None:
        def fits(a, b, f, p):
            return _total(cfg, w, tp, a, b, f, p) <= available_s

        if not fits(e1, e2, folds, passes):
            # largest common scale of both stages' epochs that fits, above their floors
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = (lo + hi) / 2
                a, b = _scaled(e1, mid, MIN_EPOCHS_NOISY), _scaled(e2, mid, MIN_EPOCHS_CURATED)
                lo, hi = (mid, hi) if fits(a, b, folds, passes) else (lo, mid)
            a, b = _scaled(e1, lo, MIN_EPOCHS_NOISY), _scaled(e2, lo, MIN_EPOCHS_CURATED)
            if fits(a, b, folds, passes):
                notes.append(f"epochs cut to fit the budget: stage 1 {e1} -> {a}, stage 2 {e2} -> {b}")
                e1, e2 = a, b
            else:
                e1, e2 = _scaled(e1, 0, MIN_EPOCHS_NOISY), min(e2, MIN_EPOCHS_CURATED)
                if passes and not fits(e1, e2, folds, passes):
                    notes.append(f"augmented TTA passes cut {passes} -> 0")
                    passes = 0
                while folds > 1 and not fits(e1, e2, folds, passes):
                    folds -= 1
                if folds < cfg.folds:
                    notes.append(f"only {folds} of {cfg.folds} folds fit the budget (the others are not trained)")
                if e1 and not fits(e1, e2, folds, passes):
                    notes.append("stage 1 dropped: it does not fit the budget")
                    e1 = 0
                notes.append(f"epochs at their floor: stage 1 {e1}, stage 2 {e2}")
                if not fits(e1, e2, folds, passes):
                    notes.append("WARNING: even the smallest plan exceeds the budget; the deadline guard will "
                                 "stop training early")
    c = stage_costs(cfg, w, tp, passes)
    stages = []
    if e1:
        stages.append(("stage 1 (noisy)", e1 * c["noisy_epoch"]))
    stages += [(f"fold {k}", e2 * c["fold_epoch"] + c["fold_predict"]) for k in range(folds)]
    test_s = w.test_windows * (1 + passes) * tp.infer_s_per_window * OVERHEAD
    return Plan(e1, e2, folds, passes, float("inf") if available_s is None else available_s, stages, notes, test_s)


def _scaled(epochs: int, scale: float, floor: int) -> int:
    if epochs <= 0:
        return 0
    return max(min(floor, epochs), int(math.floor(epochs * scale)))


def replan_fold_epochs(remaining_s: float, folds_left: int, epoch_s: float, fixed_s: float, planned: int) -> int:
    """Epochs per remaining fold from measured times: the planned number, or fewer when behind (at least 1)."""
    if folds_left <= 0:
        return planned
    per_fold = remaining_s / folds_left - fixed_s
    fit = int(per_fold // max(epoch_s, 1e-9))
    return max(1, min(planned, fit))


def apply_plan(cfg: Config, plan: Plan) -> Config:
    return replace(cfg, epochs_noisy=plan.epochs_noisy, epochs_curated=plan.epochs_curated,
                   tta_aug_passes=plan.tta_aug_passes)


def count_workload(cfg: Config, noisy, curated, test) -> Workload:
    """Clips and windows of each stage, from the decoded stores (noisy may be None)."""
    def windows(store, idx):
        return len(WindowDataset(store, idx, cfg.crop_frames, cfg.tta_step_frac)) if len(idx) else 0

    noisy_ok = np.flatnonzero(noisy.ok) if noisy is not None else np.array([], dtype=int)
    n_hold = max(1, int(round(len(noisy_ok) * cfg.noisy_holdout))) if len(noisy_ok) else 0
    return Workload(noisy_train=len(noisy_ok) - n_hold, noisy_holdout_windows=windows(noisy, noisy_ok[:n_hold]),
                    curated=int(curated.ok.sum()), curated_windows=windows(curated, np.flatnonzero(curated.ok)),
                    test_windows=windows(test, np.flatnonzero(test.ok)))
