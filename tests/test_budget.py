"""Time budget planner, deadline guard, resume after a kill, NaN survival."""
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time

from unittest.mock import patch

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from conftest import REPO, RUN, TINY, run_pipeline
from fattag.budget import Budget
from fattag.config import make_config, parse_duration, with_settings
from fattag.cost import MIN_EPOCHS_CURATED, Plan, Throughput, Workload, count_workload, plan_run, stage_costs
from fattag.data import ClipTable, load_dataset
from fattag.features import Clips, MelStore, build_store, window_starts
from fattag.model import build_model
from fattag.submission import validate_submission
from fattag.stage import StageSpec, fit_stage

FAT2019 = Workload(noisy_train=18800, noisy_holdout_windows=4000, curated=4970, curated_windows=15000,
                   test_windows=15000, noisy_clips=19790)


def test_parse_duration():
    assert parse_duration("3600") == 3600 and parse_duration("55m") == 3300 and parse_duration("1h") == 3600
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_a_share_of_one_or_more_is_a_clear_error():
    assert make_config("cpu", sets=["noisy.top_up=0.5"]).noisy.top_up == 0.5
    for name in ("noisy.top_up", "curated.top_up"):
        for bad in ("1", "1.5", "-0.1"):
            with pytest.raises(ValueError, match=re.escape(name)):
                make_config("cpu", sets=[f"{name}={bad}"])


def test_no_budget_keeps_the_preset():
    cfg = make_config("kaggle-1h")
    plan = plan_run(cfg, FAT2019, Throughput(1e-3, 1e-4, "x"), None)
    assert (plan.epochs_noisy, plan.epochs_curated, plan.folds_trained) == (cfg.noisy.epochs, cfg.curated.epochs, 5)
    assert (plan.epochs_noisy, plan.epochs_curated) == (15, 25)


def test_a_slower_step_makes_the_planner_shrink_epochs():
    cfg = make_config("kaggle-1h")
    fast = plan_run(cfg, FAT2019, Throughput(1 / 1500, 1 / 6000, "fast"), 3000)
    slow = plan_run(cfg, FAT2019, Throughput(1 / 200, 1 / 800, "slow"), 3000)
    assert fast.total_s <= 3000 and slow.total_s <= 3000
    assert slow.epochs_curated < fast.epochs_curated or slow.epochs_noisy < fast.epochs_noisy
    assert slow.folds_trained == 5 and any("epochs cut" in n for n in slow.notes)
    crawl = plan_run(cfg, FAT2019, Throughput(1 / 20, 1 / 80, "crawl"), 3000)  # a CPU: folds go, then stage 1
    assert crawl.folds_trained < 5 and crawl.total_s <= 3000
    hopeless = plan_run(cfg, FAT2019, Throughput(1 / 2, 1 / 8, "hopeless"), 3000)
    assert hopeless.folds_trained == 1 and hopeless.epochs_noisy == 0 and "WARNING" in "\n".join(hopeless.notes)
    assert "plan:" in crawl.table()


def _budget(tp, seconds, cfg=None):
    cfg = cfg or make_config("kaggle-1h")
    b = Budget(cfg, time.time() + seconds)
    b.start(FAT2019, tp)
    return b


def test_budget_replans_upward_when_stages_run_faster_than_measured():
    """A pessimistic measurement cuts folds; once the stages are seen to run 4x faster, the cut folds and epochs
    come back (never beyond the requested recipe)."""
    b = _budget(Throughput(1 / 100, 1 / 400, "slow measurement"), 3000)
    assert b.plan.folds_trained < 5 or b.plan.epochs_curated < b.requested.curated.epochs
    first = b.plan
    for kind in ("noisy_epoch", "fold_epoch", "oof_predict"):
        predicted = stage_costs(b.requested, FAT2019, b.tp, 0)[kind]
        b.measured(kind, predicted / 4, 1)
    epochs = b.epochs_for(0)
    assert (b.plan.folds_trained, epochs) > (first.folds_trained, first.epochs_curated)
    assert epochs <= b.requested.curated.epochs and b.plan.folds_trained <= 5
    assert any("re-planned before fold 0" in n for n in b.plan.notes)


