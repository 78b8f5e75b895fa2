"""Whole-clip inference: augmented TTA passes and the fold ensemble, checked by value."""
import numpy as np
import pytest
import torch

import fattag.predict as predict
from fattag.config import make_config
from fattag.data import ClipTable
from fattag.features import MelStore
from fattag.model import build_model


@pytest.fixture
def cfg():
    return make_config("demo", sets=["tta_step_frac=0.5"])


@pytest.fixture
def store(cfg):
    """Five clips of random log-mels, one to four windows long."""
    rng = np.random.default_rng(0)
    lengths = [cfg.crop_frames, cfg.crop_frames + 7, 2 * cfg.crop_frames, 3 * cfg.crop_frames + 1, cfg.crop_frames]
    mels = [(rng.standard_normal((cfg.n_mels, t)) * 10 - 40).astype(np.float16) for t in lengths]
    names = [f"c{i}.wav" for i in range(len(mels))]
    return MelStore(ClipTable("test", names, names, None), mels)


def model_for(cfg, seed: int):
    torch.manual_seed(seed)
    return build_model(cfg, 4, -40.0, 10.0).eval()


def test_augmented_passes_are_averaged_with_the_plain_pass(cfg, store, monkeypatch):
    """An augmentation that blanks the input makes every augmented pass a known constant: the result must be
    (plain + passes x constant) / (1 + passes), clip by clip."""
    model = model_for(cfg, 0)
    idx = np.arange(len(store.mels))
    plain = predict.predict_clips(model, store, idx, cfg)
    blank = torch.full((1, 1, cfg.n_mels, cfg.crop_frames), -40.0)
    with torch.no_grad():
        constant = torch.sigmoid(model(blank)).numpy()[0]
    monkeypatch.setattr(predict, "tta_augment", lambda x, cfg, fill: torch.full_like(x, fill))
    for passes in (1, 2):
        got = predict.predict_clips(model, store, idx, cfg, aug_passes=passes)
        np.testing.assert_allclose(got, (plain + passes * constant[None]) / (1 + passes), rtol=1e-5, atol=1e-6)


def test_augmented_passes_change_predictions_and_are_reproducible(cfg, store):
    model = model_for(cfg, 0)
    idx = np.arange(len(store.mels))
    plain = predict.predict_clips(model, store, idx, cfg)
    a = predict.predict_clips(model, store, idx, cfg, aug_passes=2)
    b = predict.predict_clips(model, store, idx, cfg, aug_passes=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - plain).max() > 1e-4


def test_tta_augment_masks_one_stripe_each_way(cfg):
    torch.manual_seed(0)
    x = torch.zeros(64, 1, cfg.n_mels, cfg.crop_frames)
    out = predict.tta_augment(x, cfg, fill=1.0)
    masked = out == 1.0
    assert masked.any()
    frac = masked.float().mean().item()
    assert frac <= cfg.time_mask_frac / 2 + cfg.freq_mask_frac / 2 + 1e-6


def test_ensemble_mean_and_geomean_by_value():
    a = np.array([[0.25, 0.5], [0.04, 1.0]])
    b = np.array([[1.0, 0.5], [0.01, 0.25]])
    np.testing.assert_allclose(predict.ensemble([a, b], "mean"), (a + b) / 2)
    np.testing.assert_allclose(predict.ensemble([a, b], "geomean"), np.sqrt(a * b))
    with pytest.raises(ValueError, match="ensemble"):
        predict.ensemble([a, b], "median")


@pytest.mark.parametrize("how", ["mean", "geomean"])
def test_predict_test_ensembles_the_folds_and_leaves_failed_clips_empty(cfg, store, how):
    cfg = make_config("demo", sets=[f"fold_ensemble={how}"])
    store.mels[2] = None  # could not be decoded
    models = [model_for(cfg, 0), model_for(cfg, 1)]
    got = predict.predict_test(models, store, cfg, "cpu", aug_passes=0)
    ok = np.flatnonzero(store.ok)
    each = [predict.predict_clips(m, store, ok, cfg) for m in models]
    assert np.isnan(got[2]).all() and np.isfinite(got[ok]).all()
    np.testing.assert_allclose(got[ok], predict.ensemble(each, how), rtol=1e-6)


