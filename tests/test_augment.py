"""Batch augmentations: the labels must follow the inputs, with the inputs' own weights and partners.

The trick used throughout: item i of the batch is a one-hot "image" whose only non-zero pixel is at position i,
and its label is one-hot at class i. After mixing, the pixels of item i say exactly which items were mixed into it
and with which weights, so the expected label can be read off the mixed input itself.
"""
import numpy as np
import pytest
import torch

from fattag.augment import mixup, spec_augment


def identity_batch(b: int):
    x = torch.eye(b).view(b, 1, b, 1)   # (B, 1, F=B, T=1): item i lights pixel i
    y = torch.eye(b)                    # item i carries class i
    return x, y


def test_mixup_labels_follow_the_inputs_weights_and_partners():
    torch.manual_seed(0)
    x, y = identity_batch(16)
    mx, my = mixup(x, y, 0.4)
    weights = mx.view(16, 16)  # row i: how much of item j is in mixed item i
    assert torch.allclose(my, weights, atol=1e-6)
    assert torch.allclose(weights.sum(1), torch.ones(16), atol=1e-6)
    assert (weights.diagonal() >= 0.5 - 1e-6).all(), "the original item stays dominant"
    assert (weights.diagonal() < 1 - 1e-6).any(), "some items must actually be mixed"


def test_spec_augment_masks_stripes_and_keeps_shape():
    torch.manual_seed(0)
    x = torch.ones(8, 1, 40, 100)
    out = spec_augment(x, 2, 20, 2, 8, fill=-5.0)
    assert out.shape == x.shape
    masked = out == -5.0
    assert masked.any() and not masked.all()
    cols = masked.all(dim=2)  # (B, 1, T): time frames masked across every band
    rows = masked.all(dim=3)  # (B, 1, F): bands masked across every frame
    assert cols.sum(-1).max() <= 2 * 20 and rows.sum(-1).max() <= 2 * 8  # never wider than the stripes allow
    assert (masked == (cols[:, :, None, :] | rows[:, :, :, None])).all()  # nothing but whole stripes is masked
    per_item = cols.sum((1, 2)).float()
    assert per_item.std() > 0  # each item gets its own stripes (iid masks)


def test_mixup_keeps_shapes_and_label_mass():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 20)
    y = torch.zeros(16, 5)
    y[torch.arange(16), torch.arange(16) % 5] = 1
    mx, my = mixup(x, y, 0.4)
    assert mx.shape == x.shape and my.shape == y.shape
    assert torch.allclose(my.sum(1), torch.ones(16), atol=1e-6)  # one label each, mixed: mass stays 1
    assert (my.max(1).values >= 0.5 - 1e-6).all()  # the item's own label stays dominant


# ---------------------------------------------------------------- mixing in the power domain

from fattag.augment import (DB, ConcatMix, FreqShift, Mixup, SpecAugment, UnionMix, add_power,  # noqa: E402
                            augment_policy, concat_mix, level_db, union_mix)
from fattag.config import make_config  # noqa: E402

FLOOR = -120.0  # "silence" in these constructed batches


def lit_pixel_batch(b: int):
    """Item i: silence except pixel i at 0 dB (one band, one frame); label: class i. Every item has the same level."""
    x = torch.full((b, 1, b, 1), FLOOR)
    x[torch.arange(b), 0, torch.arange(b), 0] = 0.0
    return x, torch.eye(b)


