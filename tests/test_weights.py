"""Saved weights and their settings: what a checkpoint carries, inference.json, and the settings a predict-only run
gets from the fold checkpoints (weights.py)."""
import json

import pytest
import torch

from fattag.checkpoint import load_checkpoint, save_checkpoint
from fattag.config import make_config, with_settings
from fattag.model import build_model
from fattag.weights import (FEATURE_KEYS, INFERENCE_KEYS, MODEL_KEYS, check_classes, feature_settings, final_weights,
                            inference_settings, load_fold_models, model_meta, prediction_config, save_inference,
                            saved_inference)

CLASSES = ["Bark", "Meow", "Purr", "Hiss"]


def _save_folds(work, cfg, folds=2, extra=None):
    """Fold checkpoints of `cfg` under work/fold{k}/model.pth, each model seeded with k; `extra` goes in the meta."""
    for k in range(folds):
        torch.manual_seed(k)
        model = build_model(cfg, len(CLASSES), -40.0, 10.0)
        save_checkpoint(work / f"fold{k}" / "model.pth", model,
                        {**model_meta(cfg, CLASSES, stage="curated", fold=k), **(extra or {})})


def test_model_meta_carries_classes_features_and_model_but_no_inference_settings():
    cfg = make_config("demo", sets=["tta_aggregate=max", "n_mels=40"])
    meta = model_meta(cfg, CLASSES, stage="curated", fold=1)
    assert set(meta) == {"classes", "features", "model", "stage", "fold"}
    assert meta["classes"] == CLASSES and (meta["stage"], meta["fold"]) == ("curated", 1)
    assert meta["features"] == feature_settings(cfg) and set(meta["features"]) == set(FEATURE_KEYS)
    assert meta["features"]["n_mels"] == 40 and meta["features"]["hop_length"] == 250
    assert meta["model"] == {k: getattr(cfg, k) for k in MODEL_KEYS} and meta["model"]["arch"] == "xresnet_tiny"
    inference = inference_settings(cfg)
    assert set(inference) == set(INFERENCE_KEYS) and inference["tta_aggregate"] == "max"
    assert "adapt_bn" not in INFERENCE_KEYS


def test_check_classes_names_the_difference():
    meta = {"classes": CLASSES}
    check_classes(meta, list(CLASSES))
    with pytest.raises(ValueError, match=r"missing in weights: \['Moo'\]"):
        check_classes(meta, ["Bark", "Meow", "Purr", "Moo"], source="fold0")
    with pytest.raises(ValueError, match="same names, other order"):
        check_classes(meta, CLASSES[::-1])


def test_load_fold_models_takes_each_folds_final_weights(tmp_path):
    cfg, tmp_path = make_config("demo"), tmp_path / "dataset" / "run"
    _save_folds(tmp_path, cfg)
    torch.manual_seed(9)
    after_round = build_model(cfg, len(CLASSES), -40.0, 10.0)
    save_checkpoint(tmp_path / "fold1" / "pseudo" / "model.pth", after_round,
                    model_meta(cfg, CLASSES, stage="pseudo", fold=1))
    assert final_weights(tmp_path / "fold0" / "model.pth") == tmp_path / "fold0" / "model.pth"
    assert final_weights(tmp_path / "fold1" / "model.pth") == tmp_path / "fold1" / "pseudo" / "model.pth"
    loaded = load_fold_models(tmp_path, CLASSES)
    assert [p for p, _, _ in loaded] == [tmp_path / "fold0" / "model.pth", tmp_path / "fold1" / "pseudo" / "model.pth"]
    assert [m["stage"] for _, _, m in loaded] == ["curated", "pseudo"]
    for (path, model, _), expect in zip(loaded, (load_checkpoint(tmp_path / "fold0" / "model.pth")[1],
                                                 after_round.state_dict())):
        assert not model.training
        assert all(torch.equal(v, expect[k]) for k, v in model.state_dict().items()), path
    assert len(load_fold_models(tmp_path.parent, CLASSES)) == 2   # an attached dataset holding the run: found too
    with pytest.raises(ValueError, match="class vocabulary differs"):
        load_fold_models(tmp_path, CLASSES[:3] + ["Moo"])
    with pytest.raises(FileNotFoundError, match="no fold"):
        load_fold_models(tmp_path / "fold0", CLASSES)


