"""Budget: the run's time plan while it runs: what each stage may spend, when each must stop, and re-planning.

It starts from the requested recipe (`Plan.requested`); once the throughput is measured (`start`) it plans with
the cost model (cost.py), and after every stage it re-plans the work still to do from the seconds that stage really
took, upward as well as downward: epochs and folds that were cut come back when the stages run faster than
predicted, and go when they run slower. It never plans more than the requested recipe. Without a deadline every
step gets the requested recipe and no deadline, so the steps never ask whether there is a budget.
"""
from __future__ import annotations

import time
from dataclasses import replace

from .config import Config
from .cost import MIN_EPOCHS_CURATED, Plan, Workload, fit_pseudo, fold_s, plan_run, pseudo_s, replan_folds, stage_costs
from .throughput import Throughput
from .train import holdout_size


class Budget:
    """The plan of one run, from the requested recipe and a deadline (a wall-clock time, or None: no budget)."""

    def __init__(self, requested: Config, deadline: float | None = None):
        self.requested, self.deadline = requested, deadline
        self.workload = Workload(0, 0, 0, 0, 0)
        self.tp = Throughput(0.0, 0.0, "not measured")
        self.scale: dict = {}               # measured / predicted seconds, per kind of work done so far
        self.folds_done = 0
        self.plan = self.first_plan = Plan.requested(requested)

    def start(self, workload: Workload, tp: Throughput) -> Plan:
        """The first plan: the requested recipe priced with the measured throughput, cut to the time left."""
        self.workload, self.tp = workload, tp
        self.plan = self.first_plan = plan_run(self.requested, workload, tp, self.remaining())
        return self.plan

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def planned(self, stage: str) -> float | None:
        """The seconds the plan gives a stage (None: not planned)."""
        return dict(self.plan.stages).get(stage)

    def costs(self, passes: int | None = None) -> dict:
        passes = self.plan.tta_aug_passes if passes is None else passes
        return stage_costs(self.requested, self.workload, self.tp, passes, self.scale)

    def measured(self, kind: str, seconds: float, units: float) -> None:
        """Record that `units` of work of `kind` (e.g. 4 fold epochs) took `seconds`: later costs follow it."""
        predicted = stage_costs(self.requested, self.workload, self.tp, self.plan.tta_aug_passes)[kind] * units
        if units > 0 and predicted > 0 and seconds > 0:
            self.scale[kind] = seconds / predicted

    def _note(self, text: str, **changes) -> None:
        self.plan = replace(self.plan, notes=(*self.plan.notes, text), **changes)

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

    def noisy_kept(self, n_kept: int) -> None:
        """Selection kept `n_kept` noisy clips: stage 1 trains on fewer than counted, and its epochs cost less."""
        hold = holdout_size(n_kept, self.requested.noisy_holdout)
        self.workload = replace(self.workload, noisy_train=n_kept - hold, noisy_clips=n_kept)

    def epochs_for(self, k: int) -> int:
        """Re-plan folds k.. from the time left, and return fold k's epochs (0: no time for fold k)."""
        self.plan = replan_folds(self.requested, self.workload, self.tp, self.scale, self.plan, k, self.folds_done,
                                 self.remaining())
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
            self._note(f"pseudo-label round: {epochs} epochs per model (planned {planned}) fit the time left",
                       epochs_pseudo=epochs)
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
            self._note(f"test TTA: {passes} augmented passes (planned {planned}) fit the time left",
                       tta_aug_passes=passes)
        return passes