def test_budget_replans_downward_when_stages_run_slower():
    b = _budget(Throughput(1 / 2000, 1 / 8000, "fast measurement"), 3000)
    assert (b.plan.folds_trained, b.plan.epochs_curated) == (5, b.requested.curated.epochs)
    predicted = stage_costs(b.requested, FAT2019, b.tp, 0)["fold_epoch"]
    b.measured("fold_epoch", predicted * 8, 1)   # eight times slower than measured
    epochs = b.epochs_for(0)
    assert epochs < b.requested.curated.epochs or b.plan.folds_trained < 5
    c = b.costs()
    need = b.plan.folds_trained * (epochs * c["fold_epoch"] + c["oof_predict"] + c["test_predict"])
    assert need <= b.remaining()


def test_no_further_fold_starts_when_not_even_its_floor_fits():
    """Once fold 0 is trained, a later fold is only started when its floor epochs fit the time left: a re-plan that
    always kept 'at least one more fold' ran folds past the deadline."""
    b = _budget(Throughput(1 / 2000, 1 / 8000, "fast measurement"), 3000)
    assert b.epochs_for(0) == b.requested.curated.epochs
    predicted = stage_costs(b.requested, FAT2019, b.tp, 0)["fold_epoch"]
    b.measured("fold_epoch", predicted * 1000, 1)   # far slower than measured: not one more fold fits
    b.fold_done(0, 10)
    assert b.epochs_for(1) == 0 and b.plan.folds_trained == 1
    assert any("no time for another fold" in n for n in b.plan.notes)


def test_budget_deadlines_leave_the_later_work_its_time():
    b = _budget(Throughput(1 / 300, 1 / 1200, "gpu-ish"), 3000)
    c = b.costs()
    fold_cost = b.plan.epochs_curated * c["fold_epoch"] + c["oof_predict"] + c["test_predict"]
    # compared as seconds before the deadline: a wall-clock time is too large for approx's relative tolerance
    assert b.deadline - b.stage1_deadline() == pytest.approx(b.plan.folds_trained * fold_cost)
    b.epochs_for(0)
    floor = MIN_EPOCHS_CURATED * c["fold_epoch"] + c["oof_predict"] + c["test_predict"]
    n = b.plan.folds_trained
    for k in (0, 1):  # its own OOF, test TTA of the k + 1 models so far, the later folds at their floor
        expected = c["oof_predict"] + (k + 1) * c["test_predict"] + (n - k - 1) * floor
        assert b.deadline - b.fold_deadline(k) == pytest.approx(expected)


def test_no_deadline_never_cuts():
    cfg = make_config("kaggle-1h")
    b = Budget(cfg, None)
    assert b.plan == Plan.requested(cfg)                 # before anything is measured: the recipe as asked for
    assert (b.plan.epochs_noisy, b.plan.epochs_curated, b.plan.folds_trained, b.plan.epochs_pseudo) == (15, 25, 5, 10)
    assert b.remaining() is None and b.planned("fold 0") is None
    b.start(FAT2019, Throughput(1, 1, "crawl"))
    assert b.stage1_deadline() is None and b.fold_deadline(3) is None and b.select_deadline() is None
    assert b.pseudo_deadline(0, 5) is None and b.pseudo_epochs(5) == cfg.pseudo_epochs
    assert b.epochs_for(4) == cfg.curated.epochs and b.plan.folds_trained == 5
    assert b.planned("fold 4") == pytest.approx(25 * b.costs()["fold_epoch"] + b.costs()["oof_predict"]
                                                + b.costs()["test_predict"])


def test_the_budget_plan_is_frozen():
    plan = Plan.requested(make_config("demo"))
    assert (plan.epochs_noisy, plan.epochs_curated, plan.folds_trained, plan.stages, plan.notes) == (12, 30, 3, (), ())
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.epochs_curated = 1


