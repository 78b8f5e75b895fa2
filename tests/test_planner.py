"""The planner's arithmetic for several devices, re-planning and mixed precision, each guarantee held by a test that
fails with a one-line bug an audit planted in it (the bugs: the commit that added this file). Pure arithmetic on a
fake clock, and callbacks on stand-in learners: no training, no GPU."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

import fattag.budget as budget_mod
import fattag.callbacks as callbacks
from fattag.budget import Budget
from fattag.callbacks import EpochPlan
from fattag.config import make_config
from fattag.cost import Throughput, Workload, fold_s, plan_run, pseudo_s, stage_costs
from fattag.precision import DeviceMixedPrecision, amp_dtype, grad_scaler
from fattag.stages import ROUND_STAGE

WORK = Workload(noisy_train=950, noisy_holdout_windows=150, curated=500, curated_windows=1500, test_windows=1500,
                test_clips=500, noisy_clips=1000)
FAST = Throughput(1 / 2000, 1 / 8000, "fast")
TWO = dataclasses.replace(FAST, devices=2)


class Clock:
    """time.time() that moves only when told to."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """The budget's clock, fixed at 0 until a test moves it."""
    c = Clock()
    monkeypatch.setattr(budget_mod.time, "time", c)
    return c


def cpu(*sets: str):
    """The cpu preset without the pseudo-label round (unless asked for), with `sets`."""
    return make_config("cpu", sets=["pseudo_epochs=0", *sets])


def started(cfg, seconds: float, tp: Throughput = FAST) -> Budget:
    """A Budget of `seconds` from now (the fixed clock), started on WORK at throughput `tp`."""
    b = Budget(cfg, budget_mod.time.time() + seconds)
    b.start(WORK, tp)
    return b


# ---------------------------------------------------------------- the cost model


def test_out_of_fold_and_test_predictions_are_priced_per_window_and_pass():
    """A fold's OOF predictions: a centre crop per clip, then its windows once plain and once per augmented pass;
    the test TTA: every test window once plain and once per pass."""
    cfg = cpu()                                  # 3 folds
    infer = 1 / 8000 * 1.15                      # the measured inference time, with the overhead
    for passes in (0, 2):
        c = stage_costs(cfg, WORK, FAST, passes)
        assert c["oof_predict"] == pytest.approx((500 / 3 + 1500 / 3 * (1 + passes)) * infer)
        assert c["test_predict"] == pytest.approx(1500 * (1 + passes) * infer)
        assert c["teacher_predict"] == pytest.approx(1500 * infer)


def test_measured_kinds_price_themselves_test_tta_follows_oof_and_the_rest_their_mean():
    """Measured work rescales its own kind; test TTA follows the measured OOF prediction; kinds not measured yet
    follow the geometric mean of the measured ratios."""
    cfg = cpu()
    base = stage_costs(cfg, WORK, FAST, 0)
    c = stage_costs(cfg, WORK, FAST, 0, scale={"oof_predict": 4.0, "fold_epoch": 0.25})
    assert c["oof_predict"] == pytest.approx(4 * base["oof_predict"])
    assert c["fold_epoch"] == pytest.approx(0.25 * base["fold_epoch"])
    assert c["test_predict"] == pytest.approx(4 * base["test_predict"])           # windows through the model
    assert c["noisy_epoch"] == pytest.approx(base["noisy_epoch"])                 # sqrt(4 * 0.25) = 1
    slow = stage_costs(cfg, WORK, FAST, 0, scale={"fold_epoch": 3.0})
    assert slow["pseudo_epoch"] == pytest.approx(3 * base["pseudo_epoch"])        # one measured kind: its ratio


def test_a_cut_never_raises_epochs_above_the_requested_number():
    """The floors (3 fold epochs, 1 stage-1 epoch) apply only to recipes that ask for more: a recipe of 2 fold
    epochs cut to fit stays at 2."""
    cfg = cpu("curated.epochs=2")
    need = plan_run(cfg, WORK, FAST, None).total_s
    plan = plan_run(cfg, WORK, FAST, 0.5 * need)
    assert plan.epochs_curated == 2 and plan.epochs_noisy < cfg.noisy.epochs
    assert any("epochs cut" in n for n in plan.notes)