def test_level_and_power_addition():
    x = torch.full((2, 1, 8, 5), -20.0)
    x[1] += 10
    assert torch.allclose(level_db(x), torch.tensor([-20.0, -10.0]) + 10 * np.log10(8), atol=1e-4)
    assert add_power(torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(10 * np.log10(2), abs=1e-4)
    assert add_power(torch.tensor(-10.0), torch.tensor(-100.0)).item() == pytest.approx(-10.0, abs=1e-6)
    assert DB == pytest.approx(10 / np.log(10))


@pytest.mark.parametrize("gain", [0.0, 6.0])
def test_union_mix_adds_a_partner_at_its_gain_and_takes_the_union_of_labels(gain):
    torch.manual_seed(0)
    x, y = lit_pixel_batch(12)
    mx, my = union_mix(x, y, p=1.0, gain_db=gain)
    lit = mx.view(12, 12) > FLOOR + 20
    assert torch.equal(lit.float(), my), "the labels are exactly the sounds now present in the input"
    assert (my.sum(1) == 2).all() and (my.diagonal() == 1).all()  # itself and one partner, never itself twice
    partner_level = mx.view(12, 12)[lit & ~torch.eye(12, dtype=torch.bool)]
    assert (partner_level.abs() <= gain + 1e-3).all()
    assert torch.allclose(mx.view(12, 12).diagonal(), torch.zeros(12), atol=1e-3)  # the item keeps its level
    if gain:
        assert partner_level.std() > 1.0  # gains are drawn per item


def test_union_mix_probability_zero_and_one_half():
    torch.manual_seed(0)
    x, y = lit_pixel_batch(64)
    mx, my = union_mix(x, y, p=0.0, gain_db=6.0)
    assert torch.equal(mx, x) and torch.equal(my, y)
    mx, my = union_mix(x, y, p=0.5, gain_db=6.0)
    mixed = my.sum(1) == 2
    assert 16 < mixed.sum() < 48
    assert torch.equal(mx[~mixed], x[~mixed]) and torch.equal(my[~mixed], y[~mixed])


def test_concat_mix_joins_the_partner_after_a_cut_with_the_union_of_labels():
    torch.manual_seed(0)
    b, t = 10, 40
    x = torch.full((b, 1, b, t), FLOOR)
    x[torch.arange(b), 0, torch.arange(b), :] = 0.0  # item i: band i sounds all the time
    y = torch.eye(b)
    mx, my = concat_mix(x, y, p=1.0, gain_db=0.0)
    for i in range(b):
        bands = (mx[i, 0] > FLOOR + 20).float().argmax(0)  # which band sounds in each frame
        own, other = bands[0].item(), bands[-1].item()
        assert own == i and other != i
        cut = int((bands != i).float().argmax())
        assert 0.25 * t <= cut <= 0.75 * t and (bands[cut:] == other).all()
        assert my[i].nonzero().flatten().tolist() == sorted([i, other])


def test_augment_policy_follows_the_config_in_order():
    cfg = make_config("demo", sets=["curated.union_mix=0.5", "curated.concat_mix=0.2", "curated.mixup=0.4",
                                    "curated.freq_shift=2"])
    cbs = augment_policy(cfg, cfg.curated, -40.0)
    assert [type(cb) for cb in cbs] == [Mixup, UnionMix, ConcatMix, FreqShift, SpecAugment]
    # each with its stage's strength; the mixing gain and the stripes are shared (128 frames, 48 mels in demo)
    assert [cb.params for cb in cbs] == [(0.4,), (0.5, 6.0), (0.2, 6.0), (2,), (2, 12, 2, 4, -40.0)]
    assert [type(cb) for cb in augment_policy(cfg, cfg.noisy, -40.0)] == [SpecAugment]
    assert all(cb.run_valid is False for cb in augment_policy(cfg, cfg.curated, -40.0))


def test_a_stage_setting_reaches_only_its_own_stages_augmentation():
    """`--set curated.union_mix=0.5` mixes stage 2's batches at p 0.5 with the shared gain; stage 1's not at all
    (and `noisy.union_mix` the other way round)."""
    cfg = make_config("demo", sets=["curated.union_mix=0.5", "mix_gain_db=4"])
    assert (cfg.curated.union_mix, cfg.noisy.union_mix) == (0.5, 0.0)
    [mix] = [cb for cb in augment_policy(cfg, cfg.curated, -40.0) if isinstance(cb, UnionMix)]
    assert mix.params == (0.5, 4.0)
    assert not any(isinstance(cb, UnionMix) for cb in augment_policy(cfg, cfg.noisy, -40.0))
    cfg = make_config("demo", sets=["noisy.union_mix=0.3"])
    [mix] = [cb for cb in augment_policy(cfg, cfg.noisy, -40.0) if isinstance(cb, UnionMix)]
    assert mix.params[0] == 0.3
    assert not any(isinstance(cb, UnionMix) for cb in augment_policy(cfg, cfg.curated, -40.0))


def test_freq_shift_moves_whole_spectra_by_at_most_k_bands():
    from fattag.augment import freq_shift
    torch.manual_seed(0)
    b, f = 64, 16
    x = torch.arange(f, dtype=torch.float32).view(1, 1, f, 1).expand(b, 1, f, 5).clone()
    out = freq_shift(x, 3)
    shift = x[:, 0, 8, 0] - out[:, 0, 8, 0]                   # band 8 now holds band 8 - shift
    assert set(shift.long().tolist()) == set(range(-3, 4))
    for i in range(b):
        expected = (torch.arange(f) - shift[i]).clamp(0, f - 1)
        assert torch.equal(out[i, 0, :, 0], expected) and torch.equal(out[i, 0, :, 0], out[i, 0, :, 4])


def test_time_stretch_resamples_time_by_a_bounded_factor_and_keeps_bands():
    from fattag.augment import time_stretch
    torch.manual_seed(0)
    b, f, t = 256, 4, 64
    ramp = torch.arange(t, dtype=torch.float32).view(1, 1, 1, t).expand(b, 1, f, t).clone()
    x = ramp + 1000 * torch.arange(f, dtype=torch.float32).view(1, 1, f, 1)   # band k: 1000 k + frame index
    out = time_stretch(x, 0.25)
    assert out.shape == x.shape
    band = (out / 1000).floor()
    assert torch.equal(band, (x / 1000).floor()), "bands never mix: time is resampled, frequency is not"
    mid = out[:, 0, 0, 8:56]                                   # away from the reflected edges
    rate = (mid[:, 1:] - mid[:, :-1]).median(1).values         # input frames per output frame = 1 / factor
    assert rate.min() >= 1 / 1.25 - 0.02 and rate.max() <= 1.25 + 0.02
    assert (rate < 0.9).any() and (rate > 1.1).any(), "both slower and faster crops occur"
    slower = rate < 1
    assert (out[slower, 0, 0].amin(1) >= 0).all() and (out[slower, 0, 0].amax(1) <= t - 1).all()
    assert torch.allclose(time_stretch(x, 0.0), x, atol=1e-3)   # factor 1: the crop unchanged


def test_time_stretch_policy_and_labels():
    from fattag.augment import TimeStretch
    cfg = make_config("demo", sets=["curated.time_stretch=0.2"])
    cbs = augment_policy(cfg, cfg.curated, -40.0)
    assert [type(cb) for cb in cbs][-2:] == [TimeStretch, SpecAugment]
    x, y = torch.randn(4, 1, 8, 32), torch.eye(4)
    _, y2 = cbs[-2].augment(x, y)
    assert torch.equal(y2, y)


def test_union_mix_policy_adds_one_partner_and_its_labels():
    """union_mix at p=1 (mixup and SpecAugment off) on lit-pixel items: one UnionMix, so every item holds itself and
    exactly one partner, and its labels are exactly the items whose pixels it holds."""
    cfg = make_config("demo", sets=["curated.union_mix=1.0", "curated.specaug=false", "curated.mixup=0"])
    cbs = augment_policy(cfg, cfg.curated, FLOOR)
    assert [type(cb) for cb in cbs] == [UnionMix]
    torch.manual_seed(0)
    x, y = lit_pixel_batch(16)
    for cb in cbs:
        x, y = cb.augment(x, y)
    present = (x.view(16, 16) > FLOOR + 20).float()
    assert torch.equal(present, y)
    assert (y.sum(1) == 2).all()
