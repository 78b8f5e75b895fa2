"""Saved weights and their settings: what a saved stage depends on, what a checkpoint carries, and how a
predict-only run gets its models and the settings to predict with.

- A stage's *recipe* (`stage_recipe`) is every setting its weights depend on, plus the data dir: a later run in
  the same work dir reuses or resumes the stage only when its own recipe is the same (checkpoint.StageDir).
- A checkpoint's *metadata* (`model_meta`) is what prediction needs to rebuild the model and refuse a mismatched
  dataset: the classes, the feature and the model settings.
- The *inference settings* a run predicted the test set with go once to `inference.json` in its work dir, beside
  the fold folders (`save_inference`); a predict-only run from those weights starts from them. The run's decision
  thresholds per class (thresholds.py) go in the same file, under "thresholds" (`save_thresholds`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from torch import nn

from .checkpoint import atomic_write_text, load_checkpoint
from .config import REMOVED, Config, upgrade_settings, with_settings
from .model import build_model

FEATURE_KEYS = ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "f_min", "f_max", "top_db",
                "trim_silence", "trim_db", "crop_seconds")
MODEL_KEYS = ("arch", "self_attention", "mish", "dropout", "input_norm", "pool", "freq_norm", "freq_rf", "temporal",
              "noisy_head")
INFERENCE_KEYS = ("tta_step_frac", "tta_aggregate", "tta_aug_passes", "fold_ensemble", "class_balance", "batch_size")
# Settings that do not change what a trained stage's weights are: the schedule's length (the budget plans it, and a
# resumed stage keeps its own), the budget, workers, the CPU memory layout and mixed precision (float rounding only,
# like the device itself), how test clips are predicted, and the pseudo-label round's settings (the round adds
# ROUND_KEYS to its own recipe). Every other setting is part of a stage's recipe.
NOT_RECIPE_KEYS = ("noisy.epochs", "curated.epochs", "pseudo_epochs", "pseudo_threshold", "lr_pseudo",
                   "train_on_test", "tag_segments", "time_budget", "safety_margin", "tta_fill_passes", "num_workers",
                   "channels_last", "amp",
                   *(k for k in INFERENCE_KEYS if k != "batch_size"))
# What a saved pseudo-label round depends on besides the recipe: how the teacher predicts and the round's settings.
ROUND_KEYS = ("class_balance", "tta_aggregate", "tta_step_frac", "fold_ensemble", "pseudo_threshold", "lr_pseudo")
# Settings added after stages were first saved, and the value that means "off": left out of a recipe while off, so
# that a stage saved before they existed is still the same recipe.
ADDED = {"noisy.freq_mixstyle": 0.0, "curated.freq_mixstyle": 0.0, "noisy.consistency": 0.0,
         "curated.consistency": 0.0, "mixstyle_alpha": 0.3, "teacher_decay": 0.99, "freq_norm": False, "freq_rf": 0,
         "temporal": "none", "noisy_head": False}
INFERENCE_FILE = "inference.json"
THRESHOLDS_KEY = "thresholds"   # inference.json's entry for the decision thresholds, {class: threshold}
log = logging.getLogger("fattag")


def stage_recipe(cfg: Config, data_dir, pseudo_round: bool = False) -> dict:
    """The settings a saved stage's weights depend on, by --set name, plus the data dir (and, for a pseudo-label
    round, the round's own settings)."""
    flat = cfg.flat_dict()
    recipe = {k: v for k, v in flat.items() if k not in NOT_RECIPE_KEYS and ADDED.get(k, object()) != v}
    recipe["data_dir"] = str(data_dir)
    if pseudo_round:
        recipe["pseudo"] = {k: flat[k] for k in ROUND_KEYS}
    return recipe


def feature_settings(cfg: Config) -> dict:
    """The settings a trained model's input depends on: weights are only valid with the same ones."""
    return {k: getattr(cfg, k) for k in FEATURE_KEYS}


def inference_settings(cfg: Config) -> dict:
    """How test clips are predicted: may differ between training and a later predict-only run."""
    return {k: getattr(cfg, k) for k in INFERENCE_KEYS}


def model_meta(cfg: Config, classes: list[str], **extra) -> dict:
    """What prediction needs to rebuild the model and refuse a mismatched dataset: the classes, the feature and
    the model settings (and `extra`: the stage, the fold, ...)."""
    return dict(classes=list(classes), features=feature_settings(cfg),
                model={k: getattr(cfg, k) for k in MODEL_KEYS}, **extra)


def check_classes(meta: dict, classes: list[str], source: str = "weights") -> None:
    """A clear error when saved weights were trained for another class vocabulary than the data's."""
    if list(meta["classes"]) != list(classes):
        missing = sorted(set(classes) - set(meta["classes"]))[:5]
        extra = sorted(set(meta["classes"]) - set(classes))[:5]
        raise ValueError(f"{source}: class vocabulary differs from the data's sample_submission.csv "
                         f"({len(meta['classes'])} vs {len(classes)} classes; missing in weights: {missing}, "
                         f"not in data: {extra}{'; same names, other order' if not missing and not extra else ''})")


def model_from_state(meta: dict, state: dict) -> nn.Module:
    """The model a checkpoint describes, with its weights (input statistics included)."""
    model = build_model(Config(**meta["model"]), len(meta["classes"]))
    model.load_state_dict(state)
    return model.eval()


