"""Saved stages are reused or resumed only by a run with the same recipe (checkpoint.StageDir)."""
import logging
import shutil

import pandas as pd
import torch

from conftest import TINY, run_pipeline
from fattag.checkpoint import Resume, StageDir, load_checkpoint
from fattag.config import make_config

RECIPE = make_config("demo").recipe_dict()


def _finish(path, recipe):
    model = torch.nn.Linear(3, 2)
    StageDir(path, recipe).finish(model, {"stage": "noisy"}, pd.DataFrame({"epoch": [1]}))
    return model


def test_a_finished_stage_is_reused_only_with_its_own_recipe(tmp_path, caplog):
    model = _finish(tmp_path, RECIPE)
    meta, state = StageDir(tmp_path, dict(RECIPE)).finished()
    assert meta["recipe"] == RECIPE and torch.equal(state["weight"], model.state_dict()["weight"])
    with caplog.at_level(logging.WARNING, logger="fattag"):
        assert StageDir(tmp_path, {**RECIPE, "dropout": 0.5}).finished() is None
    assert "dropout 0.1 -> 0.5" in caplog.text
    assert StageDir(tmp_path, {**RECIPE, "data_dir": "/other"}).finished() is None
    assert StageDir(tmp_path).finished() is None          # a recipe was recorded, none asked for


def test_weights_saved_without_a_recipe_are_not_reused(tmp_path):
    _finish(tmp_path, None)
    assert load_checkpoint(tmp_path / "model.pth")[0]["recipe"] == {}
    assert StageDir(tmp_path, RECIPE).finished() is None


def test_an_interrupted_stage_resumes_only_with_its_own_recipe(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = Resume(2, 5, 0.7, 1, model.state_dict(), [{"epoch": 1}, {"epoch": 2}])
    StageDir(tmp_path, RECIPE).save_epoch(state, model, opt.state_dict(), new_best=True)
    same = StageDir(tmp_path, RECIPE).resume()
    assert (same.epochs_done, same.epochs, same.best_epoch) == (2, 5, 1)
    other = StageDir(tmp_path, {**RECIPE, "lr_curated": 1.0}).resume()
    assert other.epochs_done == 0 and other.last is None


def test_a_rerun_with_other_settings_trains_again_and_one_with_other_test_settings_does_not(tiny_run, tiny_data,
                                                                                            tmp_path):
    work = tmp_path / "run"
    shutil.copytree(tiny_run, work)
    first = (work / "log.txt").read_text()
    proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", work, *TINY, "--set", "tta_aggregate=max"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (work / "log.txt").read_text()[len(first):]
    assert "stage1: already finished" in log and "fold1: already finished" in log and "epoch 1/" not in log

    proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", work, *TINY, "--set", "mixup_curated=0.05"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (work / "log.txt").read_text()[len(first) + len(log):]
    assert "already finished" not in log
    assert "stage1: the saved model was trained with other settings (mixup_curated 0.2 -> 0.05)" in log
    assert "stage 1 (noisy) epoch 1/1" in log and "fold 1 (curated) epoch 2/2" in log
    for stage in ("stage1", "fold0", "fold1"):
        assert load_checkpoint(work / stage / "model.pth")[0]["recipe"]["mixup_curated"] == 0.05
