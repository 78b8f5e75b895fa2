"""Training units in-process on the tiny dataset: no out-of-fold leakage, best-epoch keeping, stage specs."""
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback

from conftest import TRAIN_SETS
import fattag.stage as stage
import fattag.train as train
from fattag.config import make_config
from fattag.context import Run
from fattag.features import Clips
from fattag.model import build_model
from fattag.predict import predict_clips
from fattag.splits import TrainingData
from fattag.stages import top_up_size
from fattag.weights import stage_recipe


def make_run(cfg, tmp_path: Path) -> Run:
    return Run(cfg, "demo", tmp_path, tmp_path, torch.device("cpu"), False)


def test_no_out_of_fold_prediction_comes_from_a_model_that_saw_the_clip(stores, tmp_path, monkeypatch):
    """Every curated clip's OOF row comes from the one fold model that validated on it, and neither that model nor
    the stage-1 model it started from trained on that clip."""
    cfg, data, curated, noisy = stores
    seen = []
    real_fit = train.fit_stage

    def spy(model, trn, val, spec, deadline=None):
        parts = [trn] if isinstance(trn, Clips) else list(trn)
        seen.append((spec.label, parts, val))
        stage = cfg.noisy if spec.label.startswith("stage 1") else cfg.curated   # each stage's own settings
        assert spec.augment is stage and spec.lr == stage.lr and spec.epochs == stage.epochs
        return real_fit(model, trn, val, spec, deadline)

    monkeypatch.setattr(train, "fit_stage", spy)
    s = make_run(cfg, tmp_path)
    d = TrainingData.make(data.classes, curated, noisy, cfg)
    stage1 = train.train_stage1(s, d)
    assert stage1.weights is not None and len(stage1.holdout["per_epoch"]) == 1
    result = train.train_folds(s, d, stage1.weights)

    label, parts, _ = seen[0]
    assert label.startswith("stage 1") and all(p.store is noisy for p in parts)  # stage 1 never sees a curated clip
    fold_runs = seen[1:]
    assert len(fold_runs) == cfg.folds == len(result.models)
    covered = np.zeros(len(curated.table), int)
    for k, ((label, parts, val), model) in enumerate(zip(fold_runs, result.models)):
        trn = parts[0]
        assert all(p.store is noisy for p in parts[1:])  # anything else a fold trains on is noisy
        # curated.top_up of its items: the noisy top-up is stage 2's share, drawn from the noisy pool
        assert sum(len(p) for p in parts[1:]) == top_up_size(len(trn), 0.3, len(d.noisy_pool)) > 0
        assert label == f"fold {k} (curated)" and trn.store is curated and val.store is curated
        assert not set(trn.indices) & set(val.indices), f"fold {k} trained on its own validation clips"
        assert set(trn.indices) | set(val.indices) == set(np.flatnonzero(curated.ok))
        covered[val.indices] += 1
        again = predict_clips(model, curated, val.indices, cfg)  # these OOF rows came from this fold's model
        np.testing.assert_allclose(result.oof_windows[val.indices], again, rtol=1e-5, atol=1e-6)
    assert (covered == 1).all(), "every clip is validated (and predicted out of fold) exactly once"
    assert result.predicted.all()
    assert [t["stage"] for t in s.timings] == ["stage 1 (noisy)", "fold 0", "fold 1", "fold 2"]
    assert [r["fold"] for r in result.results] == [0, 1, 2] and s.budget.folds_done == 3