class ForceNaN(Callback):
    """Turns the loss of the second epoch into NaN, as a diverging run would."""
    def after_loss(self):
        if self.training and self.epoch == 1:
            self.learn.loss_grad = self.loss_grad * float("nan")
            self.learn.loss = self.loss * float("nan")


def test_a_nan_loss_is_survived(tiny_data, tmp_path):
    cfg = make_config("demo", sets=["batch_size=8"])
    data = load_dataset(tiny_data)
    store = build_store(data.curated, cfg, "cpu", progress=False)
    model = build_model(cfg, len(data.classes), -40.0, 20.0)
    idx = np.arange(len(data.curated))
    spec = StageSpec("nan test", cfg.curated, tmp_path, epochs=3, lr=1e-3, loss="bce", seed=0, cfg=cfg)
    with patch("fattag.stage.augment_policy", lambda cfg, stage, fill: [ForceNaN()]):
        res = fit_stage(model, Clips(store, idx[6:]), Clips(store, idx[:6]), spec)
    assert res.nan_epochs == 1 and res.best_epoch == 1
    assert len(res.history) == 1  # the NaN epoch is discarded, and training stopped there
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_tiny_budget_ends_in_time_with_a_valid_submission(tiny_data, tmp_path):
    budget = 45
    t0 = time.time()
    proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", tmp_path, *TINY, "--set", "curated.epochs=500",
                         "--time-budget", f"{budget}s"])
    took = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < budget + 10, f"run took {took:.0f} s for a {budget} s budget"
    assert "epochs cut" in proc.stderr or "time budget" in proc.stderr
    validate_submission(pd.read_csv(tmp_path / "submission.csv"), pd.read_csv(tiny_data / "sample_submission.csv"))
    config = json.loads((tmp_path / "config.json").read_text())  # the request, and the plan that actually ran
    assert config["settings"]["curated"]["epochs"] == 500 and 0 < config["plan"]["epochs_curated"] < 500
    assert config["plan"]["notes"] and all(0 < f["epochs_run"] < 500 for f in config["folds_run"])
    inference = json.loads((tmp_path / "inference.json").read_text())   # the test passes the time left allowed
    assert inference["tta_aug_passes"] == config["plan"]["tta_aug_passes"]


def test_killed_run_resumes_without_redoing_finished_folds(tiny_data, tmp_path):
    args = [sys.executable, str(RUN), "--data-dir", str(tiny_data), "--work-dir", str(tmp_path), *TINY,
            "--set", "curated.epochs=4"]
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "log.txt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill right after fold 1 finished its first epoch
            if log.exists() and "fold 1 (curated) epoch 1/4" in log.read_text():
                break
            time.sleep(0.05)
        else:
            pytest.fail("fold 1 never started")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "fold0" / "model.pth").exists() and not (tmp_path / "fold1" / "model.pth").exists()
    fold0_mtime = (tmp_path / "fold0" / "model.pth").stat().st_mtime
    first_log = log.read_text()

    again = run_pipeline(["--data-dir", tiny_data, "--work-dir", tmp_path, *TINY, "--set", "curated.epochs=4"])
    assert again.returncode == 0, again.stderr[-3000:]
    second = log.read_text()[len(first_log):]
    assert "stage1: already finished" in second and "fold0: already finished" in second
    assert "fold 0 (curated) epoch" not in second        # finished fold not retrained
    assert "fold 1 (curated): resuming after epoch" in second
    assert "fold 1 (curated) epoch 1/4" not in second    # its finished epoch not redone either
    assert (tmp_path / "fold0" / "model.pth").stat().st_mtime == fold0_mtime
    for stage, epochs in (("stage1", 1), ("fold0", 4), ("fold1", 4)):  # every epoch once, in order, none skipped
        hist = pd.read_csv(tmp_path / stage / "history.csv")
        assert hist["epoch"].tolist() == list(range(1, epochs + 1)), (stage, hist["epoch"].tolist())
        assert hist[["train_loss", "valid_loss", "lwlrap"]].notna().all().all()
    validate_submission(pd.read_csv(tmp_path / "submission.csv"), pd.read_csv(tiny_data / "sample_submission.csv"))


