"""The noisy set: clip selection by agreement, the stage-2 noisy and stage-1 curated top-ups, stage 1's chance level."""
import numpy as np
import pandas as pd
import pytest
import torch

import fattag.select as select
import fattag.stage as stage
import fattag.train as train
from fattag.config import make_config, with_settings
from fattag.context import Run
from fattag.data import ClipTable
from fattag.features import Clips, CropDataset, MelStore
from fattag.metrics import chance_lwlrap
from fattag.splits import TrainingData
from fattag.stage import StageResult


def test_agreeing_keeps_clips_whose_labels_rank_in_the_top_n_plus_margin():
    probs = np.array([
        [0.9, 0.1, 0.2, 0.3, 0.0],   # label 0 ranked 1st                    -> keep
        [0.9, 0.1, 0.2, 0.3, 0.0],   # label 2 ranked 3rd (> 1 + margin 1)   -> drop
        [0.9, 0.1, 0.2, 0.3, 0.0],   # labels 0 and 2: ranks 1, 3 (<= 2 + 1) -> keep
        [0.9, 0.1, 0.2, 0.3, 0.0],   # labels 0 and 1: ranks 1, 4            -> drop
        [0.9, 0.1, 0.2, 0.3, 0.0],   # label 3 ranked 2nd                    -> keep
        [0.9, 0.1, 0.2, 0.3, 0.0],   # no label                              -> drop
    ])
    labels = np.zeros_like(probs)
    for row, cols in enumerate([[0], [2], [0, 2], [0, 1], [3], []]):
        labels[row, cols] = 1
    assert select.agreeing(probs, labels, margin=1).tolist() == [True, False, True, False, True, False]
    assert select.agreeing(probs, labels, margin=0).tolist() == [True, False, False, False, False, False]
    assert select.agreeing(probs, labels, margin=2).tolist() == [True, True, True, True, True, False]


def _noisy_data(n=40, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    targets = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]
    names = [f"n{i}.wav" for i in range(n)]
    mels = [np.zeros((8, 20), np.float16) for _ in range(n)]
    mels[3] = None  # undecodable: never in the pool
    noisy = MelStore(ClipTable("train_noisy", names, names, targets), mels)
    cnames = [f"c{i}.wav" for i in range(12)]
    curated = MelStore(ClipTable("train_curated", cnames, cnames, np.eye(classes, dtype=np.float32)[np.arange(12) % 4]),
                       [np.zeros((8, 20), np.float16) for _ in range(12)])
    cfg = make_config("demo", sets=["folds=3"])
    return TrainingData.make([f"k{i}" for i in range(classes)], curated, noisy, cfg), cfg


def test_select_noisy_keeps_the_agreeing_clips_and_reuses_its_choice(tmp_path, monkeypatch):
    d, cfg = _noisy_data()
    pool = np.flatnonzero(d.noisy.ok)
    labels = d.noisy.table.targets[pool]
    # a constructed scorer: right on the clips with an even index (their label on top), wrong on the others (their
    # label at the bottom)
    ramp = np.linspace(0.1, 0.5, labels.shape[1])[None, :]
    probs = np.where((pool % 2 == 0)[:, None], ramp + labels, ramp + 1 - labels)
    specs = []
    monkeypatch.setattr(select, "fit_stage", lambda model, trn, val, spec, deadline=None: specs.append(spec) or
                        StageResult(pd.DataFrame(), 0.8, 1, 0.1, 1))
    cfg = with_settings(cfg, {"curated.lr": 1e-3, "curated.loss": "focal", "noisy.lr": 5e-2})
    monkeypatch.setattr(select, "predict_clips", lambda model, store, idx, *a, **k: probs)
    s = Run(cfg, "demo", tmp_path, tmp_path, torch.device("cpu"), False)
    kept = select.select_noisy(s, d)
    assert kept.tolist() == [i for i in pool if i % 2 == 0]
    assert 3 not in kept
    [spec] = specs       # the scorer trains like a fold model: stage 2's learning rate, loss and augmentation
    assert (spec.lr, spec.loss, spec.augment, spec.epochs) == (1e-3, "focal", cfg.curated, cfg.select_epochs)
    monkeypatch.setattr(select, "predict_clips", lambda *a, **k: pytest.fail("a finished selection is reused"))
    assert select.select_noisy(s, d).tolist() == kept.tolist()


