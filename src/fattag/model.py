"""The model: fastai's xresnet on one-channel log-mels, with the input normalisation built in.

Keeping the normalisation statistics inside the model (as buffers) means a saved state dict is all that
prediction needs besides the metadata that guards against a mismatch (classes, feature settings).
"""
from __future__ import annotations

from pathlib import Path

import torch
from fastai.vision.models.xresnet import ResBlock, XResNet, xresnet18, xresnet34, xresnet50
from torch import nn

from .config import Config

ARCHS = {"xresnet18": xresnet18, "xresnet34": xresnet34, "xresnet50": xresnet50}
MODEL_KEYS = ("arch", "self_attention", "mish", "dropout")


class InputNorm(nn.Module):
    """(x - mean) / std with fixed statistics of the training log-mels; float16 stores become float32 here."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x):
        return (x.float() - self.mean) / self.std


def input_mean(model: nn.Module) -> float:
    """The log-mel value that the model's input normalisation maps to zero: the neutral fill for masks."""
    norm = model[0] if isinstance(model, nn.Sequential) else None
    return float(norm.mean) if isinstance(norm, InputNorm) else 0.0


def build_model(cfg: Config, n_classes: int, mean: float = 0.0, std: float = 1.0) -> nn.Module:
    act = nn.Mish if cfg.mish else nn.ReLU
    kw = dict(c_in=1, n_out=n_classes, p=cfg.dropout, sa=cfg.self_attention, act_cls=act)
    if cfg.arch == "xresnet_tiny":  # a few hundred thousand weights: CPU demos and tests
        body = XResNet(ResBlock, 1, [1, 1, 1, 1], stem_szs=(16, 32, 64), widen=0.25, **kw)
    elif cfg.arch in ARCHS:
        body = ARCHS[cfg.arch](**kw)
    else:
        raise ValueError(f"unknown arch {cfg.arch!r}: xresnet_tiny, {', '.join(ARCHS)}")
    return nn.Sequential(InputNorm(mean, std), body)


# ---------------------------------------------------------------- checkpoints


def model_meta(cfg: Config, classes: list[str], **extra) -> dict:
    """What prediction must know to rebuild the model and to refuse a mismatched dataset or feature setting."""
    return dict(classes=list(classes), features=cfg.feature_dict(),
                model={k: getattr(cfg, k) for k in MODEL_KEYS}, **extra)


def atomic_torch_save(obj, path) -> None:
    """Write a temporary file, then rename: a kill never leaves a half-written file that a restart would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_checkpoint(path, model: nn.Module, meta: dict) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"meta": meta, "state_dict": state}, path)


def load_checkpoint(path) -> tuple[dict, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["meta"], ckpt["state_dict"]


def check_compatible(meta: dict, cfg: Config, classes: list[str], source: str = "weights") -> None:
    """A clear error when saved weights were trained for other classes or other features than this run uses."""
    if list(meta["classes"]) != list(classes):
        missing = sorted(set(classes) - set(meta["classes"]))[:5]
        extra = sorted(set(meta["classes"]) - set(classes))[:5]
        raise ValueError(f"{source}: class vocabulary differs from the data's sample_submission.csv "
                         f"({len(meta['classes'])} vs {len(classes)} classes; missing in weights: {missing}, "
                         f"not in data: {extra}{'; same names, other order' if not missing and not extra else ''})")
    ours = cfg.feature_dict()
    diff = {k: (meta["features"].get(k), v) for k, v in ours.items() if meta["features"].get(k) != v}
    if diff:
        raise ValueError(f"{source}: feature settings differ (saved, this run): {diff}")


def model_from_checkpoint(path, cfg: Config, classes: list[str]) -> tuple[nn.Module, dict]:
    meta, state = load_checkpoint(path)
    check_compatible(meta, cfg, classes, source=str(path))
    mcfg = Config(**{**cfg.to_dict(), **meta["model"]})
    model = build_model(mcfg, len(classes))
    model.load_state_dict(state)
    return model.eval(), meta