def test_prediction_config_reads_inference_json_beside_the_fold_folders(tmp_path):
    trained = make_config("demo", sets=["n_mels=40", "hop_length=200", "crop_seconds=1.5", "tta_aggregate=max",
                                        "tta_step_frac=0.25", "class_balance=true", "tta_aug_passes=2"])
    _save_folds(tmp_path, trained)
    save_inference(tmp_path, trained)
    saved = json.loads((tmp_path / "inference.json").read_text())
    assert saved == inference_settings(trained) and saved["tta_aug_passes"] == 2
    models = load_fold_models(tmp_path, CLASSES)
    cfg = prediction_config(make_config(), models, {})   # no preset: everything comes from the weights
    assert (cfg.n_mels, cfg.hop_length, cfg.crop_seconds, cfg.arch, cfg.sample_rate) == (40, 200, 1.5, "xresnet_tiny",
                                                                                         16000)
    assert (cfg.tta_aggregate, cfg.tta_step_frac, cfg.class_balance, cfg.tta_aug_passes, cfg.batch_size) == \
        ("max", 0.25, True, 2, 32)
    # explicitly set inference settings win; other explicit settings are not inference settings
    cfg = prediction_config(make_config(), models, {"tta_aggregate": "mean", "tta_aug_passes": 0, "n_mels": 40})
    assert (cfg.tta_aggregate, cfg.tta_aug_passes, cfg.tta_step_frac, cfg.n_mels) == ("mean", 0, 0.25, 40)
    with pytest.raises(ValueError, match="feature settings differ.*n_mels 40 vs 32"):
        prediction_config(make_config(), models, {"n_mels": 32})
    # the pseudo-label round's weights (fold*/pseudo/) find the same inference.json
    save_checkpoint(tmp_path / "fold0" / "pseudo" / "model.pth", models[0][1],
                    model_meta(trained, CLASSES, stage="pseudo", fold=0))
    models = load_fold_models(tmp_path, CLASSES)
    assert models[0][0].parent.name == "pseudo"
    assert prediction_config(make_config(), models, {}).tta_step_frac == 0.25


def test_prediction_config_without_inference_json_uses_legacy_checkpoint_settings(tmp_path):
    trained = make_config("demo")
    legacy = {"tta_step_frac": 0.25, "tta_aggregate": "max", "tta_aug_passes": 1, "fold_ensemble": "geomean",
              "adapt_bn": False, "class_balance": True, "batch_size": 16}
    _save_folds(tmp_path, trained, extra={"inference": legacy})
    models = load_fold_models(tmp_path, CLASSES)
    assert saved_inference([p for p, _, _ in models], [m for _, _, m in models]) == \
        {k: v for k, v in legacy.items() if k != "adapt_bn"}
    cfg = prediction_config(make_config(), models, {})
    assert (cfg.tta_step_frac, cfg.tta_aggregate, cfg.tta_aug_passes, cfg.fold_ensemble, cfg.class_balance,
            cfg.batch_size) == (0.25, "max", 1, "geomean", True, 16)
    # an inference.json, where there is one, is what the run really predicted with
    save_inference(tmp_path, with_settings(trained, {"tta_aggregate": "mean"}))
    assert prediction_config(make_config(), models, {}).tta_aggregate == "mean"


def test_legacy_weights_predicted_with_a_removed_setting_are_a_clear_error(tmp_path):
    legacy = {"tta_step_frac": 0.5, "tta_aggregate": "meanmax", "tta_aug_passes": 0, "fold_ensemble": "mean",
              "adapt_bn": True, "class_balance": False, "batch_size": 32}
    _save_folds(tmp_path, make_config("demo"), extra={"inference": legacy})
    models = load_fold_models(tmp_path, CLASSES)
    with pytest.raises(ValueError, match="adapt_bn"):
        saved_inference([p for p, _, _ in models], [m for _, _, m in models])
    with pytest.raises(ValueError, match="adapt_bn"):
        prediction_config(make_config(), models, {})


def test_no_inference_settings_saved_keeps_the_requested_ones_with_a_warning(tmp_path, caplog):
    _save_folds(tmp_path, make_config("demo"))
    models = load_fold_models(tmp_path, CLASSES)
    with caplog.at_level("WARNING", logger="fattag"):
        cfg = prediction_config(make_config(sets=["tta_aggregate=max"]), models, {})
    assert cfg.tta_aggregate == "max" and cfg.n_mels == 48
    assert "inference.json" in caplog.text


def test_legacy_fold_checkpoints_that_disagree_on_inference_settings_are_an_error(tmp_path):
    legacy = {"tta_step_frac": 0.5, "tta_aggregate": "meanmax", "tta_aug_passes": 0, "fold_ensemble": "mean",
              "class_balance": False, "batch_size": 32}
    _save_folds(tmp_path, make_config("demo"), folds=1, extra={"inference": legacy})
    cfg = make_config("demo")
    save_checkpoint(tmp_path / "fold1" / "model.pth", build_model(cfg, len(CLASSES)),
                    {**model_meta(cfg, CLASSES, fold=1), "inference": {**legacy, "tta_aggregate": "max"}})
    with pytest.raises(ValueError, match="tta_aggregate"):
        prediction_config(make_config(), load_fold_models(tmp_path, CLASSES), {})


def test_fold_checkpoints_that_disagree_on_the_model_are_an_error(tmp_path):
    _save_folds(tmp_path, make_config("demo"), folds=1)
    other = make_config("demo", sets=["dropout=0.3"])
    save_checkpoint(tmp_path / "fold1" / "model.pth", build_model(other, len(CLASSES)),
                    model_meta(other, CLASSES, stage="curated", fold=1))
    with pytest.raises(ValueError, match=r"disagree on model settings \['dropout'\]"):
        prediction_config(make_config(), load_fold_models(tmp_path, CLASSES), {})
