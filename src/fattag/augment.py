"""Augmentations of training batches, on the device, as small fastai callbacks (one concern each).

Each callback acts on `learn.xb`/`learn.yb` before a training batch (`run_valid = False`: validation batches are
never touched). Inputs are log-mel crops (B, 1, n_mels, T) in dB of power; targets are multi-hot (B, C). Which
ones a stage uses, and how strongly, is its augmentation policy (`augment_policy`), read from the
`StageSettings` it is given (`cfg.noisy`, `cfg.curated`).

Mixing is done in the power domain (two sounds add as powers, not as dB values), with the partner's level set
relative to the clip's own level, so "-6 dB" means what it means for the test mixtures:
- UnionMix: add a partner clip at a random relative gain; the labels are the union (FAT2019 1st/3rd place).
- ConcatMix: the clip up to a random cut, then the partner; the labels are the union (1st place).
- FreqShift: the whole spectrum moved up or down by a few mel bands (a small pitch/formant shift): another
  speaker, another instrument sample bank.
- TimeStretch: the crop played a little faster or slower: another tempo.
- FreqMixStyle: each band's mean and spread over time taken partly from a partner clip, the clip's own normalised
  content kept (Freq-MixStyle, Schmid et al. 2023): another microphone, room or sample bank colours a sound's
  spectrum; this teaches the model to look past the colour.
"""
from __future__ import annotations

import math

import torch
import torchaudio
from fastai.callback.core import Callback

from .config import Config, StageSettings


def spec_augment(x: torch.Tensor, n_time: int, time_width: int, n_freq: int, freq_width: int,
                 fill: float) -> torch.Tensor:
    """SpecAugment with torchaudio's masks, drawn independently per item: `n_time` time stripes of up to
    `time_width` frames and `n_freq` frequency stripes of up to `freq_width` bands, set to `fill`."""
    for _ in range(n_time if time_width >= 1 else 0):
        x = torchaudio.transforms.TimeMasking(time_width, iid_masks=True)(x, fill)
    for _ in range(n_freq if freq_width >= 1 else 0):
        x = torchaudio.transforms.FrequencyMasking(freq_width, iid_masks=True)(x, fill)
    return x


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Mix each item with a shuffled partner; soft targets mix the same way (BCE is linear in the target)."""
    b = x.shape[0]
    lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((b,))
    lam = torch.maximum(lam, 1 - lam).to(x.device)  # the original item stays dominant
    perm = torch.randperm(b).to(x.device)
    lx = lam.view(b, *([1] * (x.dim() - 1)))
    mixed_x = lx * x.float() + (1 - lx) * x[perm].float()
    mixed_y = lam[:, None] * y.float() + (1 - lam[:, None]) * y[perm].float()
    return mixed_x.to(x.dtype), mixed_y


DB = 10.0 / math.log(10.0)  # dB per neper of power: x_dB = DB * ln(power)


def level_db(x: torch.Tensor) -> torch.Tensor:
    """Each item's mean power over its frames, in dB (B,): the level that relative gains refer to."""
    frame = torch.logsumexp(x.float() / DB, dim=2)                 # (B, 1, T): power summed over bands
    return DB * (torch.logsumexp(frame, dim=-1) - math.log(x.shape[-1])).flatten()