def test_noisy_top_up_makes_the_share_from_the_pool_only():
    d, _ = _noisy_data()
    d.noisy_pool = np.array([0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22])
    [extra] = d.noisy_top_up(n_curated=12, share=0.4, seed=1)
    assert len(extra) == 8 and set(extra.indices) <= set(d.noisy_pool) and len(set(extra.indices)) == 8
    assert extra.store is d.noisy
    again = d.noisy_top_up(12, 0.4, 1)[0]
    assert again.indices.tolist() == extra.indices.tolist()
    assert d.noisy_top_up(12, 0.0, 1) == [] and len(d.noisy_top_up(12, 0.9, 1)[0]) == 12  # capped by the pool


def test_curated_top_up_makes_the_stage1_share_from_the_decodable_curated_clips():
    d, _ = _noisy_data()
    d.curated.mels[5] = None   # undecodable: never drawn
    [extra] = d.curated_top_up(n_noisy=14, share=0.3, seed=2)   # 14 * 0.3 / 0.7 = 6 curated items
    assert extra.store is d.curated and len(extra) == 6 == len(set(extra.indices))
    assert 5 not in extra.indices and set(extra.indices) <= set(range(12))
    assert d.curated_top_up(14, 0.3, 2)[0].indices.tolist() == extra.indices.tolist()   # seeded
    assert d.curated_top_up(14, 0.0, 2) == []
    assert sorted(d.curated_top_up(14, 0.9, 2)[0].indices) == [i for i in range(12) if i != 5]   # capped at all


def test_stage1_trains_on_the_noisy_clips_plus_the_curated_share(tmp_path, monkeypatch):
    d, cfg = _noisy_data()
    seen = []

    def fake_fit(model, parts, valid, spec, deadline=None):
        seen.append((list(parts), valid, spec))
        return StageResult(pd.DataFrame(columns=stage.HISTORY_COLUMNS), 0.5, 1, 0.1, spec.epochs)

    monkeypatch.setattr(train, "fit_stage", fake_fit)
    monkeypatch.setattr(train, "finish_stage", lambda *a, **k: None)
    # 37 noisy training clips: a share of 0.1 adds 37 * 0.1 / 0.9 = 4 curated clips; 0.5 would add 37, capped at 12
    cfg = with_settings(cfg, {"curated.top_up": 0.5})   # stage 2's share: not stage 1's
    for share, n_curated in ((0.0, 0), (0.1, 4), (0.5, 12)):
        run_cfg = with_settings(cfg, {"noisy.top_up": share})
        stage1 = train.train_stage1(Run(run_cfg, "demo", tmp_path / str(share), tmp_path, torch.device("cpu"), False),
                                    d)
        assert stage1.weights is not None and stage1.holdout["per_epoch"] == []
        parts, valid, spec = seen[-1]
        assert (spec.augment, spec.lr, spec.loss) == (run_cfg.noisy, 4e-3, "bce")   # stage 1's own settings
        assert spec.augment is run_cfg.noisy and spec.label == "stage 1 (noisy)"
        assert parts[0].store is d.noisy and valid.store is d.noisy   # the holdout stays noisy
        assert not set(parts[0].indices) & set(valid.indices)
        extra = [p for p in parts[1:] if p.store is d.curated]
        assert sum(len(p) for p in extra) == n_curated and len(parts) == 1 + len(extra)


def test_crop_dataset_over_several_sets_returns_each_clip_with_its_own_labels():
    d, cfg = _noisy_data()
    for i, m in enumerate(d.noisy.mels):
        if m is not None:
            d.noisy.mels[i] = np.full((8, 20), i, np.float16)
    train, _ = d.fold(0)
    for i in train.indices:
        d.curated.mels[i] = np.full((8, 20), -i, np.float16)
    ds = CropDataset([train, Clips(d.noisy, [5, 7])], crop_frames=10, seed=0)
    assert len(ds) == len(train) + 2
    for pos, i in enumerate(train.indices):
        x, y = ds[pos]
        assert x.shape == (1, 8, 10) and x[0, 0, 0].item() == -i and torch.equal(y, torch.from_numpy(d.curated.table.targets[i]))
    for pos, i in enumerate([5, 7], start=len(train)):
        x, y = ds[pos]
        assert x[0, 0, 0].item() == i and torch.equal(y, torch.from_numpy(d.noisy.table.targets[i]))


def test_chance_lwlrap_is_what_random_scores_get():
    classes = 10
    truth = np.eye(classes)[np.random.default_rng(0).integers(0, classes, 2000)]
    harmonic = sum(1 / r for r in range(1, classes + 1)) / classes  # E[1/rank] of one label among 10 at random
    assert chance_lwlrap(truth) == pytest.approx(harmonic, abs=0.01)