def test_time_left_at_the_end_buys_augmented_test_passes():
    cfg = make_config("kaggle-1h", sets=["tta_fill_passes=3"])
    b = _budget(Throughput(1 / 300, 1 / 1200, "gpu-ish"), 10_000, cfg)
    per_pass = 5 * b.costs(0)["test_predict"]
    b.deadline = time.time() + 3.5 * per_pass        # the plain pass, one augmented one, one spare
    assert b.test_passes(5) == 1 and b.plan.tta_aug_passes == 1
    b.measured("oof_predict", 2 * b.costs()["oof_predict"], 1)   # inference runs twice as slow as measured:
    assert b.test_passes(5) == 0                                  # test TTA is priced by it
    b.deadline = time.time() + 100 * per_pass        # plenty: capped by tta_fill_passes
    assert b.test_passes(5) == 3
    b.deadline = time.time() + 0.5 * per_pass        # not even the plain pass: no augmented ones
    assert b.test_passes(5) == 0
    unbudgeted = Budget(cfg, None)
    unbudgeted.start(FAT2019, Throughput(1, 1, "x"))
    assert unbudgeted.test_passes(5) == cfg.tta_aug_passes  # no budget


def test_selection_and_both_top_ups_are_priced():
    tp = Throughput(1 / 300, 1 / 1200, "gpu-ish")
    plain = stage_costs(make_config("kaggle-1h", sets=["curated.top_up=0"]), FAT2019, tp, 0)
    w = Workload(**{**FAT2019.__dict__, "noisy_windows": 80000})
    sel = stage_costs(make_config("kaggle-1h", sets=["select_noisy=true", "select_epochs=4"]), w, tp, 0)
    assert plain["select"] == 0 and sel["select"] > 80000 / 1200 + 4 * 4970 / 300
    topped = stage_costs(make_config("kaggle-1h", sets=["curated.top_up=0.5"]), FAT2019, tp, 0)
    train_part = plain["fold_epoch"] - 15000 / 5 / 1200 * 1.15
    assert topped["fold_epoch"] == pytest.approx(plain["fold_epoch"] + train_part, rel=1e-6)  # twice the clips
    stage1 = stage_costs(make_config("kaggle-1h", sets=["curated.top_up=0", "noisy.top_up=0.2"]), FAT2019, tp, 0)
    assert stage1["noisy_epoch"] == pytest.approx(plain["noisy_epoch"] + 4700 / 300 * 1.15, rel=1e-6)  # + 18800/4
    all_curated = stage_costs(make_config("kaggle-1h", sets=["curated.top_up=0", "noisy.top_up=0.5"]), FAT2019, tp, 0)
    assert all_curated["noisy_epoch"] == pytest.approx(plain["noisy_epoch"] + 4970 / 300 * 1.15, rel=1e-6)  # capped
    plan = plan_run(make_config("kaggle-1h", sets=["select_noisy=true"]), w, tp, None)
    assert plan.stages[0][0] == "select noisy clips"


