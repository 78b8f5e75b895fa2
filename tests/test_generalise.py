"""The settings aimed at unseen recording conditions: Freq-MixStyle, frequency-wise norm, restricted frequency
receptive field, a temporal layer, a noisy-label head, a mean teacher; and the switch that keeps test audio out of
training. Each test asserts what the technique does, not only that it runs."""
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastai.vision.models.xresnet import ResBlock
from torch import nn

from fattag.augment import FreqMixStyle, SpecAugment, augment_policy, freq_mixstyle
from fattag.callbacks import MeanTeacher
from fattag.config import make_config
from fattag.data import ClipTable
from fattag.cost import Throughput, Workload, plan_run, stage_costs
from fattag.features import Clips, CropDataset, MelStore
from fattag.losses import HeadRouter, make_loss
from fattag.model import FreqNorm, Temporal, TwoHeads, build_model, warm_start
from fattag.weights import MODEL_KEYS, stage_recipe


@pytest.fixture
def toy_store():
    names = [f"c{i}.wav" for i in range(4)]
    targets = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    mels = [np.full((5, 12), i, np.float16) for i in range(4)]
    return MelStore(ClipTable("toy", names, names, targets), mels)


def band_stats(x):
    return x.mean(-1), x.std(-1, unbiased=False)


# ---------------------------------------------------------------- Freq-MixStyle

def styled_batch():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 2, 6, 40, generator=g)
    colour = torch.tensor([0.0, 20.0, -10.0]).view(3, 1, 1, 1) + torch.linspace(0, 5, 6).view(1, 1, 6, 1)
    spread = torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1, 1)
    return base * spread + colour


def test_freq_mixstyle_takes_the_partners_band_statistics_and_keeps_the_normalised_content():
    x, y = styled_batch(), torch.eye(3)
    partner = torch.tensor([1, 2, 0])
    out, out_y = freq_mixstyle(x, y, p=1.0, alpha=0.3, lam=torch.zeros(3), partner=partner)
    mean, std = band_stats(x)
    out_mean, out_std = band_stats(out)
    assert torch.allclose(out_mean, mean[partner], atol=1e-4)
    assert torch.allclose(out_std, std[partner], rtol=1e-3)
    content = (x - mean[..., None]) / std[..., None]
    out_content = (out - out_mean[..., None]) / out_std[..., None]
    assert torch.allclose(out_content, content, atol=1e-3)
    assert torch.equal(out_y, y)        # the content, so the labels, are the clip's own


def test_freq_mixstyle_mixes_statistics_by_lam_and_leaves_unchosen_items_alone():
    x = styled_batch()
    lam = torch.tensor([0.25, 0.5, 1.0])
    partner = torch.tensor([1, 2, 0])
    out, _ = freq_mixstyle(x, torch.zeros(3, 2), p=1.0, alpha=0.3, lam=lam, partner=partner)
    mean, std = band_stats(x)
    want = lam.view(3, 1, 1) * mean + (1 - lam.view(3, 1, 1)) * mean[partner]
    assert torch.allclose(band_stats(out)[0], want, atol=1e-4)
    assert torch.allclose(out[2], x[2], atol=1e-4)          # lam 1: its own statistics
    same, _ = freq_mixstyle(x, torch.zeros(3, 2), p=0.0, alpha=0.3, lam=torch.zeros(3), partner=partner)
    assert torch.allclose(same, x, atol=1e-4)                # p 0: nobody chosen


def test_freq_mixstyle_is_a_stage_setting_placed_after_mixing_and_before_the_stripes():
    cfg = make_config("demo", sets=["curated.freq_mixstyle=0.6", "mixstyle_alpha=0.2"])
    cbs = augment_policy(cfg, cfg.curated, 0.0)
    style = next(cb for cb in cbs if isinstance(cb, FreqMixStyle))
    assert style.params == (0.6, 0.2)
    assert [type(cb) for cb in cbs][-2:] == [FreqMixStyle, SpecAugment]
    assert not any(isinstance(cb, FreqMixStyle) for cb in augment_policy(cfg, cfg.noisy, 0.0))
    assert FreqMixStyle.order < MeanTeacher.order < SpecAugment.order   # the teacher's view is styled, not striped


# ---------------------------------------------------------------- model: frequency-wise norm, receptive field, time