def test_the_pseudo_label_round_is_planned_in_rounds_of_the_devices(clock):
    """The plan's row for the round: one model's labelling pass and epochs per round of devices (3 folds on 2
    devices: 2 rounds), in the first plan and after a re-plan before a later fold."""
    cfg = cpu("pseudo_epochs=10")
    for tp, n_rounds in ((FAST, 3), (TWO, 2)):
        plan = plan_run(cfg, WORK, tp, None)
        c = stage_costs(cfg, WORK, tp, plan.tta_aug_passes)
        assert dict(plan.stages)[ROUND_STAGE] == pytest.approx(n_rounds * pseudo_s(c, 10))
    b = started(cfg, 10_000)
    b.fold_done(0, 30)
    b.epochs_for(1)
    assert b.planned(ROUND_STAGE) == pytest.approx(3 * pseudo_s(b.costs(), 10))   # the trained fold's model too


# ---------------------------------------------------------------- re-planning stage 1 and the folds


def test_the_even_fold_cap_is_twice_the_shortest_of_every_trained_fold(clock):
    """A fold gets at most twice the epochs of the shortest fold trained so far: not the longest, first or last."""
    b = started(cpu("folds=4"), 10_000)
    for k, epochs in enumerate((20, 6, 14)):   # fold 1 was cut short; the shortest is neither first nor last
        b.fold_done(k, epochs)
    assert b.epochs_for(3) == 12 and b.plan.epochs_curated == 12
    assert any("fold 3: 30 -> 12 epochs, twice the shortest" in n for n in b.plan.notes)


def test_epoch_plan_hands_the_replan_its_fastest_epoch_so_far(monkeypatch):
    """Stage 1 is re-planned from its fastest epoch (contention only slows an epoch down), not its last or first."""
    clock = Clock(100.0)
    monkeypatch.setattr(callbacks.time, "time", clock)
    seen = []
    plan = EpochPlan(10, replan=lambda done, fastest: seen.append((done, fastest)) or 10)
    plan.learn = SimpleNamespace(epoch=0, n_epoch=10, iter=0, n_iter=1, training=True, pct_train=0.0, resume_epoch=0)
    plan.before_fit()
    for epoch, seconds in enumerate((30.0, 10.0, 50.0, 20.0)):
        plan.learn.epoch = epoch
        plan.before_epoch()
        clock.now += seconds
        plan.after_epoch()
    assert seen == [(1, 30.0), (2, 10.0), (3, 10.0), (4, 10.0)]
    assert plan.seconds == [30.0, 10.0, 50.0, 20.0]


def test_a_stage1_replan_counts_the_epochs_already_run_as_spent(clock):
    """After `done` epochs that ran as priced, the re-plan prices the whole stage, the epochs run included, against
    the time left plus the time they took: a recipe that just fitted still fits (nothing is cut), and it is cut
    when the epochs ran slower than priced."""
    cfg = cpu()
    need = plan_run(cfg, WORK, FAST, None).total_s          # the whole requested recipe
    b = started(cfg, 1.01 * need)
    full = cfg.noisy.epochs
    assert b.plan.epochs_noisy == full
    epoch = b.costs()["noisy_epoch"]
    clock.now += 10 * epoch                                  # ten epochs, each exactly as priced
    assert b.replan_stage1(10, epoch) == full and b.plan.epochs_noisy == full
    assert not any("re-planned" in n for n in b.plan.notes)
    assert 10 <= b.replan_stage1(10, 1.5 * epoch) < full    # slower than priced: cut
    assert b.replan_stage1(10, 100 * epoch) == 10            # far slower: no more epochs, never fewer than run


def test_a_stage1_replan_does_not_price_noisy_clip_selection_again(clock):
    """Selection ran before stage 1: the re-plan after stage 1's epochs leaves its cost out."""
    cfg = cpu("select_noisy=true", "select_epochs=20")
    w = dataclasses.replace(WORK, noisy_windows=3000)
    plain = cpu()
    need = plan_run(plain, w, FAST, None).total_s            # the recipe without selection
    b = Budget(cfg, 1.01 * need)
    b.start(w, FAST)
    epoch = b.costs()["noisy_epoch"]
    clock.now += 10 * epoch
    assert b.costs()["select"] > 0.05 * need                 # selection is not a rounding error
    assert b.replan_stage1(10, epoch) == cfg.noisy.epochs     # what is left fits without it


# ---------------------------------------------------------------- two devices


def test_with_two_devices_stage1_leaves_the_folds_their_rounds(clock):
    """Stage 1 stops in time for the folds in rounds of two (3 folds: 2 rounds), and selection before it for stage 1
    as well."""
    b = started(cpu(), 10_000, TWO)
    c, p = b.costs(), b.plan
    assert p.folds_trained == 3
    fold = fold_s(c, p.epochs_curated)
    assert b.deadline - b.stage1_deadline() == pytest.approx(2 * fold)
    assert b.deadline - b.select_deadline() == pytest.approx(2 * fold + p.epochs_noisy * c["noisy_epoch"])


