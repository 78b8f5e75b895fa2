"""The guarantees a run makes, each held by a test a one-line bug would fail: stage 2 starts from stage 1's weights
(from scratch when stage 1 is skipped); the safety margin is kept; the deadline guard stops before an epoch that
would end past the deadline (a fake clock makes both exact); stage 1 is re-planned from its real epochs; folds stay
comparable; the budget says where its time went."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import CancelFitException

import fattag.budget as budget_mod
import fattag.callbacks as callbacks
import fattag.stage as stage
import fattag.train as train
from fattag.budget import Budget
from fattag.callbacks import Deadline, EpochPlan
from fattag.config import make_config
from fattag.context import Run
from fattag.cost import Throughput, Workload, stage_costs
from fattag.model import build_model
from fattag.splits import TrainingData
from fattag.submission import class_prior, fill_missing

WORK = Workload(noisy_train=950, noisy_holdout_windows=150, curated=500, curated_windows=1500, test_windows=1500,
                test_clips=500, noisy_clips=1000)


class Clock:
    """time.time() that moves only when told to."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_each_fold_starts_from_the_stage1_weights_and_from_scratch_without_them(stores, tmp_path, monkeypatch):
    cfg, data, curated, _ = stores
    d = TrainingData.make(data.classes, curated, None, cfg)
    torch.manual_seed(123)
    stage1 = build_model(cfg, len(data.classes), *d.stats).state_dict()
    started = {}

    def record_start(model, trn, val, spec, deadline=None):   # the weights each fold's training starts from
        started[spec.out_dir] = {k: v.clone() for k, v in model.state_dict().items()}
        return stage.StageResult(pd.DataFrame([[1, 0.5, 0.5, 0.5]], columns=stage.HISTORY_COLUMNS), 0.5, 1, 0.1, 1)

    monkeypatch.setattr(train, "fit_stage", record_start)
    run = Run(cfg, "demo", tmp_path, tmp_path / "warm", torch.device("cpu"))
    assert len(train.train_folds(run, d, stage1).models) == cfg.folds
    cold = Run(cfg, "demo", tmp_path, tmp_path / "cold", torch.device("cpu"))
    train.train_folds(cold, d, None)
    weights = [name for name, v in stage1.items() if v.dim() >= 2]   # randomly initialised: convolutions, linear
    for k in range(cfg.folds):
        warm, scratch = started[run.work_dir / f"fold{k}"], started[cold.work_dir / f"fold{k}"]
        assert warm.keys() == stage1.keys()
        assert all(torch.equal(warm[n], stage1[n]) for n in stage1), f"fold {k} did not start from stage 1"
        # without stage 1 a fold starts from its own seeded initial weights, not from stage 1's
        assert not any(torch.equal(scratch[n], stage1[n]) for n in weights), f"fold {k} started from stage 1"
    assert not all(torch.equal(started[cold.work_dir / "fold0"][n], started[cold.work_dir / "fold1"][n])
                   for n in weights)   # each fold its own seed


def test_the_safety_margin_is_kept_out_of_the_deadline():
    cfg = make_config("demo", sets=["time_budget=1000", "safety_margin=0.08"])
    run = Run(cfg, "demo", Path("."), Path("."), torch.device("cpu"), started=5000.0)
    assert run.deadline == pytest.approx(5000.0 + 920.0)
    assert run.budget.deadline == run.deadline
    assert Run(make_config("demo"), "demo", Path("."), Path("."), torch.device("cpu")).budget.deadline is None


def test_the_plan_fits_into_the_budget_less_its_margin(monkeypatch):
    cfg = make_config("kaggle-1h", sets=["time_budget=600", "safety_margin=0.25"])
    clock = Clock(10_000.0)
    monkeypatch.setattr(budget_mod.time, "time", clock)
    run = Run(cfg, "kaggle-1h", Path("."), Path("."), torch.device("cpu"), started=clock.now - 100)
    plan = run.budget.start(WORK, Throughput(1 / 100, 1 / 400, "x"))
    assert plan.available_s == pytest.approx(600 * 0.75 - 100)
    assert plan.total_s <= plan.available_s
    assert plan.epochs_curated < cfg.curated.epochs   # the recipe did not fit and was cut to the usable time


def _deadline_learn(epoch=0, n_epoch=10):
    return SimpleNamespace(epoch=epoch, n_epoch=n_epoch, resume_epoch=0)


