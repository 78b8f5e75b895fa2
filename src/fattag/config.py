"""All tunable values in one place: a flat `Config` dataclass and named presets that override it.

A preset is a plain dict of field -> value. The command line can override any field with
`--set name=value`, so no value needs a code edit. Derived quantities (frames per crop, ...) are
properties, never stored twice.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields

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
    arch: str = "xresnet18"       # xresnet18/34/50, or xresnet_tiny / xresnet_small for CPU runs
    self_attention: bool = True
    mish: bool = True
    dropout: float = 0.2
    input_norm: str = "global"    # channels: global (mean/std), band (band median off), pcen; "+"-joined; both
    pool: str = "avg"             # avg: global average; freqmean_timemax: mean over frequency, mean + max over time

    # --- training ---
    folds: int = 5
    batch_size: int = 64
    lr_noisy: float = 3e-3
    lr_curated: float = 2e-3
    wd: float = 1e-2
    average_epochs: float = 0.0   # weight averaging: EMA of the weights over about this many epochs (0 = off)
    epochs_noisy: int = 12        # stage 1 (0 skips it)
    epochs_curated: int = 30      # stage 2, per fold
    noisy_holdout: float = 0.05   # share of the noisy set used to watch stage 1 (its labels are noisy too)
    select_noisy: bool = False    # before stage 1: score the noisy clips with a curated-trained model, keep agreeing
    select_epochs: int = 10       # epochs of that scorer (on the curated clips, from scratch)
    select_margin: int = 1        # a clip agrees when each of its n labels ranks in the model's top n + margin
    noisy_share_curated: float = 0.0  # share of stage-2 training items drawn from the (kept) noisy clips
    curated_share_noisy: float = 0.0  # share of stage-1 training items drawn from the curated clips (at most all)
    pseudo_epochs: int = 0        # test pseudo-labels: epochs of each fold model on its clips + the labelled test clips
    pseudo_threshold: float = 0.5  # a test clip's pseudo-labels: the ensemble's top class, plus classes scored >= this
    pseudo_soft: bool = False     # every other class keeps the ensemble's probability as its target (else 0)
    lr_pseudo: float = 1e-3
    loss_noisy: str = "bce"       # per stage: bce, focal, lsep or lsoft (see losses.py)
    loss_curated: str = "bce"
    mixup_noisy: float = 0.0      # mixup alpha per stage (0 = off)
    mixup_curated: float = 0.4
    specaug_noisy: bool = True
    specaug_curated: bool = True
    union_mix_noisy: float = 0.0  # share of training items mixed with a partner, labels = union (0 = off)
    union_mix_curated: float = 0.0
    union_mix_rounds: int = 1     # union mixing applied this many times (2: up to 4 sounds in a crop, often 3)
    concat_mix_noisy: float = 0.0  # share of items whose crop ends with a partner's frames, labels = union
    concat_mix_curated: float = 0.0
    mix_gain_db: float = 6.0      # partner level relative to the item, uniform in +-this (union and concat)
    background_noisy: float = 0.0  # share of items with a partner added far below as background (labels kept)
    background_curated: float = 0.0
    background_snr_min: float = 10.0  # background this many dB below the item, uniform in [min, max]
    background_snr_max: float = 25.0
    level_eq_noisy: bool = False  # random gain, spectral tilt and low-pass per item
    level_eq_curated: bool = False
    freq_shift_noisy: int = 0     # largest shift of the spectrum, in mel bands, per item (0 = off)
    freq_shift_curated: int = 0
    time_stretch_noisy: float = 0.0  # per item, crop tempo times a factor in [1/(1+s), 1+s] (0 = off)
    time_stretch_curated: float = 0.0
    level_gain_db: float = 10.0
    eq_tilt_db: float = 10.0
    lowpass_p: float = 0.25
    time_masks: int = 2
    time_mask_frac: float = 0.1   # widest time mask, as a share of the crop
    freq_masks: int = 2
    freq_mask_frac: float = 0.1   # widest frequency mask, as a share of the mel bands
    num_workers: int = 0
    channels_last: bool = True    # on the CPU, the model in channels-last memory layout (faster there; CUDA keeps its)
    amp: str = "auto"             # mixed precision: auto (float16 on CUDA, float32 on CPU), fp16, bf16 or off

    # --- inference / TTA ---
    tta_step_frac: float = 0.5    # window step as a share of the window (0.5 = half-overlapping windows)
    tta_aggregate: str = "meanmax"  # per clip over windows: mean, max, or meanmax (their average)
    tta_aug_passes: int = 0       # extra passes with light SpecAugment over the windows
    fold_ensemble: str = "mean"   # arithmetic "mean" or "geomean" over folds
    adapt_bn: bool = False        # before predicting the test set, re-estimate batch-norm statistics on its windows
    class_balance: bool = False   # divide each class's test scores by their mean over the test set (predict.py)
    tta_fill_passes: int = 4      # with a time budget, time left at the end buys up to this many augmented passes

    # --- run control ---
    seed: int = 42
    time_budget: float = 0.0      # seconds for the whole run; 0 = no budget
    safety_margin: float = 0.08   # share of the budget kept free

    def __post_init__(self):
        for name in SHARE_KEYS:   # a share of 1 would leave no item of the stage's own set (and divide by zero)
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be at least 0 and below 1, got {getattr(self, name)!r}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"unknown amp {self.amp!r}: {', '.join(AMP_CHOICES)}")

    @property
    def crop_frames(self) -> int:
        return max(1, int(round(self.crop_seconds * self.sample_rate / self.hop_length)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def feature_dict(self) -> dict:
        """The values a trained model's input depends on: weights are only valid with the same ones."""
        return {k: getattr(self, k) for k in FEATURE_KEYS}

    def recipe_dict(self) -> dict:
        """The values a stage's weights depend on: saved stages are reused only by a run with the same ones."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_RECIPE_KEYS}

    def inference_dict(self) -> dict:
        """How test clips are predicted: may differ between training and a later predict-only run."""
        return {k: getattr(self, k) for k in INFERENCE_KEYS}


AMP_CHOICES = ("auto", "off", "fp16", "bf16")  # precision.amp_dtype says what each means on which device

# Shares of a stage's training items drawn from the other set (train.top_up): each in [0, 1).
SHARE_KEYS = ("noisy_share_curated", "curated_share_noisy")


def top_up_size(n_base: int, share: float, available: int) -> int:
    """How many clips of the other set make them `share` of a training set of `n_base` clips, at most `available`:
    what train.top_up draws and what the budget prices."""
    return min(available, int(round(n_base * share / (1 - share))))


# Groups of settings that a checkpoint records (see model.model_meta and predict.prediction_config).
FEATURE_KEYS = ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "f_min", "f_max", "top_db",
                "trim_silence", "trim_db", "crop_seconds")
MODEL_KEYS = ("arch", "self_attention", "mish", "dropout", "input_norm", "pool")
INFERENCE_KEYS = ("tta_step_frac", "tta_aggregate", "tta_aug_passes", "fold_ensemble", "adapt_bn", "class_balance",
                  "batch_size")
# Settings that do not change what a trained stage's weights are: the schedule's length (the budget plans it, and a
# resumed stage keeps its own), the budget, workers, the CPU memory layout and mixed precision (float rounding only,
# like the device itself), how test clips are predicted, and the pseudo-label round's settings (that round records
# them in its own recipe, pseudo.py). Every other value is part of the recipe that a work dir's saved stages must
# match before a later run reuses them.
NOT_RECIPE_KEYS = ("epochs_noisy", "epochs_curated", "pseudo_epochs", "pseudo_threshold", "pseudo_soft", "lr_pseudo",
                   "time_budget", "safety_margin", "tta_fill_passes", "num_workers", "channels_last", "amp",
                   *(k for k in INFERENCE_KEYS if k != "batch_size"))


# Small, fast and CPU-friendly: the synthetic demo dataset on a 2-core machine in a few minutes.
_DEMO = dict(
    sample_rate=16000, n_fft=512, win_length=400, hop_length=250, n_mels=48,  # 64 frames/s, as at 44.1k/690
    f_min=20.0, f_max=8000.0, crop_seconds=2.0,
    arch="xresnet_tiny", self_attention=False, mish=False, dropout=0.1,
    folds=3, batch_size=32, lr_noisy=4e-3, lr_curated=3e-3,
    epochs_noisy=12, epochs_curated=30, mixup_curated=0.2,
)
# What won on real recordings (realdev, README): union mixing in both stages, stage-2 batches half noisy, the
# log-mel as three input channels (global, per-band and PCEN normalised), test scores balanced per class, and a
# test pseudo-label round (pseudo.py) in whatever time the rest of the recipe leaves in the budget.
_REAL_DATA_RECIPE = dict(union_mix_noisy=0.5, union_mix_curated=0.5, noisy_share_curated=0.5,
                         input_norm="global+band+pcen", class_balance=True, pseudo_epochs=10)

PRESETS: dict[str, dict] = {
    "demo": _DEMO,
    # Real recordings without a GPU (the default on real data when there is no CUDA): a dataset of ~1,500 clips,
    # 1-2 h of audio and ~20 classes trains and predicts in under 10 minutes on 2 CPU cores. The demo preset plus
    # the changes measured on the realdev sets (README's ablation): the real-data recipe, a small xresnet and a
    # longer stage 1; the budget keeps a slower machine inside the 10 minutes (the pseudo-label round goes first).
    "cpu": {**_DEMO, **_REAL_DATA_RECIPE, "arch": "xresnet_small", "epochs_noisy": 30, "time_budget": 570.0},
    # Default of the bundled kernel: the whole two-stage K-fold run plus TTA inside 60 minutes on a
    # Kaggle GPU (T4, float16 autocast). The cpu preset's recipe (union mixing, stage-2 batches half noisy,
    # three-channel input, class balancing, the test pseudo-label round in the time left) at FAT2019's feature
    # settings; sized for ~700 training clips/s (about 42 min of training and prediction on FAT2019 before the
    # round). The time-budget planner cuts the round, then epochs (then folds) to what the measured GPU speed allows.
    "kaggle-1h": dict(
        **_REAL_DATA_RECIPE, arch="xresnet18", folds=5, batch_size=64, epochs_noisy=15, epochs_curated=25,
        time_budget=3300.0,
    ),
    # A long Kaggle GPU session (9 h allowed; planned for 8.5 h): deeper model, more epochs, TTA passes.
    "kaggle-9h": dict(
        **_REAL_DATA_RECIPE, arch="xresnet34", folds=5, batch_size=64, epochs_noisy=30, epochs_curated=40,
        tta_aug_passes=2, time_budget=8.5 * 3600,
    ),
}


# One line per preset for --help: what it is for.
PRESET_USE = {
    "demo": "the synthetic demo data (a smoke test of the pipeline); ~1.5 min on 2 CPU cores",
    "cpu": "real recordings without a GPU: ~1,500 clips / 1-2 h of audio in under 10 min on 2 cores",
    "kaggle-1h": "FAT2019 on a Kaggle GPU: two stages, 5 folds and TTA inside the 1-hour kernel limit",
    "kaggle-9h": "a long Kaggle GPU session: xresnet34, more epochs, augmented TTA passes (8.5 h)",
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


def parse_sets(sets: list[str] | None, cfg: Config | None = None) -> dict:
    """`name=value` strings (from --set) -> {name: value}, each converted to its field's type."""
    cfg = cfg or Config()
    known = {f.name for f in fields(Config)}
    out = {}
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects name=value, got {item!r}")
        name, raw = item.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in known:
            raise ValueError(f"--set: unknown setting {name!r}; known: {', '.join(sorted(known))}")
        out[name] = _coerce(name, raw, getattr(cfg, name))
    return out


def make_config(preset: str | None = None, overrides: dict | None = None, sets: list[str] | None = None) -> Config:
    """Defaults, then the preset, then explicit overrides, then `name=value` strings from --set."""
    cfg = Config()
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        cfg = dataclasses.replace(cfg, **PRESETS[preset])
    if overrides:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return dataclasses.replace(cfg, **parse_sets(sets, cfg))
