"""Budget: the run's time plan while it runs: what each stage may spend, when each must stop, and re-planning.

It starts from the requested recipe (`Plan.requested`); once the throughput is measured (`start`) it plans with
the cost model (cost.py), and after every stage it re-plans the work still to do from the seconds that stage really
took, upward as well as downward: epochs and folds that were cut come back when the stages run faster than
predicted, and go when they run slower. It never plans more than the requested recipe. Without a deadline every
step gets the requested recipe and no deadline, so the steps never ask whether there is a budget.

With N devices (`Throughput.devices`) each rank keeps its own Budget for the folds it trains, in rounds of N
(which rank trains which fold, and in which round: stages.fold_rank, stages.fold_round); rank 0's plan is shared
after the throughput is measured and after stage 1, and the decisions taken when all ranks meet (pseudo-label
epochs, test passes) are rank 0's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from .config import Config
from .cost import (MIN_EPOCHS_CURATED, Plan, Throughput, Workload, fit_pseudo, fold_s, plan_run, pseudo_s,
                   replan_folds, stage_costs)
from .stages import fold_round, holdout_size, round_start, rounds

log = logging.getLogger("fattag")


class Budget:
    """The plan of one run, from the requested recipe and a deadline (a wall-clock time, or None: no budget)."""

    def __init__(self, requested: Config, deadline: float | None = None):
        self.requested, self.deadline = requested, deadline
        self.workload = Workload(0, 0, 0, 0, 0)
        self.tp = Throughput(0.0, 0.0, "not measured")
        self.scale: dict = {}               # measured / predicted seconds, per kind of work done so far
        self.folds_done = 0
        self.fold_epochs: list = []         # epochs each trained fold ran
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

    def rounds(self, n: int) -> int:
        """Rounds of side-by-side work that `n` folds (or models) take on this run's devices."""
        return rounds(n, self.tp.devices)

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
        return self.deadline - self.rounds(self.plan.folds_trained) * fold_s(self.costs(), self.plan.epochs_curated,
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

    def replan_stage1(self, done: int, fastest_s: float) -> int:
        """Stage 1's epochs, re-planned after its `done`-th epoch from its fastest epoch so far (`fastest_s`): the
        throughput measured before training may have been slowed by another process, and stage 1 is the first
        stage whose real epochs show the machine's speed. The run is planned again from now, the epochs done
        counted as spent; more epochs come back (up to the requested number) when the machine is faster than
        measured, and go when it is slower."""
        self.measured("noisy_epoch", fastest_s, 1)
        if self.deadline is None:
            return self.plan.epochs_noisy
        cost = self.costs()["noisy_epoch"]
        start = replace(self.requested, select_noisy=False)   # selection, where it ran, is done
        plan = plan_run(start, self.workload, self.tp, self.remaining() + done * cost, self.scale)
        epochs = max(plan.epochs_noisy, done)
        if epochs != self.plan.epochs_noisy:
            note = (f"stage 1 re-planned after epoch {done} ({fastest_s:.1f} s at its fastest): "
                    f"{self.plan.epochs_noisy} -> {epochs} epochs")
            self.plan = replace(plan, epochs_noisy=epochs, notes=(*self.plan.notes, note))
            log.info("time budget: %s", note)
        return epochs

    def epochs_for(self, k: int) -> int:
        """Re-plan folds k.. from the time left, and return fold k's epochs (0: no time for fold k). A fold gets
        at most twice the epochs of the shortest fold trained so far, so that the ensemble's members stay
        comparable; the time that frees goes to the pseudo-label round and the test passes. With N devices the
        re-plan starts at fold k's round, the folds of earlier rounds counted as trained."""
        start = round_start(k, self.tp.devices)
        done = self.folds_done if self.tp.devices == 1 else start   # the other ranks' folds are not known here
        self.plan = replan_folds(self.requested, self.workload, self.tp, self.scale, self.plan, start, done,
                                 self.remaining())
        even = 2 * min(self.fold_epochs) if self.fold_epochs else self.plan.epochs_curated
        if self.plan.epochs_curated > even:
            self._note(f"fold {k}: {self.plan.epochs_curated} -> {even} epochs, twice the shortest fold's",
                       epochs_curated=even)
        return self.plan.epochs_curated if k < self.plan.folds_trained else 0

    def fold_deadline(self, k: int) -> float | None:
        """Fold k trains until: the deadline, less its OOF predictions, test TTA and the pseudo-label round for the
        k + 1 models trained by then, and the planned later folds at their floor."""
        if self.deadline is None:
            return None
        c, models = self.costs(), self.rounds(k + 1)
        later = max(self.rounds(self.plan.folds_trained) - models, 0) * fold_s(c, MIN_EPOCHS_CURATED)
        return (self.deadline - c["oof_predict"] - models * (c["test_predict"] + pseudo_s(c, self.plan.epochs_pseudo))
                - later)

    def fold_done(self, k: int, epochs_run: int) -> None:
        self.folds_done = k + 1
        self.fold_epochs.append(epochs_run)

    def pseudo_epochs(self, n_models: int) -> int:
        """Epochs of the pseudo-label round for each of `n_models` fold models, decided when stage 2 is over: the
        plan's, fewer when they no longer fit before the plain test pass, more (up to the requested number) when
        time is left; 0 when not even one epoch fits."""
        if n_models == 0 or self.requested.test_round_epochs <= 0:
            return 0
        if self.deadline is None:
            return self.requested.test_round_epochs
        planned, c = self.plan.epochs_pseudo, self.costs(0)
        epochs = fit_pseudo(self.requested.test_round_epochs,
                            lambda p: self.rounds(n_models) * (c["test_predict"] + pseudo_s(c, p)), self.remaining())
        if epochs != planned:
            self._note(f"pseudo-label round: {epochs} epochs per model (planned {planned}) fit the time left",
                       epochs_pseudo=epochs)
        return epochs

    def pseudo_deadline(self, k: int, n_models: int) -> float | None:
        """Model k's pseudo-label epochs stop in time for the later models' one epoch each and the plain test pass
        (with N devices: the later models of its rank, after fold k's round)."""
        if self.deadline is None:
            return None
        c, per_rank = self.costs(0), self.rounds(n_models)
        later = per_rank - fold_round(k, self.tp.devices) - 1
        return self.deadline - per_rank * c["test_predict"] - later * c["pseudo_epoch"]

    def usage(self, started: float) -> dict | None:
        """How the run used its budget (None without one): usable, used and unused seconds, why what is unused could
        not be used, and the plan's notes (what was cut or re-planned, and when)."""
        if self.deadline is None:
            return None
        usable, used = self.deadline - started, time.time() - started
        unused = max(usable - used, 0.0)
        req, plan = self.requested, self.plan
        whole = ((plan.epochs_noisy >= req.noisy.epochs or not self.workload.noisy_train)
                 and plan.epochs_curated >= req.curated.epochs and plan.folds_trained >= req.folds
                 and plan.epochs_pseudo >= req.test_round_epochs
                 and plan.tta_aug_passes >= max(req.tta_aug_passes, req.tta_fill_passes))
        if unused <= 0.05 * usable:
            why = "used up to the safety margin"
        elif whole:
            why = (f"the whole requested recipe ran, with the most augmented TTA passes (tta_fill_passes "
                   f"{req.tta_fill_passes}): there was nothing more to spend it on")
        else:
            why = "the work left after the last re-plan took less time than the plan priced it at"
        return dict(usable_s=round(usable, 1), used_s=round(used, 1), unused_s=round(unused, 1),
                    unused_share=round(unused / usable, 3), why=why, notes=list(plan.notes))

    def test_passes(self, n_models: int) -> int:
        """Augmented TTA passes for the test set, decided when training is over: the plan's, fewer if they no longer
        fit, more (up to `tta_fill_passes`) when time is left over, so that time is not wasted."""
        planned = self.plan.tta_aug_passes
        if self.deadline is None or n_models == 0:
            return planned
        per_pass = self.rounds(n_models) * self.costs(0)["test_predict"]
        fit = int(self.remaining() // max(per_pass, 1e-9)) - 2   # the plain pass, and one spare for the estimate
        passes = max(0, min(fit, max(planned, self.requested.tta_fill_passes)))
        if passes != planned:
            self._note(f"test TTA: {passes} augmented passes (planned {planned}) fit the time left",
                       tta_aug_passes=passes)
        return passes