def add_power(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The dB log-mel of two sounds played together (their powers add)."""
    return DB * torch.logaddexp(x.float() / DB, other.float() / DB)


def partners(b: int, device) -> torch.Tensor:
    """A random partner for every item of a batch, never itself (when the batch has more than one item)."""
    if b < 2:
        return torch.zeros(b, dtype=torch.long, device=device)
    return (torch.arange(b, device=device) + torch.randint(1, b, (b,), device=device)) % b


def uniform(n: int, lo: float, hi: float, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device)


def union_mix(x: torch.Tensor, y: torch.Tensor, p: float, gain_db: float):
    """With probability p per item: add a partner at a relative level in [-gain_db, +gain_db]; labels: the union."""
    b = x.shape[0]
    chosen = torch.rand(b, device=x.device) < p
    j = partners(b, x.device)
    shift = level_db(x) - level_db(x[j]) + uniform(b, -gain_db, gain_db, x.device)
    mixed = add_power(x, x[j] + shift.view(b, 1, 1, 1))
    x = torch.where(chosen.view(b, 1, 1, 1), mixed.to(x.dtype), x)
    y = torch.where(chosen[:, None], torch.maximum(y, y[j]), y)
    return x, y


def concat_mix(x: torch.Tensor, y: torch.Tensor, p: float, gain_db: float):
    """With probability p per item: from a random cut (25-75 % of the crop) on, the partner's frames, at a relative
    level in [-gain_db, +gain_db]; labels: the union."""
    b, t = x.shape[0], x.shape[-1]
    chosen = torch.rand(b, device=x.device) < p
    j = partners(b, x.device)
    shift = level_db(x) - level_db(x[j]) + uniform(b, -gain_db, gain_db, x.device)
    cut = (uniform(b, 0.25, 0.75, x.device) * t).long()
    tail = (torch.arange(t, device=x.device)[None, :] >= cut[:, None]) & chosen[:, None]   # (B, T)
    x = torch.where(tail.view(b, 1, 1, t), (x[j].float() + shift.view(b, 1, 1, 1)).to(x.dtype), x)
    y = torch.where(chosen[:, None], torch.maximum(y, y[j]), y)
    return x, y


def freq_shift(x: torch.Tensor, max_bands: int) -> torch.Tensor:
    """Per item: move the spectrum by a random whole number of mel bands in [-max_bands, max_bands]; the bands that
    come in at the edge repeat the edge band."""
    b, f = x.shape[0], x.shape[2]
    shift = torch.randint(-max_bands, max_bands + 1, (b,), device=x.device)
    src = (torch.arange(f, device=x.device)[None, :] - shift[:, None]).clamp(0, f - 1)      # (B, F)
    return torch.gather(x, 2, src.view(b, 1, f, 1).expand_as(x))


def time_stretch(x: torch.Tensor, max_stretch: float) -> torch.Tensor:
    """Per item: play the crop faster or slower by a factor in [1/(1+s), 1+s] (log-uniform), resampled along time
    with torch's `grid_sample` around a random centre; a crop that becomes too short is continued by reflection.
    Another speaker or player takes another tempo."""
    b = x.shape[0]
    factor = torch.exp(uniform(b, -math.log1p(max_stretch), math.log1p(max_stretch), x.device))   # >1: slower
    width = 1.0 / factor                                       # share of the crop's frames the output spans
    centre = uniform(b, -1.0, 1.0, x.device) * (1.0 - width).clamp(min=0.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1] = width, centre, 1.0
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection",
                                          align_corners=False)
    return out.to(x.dtype)


def freq_mixstyle(x: torch.Tensor, y: torch.Tensor, p: float, alpha: float, lam: torch.Tensor | None = None,
                  partner: torch.Tensor | None = None):
    """With probability p per item: normalise each band of the crop by its own mean and standard deviation over time,
    then give it lam * its own + (1 - lam) * the partner's statistics, lam ~ Beta(alpha, alpha) per item; labels
    kept (the content is the item's own). `lam` and `partner` may be given (tests)."""
    b = x.shape[0]
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)                                   # (B, 1, F, 1): per band, over time
    std = (xf.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt()
    if lam is None:
        lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((b,)).to(x.device)
    if partner is None:
        partner = partners(b, x.device)
    chosen = torch.rand(b, device=x.device) < p
    lam = torch.where(chosen, lam.float(), torch.ones_like(lam, dtype=torch.float32)).view(b, 1, 1, 1)
    mixed_mean = lam * mean + (1 - lam) * mean[partner]
    mixed_std = lam * std + (1 - lam) * std[partner]
    return ((xf - mean) / std * mixed_std + mixed_mean).to(x.dtype), y


class BatchAugment(Callback):
    """Base: `fn(x, y, *params) -> (x, y)` on each training batch, on the device. Subclasses name the function
    and their place in the order; validation batches are never touched (`run_valid = False`)."""
    run_valid = False
    order = 60

    def __init__(self, *params):
        self.params = params

    def before_batch(self):
        x, y = self.augment(self.xb[0], self.yb[0])
        self.learn.xb, self.learn.yb = (x,), (y,)

    def augment(self, x: torch.Tensor, y: torch.Tensor):
        """The transform itself; also called outside a Learner (benchmarks, tests)."""
        return type(self).fn(x, y, *self.params)


class Mixup(BatchAugment):
    """Classic mixup (alpha): a convex mix of two clips with the same mix of their labels."""
    fn = staticmethod(mixup)


class UnionMix(BatchAugment):
    """(p, gain_db): add a partner; labels: the union."""
    order, fn = 61, staticmethod(union_mix)


class ConcatMix(BatchAugment):
    """(p, gain_db): the partner after a cut; labels: the union."""
    order, fn = 62, staticmethod(concat_mix)


class FreqShift(BatchAugment):
    """(max_bands,): a small shift of the whole spectrum along the mel axis."""
    order, fn = 65, staticmethod(lambda x, y, *p: (freq_shift(x, *p), y))


class TimeStretch(BatchAugment):
    """(max_stretch,): each crop a little faster or slower."""
    order, fn = 66, staticmethod(lambda x, y, *p: (time_stretch(x, *p), y))


class FreqMixStyle(BatchAugment):
    """(p, alpha): per-band statistics mixed with a partner's, after mixing (a mixture is restyled as one clip)."""
    order, fn = 67, staticmethod(freq_mixstyle)


class SpecAugment(BatchAugment):
    """(n_time, time_width, n_freq, freq_width, fill): stripes filled with the model's input mean (a neutral value),
    after every mixing step: a stripe hides part of the mixture, as it would hide part of a clip."""
    order, fn = 70, staticmethod(lambda x, y, *p: (spec_augment(x, *p), y))


def augment_policy(cfg: Config, stage: StageSettings, fill: float) -> list[Callback]:
    """The training-batch callbacks of a stage (`cfg.noisy`, `cfg.curated`, or whichever a step trains with), in the
    order they act: mixing (mixup, union, concatenation), frequency shift, time stretch, Freq-MixStyle, then
    SpecAugment stripes;
    `cfg` gives the settings both stages share (mixing gain, stripe widths)."""
    cbs: list[Callback] = []
    if stage.mixup > 0:
        cbs.append(Mixup(stage.mixup))
    if stage.union_mix > 0:
        cbs.append(UnionMix(stage.union_mix, cfg.mix_gain_db))
    if stage.concat_mix > 0:
        cbs.append(ConcatMix(stage.concat_mix, cfg.mix_gain_db))
    if stage.freq_shift > 0:
        cbs.append(FreqShift(stage.freq_shift))
    if stage.time_stretch > 0:
        cbs.append(TimeStretch(stage.time_stretch))
    if stage.freq_mixstyle > 0:
        cbs.append(FreqMixStyle(stage.freq_mixstyle, cfg.mixstyle_alpha))
    if stage.specaug:
        cbs.append(SpecAugment(*stripes(cfg, fill)))
    return sorted(cbs, key=lambda cb: cb.order)


def stripes(cfg: Config, fill: float) -> tuple:
    """SpecAugment's parameters (spec_augment after x): stripe counts and widest widths from the settings."""
    return (cfg.time_masks, int(cfg.crop_frames * cfg.time_mask_frac), cfg.freq_masks,
            int(cfg.n_mels * cfg.freq_mask_frac), fill)


def teacher_view(cfg: Config, fill: float):
    """The mean teacher's view of a training batch (callbacks.MeanTeacher): the batch as mixed, before the student's
    stripes, with SpecAugment stripes of its own."""
    params = stripes(cfg, fill)
    return lambda x: spec_augment(x, *params)