def test_freq_norm_is_lam_x_plus_each_bands_instance_norm():
    x = styled_batch()
    norm = FreqNorm(lam=0.1)
    inst = norm(x) - 0.1 * x
    assert torch.allclose(inst.mean((1, 3)), torch.zeros(3, 6), atol=1e-4)
    assert torch.allclose(inst.var((1, 3), unbiased=False), torch.ones(3, 6), atol=1e-3)
    offset = torch.randn(1, 1, 6, 1) * 10              # a recording's colour: a per-band offset
    assert torch.allclose(norm(x + offset) - norm(x), 0.1 * offset.expand_as(x), atol=1e-3)


def is_stage(m):
    return isinstance(m, nn.Sequential) and isinstance(m[0], ResBlock)


def test_freq_norm_goes_before_every_residual_stage():
    cfg = make_config("cpu", sets=["freq_norm=true"])
    body = build_model(cfg, 5)[1]
    names = [type(m).__name__ for m in body]
    stage_starts = [i for i, m in enumerate(body) if is_stage(m)]
    assert len(stage_starts) == 4 and all(names[i - 1] == "FreqNorm" for i in stage_starts)
    assert names.count("FreqNorm") == 4


def conv_kernels(module):
    return [m.kernel_size for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("n", [1, 2])
def test_freq_rf_turns_the_last_stages_3x3_convs_into_1x3(n):
    body = build_model(make_config("cpu", sets=[f"freq_rf={n}"]), 5)[1]
    stages = [m for m in body if is_stage(m)]
    for i, stage in enumerate(stages):
        kernels = [k for k in conv_kernels(stage) if k != (1, 1)]
        assert kernels and all(k == ((1, 3) if i >= len(stages) - n else (3, 3)) for k in kernels)
    x = torch.randn(2, 1, 48, 128)
    assert build_model(make_config("cpu", sets=[f"freq_rf={n}"]), 5).eval()(x).shape == (2, 5)


@pytest.mark.parametrize("arch, widths", [("xresnet_tiny", [16, 32, 64, 128]), ("xresnet_small", [32, 64, 128, 256]),
                                          ("xresnet_medium", [48, 96, 192, 384])])
def test_the_small_archs_widen_every_stage_by_their_factor(arch, widths):
    model = build_model(make_config("cpu", sets=[f"arch={arch}"]), 5)
    stages = [m for m in model[1] if is_stage(m)]
    assert [[c.out_channels for c in s.modules() if isinstance(c, nn.Conv2d)][-1] for s in stages] == widths
    assert model[1][-1].in_features == widths[-1]
    assert model.eval()(torch.randn(2, 1, 48, 128)).shape == (2, 5)


@pytest.mark.parametrize("kind", ["gru", "attention"])
def test_temporal_layer_lets_the_last_frame_hear_the_first(kind):
    torch.manual_seed(0)
    layer = Temporal(kind, 8).eval()
    x = torch.randn(1, 8, 3, 6, requires_grad=True)
    out = layer(x)
    assert out.shape == (1, 8, 1, 6)
    out[..., -1].sum().backward()
    assert x.grad[..., 0].abs().sum() > 0             # pooling alone: frame 0 would not move frame 5's output


def test_temporal_sits_before_the_pooling():
    body = build_model(make_config("cpu", sets=["temporal=gru"]), 5)[1]
    names = [type(m).__name__ for m in body]
    assert names.index("Temporal") == names.index("AdaptiveAvgPool2d") - 1
    with pytest.raises(ValueError, match="temporal"):
        make_config("cpu", sets=["temporal=lstm"])


# ---------------------------------------------------------------- the noisy head

def test_noisy_head_gives_2c_logits_in_training_and_the_main_head_in_evaluation():
    model = build_model(make_config("demo", sets=["noisy_head=true"]), 4)
    x = torch.randn(3, 1, 48, 128)
    heads = next(m for m in model.modules() if isinstance(m, TwoHeads))
    model.train()
    both = model(x)
    model.eval()
    main = model(x)
    assert both.shape == (3, 8) and main.shape == (3, 4)
    stage1 = build_model(make_config("demo", sets=["noisy_head=true"]), 4).state_dict()
    warm_start(model, stage1)
    assert torch.equal(heads.main.weight, stage1["1.11.main.weight"])
    assert torch.equal(heads.noisy.weight, heads.main.weight) and torch.equal(heads.noisy.bias, heads.main.bias)
    assert not torch.equal(heads.noisy.weight, stage1["1.11.noisy.weight"])


def test_the_noisy_head_receives_the_gradient_of_noisy_clips_only():
    logits = torch.randn(4, 6, requires_grad=True)           # 3 classes: main 0-2, noisy 3-5
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    flag = torch.tensor([[1.0], [0.0], [0.7], [0.2]])          # items 0 and 2 noisy (2: a mix, mostly noisy)
    loss = HeadRouter(nn.BCEWithLogitsLoss())(logits, torch.cat([labels, flag], 1))
    loss.backward()
    g = logits.grad
    noisy = torch.tensor([True, False, True, False])
    assert (g[noisy, :3] == 0).all() and (g[~noisy, 3:] == 0).all()
    assert (g[noisy, 3:] != 0).all() and (g[~noisy, :3] != 0).all()
    picked = torch.where(noisy[:, None], logits[:, 3:], logits[:, :3])
    assert torch.isclose(loss, nn.functional.binary_cross_entropy_with_logits(picked, labels))
    same = torch.randn(4, 3)                                  # validation: C logits, C targets, unchanged
    assert torch.isclose(make_loss("bce", True)(same, labels), make_loss("bce")(same, labels))


def test_crops_carry_the_noisy_flag_of_their_set(toy_store):
    curated, noisy = Clips(toy_store, [0, 1]), Clips(toy_store, [2, 3], noisy_labels=True)
    ds = CropDataset([curated, noisy], 8, head_flag=True)
    flags = [float(ds[i][1][-1]) for i in range(4)]
    assert flags == [0.0, 0.0, 1.0, 1.0]
    assert torch.equal(ds[2][1][:-1], torch.from_numpy(toy_store.table.targets[2]))
    assert len(CropDataset([curated], 8)[0][1]) == toy_store.table.targets.shape[1]   # no flag without the head


def test_only_the_noisy_top_up_of_stage_2_is_flagged_noisy(toy_store):
    from fattag.splits import TrainingData
    cfg = make_config("demo", sets=["folds=2", "curated.top_up=0.5", "noisy.top_up=0.5"])
    d = TrainingData.make(["a", "b", "c"], toy_store, toy_store, cfg)
    train, valid = d.fold_training(0, 0.5, seed=0)
    assert [c.noisy_labels for c in train] == [False, True] and not valid.noisy_labels
    assert not any(c.noisy_labels for c in d.curated_top_up(4, 0.5, seed=0))   # stage 1: all on the main head


# ---------------------------------------------------------------- mean teacher

def fake_learner(model, x, pred, base_loss):
    return SimpleNamespace(model=model, xb=(x,), pred=pred, loss_grad=base_loss, loss=base_loss.clone(),
                           training=True)


def test_mean_teacher_adds_weight_times_mse_to_its_views_probabilities():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randn(5, 1, 3, 4)
    seen = []
    cb = MeanTeacher(0.5, 0.9, view=lambda v: seen.append(v) or v * 2)   # a view the test can recompute
    cb.learn = fake_learner(model, x, model(x), torch.tensor(1.0))
    cb.before_fit()
    cb.before_batch()
    cb.learn.pred = torch.cat([cb.learn.pred, torch.zeros(5, 3)], 1)      # a noisy head's half is ignored
    cb.after_loss()
    with torch.no_grad():
        target = torch.sigmoid(model(x * 2))
        want = 1.0 + 0.5 * ((torch.sigmoid(model(x)) - target) ** 2).mean()
    assert torch.allclose(cb.learn.loss_grad, want) and torch.allclose(cb.learn.loss, want)
    assert len(seen) == 1 and seen[0] is not x                           # the view of a copy


def test_mean_teacher_follows_the_model_as_an_exponential_average():
    model = nn.Linear(2, 1)
    cb = MeanTeacher(1.0, 0.9, view=lambda v: v)
    cb.learn = fake_learner(model, torch.zeros(1, 2), torch.zeros(1, 1), torch.tensor(0.0))
    cb.before_fit()
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    cb.after_step()   # the first update copies; then each moves 10 % of the way
    with torch.no_grad():
        model.weight.add_(1.0)
    cb.after_step()
    teacher = cb.teacher.module.weight
    assert torch.allclose(teacher, 0.9 * (start + 1) + 0.1 * (start + 2))


def test_the_budget_prices_the_teachers_extra_forward_per_crop():
    w = Workload(noisy_train=100, noisy_holdout_windows=10, curated=60, curated_windows=90, test_windows=50,
                 test_clips=30, noisy_clips=110)
    tp = Throughput(train_s_per_clip=0.03, infer_s_per_window=0.01, device="cpu")
    base = make_config("cpu", sets=["curated.top_up=0"])
    off = stage_costs(base, w, tp, 0)
    on = stage_costs(make_config("cpu", sets=["curated.top_up=0", "curated.consistency=1", "noisy.consistency=1"]),
                     w, tp, 0)
    infer = 0.01 * 1.15
    fold_train = 60 * (base.folds - 1) / base.folds
    assert math.isclose(on["fold_epoch"] - off["fold_epoch"], fold_train * infer)
    assert math.isclose(on["noisy_epoch"] - off["noisy_epoch"], 100 * infer)
    assert math.isclose(on["pseudo_epoch"] - off["pseudo_epoch"], (fold_train + 30) * infer)
    assert on["oof_predict"] == off["oof_predict"]


# ---------------------------------------------------------------- test audio kept out of training

def test_train_on_test_false_plans_no_pseudo_label_round():
    w = Workload(noisy_train=100, noisy_holdout_windows=10, curated=60, curated_windows=90, test_windows=50,
                 test_clips=30, noisy_clips=110)
    tp = Throughput(train_s_per_clip=1e-4, infer_s_per_window=1e-4, device="cpu")
    on, off = (make_config("cpu", sets=[f"train_on_test={v}", "pseudo_epochs=10"]) for v in ("true", "false"))
    assert on.test_round_epochs == 10 and off.test_round_epochs == 0
    assert plan_run(on, w, tp, 1e6).epochs_pseudo == 10
    assert plan_run(off, w, tp, 1e6).epochs_pseudo == 0


def test_train_on_test_false_stops_the_round_before_it_reads_the_test_clips(caplog):
    from fattag.pseudo import pseudo_label_round
    folds = SimpleNamespace(models=["m"], results=[{"fold": 0}])
    run = SimpleNamespace(cfg=make_config("cpu", sets=["train_on_test=false"]))   # no world, budget: never asked
    with caplog.at_level(logging.INFO, logger="fattag"):
        assert pseudo_label_round(run, None, folds, None) is folds
    assert "train_on_test=false" in caplog.text


def test_the_report_line_says_whether_test_audio_was_trained_on():
    from run import test_audio_use
    cfg = make_config("cpu")
    assert test_audio_use(cfg, [{"fold": 0, "pseudo_epoch": 3}, {"fold": 1}]).startswith("trained on")
    assert "1 fold model" in test_audio_use(cfg, [{"fold": 0, "pseudo_epoch": 3}, {"fold": 1}])
    assert test_audio_use(make_config("cpu", sets=["train_on_test=false"]), [{"fold": 0}]) == \
        "not trained on (train_on_test=false)"


# ---------------------------------------------------------------- saved with the weights

def test_new_model_settings_travel_with_the_weights_and_stay_out_of_old_recipes():
    assert {"freq_norm", "freq_rf", "temporal", "noisy_head"} <= set(MODEL_KEYS)
    plain = stage_recipe(make_config("cpu"), "data")
    assert not {"freq_norm", "noisy_head", "curated.freq_mixstyle", "train_on_test"} & set(plain)
    on = stage_recipe(make_config("cpu", sets=["noisy_head=true", "curated.freq_mixstyle=0.5"]), "data")
    assert on["noisy_head"] is True and on["curated.freq_mixstyle"] == 0.5


@pytest.mark.parametrize("sets", [["temporal=gru", "freq_norm=true"], ["temporal=attention", "noisy_head=true"]])
def test_new_layers_run_under_bfloat16_autocast(sets):
    model = build_model(make_config("demo", sets=sets), 4).eval()
    x = torch.randn(2, 1, 48, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 4) and torch.isfinite(out.float()).all()
    np.testing.assert_allclose(out.float().detach(), model(x).detach(), atol=0.15)