class ScriptedScores(Callback):
    """Replaces each epoch's lwlrap with a scripted value and remembers the weights after each epoch."""
    order = 52  # after the Recorder, before NanGuard / KeepBest

    def __init__(self, scores):
        self.scores, self.states = scores, []

    def after_epoch(self):
        idx = self.recorder.metric_names.index("lwlrap")
        self.recorder.log[idx] = self.scores[self.epoch]
        self.recorder.values[-1][idx - 1] = self.scores[self.epoch]
        self.states.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_the_best_epoch_is_kept_not_the_last(stores, tmp_path, monkeypatch):
    cfg, data, curated, _ = stores
    scripted = ScriptedScores([0.5, 0.9, 0.7])
    monkeypatch.setattr(stage, "augment_policy", lambda cfg, stage, fill: [scripted])
    model = build_model(cfg, len(data.classes), -40.0, 20.0)
    idx = np.flatnonzero(curated.ok)
    spec = stage.StageSpec("best test", cfg.curated, tmp_path, epochs=3, lr=1e-3, loss="bce", seed=0, cfg=cfg)
    res = stage.fit_stage(model, Clips(curated, idx[6:]), Clips(curated, idx[:6]), spec)
    assert res.best_epoch == 2 and res.best_score == pytest.approx(0.9)
    assert res.history["lwlrap"].tolist() == pytest.approx([0.5, 0.9, 0.7])
    for k, v in model.state_dict().items():
        assert torch.equal(v, scripted.states[1][k]), f"{k}: not the weights of the best epoch"
    assert not torch.equal(scripted.states[1]["1.0.0.weight"], scripted.states[2]["1.0.0.weight"])


def test_stage_specs_differ_only_by_their_stage_values():
    cfg = make_config("demo", sets=["noisy.lr=0.01", "curated.lr=0.002", "noisy.loss=lsoft", "curated.mixup=0.3"])
    s = make_run(cfg, Path("/tmp"))
    noisy = stage.StageSpec.for_stage(s, cfg.noisy, "s1", "/tmp/a", 5, 1)
    curated = stage.StageSpec.for_stage(s, cfg.curated, "f0", "/tmp/b", 7, 2)
    assert (noisy.lr, noisy.loss, noisy.epochs, noisy.seed, noisy.label) == (0.01, "lsoft", 5, 1, "s1")
    assert (curated.lr, curated.loss, curated.epochs, curated.seed) == (0.002, "bce", 7, 2)
    assert noisy.augment is cfg.noisy and curated.augment is cfg.curated and curated.augment.mixup == 0.3
    assert noisy.cfg is curated.cfg is cfg and (noisy.out_dir, curated.device) == (Path("/tmp/a"), "cpu")
    assert noisy.recipe == curated.recipe == stage_recipe(cfg, Path("/tmp"))  # one recipe for every stage of a run


class RecordWeights(Callback):
    """At the end of every epoch: the raw weights training goes on from, and the averaged weights."""
    order = 99

    def __init__(self):
        self.raw, self.averaged = [], []

    def after_epoch(self):
        from fattag.callbacks import WeightAverage
        avg = next(cb for cb in self.learn.cbs if isinstance(cb, WeightAverage))
        self.raw.append({k: v.clone() for k, v in self.model.state_dict().items()})
        self.averaged.append({k: v.clone() for k, v in avg.averaged.module.state_dict().items()})


def test_weight_averaging_scores_and_keeps_the_averaged_weights(stores, tmp_path, monkeypatch):
    cfg, data, curated, _ = stores
    cfg = make_config("demo", sets=[*TRAIN_SETS, "average_epochs=1"])
    scripted, rec = ScriptedScores([0.2, 0.3, 0.9]), RecordWeights()
    monkeypatch.setattr(stage, "augment_policy", lambda cfg, stage, fill: [scripted, rec])
    torch.manual_seed(0)
    model = build_model(cfg, len(data.classes), -40.0, 20.0)
    idx = np.flatnonzero(curated.ok)
    spec = stage.StageSpec("ema test", cfg.curated, tmp_path, epochs=3, lr=3e-3, loss="bce", seed=0, cfg=cfg)
    res = stage.fit_stage(model, Clips(curated, idx[6:]), Clips(curated, idx[:6]), spec)
    assert res.best_epoch == 3
    key = "1.0.0.weight"
    assert not torch.equal(rec.raw[2][key], rec.averaged[2][key]), "training goes on from the raw weights"
    assert torch.equal(model.state_dict()[key], rec.averaged[2][key]), "the kept weights are the averaged ones"
    assert torch.equal(scripted.states[2][key], rec.averaged[2][key]), "validation ran on the averaged weights"
    assert "average" in torch.load(tmp_path / "last.pth", weights_only=False)  # resumable