def test_stage2_noisy_top_up_is_priced_capped_at_the_noisy_pool():
    """A fold's training set is its curated clips plus top_up_size(them, share, noisy clips): with a pool smaller
    than the share asks for, only the pool's clips are added, so its epoch costs less."""
    tp = Throughput(1 / 300, 1 / 1200, "gpu-ish")
    cfg = make_config("kaggle-1h", sets=["curated.top_up=0.5"])
    plain = stage_costs(make_config("kaggle-1h", sets=["curated.top_up=0"]), FAT2019, tp, 0)
    small = Workload(**{**FAT2019.__dict__, "noisy_clips": 1000})
    large = Workload(**{**FAT2019.__dict__, "noisy_clips": 50000})
    fold_curated = 4970 * 4 / 5                       # 3976 curated clips per fold: as many noisy ones at 0.5
    c_small, c_large = stage_costs(cfg, small, tp, 0), stage_costs(cfg, large, tp, 0)
    assert c_small["fold_epoch"] < c_large["fold_epoch"]
    assert c_small["fold_epoch"] == pytest.approx(plain["fold_epoch"] + 1000 / 300 * 1.15, rel=1e-6)
    assert c_large["fold_epoch"] == pytest.approx(plain["fold_epoch"] + fold_curated / 300 * 1.15, rel=1e-6)
    assert c_small["pseudo_epoch"] < c_large["pseudo_epoch"]      # the round trains on the same topped-up set
    none = stage_costs(cfg, Workload(**{**FAT2019.__dict__, "noisy_clips": 0}), tp, 0)
    assert none["fold_epoch"] == pytest.approx(plain["fold_epoch"], rel=1e-6)   # no noisy set: nothing to add
    # noisy-clip selection keeping few clips shrinks the pool that stage 2 tops up from
    b = _budget(tp, 3000, cfg)
    before = b.costs()["fold_epoch"]
    b.noisy_kept(1000)
    assert b.workload.noisy_clips == 1000 and b.workload.noisy_train == 1000 - 50
    assert b.costs()["fold_epoch"] == pytest.approx(c_small["fold_epoch"], rel=1e-6) and before > c_small["fold_epoch"]


