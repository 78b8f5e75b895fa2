"""All tunable values in one place: a flat `Config` dataclass and named presets that override it.

A preset is a plain dict of field -> value. The command line can override any field with
`--set name=value`, so no value needs a code edit. Derived quantities (frames per crop, ...) are
properties, never stored twice.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, fields

KAGGLE_DATA_DIR = "/kaggle/input/freesound-audio-tagging-2019"
KAGGLE_WORK_DIR = "/kaggle/working"


@dataclass
class Config:
    # --- audio and log-mel features (seed / 1st place values for FAT2019) ---
    sample_rate: int = 44100      # every clip is resampled to this rate
    n_fft: int = 2560
    win_length: int = 1024
    hop_length: int = 690         # ~64 frames per second at 44.1 kHz
    n_mels: int = 128
    f_min: float = 20.0
    f_max: float = 20000.0
    top_db: float = 60.0
    trim_silence: bool = True     # cut leading/trailing audio quieter than trim_db below the clip's peak
    trim_db: float = 60.0
    crop_seconds: float = 4.0     # training crop and inference window (256 frames at 44.1 kHz / hop 690)

    # --- model (fastai xresnet family) ---
    arch: str = "xresnet18"       # xresnet18/34/50 or "xresnet_tiny" for CPU demos
    self_attention: bool = True
    mish: bool = True
    dropout: float = 0.2

    # --- training ---
    folds: int = 5
    batch_size: int = 64
    lr_noisy: float = 3e-3
    lr_curated: float = 2e-3
    wd: float = 1e-2
    epochs_noisy: int = 12        # stage 1 (0 skips it)
    epochs_curated: int = 30      # stage 2, per fold
    stage1_per_fold: bool = False  # the seed trained stage 1 once per fold; one shared model is ~K times cheaper
    noisy_holdout: float = 0.05   # share of the noisy set used to watch stage 1 (its labels are noisy too)
    mixup_noisy: float = 0.0      # mixup alpha per stage (0 = off)
    mixup_curated: float = 0.4
    specaug_noisy: bool = True
    specaug_curated: bool = True
    time_masks: int = 2
    time_mask_frac: float = 0.1   # widest time mask, as a share of the crop
    freq_masks: int = 2
    freq_mask_frac: float = 0.1   # widest frequency mask, as a share of the mel bands
    num_workers: int = 0

    # --- inference / TTA ---
    tta_step_frac: float = 0.5    # window step as a share of the window (0.5 = half-overlapping windows)
    tta_aggregate: str = "meanmax"  # per clip over windows: mean, max, or meanmax (their average)
    tta_aug_passes: int = 0       # extra passes with light SpecAugment over the windows
    fold_ensemble: str = "mean"   # arithmetic "mean" or "geomean" over folds

    # --- run control ---
    seed: int = 42
    time_budget: float = 0.0      # seconds for the whole run; 0 = no budget
    safety_margin: float = 0.08   # share of the budget kept free

    @property
    def crop_frames(self) -> int:
        return max(1, int(round(self.crop_seconds * self.sample_rate / self.hop_length)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def feature_dict(self) -> dict:
        """The values a trained model's input depends on: weights are only valid with the same ones."""
        keys = ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "f_min", "f_max",
                "top_db", "trim_silence", "trim_db", "crop_seconds")
        return {k: getattr(self, k) for k in keys}


PRESETS: dict[str, dict] = {
    # Small, fast and CPU-friendly: the synthetic demo dataset on a 2-core machine in a few minutes.
    "demo": dict(
        sample_rate=16000, n_fft=512, win_length=400, hop_length=250, n_mels=48,  # 64 frames/s, as at 44.1k/690
        f_min=20.0, f_max=8000.0, crop_seconds=2.0,
        arch="xresnet_tiny", self_attention=False, mish=False, dropout=0.1,
        folds=3, batch_size=32, lr_noisy=4e-3, lr_curated=3e-3,
        epochs_noisy=12, epochs_curated=30, mixup_curated=0.2,
    ),
    # Default of the bundled kernel: the whole two-stage K-fold run plus TTA inside 60 minutes on a
    # Kaggle GPU (P100 / T4). Sized for ~700 training clips/s (about 32 min of training on FAT2019); the
    # time-budget planner cuts epochs (then folds) to what the measured GPU speed allows.
    "kaggle-1h": dict(
        arch="xresnet18", folds=5, batch_size=64, epochs_noisy=12, epochs_curated=35,
        time_budget=3300.0,
    ),
    # A long Kaggle GPU session (9 h allowed; planned for 8.5 h): deeper model, more epochs, TTA passes.
    "kaggle-9h": dict(
        arch="xresnet34", folds=5, batch_size=64, epochs_noisy=25, epochs_curated=60,
        tta_aug_passes=2, time_budget=8.5 * 3600,
    ),
}


def parse_duration(text: str | float | int) -> float:
    """'3600', '55m', '1h', '1h30m', '90s' -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", s):
        raise ValueError(f"cannot read duration {text!r}: use seconds (3600) or units (55m, 1h, 1h30m)")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _coerce(name: str, raw: str, current):
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} expects true/false, got {raw!r}")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return parse_duration(raw) if name == "time_budget" else float(raw)
    return raw


def make_config(preset: str | None = None, overrides: dict | None = None, sets: list[str] | None = None) -> Config:
    """Defaults, then the preset, then explicit overrides, then `name=value` strings from --set."""
    cfg = Config()
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        cfg = dataclasses.replace(cfg, **PRESETS[preset])
    if overrides:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Config)}
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects name=value, got {item!r}")
        name, raw = item.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in known:
            raise ValueError(f"--set: unknown setting {name!r}; known: {', '.join(sorted(known))}")
        cfg = dataclasses.replace(cfg, **{name: _coerce(name, raw, getattr(cfg, name))})
    return cfg