def test_predict_and_submit_uses_the_given_settings_and_records_them(cfg, store, tmp_path):
    """The test passes and inference settings are those of the cfg it is given (the run's request may differ):
    submission.csv holds its predictions, inference.json its inference settings, a prior row the failed clip."""
    import json
    from types import SimpleNamespace

    import pandas as pd

    from fattag.context import Run
    from fattag.weights import inference_settings
    store.mels[1] = None                               # could not be decoded
    run = Run(make_config("demo"), "demo", tmp_path, tmp_path, torch.device("cpu"))
    classes = ["a", "b", "c", "d"]
    fnames = list(store.table.fnames)
    pd.DataFrame({"fname": fnames, **{c: 0.0 for c in classes}}).to_csv(tmp_path / "sample.csv", index=False)
    data = SimpleNamespace(sample_submission=tmp_path / "sample.csv", test=store.table,
                           classes=classes)
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    used = make_config("demo", sets=["tta_aug_passes=2", "tta_aggregate=max"])
    models = [model_for(used, 0), model_for(used, 1)]
    probs, unbalanced = predict.predict_and_submit(run, used, data, models, store, prior)
    ok = np.flatnonzero(store.ok)
    expected = predict.predict_test(models, store, used, "cpu", aug_passes=2)
    np.testing.assert_allclose(probs[ok], expected[ok], rtol=1e-6)
    assert not np.allclose(probs[ok], predict.predict_test(models, store, used, "cpu", aug_passes=0)[ok])
    np.testing.assert_allclose(probs[1], prior)
    sub = pd.read_csv(tmp_path / "submission.csv")
    np.testing.assert_allclose(sub[classes].to_numpy(), probs, atol=1e-6)
    assert json.loads((tmp_path / "inference.json").read_text()) == inference_settings(used)
    assert [t["stage"] for t in run.timings] == ["predict test"]
    np.testing.assert_allclose(unbalanced[ok], expected[ok], rtol=1e-6)   # class balancing is off here
    assert np.isnan(unbalanced[1]).all()
    # no model trained in time: the class prior on every row
    probs, _ = predict.predict_and_submit(run, used, data, [], store, prior)
    assert np.allclose(probs, prior[None])


def test_class_balance_removes_a_class_that_is_scored_high_everywhere():
    """Class 0 gets 0.5 on every clip, the true class of each clip only 0.3 (others 0.05): unbalanced, class 0 tops
    every clip; divided by each class's test mean, each clip's true class comes first."""
    from fattag.metrics import lwlrap
    n, c = 60, 4
    truth = np.zeros((n, c))
    truth[np.arange(n), 1 + np.arange(n) % (c - 1)] = 1
    probs = np.where(truth > 0, 0.3, 0.05)
    probs[:, 0] = 0.5
    balanced = predict.balance_classes(probs)
    assert lwlrap(truth, probs) < 0.6 and lwlrap(truth, balanced) == 1.0
    assert balanced.min() >= 0 and balanced.max() == pytest.approx(1.0)
    ratio = probs / probs.mean(0)
    assert np.array_equal(balanced.argsort(1), ratio.argsort(1))  # the order within a clip is that of p / mean
    few = probs[: predict.BALANCE_MIN_CLIPS - 1]
    assert np.array_equal(predict.balance_classes(few), few)  # too few clips to estimate the means: unchanged


