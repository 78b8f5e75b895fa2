"""The model: fastai's xresnet on log-mel crops, with the input channels (normalisations) built in.

Keeping the normalisation statistics inside the model (as buffers) means a saved state dict is all that
prediction needs besides the metadata that guards against a mismatch (classes, feature settings: weights.py).
"""
from __future__ import annotations

import torch
import torchaudio
from fastai.vision.models.xresnet import ResBlock, XResNet, xresnet18, xresnet34, xresnet50
from torch import nn

from .config import Config

ARCHS = {"xresnet18": xresnet18, "xresnet34": xresnet34, "xresnet50": xresnet50}
SMALL = {"xresnet_tiny": 0.25, "xresnet_small": 0.5}  # one block per stage, channels x widen


class InputNorm(nn.Module):
    """The model's input channels from a log-mel crop; float16 stores become float32 here.

    Channels (`input_norm`, one name or several joined by "+"):
    - `global`: (x - mean) / std with fixed statistics of the training log-mels;
    - `band`: each band's median over the crop's frames subtracted (a per-clip, per-frequency normalisation: a
      stationary background colour or a recording's EQ no longer shifts the input, but neither does a sustained
      sound's own spectrum);
    - `pcen`: per-channel energy normalisation (Wang et al. 2017): each band's energy divided by its own smoothed
      past (an automatic gain control over ~0.4 s), then root-compressed, so a slowly varying background fades and
      onsets stand out. The smoother is torchaudio's IIR `lfilter`, started at the crop's first frame.
    `both` is `global+band`.
    """

    CHANNELS = ("global", "band", "pcen")
    ALIASES = {"both": "global+band"}
    # PCEN constants as in the paper for 64 frames/s-ish hops: smoothing s, gain exponent, bias, root.
    PCEN_S, PCEN_ALPHA, PCEN_DELTA, PCEN_R = 0.04, 0.98, 2.0, 0.5

    @classmethod
    def channels(cls, mode: str) -> list[str]:
        names = cls.ALIASES.get(mode, mode).split("+")
        if any(n not in cls.CHANNELS for n in names) or len(set(names)) != len(names):
            raise ValueError(f"unknown input_norm {mode!r}: channels {', '.join(cls.CHANNELS)} joined by '+', "
                             f"or {', '.join(cls.ALIASES)}")
        return names

    def __init__(self, mean: float = 0.0, std: float = 1.0, mode: str = "global"):
        super().__init__()
        self.names = self.channels(mode)
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def pcen(self, x: torch.Tensor) -> torch.Tensor:
        energy = torch.pow(10.0, (x - self.mean) / 10.0)  # dB (power) -> energy, relative to the store's mean level
        start, s = energy[..., :1], self.PCEN_S
        a, b = (torch.tensor(c, device=x.device, dtype=energy.dtype) for c in ([1.0, s - 1.0], [s, 0.0]))
        smooth = torchaudio.functional.lfilter(energy - start, a, b, clamp=False) + start
        gain = energy / (1e-6 + smooth).pow(self.PCEN_ALPHA)
        return (gain + self.PCEN_DELTA).pow(self.PCEN_R) - self.PCEN_DELTA ** self.PCEN_R

    def forward(self, x):
        # Always float32, also inside a mixed-precision region: torchaudio's lfilter runs its FIR part as a conv1d
        # that autocast would make half precision, and its IIR loop accepts only float32/float64. The layers after
        # this one keep autocast's speed.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            make = {"global": lambda: (x - self.mean) / self.std,
                    "band": lambda: (x - x.median(dim=-1, keepdim=True).values) / self.std,
                    "pcen": lambda: self.pcen(x)}
            out = [make[name]() for name in self.names]
            return out[0] if len(out) == 1 else torch.cat(out, 1)


class FreqMeanTimeMax(nn.Module):
    """Pooling of the last feature map (B, C, F, T) -> (B, C): the mean over frequency, then the mean plus the max
    over time. A short event (a door, a gunshot) is not averaged away by the silence around it (FAT2019 2nd place:
    max over time with average over frequency "gained a lot")."""

    def forward(self, x):
        x = x.mean(2)
        return x.mean(-1) + x.amax(-1)


def to_device(model: nn.Module, device, channels_last: bool = True) -> nn.Module:
    """`model` on `device`, in the memory layout that is fastest there: channels-last on the CPU (`channels_last`),
    where oneDNN's convolutions then run the pipeline's epochs 6-22 % and its predictions ~80 % faster
    (docs/performance.md); the default layout on CUDA, whose speed mixed precision decides (a change there is
    unmeasured). Values are unchanged; only strides, and so float rounding, differ."""
    device = torch.device(device)
    fast = channels_last and device.type == "cpu"
    return model.to(device, memory_format=torch.channels_last if fast else torch.contiguous_format)


def input_mean(model: nn.Module) -> float:
    """The log-mel value that the model's input normalisation maps to zero: the neutral fill for masks."""
    norm = model[0] if isinstance(model, nn.Sequential) else None
    return float(norm.mean) if isinstance(norm, InputNorm) else 0.0


def build_model(cfg: Config, n_classes: int, mean: float = 0.0, std: float = 1.0) -> nn.Module:
    norm = InputNorm(mean, std, cfg.input_norm)
    act = nn.Mish if cfg.mish else nn.ReLU
    kw = dict(c_in=len(norm.names), n_out=n_classes, p=cfg.dropout, sa=cfg.self_attention, act_cls=act)
    if cfg.arch in SMALL:  # a few hundred thousand to a few million weights: CPU runs, demos and tests
        body = XResNet(ResBlock, 1, [1, 1, 1, 1], stem_szs=(16, 32, 64), widen=SMALL[cfg.arch], **kw)
    elif cfg.arch in ARCHS:
        body = ARCHS[cfg.arch](**kw)
    else:
        raise ValueError(f"unknown arch {cfg.arch!r}: {', '.join([*SMALL, *ARCHS])}")
    if cfg.pool == "freqmean_timemax":  # fastai's head: AdaptiveAvgPool2d(1), Flatten, Dropout, Linear
        pool = next(i for i, m in enumerate(body) if isinstance(m, nn.AdaptiveAvgPool2d))
        body[pool], body[pool + 1] = FreqMeanTimeMax(), nn.Identity()
    elif cfg.pool != "avg":
        raise ValueError(f"unknown pool {cfg.pool!r}: avg or freqmean_timemax")
    return nn.Sequential(norm, body)