def final_weights(fold_model: Path) -> Path:
    """A fold's final weights: those after the test pseudo-label round when it ran (fold*/pseudo/), else stage 2's."""
    after_round = Path(fold_model).parent / "pseudo" / "model.pth"
    return after_round if after_round.is_file() else Path(fold_model)


def load_fold_models(weights_dir, classes: list[str] | None = None) -> list:
    """Every fold's final weights under `weights_dir` (fold*/model.pth, or fold*/pseudo/model.pth where the
    pseudo-label round ran) as (path, model, meta); a clear error when there are none or they mismatch `classes`
    (default: the first fold's, which the others must share)."""
    weights_dir = Path(weights_dir)
    paths = sorted(weights_dir.glob("fold*/model.pth")) or sorted(weights_dir.glob("**/fold*/model.pth"))
    if not paths:
        raise FileNotFoundError(f"no fold*/model.pth under {weights_dir}: point --weights at a training run's "
                                "work dir (or the dataset holding its fold folders)")
    loaded = []
    for path in map(final_weights, paths):
        meta, state = load_checkpoint(path)
        classes = meta["classes"] if classes is None else classes
        check_classes(meta, classes, source=str(path))
        loaded.append((path, model_from_state(meta, state), meta))
    return loaded


def save_inference(work_dir, cfg: Config) -> None:
    """inference.json: how this run predicted the test set, for a later predict-only run from its weights."""
    atomic_write_text(Path(work_dir) / INFERENCE_FILE, json.dumps(inference_settings(cfg), indent=2) + "\n")


def save_thresholds(work_dir, thresholds: dict | None) -> None:
    """The decision thresholds ({class: threshold}) added to the work dir's inference.json (nothing when None)."""
    if thresholds is None:
        return
    path = Path(work_dir) / INFERENCE_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_text(path, json.dumps({**saved, THRESHOLDS_KEY: thresholds}, indent=2) + "\n")


def inference_file(paths: list[Path]) -> Path | None:
    """The inference.json of the training run of these fold checkpoints: in the folder holding the fold folders."""
    for path in paths:
        folds_dir = next((p.parent for p in Path(path).parents if p.name.startswith("fold")), None)
        if folds_dir is not None and (folds_dir / INFERENCE_FILE).is_file():
            return folds_dir / INFERENCE_FILE
    return None


def saved_thresholds(paths: list[Path]) -> dict | None:
    """The decision thresholds the training run of these fold checkpoints saved, or None (a run older than them)."""
    found = inference_file(paths)
    return json.loads(found.read_text()).get(THRESHOLDS_KEY) if found is not None else None


def saved_inference(paths: list[Path], metas: list[dict]) -> dict:
    """The inference settings that the training run of these fold checkpoints used: its inference.json (in the
    folder holding the fold folders), else the settings older checkpoints carried in their metadata."""
    found = inference_file(paths)
    if found is not None:
        return {k: v for k, v in json.loads(found.read_text()).items() if k != THRESHOLDS_KEY}
    legacy = [upgrade_settings(m.get("inference", {})) for m in metas]
    used = sorted({k for group in legacy for k in group if k in REMOVED})
    if used:
        raise ValueError(f"these weights were predicted with settings that no longer exist: {', '.join(used)} "
                         "(removed, docs/ablation.md); predict them with the version that trained them")
    differ = sorted({k for group in legacy for k in group if any(g.get(k) != group.get(k) for g in legacy)})
    if differ:
        raise ValueError(f"the fold checkpoints disagree on inference settings {differ} ({paths[0]} and others)")
    if not legacy or not legacy[0]:
        log.warning("no %s beside the fold folders and no inference settings in the checkpoints: predicting with "
                    "this run's settings (upload the training run's %s with its fold folders)", INFERENCE_FILE,
                    INFERENCE_FILE)
        return {}
    return legacy[0]


def prediction_config(cfg: Config, models: list, explicit: dict) -> Config:
    """The settings to predict with: features and model from the checkpoints (`models`: (path, model, meta); every
    fold must agree), the inference settings the training run used, then the inference settings the user `--set`
    explicitly. Setting a feature or model value other than the weights' is an error: the weights are only valid
    with their own."""
    first_path, _, first = models[0]
    for group in ("features", "model"):
        for path, _, meta in models:
            diff = sorted(k for k in set(first[group]) | set(meta[group]) if first[group].get(k) != meta[group].get(k))
            if diff:
                raise ValueError(f"the fold checkpoints disagree on {group} settings {diff}: {first_path} has "
                                 f"{ {k: first[group].get(k) for k in diff} }, {path} has "
                                 f"{ {k: meta[group].get(k) for k in diff} }")
    fixed = {**first["features"], **first["model"]}
    clash = {k: (fixed[k], v) for k, v in explicit.items() if k in fixed and fixed[k] != v}
    if clash:
        raise ValueError("feature settings differ from the weights (saved, --set): "
                         + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in clash.items())
                         + "; feature and model settings come from the weights")
    inference = {**saved_inference([p for p, _, _ in models], [m for _, _, m in models]),
                 **{k: v for k, v in explicit.items() if k in INFERENCE_KEYS}}
    return with_settings(replace(cfg, **fixed), inference)