def test_per_band_input_normalisation_removes_each_bands_level():
    cfg = make_config("demo", sets=["input_norm=band"])
    model = build_model(cfg, 3, -40.0, 20.0)
    x = torch.randn(2, 1, cfg.n_mels, 50) + torch.linspace(-60, 0, cfg.n_mels)[None, None, :, None]
    out = model[0](x)
    assert torch.allclose(out.median(dim=-1).values, torch.zeros(2, 1, cfg.n_mels), atol=1e-5)
    assert torch.allclose(model[0](x + 13.0), out, atol=1e-5)  # a gain or EQ change no longer moves the input
    with pytest.raises(ValueError, match="input_norm"):
        build_model(make_config("demo", sets=["input_norm=cepstrum"]), 3)
    with pytest.raises(ValueError, match="input_norm"):
        build_model(make_config("demo", sets=["input_norm=band+band"]), 3)


def test_both_input_normalisations_as_two_channels():
    cfg = make_config("demo", sets=["input_norm=both"])
    model = build_model(cfg, 3, -40.0, 20.0)
    x = torch.randn(2, 1, cfg.n_mels, 50) - 40
    out = model[0](x)
    assert out.shape == (2, 2, cfg.n_mels, 50)
    assert torch.allclose(out[:, :1], (x + 40) / 20, atol=1e-5)
    assert torch.allclose(out[:, 1:], (x - x.median(dim=-1, keepdim=True).values) / 20, atol=1e-5)
    assert model(x).shape == (2, 3)


def test_pcen_channel_fades_a_steady_background_and_keeps_onsets():
    cfg = make_config("demo", sets=["input_norm=global+band+pcen"])
    model = build_model(cfg, 3, -40.0, 20.0)
    x = torch.full((2, 1, cfg.n_mels, 128), -50.0)
    x[:, :, : cfg.n_mels // 2] = -20.0           # a loud steady band region: a coloured background
    x[1, :, 5, 64:] += 30.0                       # an onset in one band of the second clip
    out = model[0](x)
    assert out.shape == (2, 3, cfg.n_mels, 128) and model(x).shape == (2, 3)
    pcen = out[:, 2]
    steady = pcen[0]
    # a steady input gives one flat value whatever its level (30 dB apart: 1.5 in the global channel, < 0.05
    # here): a background's colour is (almost) gone
    assert torch.allclose(steady, steady[0, 0].expand_as(steady), atol=0.05)
    onset = pcen[1, 5]
    assert onset[64] > 5 * steady[5, 64] and onset[64] > 2 * onset[120], "onset stands out, then fades"
    assert torch.allclose(pcen[1, 6], steady[6]), "bands are normalised independently"


def test_replayed_epochs_skip_every_stage_callbacks_after_epoch():
    """A resumed stage replays its finished epochs (fastai still runs after_epoch for them): the base class keeps
    them from being scored, checkpointed or logged again; other events and later epochs run as usual."""
    from types import SimpleNamespace

    from fattag.callbacks import EpochLog, StageCallback

    class Record(StageCallback):
        def __init__(self):
            self.calls = []

        def before_epoch(self):
            self.calls.append(("before_epoch", self.epoch))

        def after_epoch(self):
            self.calls.append(("after_epoch", self.epoch))

    cb = Record()
    cb.learn = SimpleNamespace(resume_epoch=2, epoch=0, training=True)
    for epoch in range(4):
        cb.learn.epoch = epoch
        cb("before_epoch")
        cb("after_epoch")
    assert cb.calls == [("before_epoch", 0), ("before_epoch", 1), ("before_epoch", 2), ("after_epoch", 2),
                        ("before_epoch", 3), ("after_epoch", 3)]
    fresh = Record()
    fresh.learn = SimpleNamespace(epoch=0, training=True)      # not a resumed stage: every epoch counts
    fresh("after_epoch")
    assert fresh.calls == [("after_epoch", 0)]
    log = EpochLog("replay test")
    log.learn = SimpleNamespace(resume_epoch=1, epoch=0, training=True)
    log("after_epoch")    # would need the recorder's values if it ran
