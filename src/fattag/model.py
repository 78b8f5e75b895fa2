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
SMALL = {"xresnet_tiny": 0.25, "xresnet_small": 0.5, "xresnet_medium": 0.75}  # one block per stage, channels x widen


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


class FreqNorm(nn.Module):
    """Residual frequency-wise normalisation (Kim et al. 2021, DCASE 2021 Task 1A): `lam * x + FreqIN(x)`, where
    FreqIN normalises each frequency row of each clip by its mean and spread over channels and time. A recording's
    colour (a microphone's or a room's response) is a per-band offset; this takes most of it away while `lam * x`
    keeps what the band itself says."""

    def __init__(self, lam: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.lam, self.eps = lam, eps

    def forward(self, x):                                       # (B, C, F, T)
        mean = x.mean((1, 3), keepdim=True)
        var = x.var((1, 3), keepdim=True, unbiased=False)
        return self.lam * x + (x - mean) / (var + self.eps).sqrt()


class Temporal(nn.Module):
    """A sequence model over the last feature map's frames, before the clip pooling: the map is averaged over
    frequency, each frame's channels go through a bidirectional GRU or one self-attention layer, and the result is
    added back (a residual), shaped (B, C, 1, T) for the pooling that follows. The pooling alone sees each frame on
    its own; this lets a frame's score depend on what came before and after (FAT2019 1st place's attention,
    Paderborn's CRNN)."""

    def __init__(self, kind: str, channels: int, heads: int = 4):
        super().__init__()
        self.kind = kind
        if kind == "gru":
            self.seq = nn.GRU(channels, channels // 2, batch_first=True, bidirectional=True)
        elif kind == "attention":
            self.seq = nn.MultiheadAttention(channels, heads if channels % heads == 0 else 1, batch_first=True)
        else:
            raise ValueError(f"unknown temporal {kind!r}: gru or attention")
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):                                       # (B, C, F, T) -> (B, C, 1, T)
        frames = x.mean(2).transpose(1, 2)                      # (B, T, C)
        h = self.norm(frames)
        h = self.seq(h)[0] if self.kind == "gru" else self.seq(h, h, h, need_weights=False)[0]
        return (frames + h).transpose(1, 2).unsqueeze(2)


class TwoHeads(nn.Module):
    """The classifier with a second head for noisy-labelled clips (FAT2019 4th place): in training both heads'
    logits side by side (B, 2C), which `losses.HeadRouter` routes by each item's noisy flag; in evaluation the main
    (curated) head's alone, so validation and prediction see C classes."""

    def __init__(self, main: nn.Linear):
        super().__init__()
        self.main = main
        self.noisy = nn.Linear(main.in_features, main.out_features)

    def forward(self, x):
        return torch.cat([self.main(x), self.noisy(x)], 1) if self.training else self.main(x)


def warm_start(model: nn.Module, state: dict) -> None:
    """Stage 2 from stage 1's weights: a noisy head starts as a copy of the main head that stage 1 trained on every
    clip (stage 1 scores all its clips on the main head), from where it takes over the noisy top-up's labels."""
    model.load_state_dict(state)
    for m in model.modules():
        if isinstance(m, TwoHeads):
            m.noisy.load_state_dict(m.main.state_dict())


def restrict_freq_rf(stage: nn.Module) -> None:
    """Every 3x3 convolution of a residual stage becomes 1x3 (one band, three frames): the stage adds nothing to the
    receptive field along frequency (CP-ResNet, Koutini et al. 2019). Shapes and strides are unchanged."""
    for parent in list(stage.modules()):
        for name, conv in list(parent.named_children()):
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                setattr(parent, name, nn.Conv2d(conv.in_channels, conv.out_channels, (1, 3), conv.stride, (0, 1),
                                                bias=conv.bias is not None, groups=conv.groups))


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
    stages = [i for i, m in enumerate(body) if isinstance(m, nn.Sequential) and isinstance(m[0], ResBlock)]
    for i in stages[len(stages) - cfg.freq_rf:] if cfg.freq_rf > 0 else []:
        restrict_freq_rf(body[i])
    pool = next(i for i, m in enumerate(body) if isinstance(m, nn.AdaptiveAvgPool2d))
    if cfg.pool == "freqmean_timemax":  # fastai's head: AdaptiveAvgPool2d(1), Flatten, Dropout, Linear
        body[pool], body[pool + 1] = FreqMeanTimeMax(), nn.Identity()
    elif cfg.pool != "avg":
        raise ValueError(f"unknown pool {cfg.pool!r}: avg or freqmean_timemax")
    features = body[-1].in_features   # channels of the last stage, into the classifier
    if cfg.noisy_head:
        body[-1] = TwoHeads(body[-1])
    if cfg.temporal == "none" and not cfg.freq_norm:
        return nn.Sequential(norm, body)
    layers = list(body)                # modules go in between: later indices first, so earlier ones stay put
    if cfg.temporal != "none":
        layers.insert(pool, Temporal(cfg.temporal, features))
    for i in reversed(stages if cfg.freq_norm else []):
        layers.insert(i, FreqNorm())
    return nn.Sequential(norm, nn.Sequential(*layers))