def test_count_workload_counts_the_clips_and_windows_of_each_set():
    cfg = make_config("demo")          # 128-frame windows, half overlapping

    def store(name, lengths, bad=()):
        mels = [None if i in bad else np.zeros((cfg.n_mels, t), np.float16) for i, t in enumerate(lengths)]
        names = [f"{name}{i}.wav" for i in range(len(lengths))]
        return MelStore(ClipTable(name, names, names, np.zeros((len(lengths), 2), np.float32)), mels)

    def n_windows(lengths):
        return sum(len(window_starts(t, cfg.crop_frames, cfg.crop_frames // 2)) for t in lengths)

    noisy = store("noisy", [128] * 40, bad=(3,))     # 39 decodable: a holdout of 2 (5 %), 37 to train on
    curated = store("curated", [128, 256, 130, 300], bad=(3,))
    test = store("test", [128, 256, 64, 128], bad=(0,))
    w = count_workload(cfg, noisy, curated, test)
    assert w == Workload(noisy_train=37, noisy_holdout_windows=2, curated=3, curated_windows=n_windows([128, 256, 130]),
                         test_windows=n_windows([256, 64, 128]), noisy_windows=0, test_clips=3, noisy_clips=39)
    assert w.curated_windows == 6 and w.test_windows == 5
    selecting = count_workload(with_settings(cfg, {"select_noisy": True}), noisy, curated, test)
    assert selecting.noisy_windows == 39 and selecting.noisy_clips == 39
    alone = count_workload(cfg, None, curated, test)
    assert (alone.noisy_train, alone.noisy_holdout_windows, alone.noisy_clips) == (0, 0, 0)


def test_a_run_carries_its_budget_and_records_the_plan_with_its_settings(tmp_path):
    from fattag.context import Run
    cfg = make_config("demo", sets=["time_budget=100", "safety_margin=0.1"])
    run = Run(cfg, "demo", tmp_path, tmp_path, torch.device("cpu"), started=1000.0)
    assert run.deadline == pytest.approx(1090.0) and run.budget.deadline == run.deadline
    assert run.budget.requested is cfg and run.budget.plan == Plan.requested(cfg)
    free = Run(make_config("demo"), "demo", tmp_path, tmp_path, torch.device("cpu"))
    assert free.deadline is None and free.budget.deadline is None and free.budget.remaining() is None
    assert free.budget.plan == Plan.requested(free.cfg)           # no budget: the requested recipe, unchanged
    free.budget.start(FAT2019, Throughput(1 / 300, 1 / 1200, "x"))
    assert (free.budget.plan.epochs_noisy, free.budget.plan.epochs_curated) == (12, 30)
    free.record("fold 1", 12.345)
    free.record("something else", 1.0)
    assert [{k: t[k] for k in ("stage", "planned_s", "actual_s")} for t in free.timings] == [
        dict(stage="fold 1", planned_s=free.budget.planned("fold 1"), actual_s=12.35),
        dict(stage="something else", planned_s=None, actual_s=1.0)]
    assert free.timings[0]["ended_s"] <= free.timings[1]["ended_s"] == pytest.approx(free.elapsed(), abs=1.0)
    assert free.timings[0]["planned_s"] > 0
    free.save_config(folds_run=[{"fold": 0}])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["settings"]["curated"]["epochs"] == 30 and saved["plan"]["epochs_curated"] == 30
    assert saved["folds_run"] == [{"fold": 0}] and saved["preset"] == "demo"
    free.save_config(with_settings(free.cfg, {"tta_aggregate": "max"}), weights="w")   # the settings a step used
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["settings"]["tta_aggregate"] == "max" and saved["weights"] == "w"


# ---------------------------------------------------------------- several devices


def test_two_devices_share_stage_1_and_run_the_folds_in_rounds():
    from fattag.cost import recipe_total
    from fattag.stages import rounds
    cfg = make_config("kaggle-1h")
    one, two = Throughput(1 / 300, 1 / 1200, "t4"), Throughput(1 / 300, 1 / 1200, "t4", devices=2)
    c1, c2 = stage_costs(cfg, FAT2019, one, 0), stage_costs(cfg, FAT2019, two, 0)
    validation = FAT2019.noisy_holdout_windows * one.infer_s_per_window * 1.15
    assert c2["noisy_epoch"] - validation == pytest.approx((c1["noisy_epoch"] - validation) / 2)   # training shared
    assert c2["fold_epoch"] == c1["fold_epoch"]                                  # a fold runs on one device
    measured = dataclasses.replace(two, ddp_train_s_per_clip=1 / 450)            # DDP measured: 1.5x, not 2x
    assert stage_costs(cfg, FAT2019, measured, 0)["noisy_epoch"] - validation == pytest.approx(
        (c1["noisy_epoch"] - validation) / 1.5)
    assert [rounds(n, 2) for n in (1, 2, 3, 5)] == [1, 1, 2, 3] and rounds(5, 1) == 5
    total1, total2 = recipe_total(cfg, FAT2019, one, None, 0), recipe_total(cfg, FAT2019, two, None, 0)
    assert total2(0, 25, 5, 0) == pytest.approx(total2(0, 25, 6, 0))   # 5 folds on 2 devices: 3 rounds, as 6
    assert total1(0, 25, 5, 0) < total1(0, 25, 6, 0)
    assert total2(0, 25, 4, 0) == pytest.approx(total1(0, 25, 2, 0))   # 4 folds side by side: 2 folds' time


def test_two_devices_fit_more_of_the_recipe_and_plan_by_rounds():
    cfg = make_config("kaggle-1h")
    slow = Throughput(1 / 120, 1 / 480, "slow")
    p1 = plan_run(cfg, FAT2019, slow, 3000)
    p2 = plan_run(cfg, FAT2019, dataclasses.replace(slow, devices=2), 3000)
    assert p1.total_s <= 3000 and p2.total_s <= 3000 and p2.devices == 2 and "2 devices" in p2.table()
    assert (p2.folds_trained, p2.epochs_curated, p2.epochs_noisy) > (p1.folds_trained, p1.epochs_curated,
                                                                     p1.epochs_noisy)
    b = Budget(cfg, time.time() + 3000)
    b.start(FAT2019, dataclasses.replace(slow, devices=2))
    b.fold_done(1, b.epochs_for(1))   # rank 1 trained fold 1; its next fold is 3, in the second round
    b.epochs_for(3)
    assert any("re-planned before fold 2" in n for n in b.plan.notes)   # the round's first fold, not 3
    c = b.costs()
    n = b.plan.folds_trained
    floor = MIN_EPOCHS_CURATED * c["fold_epoch"] + c["oof_predict"] + c["test_predict"]
    for k, models in ((1, 1), (3, 2)):   # by fold 3's end 2 rounds of models need their test TTA
        expected = c["oof_predict"] + models * c["test_predict"] + (-(-n // 2) - models) * floor
        assert b.deadline - b.fold_deadline(k) == pytest.approx(expected)
