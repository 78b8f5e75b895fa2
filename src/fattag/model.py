"""The model: fastai's xresnet on one-channel log-mels, with the input normalisation built in.

Keeping the normalisation statistics inside the model (as buffers) means a saved state dict is all that
prediction needs besides the metadata that guards against a mismatch (classes, feature settings).
"""
from __future__ import annotations

import torch
from fastai.vision.models.xresnet import ResBlock, XResNet, xresnet18, xresnet34, xresnet50
from torch import nn

from .config import MODEL_KEYS, Config

ARCHS = {"xresnet18": xresnet18, "xresnet34": xresnet34, "xresnet50": xresnet50}


class InputNorm(nn.Module):
    """(x - mean) / std with fixed statistics of the training log-mels; float16 stores become float32 here.

    With `per_band`, each band's median over the crop's frames is subtracted first (a per-clip, per-frequency
    normalisation: a stationary background colour or a recording's EQ no longer shifts the input).
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, per_band: bool = False):
        super().__init__()
        self.per_band = per_band
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x):
        x = x.float()
        if self.per_band:
            return (x - x.median(dim=-1, keepdim=True).values) / self.std
        return (x - self.mean) / self.std


def input_mean(model: nn.Module) -> float:
    """The log-mel value that the model's input normalisation maps to zero: the neutral fill for masks."""
    norm = model[0] if isinstance(model, nn.Sequential) else None
    return float(norm.mean) if isinstance(norm, InputNorm) else 0.0


def build_model(cfg: Config, n_classes: int, mean: float = 0.0, std: float = 1.0) -> nn.Module:
    if cfg.input_norm not in ("global", "band"):
        raise ValueError(f"unknown input_norm {cfg.input_norm!r}: global or band")
    act = nn.Mish if cfg.mish else nn.ReLU
    kw = dict(c_in=1, n_out=n_classes, p=cfg.dropout, sa=cfg.self_attention, act_cls=act)
    if cfg.arch == "xresnet_tiny":  # a few hundred thousand weights: CPU demos and tests
        body = XResNet(ResBlock, 1, [1, 1, 1, 1], stem_szs=(16, 32, 64), widen=0.25, **kw)
    elif cfg.arch in ARCHS:
        body = ARCHS[cfg.arch](**kw)
    else:
        raise ValueError(f"unknown arch {cfg.arch!r}: xresnet_tiny, {', '.join(ARCHS)}")
    return nn.Sequential(InputNorm(mean, std, per_band=cfg.input_norm == "band"), body)


# ---------------------------------------------------------------- what a checkpoint carries


def model_meta(cfg: Config, classes: list[str], **extra) -> dict:
    """What prediction needs to rebuild the model and refuse a mismatched dataset: the classes, the feature and
    model settings, and the inference settings the run used (predict-only mode starts from them)."""
    return dict(classes=list(classes), features=cfg.feature_dict(), model={k: getattr(cfg, k) for k in MODEL_KEYS},
                inference=cfg.inference_dict(), **extra)


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
