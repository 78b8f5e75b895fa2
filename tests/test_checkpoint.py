"""Saved stages are reused or resumed only by a run with the same recipe (checkpoint.StageDir)."""
import logging
import shutil

import pandas as pd
import torch

from conftest import TINY, run_pipeline
from fattag.checkpoint import Resume, StageDir, load_checkpoint, save_checkpoint
from fattag.config import make_config
from fattag.weights import stage_recipe

RECIPE = stage_recipe(make_config("demo"), "/data/fat")


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


def test_recipe_is_every_weight_setting_by_its_set_name_plus_the_data_dir():
    cfg = make_config("demo", sets=["curated.top_up=0.5", "noisy.union_mix=0.25"])
    recipe = stage_recipe(cfg, "/data/fat")
    assert recipe["data_dir"] == "/data/fat" and recipe["arch"] == cfg.arch
    assert (recipe["curated.top_up"], recipe["noisy.union_mix"], recipe["curated.lr"]) == (0.5, 0.25, 3e-3)
    for name in ("noisy.epochs", "curated.epochs", "time_budget", "tta_aggregate", "amp", "pseudo_epochs"):
        assert name not in recipe, name          # they do not change what the saved weights are
    assert "batch_size" in recipe and "pseudo" not in recipe
    round_recipe = stage_recipe(cfg, "/data/fat", pseudo_round=True)
    assert round_recipe["pseudo"]["lr_pseudo"] == cfg.lr_pseudo and round_recipe["pseudo"]["tta_aggregate"] == "meanmax"
    assert {k: v for k, v in round_recipe.items() if k != "pseudo"} == recipe


# The names a stage's recipe was saved under before the per-stage settings became `StageSettings`.
OLD_STAGE_NAMES = ("lr", "loss", "mixup", "specaug", "union_mix", "concat_mix", "freq_shift", "time_stretch")
OLD_REMOVED_OFF = dict(background_noisy=0.0, background_curated=0.0, background_snr_min=10.0, background_snr_max=25.0,
                       level_eq_noisy=False, level_eq_curated=False, level_gain_db=10.0, eq_tilt_db=10.0,
                       lowpass_p=0.25, union_mix_rounds=1)


def old_style(recipe: dict, **changes) -> dict:
    """`recipe` as an earlier version saved it: flat `<setting>_<stage>` names, the shares under their old names,
    and the removed options saved at their off values (then `changes`)."""
    old = {}
    for name, value in recipe.items():
        stage, dot, key = name.partition(".")
        if not dot:
            old[name] = value
        elif key == "top_up":
            old["noisy_share_curated" if stage == "curated" else "curated_share_noisy"] = value
        else:
            assert key in OLD_STAGE_NAMES, name
            old[f"{key}_{stage}"] = value
    return {**old, **OLD_REMOVED_OFF, **changes}


def _save_with_recipe(path, recipe):
    model = torch.nn.Linear(3, 2)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path / "model.pth", model, {"stage": "curated", "fold": 0, "recipe": recipe})
    return model


def test_a_stage_saved_under_the_old_setting_names_is_the_same_recipe(tmp_path):
    cfg = make_config("demo", sets=["curated.top_up=0.5", "noisy.top_up=0.2", "curated.union_mix=0.5"])
    recipe = stage_recipe(cfg, "/data/fat")
    saved = old_style(recipe)
    assert saved["noisy_share_curated"] == 0.5 and saved["curated_share_noisy"] == 0.2
    assert saved["union_mix_curated"] == 0.5 and saved["lr_noisy"] == 4e-3 and "curated.lr" not in saved
    model = _save_with_recipe(tmp_path / "same", saved)
    done = StageDir(tmp_path / "same", recipe).finished()
    assert done is not None and torch.equal(done[1]["weight"], model.state_dict()["weight"])
    # the old shares swapped, or another old value: not the same recipe
    swapped = {**saved, "noisy_share_curated": 0.2, "curated_share_noisy": 0.5}
    _save_with_recipe(tmp_path / "swapped", swapped)
    assert StageDir(tmp_path / "swapped", recipe).finished() is None
    _save_with_recipe(tmp_path / "lr", {**saved, "lr_curated": 1.0})
    assert StageDir(tmp_path / "lr", recipe).finished() is None
    # a pseudo-label round saved under the old names, with its removed settings off
    round_recipe = stage_recipe(cfg, "/data/fat", pseudo_round=True)
    old_round = {**saved, "pseudo": {**round_recipe["pseudo"], "adapt_bn": False, "pseudo_soft": False}}
    _save_with_recipe(tmp_path / "round", old_round)
    assert StageDir(tmp_path / "round", round_recipe).finished() is not None
    _save_with_recipe(tmp_path / "soft", {**old_round, "pseudo": {**old_round["pseudo"], "pseudo_soft": True}})
    assert StageDir(tmp_path / "soft", round_recipe).finished() is None


def test_a_stage_saved_with_a_removed_option_on_is_trained_again(tmp_path, caplog):
    recipe = stage_recipe(make_config("demo"), "/data/fat")
    for name, on in (("background_noisy", 0.3), ("level_eq_curated", True), ("union_mix_rounds", 2)):
        _save_with_recipe(tmp_path / name, old_style(recipe, **{name: on}))
        with caplog.at_level(logging.WARNING, logger="fattag"):
            assert StageDir(tmp_path / name, recipe).finished() is None, name
        assert name in caplog.text
    _save_with_recipe(tmp_path / "off", old_style(recipe))
    assert StageDir(tmp_path / "off", recipe).finished() is not None


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
    other = StageDir(tmp_path, {**RECIPE, "curated.lr": 1.0}).resume()
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

    proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", work, *TINY, "--set", "curated.mixup=0.05"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (work / "log.txt").read_text()[len(first) + len(log):]
    assert "already finished" not in log
    assert "stage1: the saved model was trained with other settings (curated.mixup 0.2 -> 0.05)" in log
    assert "stage 1 (noisy) epoch 1/1" in log and "fold 1 (curated) epoch 2/2" in log
    for stage in ("stage1", "fold0", "fold1"):
        assert load_checkpoint(work / stage / "model.pth")[0]["recipe"]["curated.mixup"] == 0.05