def test_a_fold_replan_leaves_the_trained_folds_their_test_tta(clock):
    """Before fold 2, the two folds trained are counted: 3 models' test TTA come after fold 2, not 1."""
    cfg = cpu("tta_aug_passes=0")
    b = started(cfg, 10_000)
    c = b.costs(0)
    fold = 30 * c["fold_epoch"] + c["oof_predict"]
    b.fold_done(0, 30)
    b.fold_done(1, 30)
    b.deadline = clock.now + fold + 3.02 * c["test_predict"]
    assert b.epochs_for(2) == 30
    b.deadline = clock.now + fold + 2.5 * c["test_predict"]
    assert b.epochs_for(2) < 30


def test_with_two_devices_a_fold_replan_counts_the_other_ranks_earlier_folds(clock):
    """Rank 0 re-plans fold 2 after its fold 0 with fold 1 (rank 1's) counted as trained: 3 models' test TTA take
    2 rounds after fold 2, not 1."""
    cfg = cpu("tta_aug_passes=0")
    b = started(cfg, 10_000, TWO)
    c = b.costs(0)
    fold = 30 * c["fold_epoch"] + c["oof_predict"]
    b.fold_done(0, 30)
    b.deadline = clock.now + fold + 2.02 * c["test_predict"]    # fold 2 and two rounds of test TTA: all 30 epochs
    assert b.epochs_for(2) == 30
    b.deadline = clock.now + fold + 1.5 * c["test_predict"]     # one round would fit, two do not: cut
    assert b.epochs_for(2) < 30


def test_with_two_devices_each_rank_leaves_time_only_for_its_own_later_pseudo_label_models(clock):
    """4 models on 2 ranks: each rank labels, trains and predicts 2; model k stops for its rank's later model (one
    epoch each) and its rank's 2 plain test passes, not all 4 models'."""
    b = started(cpu("pseudo_epochs=10", "folds=4"), 10_000, TWO)
    c = b.costs(0)
    for k, later in ((0, 1), (1, 1), (2, 0), (3, 0)):   # folds 0, 1 in the first round, 2, 3 in the second
        assert b.deadline - b.pseudo_deadline(k, 4) == pytest.approx(2 * c["test_predict"] + later * c["pseudo_epoch"])


def test_with_two_devices_the_round_and_the_test_passes_are_priced_by_rounds(clock):
    """When training is over, 4 models on 2 devices take 2 rounds: the pseudo-label epochs and the augmented test
    passes that fit are those of 2 models, not 4."""
    b = started(cpu("pseudo_epochs=10", "folds=4", "tta_fill_passes=3"), 10_000, TWO)
    c = b.costs(0)
    fixed = 2 * (c["test_predict"] + c["teacher_predict"])
    b.deadline = clock.now + fixed + 4.5 * 2 * c["pseudo_epoch"]      # 4 epochs of each rank's 2 models fit
    assert b.pseudo_epochs(4) == 4
    b.deadline = clock.now + 3.5 * 2 * c["test_predict"]             # the plain pass, one augmented one, one spare
    assert b.test_passes(4) == 1


# ---------------------------------------------------------------- mixed precision


def test_float16_on_cuda_trains_with_loss_scaling_and_bfloat16_and_float32_without(monkeypatch):
    """float16's narrow range needs the loss scaled: on CUDA (kaggle-1h's `auto`) the callback that training adds
    installs an enabled GradScaler and float16 autocast; bfloat16 and float32 get a disabled one. The GPU is faked
    as far as torch's availability checks go: nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dtype = amp_dtype(make_config("kaggle-1h"), "cuda")
    assert dtype is torch.float16
    assert grad_scaler("cuda", dtype).is_enabled()
    assert not grad_scaler("cuda", torch.bfloat16).is_enabled() and not grad_scaler("cuda", None).is_enabled()

    def installed(dtype, device):
        cb = DeviceMixedPrecision(dtype)
        cb.learn = SimpleNamespace(dls=SimpleNamespace(device=torch.device(device)))
        cb.before_fit()
        return cb.learn.scaler, cb.autocast

    scaler, cast = installed(torch.float16, "cuda")
    assert scaler.is_enabled() and (cast.device, cast.fast_dtype, cast._enabled) == ("cuda", torch.float16, True)
    scaler, cast = installed(torch.bfloat16, "cpu")
    assert not scaler.is_enabled() and (cast.device, cast.fast_dtype, cast._enabled) == ("cpu", torch.bfloat16, True)