def test_the_deadline_guard_stops_before_an_epoch_that_would_end_past_it(monkeypatch):
    clock = Clock(100.0)
    monkeypatch.setattr(callbacks.time, "time", clock)
    guard = Deadline(200.0)
    guard.learn = _deadline_learn()
    guard.before_epoch()            # an epoch from t=100 ...
    clock.now = 150.0               # ... took 50 s: another one ends at 200, exactly the deadline: it may start
    guard.after_epoch()
    guard.before_epoch()
    clock.now = 150.0 + 25.5        # 25.5 s: the next would end at 201 > 200: stop now
    with pytest.raises(CancelFitException):
        guard.after_epoch()


def test_the_deadline_guard_follows_a_deadline_that_moves(monkeypatch):
    clock, deadline = Clock(0.0), [100.0]
    monkeypatch.setattr(callbacks.time, "time", clock)
    guard = Deadline(lambda: deadline[0])
    guard.learn = _deadline_learn()
    guard.before_epoch()
    clock.now = 40.0
    guard.after_epoch()             # 80 <= 100
    deadline[0] = 70.0              # the budget re-planned: less time for this stage
    guard.before_epoch()
    clock.now = 56.0                # the next epoch would end at 72: past the new deadline, not the old one
    with pytest.raises(CancelFitException):
        guard.after_epoch()
    quiet = Deadline(None)
    quiet.learn = _deadline_learn()
    quiet.before_epoch()
    clock.now = 1e9
    quiet.after_epoch()             # no deadline: never stops


def test_epoch_plan_spreads_the_schedule_over_a_replanned_count():
    plan = EpochPlan(4, replan=lambda done, fastest: 2)
    plan.learn = SimpleNamespace(epoch=0, n_epoch=8, iter=0, n_iter=10, training=True, pct_train=0.0, resume_epoch=0)
    plan.before_fit()
    plan.before_epoch()
    plan.before_train()
    assert plan.learn.pct_train == 0.0
    plan.learn.iter = 4
    plan.after_batch()
    assert plan.learn.pct_train == pytest.approx(0.5 / 4)   # half of epoch 1 of 4
    plan.after_epoch()              # re-planned to 2: the stage ends after epoch 2
    assert plan.epochs == 2 and plan.learn.epochs_planned == 2
    plan.learn.epoch = 1
    plan.before_train()
    assert plan.learn.pct_train == pytest.approx(0.25)      # continuous: where epoch 1 of 4 left the schedule
    plan.learn.iter = 4
    plan.after_batch()
    assert plan.learn.pct_train == pytest.approx(0.25 + 0.75 * 0.5)   # the other 3/4 over the one epoch left
    plan.learn.iter = 9
    plan.after_batch()
    assert plan.learn.pct_train == pytest.approx(1.0)
    with pytest.raises(CancelFitException):
        plan.after_epoch()
    longer = EpochPlan(2, replan=lambda done, fastest: 6)   # more epochs: the rest stretched, never a step back
    longer.learn = SimpleNamespace(epoch=0, n_epoch=8, iter=9, n_iter=10, training=True, pct_train=0.0,
                                   resume_epoch=0)
    longer.before_fit()
    longer.before_epoch()
    longer.after_epoch()
    longer.learn.epoch = 1
    longer.before_train()
    assert longer.epochs == 6 and longer.learn.pct_train == pytest.approx(0.5)
    longer.learn.iter = 4
    longer.after_batch()
    assert longer.learn.pct_train == pytest.approx(0.5 + 0.5 * 0.5 / 5)
    # without a re-plan and with the plan equal to fastai's own count, fastai's schedule is left alone
    same = EpochPlan(8)
    same.learn = SimpleNamespace(epoch=3, n_epoch=8, iter=2, n_iter=10, training=True, pct_train=0.123, resume_epoch=0)
    same.before_train()
    same.after_batch()
    assert same.learn.pct_train == 0.123
    same.before_epoch()
    same.after_epoch()


def _budget(clock, budget_s=600.0, epochs_noisy=30):
    cfg = make_config("cpu", sets=[f"time_budget={budget_s}", f"noisy.epochs={epochs_noisy}", "pseudo_epochs=0"])
    b = Budget(cfg, clock.now + budget_s * (1 - cfg.safety_margin))
    return b


def _measured(monkeypatch, tp: Throughput):
    """A 600-s budget planned from throughput `tp` on a fake clock: (budget, clock, a stage-1 epoch as priced)."""
    clock = Clock(0.0)
    monkeypatch.setattr(budget_mod.time, "time", clock)
    b = _budget(clock)
    b.start(WORK, tp)
    return b, clock, stage_costs(b.requested, WORK, tp, 0)["noisy_epoch"]