def test_predict_and_submit_balances_the_submission_and_hands_back_the_probabilities_before(cfg, store, tmp_path,
                                                                                            monkeypatch):
    """predict_test gives the fold ensemble as it is, whatever class_balance says; with class balancing on,
    submission.csv holds the balanced scores and the second result the probabilities before balancing: what the
    report's class means are drawn from and what the tag mode gives."""
    from types import SimpleNamespace

    import pandas as pd

    from fattag.context import Run
    monkeypatch.setattr(predict, "BALANCE_MIN_CLIPS", 1)
    classes = ["a", "b", "c", "d"]
    pd.DataFrame({"fname": store.table.fnames, **{c: 0.0 for c in classes}}).to_csv(tmp_path / "s.csv", index=False)
    data = SimpleNamespace(sample_submission=tmp_path / "s.csv", test=store.table, classes=classes)
    balanced_cfg = make_config("demo", sets=["class_balance=true"])
    models = [model_for(cfg, 0), model_for(cfg, 1)]
    plain = predict.predict_test(models, store, cfg, "cpu", 0)
    np.testing.assert_array_equal(predict.predict_test(models, store, balanced_cfg, "cpu", 0), plain)
    run = Run(balanced_cfg, "demo", tmp_path, tmp_path, torch.device("cpu"))
    probs, unbalanced = predict.predict_and_submit(run, balanced_cfg, data, models, store, np.full(4, 0.25))
    ratio = plain / plain.mean(0)
    np.testing.assert_allclose(probs, ratio / ratio.max(), rtol=1e-6)
    np.testing.assert_allclose(unbalanced, plain, rtol=1e-6)
    assert not np.allclose(probs.mean(0), unbalanced.mean(0), atol=1e-3)
    sub = pd.read_csv(tmp_path / "submission.csv")
    np.testing.assert_allclose(sub[classes].to_numpy(), probs, atol=1e-6)


def test_cpu_layout_is_channels_last_and_predicts_the_same(cfg, store):
    """model.to_device puts a CPU model's convolutions in channels-last layout (the faster one there); the
    predictions are those of the default layout up to float rounding."""
    from fattag.model import to_device
    plain = model_for(cfg, 0)
    fast = to_device(model_for(cfg, 0), "cpu")
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert sum(not w.is_contiguous() for w in convs) > len(convs) / 2   # 1x1 kernels are both layouts at once
    assert all(w.is_contiguous() for w in to_device(model_for(cfg, 0), "cpu", channels_last=False).parameters())
    x = torch.from_numpy(np.stack([m[:, :cfg.crop_frames] for m in store.mels])[:, None].astype(np.float32))
    with torch.inference_mode():
        assert torch.allclose(fast(x), plain(x), atol=1e-4)
    idx = np.arange(len(store.mels))
    assert np.allclose(predict.predict_clips(plain, store, idx, cfg), predict.predict_clips(fast, store, idx, cfg),
                       atol=1e-5)


def test_predict_and_submit_balances_the_submission_and_hands_back_the_ensemble_before_it(cfg, store, tmp_path,
                                                                                          monkeypatch):
    """With class balancing on, submission.csv holds the balanced scores and the second result is the ensemble as
    the models gave it: what the report's class-mean figure shows (balanced, every class's mean would be equal)."""
    from types import SimpleNamespace

    import pandas as pd

    from fattag.context import Run
    monkeypatch.setattr(predict, "BALANCE_MIN_CLIPS", 2)   # the small store is enough test clips here
    run = Run(make_config("demo"), "demo", tmp_path, tmp_path, torch.device("cpu"))
    classes = ["a", "b", "c", "d"]
    pd.DataFrame({"fname": list(store.table.fnames), **{c: 0.0 for c in classes}}).to_csv(tmp_path / "s.csv",
                                                                                         index=False)
    data = SimpleNamespace(sample_submission=tmp_path / "s.csv", test=store.table, classes=classes)
    used = make_config("demo", sets=["class_balance=true"])
    models = [model_for(used, 0), model_for(used, 1)]
    probs, unbalanced = predict.predict_and_submit(run, used, data, models, store, np.full(4, 0.25))
    ensemble = predict.predict_test(models, store, used, "cpu", aug_passes=0)
    np.testing.assert_allclose(unbalanced, ensemble, rtol=1e-6)
    np.testing.assert_allclose(probs, predict.balance_classes(ensemble), rtol=1e-6)
    assert not np.allclose(probs, unbalanced, atol=1e-3)
