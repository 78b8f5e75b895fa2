"""Time budget planner, deadline guard, resume after a kill, NaN survival."""
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from conftest import REPO, RUN, TINY, run_pipeline
from fattag.budget import Throughput, Workload, plan_run, replan_fold_epochs
from fattag.config import make_config, parse_duration
from fattag.data import load_dataset
from fattag.features import build_store
from fattag.model import build_model
from fattag.submission import validate_submission
from fattag.train import fit_stage

FAT2019 = Workload(noisy_train=18800, noisy_holdout_windows=4000, curated=4970, curated_windows=15000,
                   test_windows=15000)


def test_parse_duration():
    assert parse_duration("3600") == 3600 and parse_duration("55m") == 3300 and parse_duration("1h") == 3600
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_no_budget_keeps_the_preset():
    cfg = make_config("kaggle-1h")
    plan = plan_run(cfg, FAT2019, Throughput(1e-3, 1e-4, "x"), None)
    assert (plan.epochs_noisy, plan.epochs_curated, plan.folds_trained) == (cfg.epochs_noisy, cfg.epochs_curated, 5)


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


def test_replan_when_behind():
    assert replan_fold_epochs(1000, 4, 10, 50, 20) == 20           # on time: as planned
    assert replan_fold_epochs(400, 4, 10, 50, 20) == 5             # behind: 100 s per fold, 50 fixed -> 5 epochs
    assert replan_fold_epochs(10, 4, 10, 50, 20) == 1              # hopeless: still one epoch


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
    res = fit_stage(model, store, idx[6:], store, idx[:6], cfg, epochs=3, lr=1e-3, mixup_alpha=0, specaug=False,
                    label="nan test", device="cpu", seed=0, out_dir=tmp_path, extra_cbs=[ForceNaN()])
    assert res.nan_epochs == 1 and res.best_epoch == 1
    assert len(res.history) == 1  # the NaN epoch is discarded, and training stopped there
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_tiny_budget_ends_in_time_with_a_valid_submission(tiny_data, tmp_path):
    budget = 45
    t0 = time.time()
    proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", tmp_path, *TINY, "--set", "epochs_curated=500",
                         "--time-budget", f"{budget}s"])
    took = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < budget + 10, f"run took {took:.0f} s for a {budget} s budget"
    assert "epochs cut" in proc.stderr or "time budget" in proc.stderr
    validate_submission(pd.read_csv(tmp_path / "submission.csv"), pd.read_csv(tiny_data / "sample_submission.csv"))


def test_killed_run_resumes_without_redoing_finished_folds(tiny_data, tmp_path):
    args = [sys.executable, str(RUN), "--data-dir", str(tiny_data), "--work-dir", str(tmp_path), *TINY,
            "--set", "epochs_curated=4"]
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

    again = run_pipeline(["--data-dir", tiny_data, "--work-dir", tmp_path, *TINY, "--set", "epochs_curated=4"])
    assert again.returncode == 0, again.stderr[-3000:]
    second = log.read_text()[len(first_log):]
    assert "stage 1: already finished" in second and "fold0: already finished" in second
    assert "fold 0 (curated) epoch" not in second        # finished fold not retrained
    assert "fold 1 (curated): resuming after epoch" in second
    assert "fold 1 (curated) epoch 1/4" not in second    # its finished epoch not redone either
    assert (tmp_path / "fold0" / "model.pth").stat().st_mtime == fold0_mtime
    validate_submission(pd.read_csv(tmp_path / "submission.csv"), pd.read_csv(tiny_data / "sample_submission.csv"))