def test_stage1_comes_back_when_its_real_epochs_beat_a_contended_measurement(monkeypatch):
    b, clock, priced = _measured(monkeypatch, Throughput(1 / 20, 1 / 80, "measured while another process ran"))
    assert b.plan.epochs_noisy < 30   # the slow measurement cut stage 1
    quiet_epoch = priced / 20         # the machine is 20x faster
    clock.now += quiet_epoch
    assert b.replan_stage1(1, quiet_epoch) == 30          # all the requested epochs fit now
    assert any("stage 1 re-planned" in n for n in b.plan.notes)
    assert b.plan.epochs_curated == b.requested.curated.epochs


def test_stage1_is_cut_when_its_real_epochs_are_slower_than_measured(monkeypatch):
    b, clock, priced = _measured(monkeypatch, Throughput(1 / 2000, 1 / 8000, "fast"))
    assert b.plan.epochs_noisy == 30
    slow_epoch = priced * 40
    clock.now += slow_epoch
    epochs = b.replan_stage1(1, slow_epoch)
    assert 1 <= epochs < 30
    assert b.replan_stage1(5, slow_epoch) >= 5            # never fewer than the epochs already run
    assert Budget(b.requested).replan_stage1(3, 1.0) == 30   # no deadline: the requested recipe


def test_no_fold_gets_more_than_twice_the_shortest_folds_epochs(monkeypatch):
    clock = Clock(0.0)
    monkeypatch.setattr(budget_mod.time, "time", clock)
    b = _budget(clock, budget_s=10_000.0)
    b.start(WORK, Throughput(1 / 2000, 1 / 8000, "fast"))
    b.fold_done(0, 6)               # fold 0 ran 6 epochs (e.g. cut by a slow start)
    assert b.epochs_for(1) == 12
    assert any("twice the shortest" in n for n in b.plan.notes)
    unlimited = Budget(b.requested)
    unlimited.fold_done(0, 30)
    assert unlimited.epochs_for(1) == 30


def test_the_budget_says_where_its_time_went(monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(budget_mod.time, "time", clock)
    b = _budget(clock, budget_s=1000.0)
    b.start(WORK, Throughput(1 / 2000, 1 / 8000, "fast"))
    clock.now = 1000.0 + 400.0
    use = b.usage(started=1000.0)
    assert use["usable_s"] == pytest.approx(920.0) and use["used_s"] == pytest.approx(400.0)
    assert use["unused_s"] == pytest.approx(520.0) and use["unused_share"] == pytest.approx(520 / 920, abs=1e-3)
    assert "nothing more to spend it on" not in use["why"]   # the recipe's TTA passes were not filled
    b.test_passes(3)
    assert "nothing more to spend it on" in b.usage(started=1000.0)["why"]
    clock.now = 1000.0 + 900.0
    assert b.usage(started=1000.0)["why"] == "used up to the safety margin"
    assert Budget(b.requested).usage(started=0.0) is None


def test_every_clip_that_was_not_predicted_gets_the_class_prior():
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=np.float32)
    prior = class_prior(targets)
    assert np.allclose(prior, [0.75, 0.25, 1e-4])   # each class's share of the clips (a floor above 0)
    probs = np.array([[0.9, 0.1, 0.2], [np.nan, np.nan, np.nan], [0.3, 0.6, 0.1], [0.5, np.nan, 0.5]])
    ok = np.array([True, True, False, True])      # clip 2 could not be decoded; clips 1 and 3 hold NaN scores
    out = fill_missing(probs, ok, prior)
    assert np.allclose(out[0], probs[0])
    for row in (1, 2, 3):
        assert np.allclose(out[row], prior), f"clip {row} has no prior row"
    assert np.isnan(probs[1]).all()                # the input is left as it was


def test_with_test_audio_kept_out_the_missing_round_is_not_a_cut(monkeypatch):
    """train_on_test=false plans no round, whatever pseudo_epochs says: a run that ran everything else whole had
    nothing more to spend its time on (not a plan that priced its work too high)."""
    clock = Clock(1000.0)
    monkeypatch.setattr(budget_mod.time, "time", clock)
    cfg = make_config("cpu", sets=["time_budget=1000", "noisy.epochs=30", "pseudo_epochs=10", "train_on_test=false"])
    b = Budget(cfg, clock.now + 1000.0 * (1 - cfg.safety_margin))
    b.start(WORK, Throughput(1 / 2000, 1 / 8000, "fast"))
    b.test_passes(3)
    clock.now = 1000.0 + 400.0
    assert b.plan.epochs_pseudo == 0
    assert "nothing more to spend it on" in b.usage(started=1000.0)["why"]
