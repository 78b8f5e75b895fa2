# GENERATED FILE -- DO NOT EDIT BY HAND.
# Built by `python build_kernel.py --mode train --preset kaggle-1h` from src/fattag/**/*.py and src/run.py
# (source hash d5f32e446988). Edit the sources, rebuild, and check with `python build_kernel.py --check`.
#
# A self-contained Kaggle kernel: runs src/run.py with the baked-in defaults below; the
# command line (`python kernel.py --help`) can override them. The package is imported from the
# source strings at the end of this file by an in-memory importer: no file is written, no
# process is started, and tracebacks name the original files (src/fattag/...).
#
# Embedded files:
#   src/fattag/__init__.py                       2 lines
#   src/fattag/audio.py                        190 lines
#   src/fattag/cli.py                           53 lines
#   src/fattag/config.py                       168 lines
#   src/fattag/data.py                         253 lines
#   src/fattag/demo.py                         525 lines
#   src/fattag/features.py                     221 lines
#   src/fattag/metrics.py                       69 lines
#   src/fattag/model.py                         88 lines
#   src/fattag/predict.py                       69 lines
#   src/fattag/session.py                       88 lines
#   src/fattag/submission.py                    61 lines
#   src/fattag/train.py                        298 lines
#   src/run.py                                  84 lines

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import sys
import traceback

PACKAGE = "fattag"
ENTRY = "src/run.py"
SOURCES: dict[str, str] = {}  # repository path -> source text (filled at the end of this file)


def _add(path: str, text: str) -> None:
    SOURCES[path] = text[1:]  # drop the newline after the opening quotes


def source_hash(sources: dict[str, str]) -> str:
    """sha256 over the sorted (path, content) pairs, first 12 hex digits (as build_kernel.py)."""
    h = hashlib.sha256()
    for path in sorted(sources):
        h.update(path.encode("utf-8") + b"\0" + sources[path].encode("utf-8") + b"\0")
    return h.hexdigest()[:12]


def _module_name(path: str) -> tuple[str, bool]:
    parts = path[:-3].split("/")[1:]  # "src/fattag/a/__init__.py" -> ["fattag", "a", "__init__"]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


class EmbeddedImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `fattag` and its submodules from SOURCES: first on sys.meta_path, so nothing on disk
    (the working directory, PYTHONPATH, site-packages) can shadow the embedded code."""

    def __init__(self, sources: dict[str, str], package: str = PACKAGE):
        self.sources = sources
        self.package = package
        self.modules = {}  # module name -> (is_package, repository path)
        for path in sources:
            name, is_pkg = _module_name(path)
            if name.partition(".")[0] == package:
                self.modules[name] = (is_pkg, path)

    def register_lines(self) -> None:
        # mtime None: linecache.checkcache() keeps the entries (there is no file to compare with)
        for path, text in self.sources.items():
            linecache.cache[path] = (len(text), None, text.splitlines(keepends=True), path)

    def spec_for(self, name: str) -> importlib.machinery.ModuleSpec:
        is_pkg, path = self.modules[name]
        # is_package=True gives submodule_search_locations=[]: submodules come only from this finder
        return importlib.machinery.ModuleSpec(name, self, origin=path, is_package=is_pkg)

    # MetaPathFinder
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] != self.package or fullname not in self.modules:
            return None
        return self.spec_for(fullname)

    # Loader (and the InspectLoader methods that linecache, inspect and pdb use)
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__file__ = self.modules[module.__name__][1]  # a repository path, not a file on disk
        exec(self.get_code(module.__name__), module.__dict__)

    def is_package(self, fullname: str) -> bool:
        return self.modules[fullname][0]

    def get_source(self, fullname: str) -> str:
        return self.sources[self.modules[fullname][1]]

    def get_code(self, fullname: str):
        path = self.modules[fullname][1]
        return compile(self.sources[path], path, "exec", dont_inherit=True)


def print_exception(exc_type, exc, tb) -> None:
    """sys.excepthook showing the embedded lines: the interpreter's default hook reads source lines
    from files on disk; the traceback module reads them from linecache, which holds the sources."""
    traceback.print_exception(exc_type, exc, tb)


def install(sources: dict[str, str] = SOURCES) -> EmbeddedImporter:
    """Put the importer first on sys.meta_path (replacing one from an earlier run in this process)."""
    if sys.excepthook is sys.__excepthook__:  # not in IPython, which prints tracebacks its own way
        sys.excepthook = print_exception
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "EmbeddedImporter"]
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]  # a notebook re-run must not keep modules of an earlier bundle
    importer = EmbeddedImporter(sources)
    importer.register_lines()
    sys.meta_path.insert(0, importer)
    return importer


def load_entry(importer: EmbeddedImporter, name: str = "run"):
    """Import the package, then execute src/run.py from memory as module `run`."""
    __import__(PACKAGE)  # first, so run.py sees the embedded package and leaves sys.path alone
    importer.modules[name] = (False, ENTRY)
    spec = importer.spec_for(name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    digest = source_hash(SOURCES)
    state = "" if digest == BUILD_HASH else f" (MODIFIED: built from {BUILD_HASH})"
    print(f"fattag kernel: sources {digest}{state}, {len(SOURCES)} files, baked defaults {BAKED_DEFAULTS}, "
          f"python {sys.version.split()[0]}", flush=True)
    run = load_entry(install(SOURCES))
    return run.main(argv, defaults=dict(BAKED_DEFAULTS))

BUILD_HASH = 'd5f32e446988'
BAKED_DEFAULTS = {'mode': 'train', 'preset': 'kaggle-1h'}

# ==== embedded sources (verbatim) ===============================================================

_add('src/fattag/__init__.py', r'''
"""fattag: two-stage K-fold audio tagging for FAT2019-shaped data (Kaggle-kernel style)."""
__version__ = "0.1.0"
''')

_add('src/fattag/audio.py', r'''
"""WAV input/output with the standard library and numpy, plus resampling and silence trimming.

The RIFF parser is our own because the stdlib `wave` module reads neither IEEE float nor
WAVE_FORMAT_EXTENSIBLE files, and `torchaudio.load` depends on backends (torchcodec/ffmpeg) whose
presence differs between machines. Every sample format is decoded with `np.frombuffer`, never a
Python loop per sample, so decoding keeps up with disk reads on the ~100 h of FAT2019 audio.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

_PCM = 0x0001
_FLOAT = 0x0003
_EXTENSIBLE = 0xFFFE
_WRITE_FORMATS = {  # fmt -> (format tag, bytes per sample)
    "pcm8": (_PCM, 1), "pcm16": (_PCM, 2), "pcm24": (_PCM, 3), "pcm32": (_PCM, 4), "float32": (_FLOAT, 4),
}
TRIM_FRAME = 512  # samples per RMS frame in trim_silence (~12 ms at 44.1 kHz)


class AudioError(ValueError):
    """A clip that cannot be decoded; `path` and `reason` are kept apart so reports can show either."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _parse_fmt(path, body: bytes) -> tuple[int, int, int, int]:
    """Return (format tag, channels, sample rate, bytes per sample) from a `fmt ` chunk."""
    if len(body) < 16:
        raise AudioError(path, f"fmt chunk too short ({len(body)} bytes)")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == _EXTENSIBLE:
        if len(body) < 26:
            raise AudioError(path, "WAVE_FORMAT_EXTENSIBLE fmt chunk too short")
        tag = struct.unpack("<H", body[24:26])[0]  # first two bytes of the sub-format GUID
    if channels == 0:
        raise AudioError(path, "header declares 0 channels")
    if rate == 0:
        raise AudioError(path, "header declares a sample rate of 0")
    # Samples are stored in containers of block_align / channels bytes (e.g. 20-bit audio in 3 bytes,
    # left-justified), so decoding by container width is exact for PCM.
    width = block_align // channels if block_align else (bits + 7) // 8
    if block_align and block_align != width * channels:
        raise AudioError(path, f"block align {block_align} does not fit {channels} channels")
    if not ((tag == _PCM and width in (1, 2, 3, 4)) or (tag == _FLOAT and width in (4, 8))):
        raise AudioError(path, f"unsupported sample format (format tag 0x{tag:04x}, {width * 8}-bit samples)")
    return tag, channels, rate, width


def _decode(tag: int, width: int, data: bytes) -> np.ndarray:
    """Interleaved little-endian samples -> float32 in [-1, 1]."""
    if tag == _FLOAT:
        x = np.frombuffer(data, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        return np.clip(x, -1.0, 1.0, out=x)
    if width == 1:  # 8-bit WAV is unsigned with 128 as zero
        return (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if width == 3:  # place the 3 bytes in the top of an int32 so its sign bit is the sample's
        packed = np.zeros((len(data) // 3, 4), dtype=np.uint8)
        packed[:, 1:] = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
        return packed.view("<i4").ravel().astype(np.float32) / 2147483648.0
    return np.frombuffer(data, dtype="<i4").astype(np.float32) / 2147483648.0


def read_wav(path) -> tuple[np.ndarray, int]:
    """Read a WAV file as float32 mono (channels averaged) in [-1, 1]; return (wave, sample_rate).

    Unknown chunks are skipped. A data chunk cut short (truncated download) yields the whole frames
    that are present; a file with no whole frame raises AudioError, as does anything else unreadable.
    """
    path = Path(path)
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        raise AudioError(path, "file not found") from None
    except OSError as e:
        raise AudioError(path, f"cannot read file ({e.strerror or e})") from None
    if not buf:
        raise AudioError(path, "file is empty")
    if len(buf) < 12 or buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise AudioError(path, "not a RIFF/WAVE file")

    fmt = None
    data = None
    pos = 12
    while pos + 8 <= len(buf):
        chunk_id = buf[pos:pos + 4]
        size = struct.unpack("<I", buf[pos + 4:pos + 8])[0]
        body = buf[pos + 8:pos + 8 + size]  # shorter than `size` when the file is truncated
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(path, body)
        elif chunk_id == b"data" and data is None:
            data = body
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    if fmt is None:
        raise AudioError(path, "no fmt chunk (truncated header?)")
    if data is None:
        raise AudioError(path, "no data chunk")

    tag, channels, rate, width = fmt
    frames = len(data) // (width * channels)
    if frames == 0:
        raise AudioError(path, "has no audio (0 frames)")
    wave = _decode(tag, width, data[:frames * width * channels])
    if channels > 1:
        wave = wave.reshape(frames, channels).mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32), rate


def write_wav(path, wave, sample_rate: int, fmt: str = "pcm16") -> None:
    """Write float samples in [-1, 1], shape (n,) or (n, channels), as a WAV file in `fmt`."""
    if fmt not in _WRITE_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_WRITE_FORMATS)}, got {fmt!r}")
    tag, width = _WRITE_FORMATS[fmt]
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"wave must have shape (n,) or (n, channels), got {x.shape}")
    channels = x.shape[1]
    x = np.clip(x, -1.0, 1.0).ravel()  # interleaved: frame by frame
    if fmt == "float32":
        payload = x.astype("<f4").tobytes()
    elif fmt == "pcm8":
        payload = np.clip(np.round(x * 128.0 + 128.0), 0, 255).astype(np.uint8).tobytes()
    else:
        scale = float(2 ** (8 * width - 1))
        ints = np.clip(np.round(x * scale), -scale, scale - 1)
        if width == 3:  # low three bytes of each little-endian int32
            payload = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        else:
            payload = ints.astype("<i2" if width == 2 else "<i4").tobytes()
    fmt_chunk = struct.pack("<HHIIHH", tag, channels, int(sample_rate), int(sample_rate) * channels * width,
                            channels * width, 8 * width)
    pad = b"\x00" * (len(payload) & 1)
    riff_size = 4 + (8 + len(fmt_chunk)) + (8 + len(payload) + len(pad))
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", riff_size) + b"WAVE")
        f.write(b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk)
        f.write(b"data" + struct.pack("<I", len(payload)) + payload + pad)


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's sinc interpolation); returns the input when the rates match."""
    if int(orig_sr) == int(new_sr):
        return np.asarray(wave, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    return AF.resample(x, int(orig_sr), int(new_sr)).numpy()


def trim_silence(wave: np.ndarray, top_db: float, frame: int = TRIM_FRAME) -> np.ndarray:
    """Drop leading/trailing frames whose RMS is more than `top_db` below the loudest frame's.

    Frames are non-overlapping `frame`-sample windows; the loudest frame is always kept, so the result
    is never empty, and an all-zero clip comes back unchanged (there is no reference level to cut at).
    """
    wave = np.asarray(wave, dtype=np.float32)
    n = len(wave)
    if n == 0:
        return wave
    starts = np.arange(0, n, frame)
    power = np.add.reduceat(wave.astype(np.float64) ** 2, starts) / np.diff(np.append(starts, n))
    peak = power.max()
    if peak <= 0.0:
        return wave
    loud = np.flatnonzero(power >= peak * 10.0 ** (-top_db / 10.0))
    begin, end = loud[0] * frame, min((loud[-1] + 1) * frame, n)
    return wave if (begin, end) == (0, n) else wave[begin:end].copy()


def load_clip(path, sample_rate: int, trim: bool = False, trim_db: float = 60.0) -> np.ndarray:
    """Read a clip at `sample_rate` (optionally silence-trimmed). Any length >= 1; padding happens later."""
    wave, sr = read_wav(path)
    wave = resample(wave, sr, sample_rate)
    if trim:
        wave = trim_silence(wave, trim_db)
    return wave


__all__ = ["AudioError", "TRIM_FRAME", "load_clip", "read_wav", "resample", "trim_silence", "write_wav"]
''')

_add('src/fattag/cli.py', r'''
"""Command line: one set of options shared by `python src/run.py` and the bundled Kaggle kernel."""
from __future__ import annotations

import argparse
import textwrap

from .config import KAGGLE_DATA_DIR, PRESETS, parse_duration


def _preset_lines() -> str:
    lines = []
    for name, values in PRESETS.items():
        shown = ", ".join(f"{k}={v}" for k, v in list(values.items())[:6])
        lines.append(f"  {name:<10} {shown}{', ...' if len(values) > 6 else ''}")
    return "\n".join(lines)


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    epilog = textwrap.dedent("""\
        presets (any value can be overridden with --set name=value):
        {presets}

        examples:
          python src/run.py                                  # demo dataset, demo preset, CPU, a few minutes
          python src/run.py --data-dir /data/fat2019 --preset kaggle-1h --work-dir runs/full
          python src/run.py --set epochs_curated=5 --set arch=xresnet34
        """).format(presets=_preset_lines())
    p = argparse.ArgumentParser(
        prog="run.py",
        description="Two-stage K-fold audio tagger for FAT2019-shaped data: stage 1 on the noisy set, stage 2 "
                    "on the curated set per fold (warm-started), whole-clip TTA, fold ensemble, submission.csv.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help=f"dataset folder in FAT2019 layout (default: {KAGGLE_DATA_DIR} when present, "
                        "else the synthetic demo dataset, generated on first use)")
    p.add_argument("--work-dir", default=None,
                   help="folder for every output of the run: config, logs, metrics, weights, oof.csv, "
                        "submission.csv (default: /kaggle/working on Kaggle, else runs/<preset>)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="named set of values (default: demo for the demo dataset, kaggle-1h otherwise)")
    p.add_argument("--seed", type=int, default=None, help="random seed for folds, crops and weights (default 42)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="override one config value, e.g. --set epochs_curated=10 (repeatable)")
    if defaults:
        p.set_defaults(**defaults)
    return p


def parse_args(argv=None, defaults: dict | None = None) -> argparse.Namespace:
    return build_parser(defaults).parse_args(argv)


__all__ = ["build_parser", "parse_args", "parse_duration"]
''')

_add('src/fattag/config.py', r'''
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
        sample_rate=16000, n_fft=512, win_length=400, hop_length=160, n_mels=48,
        f_min=20.0, f_max=8000.0, crop_seconds=1.5,
        arch="xresnet_tiny", self_attention=False, mish=False, dropout=0.1,
        folds=3, batch_size=32, lr_noisy=4e-3, lr_curated=3e-3,
        epochs_noisy=6, epochs_curated=10, mixup_curated=0.2,
    ),
    # Default of the bundled kernel: the whole two-stage K-fold run plus TTA inside 60 minutes on a
    # Kaggle GPU (P100 / T4). The time-budget planner shrinks epochs further if the GPU is slower.
    "kaggle-1h": dict(
        arch="xresnet18", folds=5, batch_size=64, epochs_noisy=8, epochs_curated=25,
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


def load_config(path) -> Config:
    """Read a config.json written by a run (unknown keys are an error: they mean another version)."""
    with open(path) as f:
        data = json.load(f)
    known = {f.name for f in fields(Config)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    return Config(**data)
''')

_add('src/fattag/data.py', r'''
"""FAT2019 folder layout -> clip tables, and streamed, fault-tolerant decoding of their audio.

A data dir holds `sample_submission.csv` (its columns after `fname` are the class vocabulary, in
order), `train_curated.csv` + `train_curated/`, optionally `train_noisy.csv` + `train_noisy/`, and
`test/`. Audio is decoded lazily by `iter_decoded`: the noisy set alone is bigger than a Kaggle
machine's RAM as raw samples, and one unreadable clip must cost that clip only, not the run.
"""
from __future__ import annotations

import csv
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .audio import AudioError, load_clip
from .config import KAGGLE_DATA_DIR

log = logging.getLogger("fattag")


class DataError(ValueError):
    """A dataset folder or CSV that does not match the FAT2019 layout."""


def find_data_dir(explicit: str | None) -> Path | None:
    """The dataset to use: `explicit` (checked), else the Kaggle mount if present, else None (demo data)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise DataError(f"data dir {path} does not exist")
        if not (path / "sample_submission.csv").is_file():
            raise DataError(f"data dir {path} has no sample_submission.csv (not a FAT2019-style folder)")
        return path
    kaggle = Path(KAGGLE_DATA_DIR)
    return kaggle if kaggle.is_dir() else None


def read_vocabulary(sample_submission_csv) -> list[str]:
    """Class names in the order of sample_submission.csv's columns (all but `fname`)."""
    path = Path(sample_submission_csv)
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not header:
        raise DataError(f"{path} is empty")
    header = [name.strip() for name in header]
    if "fname" not in header:
        raise DataError(f"{path} has no 'fname' column (columns: {header[:10]})")
    classes = [name for name in header if name != "fname"]
    if not classes:
        raise DataError(f"{path} has no class columns after 'fname'")
    if "" in classes:
        raise DataError(f"{path} has an empty column name")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise DataError(f"{path} has duplicate class columns: {dupes}")
    return classes


@dataclass
class ClipTable:
    """Clips of one set; `targets` is a float32 multi-hot (n, C) for training sets, None for test."""
    name: str
    fnames: list[str]
    paths: list[Path]
    targets: np.ndarray | None = None

    def __post_init__(self):
        if len(self.paths) != len(self.fnames) or (self.targets is not None and len(self.targets) != len(self.fnames)):
            raise ValueError(f"ClipTable {self.name}: fnames, paths and targets differ in length")

    def __len__(self) -> int:
        return len(self.fnames)

    def subset(self, indices) -> ClipTable:
        """Rows `indices` (integer positions or a boolean mask), in that order."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).ravel()
        return ClipTable(self.name, [self.fnames[i] for i in idx], [self.paths[i] for i in idx],
                         None if self.targets is None else self.targets[idx])


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """All-string table; DataError (not a pandas traceback) for a missing/empty file or missing columns."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"cannot parse {path}: {e}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; it has {list(df.columns)}")
    return df


def _check_fnames(path: Path, fnames: list[str]) -> None:
    for row, fname in enumerate(fnames, start=1):
        if not fname:
            raise DataError(f"{path} row {row}: empty fname")
    seen = pd.Series(fnames)
    dupes = seen[seen.duplicated()].unique().tolist()
    if dupes:
        raise DataError(f"{path} lists {len(dupes)} fname(s) more than once, e.g. {dupes[:5]}")


def read_train_csv(csv_path, audio_dir, classes: list[str]) -> ClipTable:
    """A training CSV (`fname,labels`, labels comma-joined) -> ClipTable with multi-hot targets.

    Any label outside `classes` raises DataError naming the file, the 1-based data row (header not
    counted) and the label: an unknown label means the CSV and the vocabulary disagree, and training on
    a silently wrong class map is worse than stopping. Empty label strings and duplicate fnames are
    errors too. Spaces around the commas are ignored.
    """
    path, audio_dir = Path(csv_path), Path(audio_dir)
    df = _read_csv(path, ("fname", "labels"))
    fnames = [f.strip() for f in df["fname"]]
    _check_fnames(path, fnames)
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(fnames), len(classes)), dtype=np.float32)
    for row, labels in enumerate(df["labels"]):
        parts = [p.strip() for p in labels.split(",")]
        if not all(parts):
            raise DataError(f"{path} row {row + 1} ({fnames[row]}): empty label in {labels!r}")
        for label in parts:
            if label not in index:
                raise DataError(f"{path} row {row + 1} ({fnames[row]}): label {label!r} is not in the "
                                f"vocabulary of {len(classes)} classes from sample_submission.csv")
            targets[row, index[label]] = 1.0
    return ClipTable(audio_dir.name, fnames, [audio_dir / f for f in fnames], targets)


def read_test_table(sample_submission_csv, test_dir) -> ClipTable:
    """Test clips in sample_submission.csv's row order (the submission must keep it); no targets."""
    path, test_dir = Path(sample_submission_csv), Path(test_dir)
    fnames = [f.strip() for f in _read_csv(path, ("fname",))["fname"]]
    _check_fnames(path, fnames)
    return ClipTable(test_dir.name, fnames, [test_dir / f for f in fnames], None)


@dataclass
class FatData:
    data_dir: Path
    classes: list[str]
    curated: ClipTable
    noisy: ClipTable | None
    test: ClipTable
    sample_submission: Path

    def summary(self) -> str:
        noisy = f"{len(self.noisy)} clips" if self.noisy is not None else "absent"
        return (f"{self.data_dir}: {len(self.classes)} classes; train_curated {len(self.curated)} clips, "
                f"train_noisy {noisy}, test {len(self.test)} clips")


def load_dataset(data_dir) -> FatData:
    """Read every table of a FAT2019-layout folder (no audio is decoded here)."""
    data_dir = Path(data_dir)
    sub = data_dir / "sample_submission.csv"
    classes = read_vocabulary(sub)
    curated = read_train_csv(data_dir / "train_curated.csv", data_dir / "train_curated", classes)
    noisy_csv = data_dir / "train_noisy.csv"
    noisy = read_train_csv(noisy_csv, data_dir / "train_noisy", classes) if noisy_csv.is_file() else None
    test = read_test_table(sub, data_dir / "test")
    return FatData(data_dir, classes, curated, noisy, test, sub)


def _decode_one(path: Path, sample_rate: int, trim: bool, trim_db: float):
    """(wave, None, file bytes) or (None, reason, 0); never raises, so one bad clip never stops a run."""
    try:
        wave = load_clip(path, sample_rate, trim=trim, trim_db=trim_db)
        return wave, None, os.path.getsize(path)
    except AudioError as e:
        return None, e.reason, 0
    except Exception as e:  # noqa: BLE001 - any failure of one clip is reported, not fatal
        return None, f"{type(e).__name__}: {e}", 0


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def iter_decoded(table: ClipTable, sample_rate: int, trim: bool = False, trim_db: float = 60.0,
                 workers: int | None = None, progress: bool = True, desc: str | None = None):
    """Yield `(index, wave_or_None, error_or_None)` for every clip of `table`, in index order.

    Clips are decoded by a thread pool (numpy and torch release the GIL) with at most 4 * workers
    clips in flight, so memory stays bounded however big the table is. Failures are yielded as an
    error message instead of raised.
    """
    workers = max(1, workers or min(8, os.cpu_count() or 1))
    max_in_flight = 4 * workers
    desc = desc or table.name
    tty = _stderr_is_tty()
    bar = tqdm(total=len(table), desc=desc, unit="clip", disable=not progress, file=sys.stderr,
               mininterval=0.1 if tty else 10.0, dynamic_ncols=tty)
    start, n_bytes, n_failed = time.perf_counter(), 0, 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fattag-decode")
    pending: deque = deque()
    try:
        submitted = 0
        for index in range(len(table)):
            while submitted < len(table) and len(pending) < max_in_flight:
                pending.append(pool.submit(_decode_one, table.paths[submitted], sample_rate, trim, trim_db))
                submitted += 1
            wave, error, size = pending.popleft().result()
            n_bytes += size
            n_failed += error is not None
            bar.update(1)
            bar.set_postfix(MB_s=f"{n_bytes / 1e6 / max(time.perf_counter() - start, 1e-9):.1f}",
                            skipped=n_failed, refresh=False)
            yield index, wave, error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    elapsed = max(time.perf_counter() - start, 1e-9)
    log.info("decoded %s: %d clips (%d skipped) in %.1f s, %.1f clips/s, %.1f MB/s of audio files",
             desc, len(table), n_failed, elapsed, len(table) / elapsed, n_bytes / 1e6 / elapsed)


def decode_report(name: str, errors: list[tuple[str, str]]) -> str:
    """Log one warning per skipped clip plus a count line (only when there are skips); return the text.

    `errors` holds (fname, reason) pairs. The caller need not log the returned text again; it is
    returned for run summaries and files.
    """
    lines = [f"skipped {name}/{fname}: {reason}" for fname, reason in errors]
    lines.append(f"{name}: {len(errors)} file(s) skipped")
    if errors:
        for line in lines:
            log.warning(line)
    return "\n".join(lines)


__all__ = ["ClipTable", "DataError", "FatData", "decode_report", "find_data_dir", "iter_decoded",
           "load_dataset", "read_test_table", "read_train_csv", "read_vocabulary"]
''')

_add('src/fattag/demo.py', r'''
"""A deterministic synthetic dataset in the FAT2019 layout, small enough to train on a 2-core CPU.

It stands in for the real data when none is mounted, so it keeps the properties the pipeline is built
for: classes share frequency ranges and differ by their shape over time (a model has to learn
spectro-temporal patterns), the noisy set is longer, has backgrounds, distractors and ~30 % wrong labels
(informative but unreliable), and test clips are multi-label. The true labels of the noisy and test
clips go to files the pipeline must not train on (`train_noisy_truth.csv`, `test_truth.csv`), for
experiments and evaluation.

Every clip gets its own generator seeded from (seed, split, index), so a seed gives byte-identical files.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import wave
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["DEMO_VERSION", "default_demo_dir", "demo_classes", "demo_truth", "make_demo_dataset"]

DEMO_VERSION = "1"
MARKER = ".demo_complete.json"

CURATED_MULTI_SHARE = 0.15   # curated clips with two labels
NOISY_MULTI_SHARE = 0.15
NOISY_WRONG_SHARE = 0.30     # noisy clips with one label replaced by another class
TEST_MULTI_SHARE = 0.40      # test clips with two or three labels

_SPLIT_CODES = {"plan": 0, "train_curated": 1, "train_noisy": 2, "test": 3}


def default_demo_dir(seed: int = 42) -> Path:
    """$FATTAG_CACHE/demo-..., else <repo>/.cache/demo-... when run from a src/ checkout, else
    ~/.cache/fattag/demo-... (e.g. inside a bundled single-file Kaggle kernel)."""
    name = f"demo-{DEMO_VERSION}-seed{seed}"
    env = os.environ.get("FATTAG_CACHE")
    if env:
        return Path(env).expanduser() / name
    try:
        here = Path(__file__).resolve()
    except (NameError, TypeError, OSError):
        here = None
    if here is not None and len(here.parents) > 2 and here.parents[1].name == "src":
        return here.parents[2] / ".cache" / name
    return Path.home() / ".cache" / "fattag" / name


# ----------------------------------------------------------------------------- signal helpers

def _logu(rng, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _tone(freq, sr: int, amps=(1.0,), phase0: float = 0.0) -> np.ndarray:
    """Additive harmonic tone following an instantaneous f0 track; harmonics near Nyquist are left out."""
    freq = np.asarray(freq, dtype=np.float64)
    phase = 2 * np.pi * np.cumsum(freq) / sr + phase0
    top = float(freq.max()) if freq.size else 0.0
    out = np.zeros(freq.shape)
    for k, a in enumerate(amps, start=1):
        if a and k * top < 0.45 * sr:
            out += a * np.sin(k * phase)
    return out


def _fade(x: np.ndarray, sr: int, seconds: float = 0.005) -> np.ndarray:
    m = min(int(seconds * sr), x.size // 2)
    if m > 0:
        ramp = np.linspace(0.0, 1.0, m)
        x[:m] *= ramp
        x[-m:] *= ramp[::-1]
    return x


def _band_noise(rng, n: int, sr: int, fc: float, octaves: float) -> np.ndarray:
    """White noise shaped by a Gaussian band in log-frequency around fc (kept below Nyquist)."""
    fc = min(fc, 0.4 * sr)
    f = np.fft.rfftfreq(n, 1.0 / sr)
    f[0] = f[1] if n > 2 else 1.0
    gain = np.exp(-0.5 * (np.log2(f / fc) / (octaves / 2)) ** 2)
    x = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * gain, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _colored_noise(rng, n: int, sr: int, exponent: float) -> np.ndarray:
    """Unit-RMS noise with power ~ 1/f**exponent (0 white, 1 pink, 2 brown), flat below 20 Hz."""
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / sr), 20.0)
    x = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * f ** (-exponent / 2), n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _repeat(rng, n: int, sr: int, event, gap: tuple[float, float]) -> np.ndarray:
    """Events one after another with random gaps until n samples are filled (the last one is cut)."""
    out = np.zeros(n)
    pos = int(rng.uniform(0.0, 0.1) * sr) if n > sr else 0
    while pos < n:
        ev = event()
        m = min(ev.size, n - pos)
        out[pos:pos + m] += ev[:m]
        pos += ev.size + int(rng.uniform(*gap) * sr)
    return out


def _stamp(n: int, onsets, kernels) -> np.ndarray:
    """Sum of short kernels placed at sample onsets."""
    out = np.zeros(n)
    for at, k in zip(onsets, kernels):
        if at < n:
            m = min(k.size, n - at)
            out[at:at + m] += k[:m]
    return out


def _active_rms(x: np.ndarray, sr: int) -> float:
    """RMS over the louder half of 20-ms frames: a level for sparse events (knocks, clicks) that a
    plain RMS over silence would understate."""
    hop = max(int(0.02 * sr), 1)
    m = x.size // hop
    if m < 2:
        return float(np.sqrt(np.mean(x ** 2)) + 1e-12)
    energy = np.sort(np.mean(x[:m * hop].reshape(m, hop) ** 2, axis=1))
    return float(np.sqrt(np.mean(energy[m // 2:])) + 1e-12)


# ----------------------------------------------------------------------------- sound classes
# Each renderer fills n samples with its sound, drawing pitch, rate, duration, ... from rng per clip.

def _bell_tone(rng, n, sr):
    f0, tau = _logu(rng, 250, 1400), rng.uniform(0.25, 1.0)
    ratios, amps = (1.0, 2.0, 2.76, 4.07, 5.4), (1.0, 0.6, 0.5, 0.35, 0.25)

    def strike():
        t = np.arange(int(min(4 * tau, 3.0) * sr)) / sr
        x = sum(a * np.sin(2 * np.pi * f0 * r * t + rng.uniform(0, 6.3)) * np.exp(-t * np.sqrt(r) / tau)
                for r, a in zip(ratios, amps) if f0 * r < 0.45 * sr)
        return _fade(x, sr, 0.002) * rng.uniform(0.6, 1.0)
    return _repeat(rng, n, sr, strike, (0.05, 0.6))


def _chirp(rising: bool):
    def render(rng, n, sr):
        f_lo, ratio, dur = _logu(rng, 300, 1600), rng.uniform(1.8, 3.5), rng.uniform(0.15, 0.6)
        amps = (1.0, rng.uniform(0.0, 0.4))

        def event():
            u = np.arange(int(dur * rng.uniform(0.85, 1.15) * sr)) / (dur * sr)
            f = f_lo * ratio ** (u if rising else 1.0 - u)
            return _tone(f, sr, amps) * np.sqrt(np.sin(np.pi * np.clip(u, 0, 1)))
        return _repeat(rng, n, sr, event, (0.03, 0.4))
    return render


def _click_train(rng, n, sr):
    rate, fc, tau = _logu(rng, 4, 40), _logu(rng, 800, 5000), rng.uniform(0.0005, 0.003)
    t = np.arange(int(6 * tau * sr) + 1) / sr
    kernel = np.sin(2 * np.pi * min(fc, 0.4 * sr) * t) * np.exp(-t / tau)
    period = rng.uniform(0.9, 1.1, int(n / sr * rate) + 2) / rate
    onsets = (np.cumsum(period) * sr).astype(int)
    return _stamp(n, onsets, [kernel * rng.uniform(0.6, 1.0) for _ in onsets])


def _noise_burst(rng, n, sr):
    fc, octaves = _logu(rng, 300, 4000), rng.uniform(0.7, 2.0)

    def burst():
        m = int(rng.uniform(0.08, 0.5) * sr)
        env = np.exp(-np.arange(m) / (m / 3))
        return _fade(_band_noise(rng, m, sr, fc, octaves) * env, sr, 0.003)
    return _repeat(rng, n, sr, burst, (0.1, 0.8))


def _hum(rng, n, sr):
    f0 = rng.uniform(50, 180)
    t = np.arange(n) / sr
    f = f0 * (1 + 0.004 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t))
    wobble = 1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 6.3))
    return _tone(f, sr, [k ** -1.5 for k in range(1, 7)]) * wobble


def _whistle(rng, n, sr):
    base = _logu(rng, 800, 3000)

    def note():
        m = int(rng.uniform(0.3, 1.5) * sr)
        drift = 1 + 0.006 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * np.arange(m) / sr)
        return _fade(_tone(base * 2 ** rng.uniform(-0.3, 0.3) * drift, sr), sr, 0.02)
    return _repeat(rng, n, sr, note, (0.05, 0.3))


def _trill(rng, n, sr):
    fc, rate = _logu(rng, 500, 3000), rng.uniform(10, 30)
    amps = (1.0, rng.uniform(0, 0.3))

    def phrase():
        t = np.arange(int(rng.uniform(0.4, 1.5) * sr)) / sr
        env = (0.5 - 0.5 * np.cos(2 * np.pi * rate * t)) ** 2
        return _fade(_tone(np.full(t.size, fc), sr, amps) * env, sr, 0.01)
    return _repeat(rng, n, sr, phrase, (0.1, 0.5))


def _vibrato(rng, n, sr):
    fc, rate, depth = _logu(rng, 300, 2000), rng.uniform(4.5, 8.0), rng.uniform(0.02, 0.06)

    def note():
        t = np.arange(int(rng.uniform(0.6, 2.5) * sr)) / sr
        f = fc * (1 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 6.3)))
        return _fade(_tone(f, sr, (1.0, 0.5, 0.25)), sr, 0.03)
    return _repeat(rng, n, sr, note, (0.1, 0.4))


def _knock(rng, n, sr):
    f, tau = _logu(rng, 80, 400), rng.uniform(0.02, 0.06)
    t = np.arange(int(5 * tau * sr)) / sr
    body = np.sin(2 * np.pi * f * t) * np.exp(-t / tau)
    body[:int(0.003 * sr)] += 0.5 * rng.standard_normal(int(0.003 * sr))

    def group():
        gaps = np.cumsum(rng.uniform(0.12, 0.35, int(rng.integers(2, 6))))
        onsets = ((gaps - gaps[0]) * sr).astype(int)
        return _stamp(onsets[-1] + body.size, onsets, [body * rng.uniform(0.6, 1.0) for _ in onsets])
    return _repeat(rng, n, sr, group, (0.3, 1.0))


def _buzz(rng, n, sr):
    f0 = rng.uniform(80, 300)

    def burst():
        m = int(rng.uniform(0.3, 1.5) * sr)
        f = f0 * (1 + 0.01 * rng.standard_normal() + 0.003 * np.sin(2 * np.pi * 3 * np.arange(m) / sr))
        saw = 2 * ((np.cumsum(f) / sr) % 1.0) - 1
        return _fade(saw, sr, 0.01)
    return _repeat(rng, n, sr, burst, (0.05, 0.5))


def _rain(rng, n, sr):
    bed = 0.3 * _band_noise(rng, n, sr, _logu(rng, 2000, 6000), 2.5)
    rate, tau = rng.uniform(40, 250), rng.uniform(0.0005, 0.002)
    onsets = np.sort(rng.integers(0, n, rng.poisson(rate * n / sr)))
    m = int(6 * tau * sr) + 1
    decay = np.exp(-np.arange(m) / (tau * sr))
    drops = _stamp(n, onsets, [rng.standard_normal(m) * decay * rng.exponential(1.0) for _ in onsets])
    return bed + drops


def _siren(rng, n, sr):
    fc, depth, rate = _logu(rng, 500, 1500), rng.uniform(0.15, 0.35), rng.uniform(0.3, 1.5)
    t = np.arange(n) / sr
    return _tone(fc * (1 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 6.3))), sr, (1.0, 0.4))


def _drip(rng, n, sr):
    f0, glide = _logu(rng, 500, 2000), rng.uniform(1.3, 2.0)

    def drop():
        m = int(rng.uniform(0.04, 0.1) * sr)
        u = np.arange(m) / m
        return _tone(f0 * glide ** u, sr) * np.exp(-3 * u)
    return _repeat(rng, n, sr, drop, (0.15, 0.9))


def _engine(rng, n, sr):
    rate = rng.uniform(15, 50)
    t = np.arange(n) / sr
    pulses = (0.5 + 0.5 * np.cos(2 * np.pi * rate * t)) ** 4 + 0.1
    return _band_noise(rng, n, sr, _logu(rng, 100, 400), 1.5) * pulses


def _beep(rng, n, sr):
    f, dur, period = _logu(rng, 600, 3000), rng.uniform(0.05, 0.2), rng.uniform(0.25, 0.6)
    pip = _fade(_tone(np.full(int(dur * sr), f), sr), sr)
    return _repeat(rng, n, sr, lambda: pip, (period - dur, period - dur))


def _pattern(k: int):
    """Family of extra classes: a melody (pitch contour + rhythm) fixed per class, sung at a random
    pitch and tempo per clip, so classes differ only by shape over time."""
    crng = np.random.default_rng([7919, k])
    n_notes = int(crng.integers(3, 7))
    semis = crng.integers(-7, 8, n_notes)
    units = crng.choice([1, 2], n_notes)
    rests = crng.choice([0, 0, 1], n_notes)
    amps = [(1.0,), (1.0, 0.5, 0.3), (1.0, 0.0, 0.33, 0.0, 0.2)][int(crng.integers(0, 3))]

    def render(rng, n, sr):
        base, unit = _logu(rng, 300, 1500), rng.uniform(0.06, 0.14)

        def phrase():
            notes = []
            for s, u, r in zip(semis, units, rests):
                m = int(u * unit * sr)
                notes.append(_fade(_tone(np.full(m, base * 2 ** (s / 12)), sr, amps), sr))
                notes.append(np.zeros(int(r * unit * sr)))
            return np.concatenate(notes)
        return _repeat(rng, n, sr, phrase, (0.1, 0.4))
    return render


_BUILTIN = [
    ("Bell_tone", _bell_tone), ("Rising_chirp", _chirp(True)), ("Falling_chirp", _chirp(False)),
    ("Click_train", _click_train), ("Noise_burst", _noise_burst), ("Hum", _hum), ("Whistle", _whistle),
    ("Trill", _trill), ("Vibrato", _vibrato), ("Knock", _knock), ("Buzz", _buzz), ("Rain", _rain),
    ("Siren", _siren), ("Drip", _drip), ("Engine", _engine), ("Beep", _beep),
]


def _class_table(n_classes: int) -> list[tuple[str, object]]:
    """(name, renderer) for the first n_classes classes: the built-ins, then melody patterns."""
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    extra = [(f"Pattern_{k:03d}", _pattern(k)) for k in range(1, n_classes - len(_BUILTIN) + 1)]
    return (_BUILTIN + extra)[:n_classes]


def demo_classes(n_classes: int = 12) -> list[str]:
    """The demo vocabulary, alphabetical like sample_submission.csv's columns."""
    return sorted(name for name, _ in _class_table(n_classes))


# ----------------------------------------------------------------------------- clips

def _event_track(rng, render, n: int, sr: int) -> np.ndarray:
    """One labelled event, active over a random stretch of the clip, at unit active RMS."""
    m = min(n, max(int(rng.uniform(0.5, 1.0) * n), int(0.3 * sr)))
    start = int(rng.integers(0, n - m + 1))
    x = _fade(render(rng, m, sr), sr)
    out = np.zeros(n)
    out[start:start + m] = x / _active_rms(x, sr)
    return out


def _render_clip(rng, split: str, labels: list[int], seconds: float, table, sr: int) -> np.ndarray:
    """Labelled events mixed, plus the split's background, at a random overall level (int16 range)."""
    n = max(int(round(seconds * sr)), 1)
    mix = np.zeros(n)
    for j, c in enumerate(labels):
        mix += _event_track(rng, table[c][1], n, sr) * (1.0 if j == 0 else 10 ** (rng.uniform(-6, 0) / 20))
    level = _active_rms(mix, sr)
    others = [c for c in range(len(table)) if c not in labels]

    def add(x, db):
        return x * level * 10 ** (db / 20)

    if split == "train_noisy":
        for c in rng.choice(others, min(len(others), int(rng.integers(0, 3))), replace=False):
            mix += add(_event_track(rng, table[c][1], n, sr), rng.uniform(-22, -12))
        if rng.random() < 0.5:
            mains = np.full(n, rng.choice([50.0, 60.0]))
            mix += add(_tone(mains, sr, (1.0, 0.5, 0.3, 0.2)), rng.uniform(-28, -18))
        mix += add(_colored_noise(rng, n, sr, rng.uniform(1.0, 2.0)), -rng.uniform(0, 15))
        # a recording channel with its own tilt (brighter or duller microphones)
        f = np.maximum(np.fft.rfftfreq(n, 1.0 / sr), 50.0)
        mix = np.fft.irfft(np.fft.rfft(mix) * (f / 1000.0) ** rng.uniform(-0.5, 0.3), n)
    elif split == "test":
        if others and rng.random() < 0.25:
            mix += add(_event_track(rng, table[int(rng.choice(others))][1], n, sr), rng.uniform(-25, -18))
        mix += add(_colored_noise(rng, n, sr, rng.uniform(0.5, 1.5)), -rng.uniform(8, 25))
    else:
        mix += add(_colored_noise(rng, n, sr, rng.uniform(0.0, 1.0)), -rng.uniform(30, 45))
    return mix * (rng.uniform(0.3, 0.9) / (np.abs(mix).max() + 1e-12))


def _write_wav(path: Path, x: np.ndarray, sr: int) -> None:
    pcm = np.round(np.clip(x, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------- label plans

def _with_extras(rng, primaries, n_classes: int, share: float, sizes=(2,), probs=(1.0,)) -> list[list[int]]:
    """Primary labels, with exactly round(share * n) clips given extra distinct labels."""
    labels = [[int(c)] for c in primaries]
    for i in rng.permutation(len(labels))[:int(round(share * len(labels)))]:
        size = min(int(rng.choice(sizes, p=probs)), n_classes)
        others = [c for c in range(n_classes) if c != labels[i][0]]
        labels[i] += [int(c) for c in rng.choice(others, size - 1, replace=False)]
    return labels


def _corrupt(rng, truth: list[list[int]], n_classes: int, share: float) -> list[list[int]]:
    """Copies of the label sets with exactly round(share * n) of them made wrong: one label swapped for a
    class the clip does not contain (or dropped when the clip contains every class)."""
    noisy = [list(ls) for ls in truth]
    for i in rng.permutation(len(noisy))[:int(round(share * len(noisy)))]:
        j = int(rng.integers(0, len(noisy[i])))
        absent = [c for c in range(n_classes) if c not in noisy[i]]
        if absent:
            noisy[i][j] = int(rng.choice(absent))
        else:
            del noisy[i][j]
    return noisy


def _fnames(rng, count: int) -> list[str]:
    """Unique random 8-hex-digit names like FAT2019's, telling nothing about split or class."""
    names: set[str] = set()
    out = []
    while len(out) < count:
        name = f"{int(rng.integers(0, 2 ** 32)):08x}.wav"
        if name not in names:
            names.add(name)
            out.append(name)
    return out


# ----------------------------------------------------------------------------- dataset

def _generate(root: Path, seed: int, n_classes: int, curated_per_class: int, noisy_per_class: int,
              n_test: int, sr: int) -> None:
    table = _class_table(n_classes)
    names = [name for name, _ in table]
    plan = np.random.default_rng([seed, _SPLIT_CODES["plan"]])

    curated = _with_extras(plan, plan.permutation(np.repeat(np.arange(n_classes), curated_per_class)),
                           n_classes, CURATED_MULTI_SHARE)
    noisy_truth = _with_extras(plan, plan.permutation(np.repeat(np.arange(n_classes), noisy_per_class)),
                               n_classes, NOISY_MULTI_SHARE)
    noisy_given = _corrupt(plan, noisy_truth, n_classes, NOISY_WRONG_SHARE)
    test = _with_extras(plan, plan.permutation(np.arange(n_test) % n_classes), n_classes,
                        TEST_MULTI_SHARE, sizes=(2, 3), probs=(0.7, 0.3))
    fnames = _fnames(plan, len(curated) + len(noisy_truth) + len(test))
    splits = {
        "train_curated": (fnames[:len(curated)], curated, (0.3, 10.0, True)),
        "train_noisy": (fnames[len(curated):len(curated) + len(noisy_truth)], noisy_truth, (5.0, 10.0, False)),
        "test": (fnames[len(curated) + len(noisy_truth):], test, (1.0, 10.0, True)),
    }

    def joined(ls):
        return ",".join(sorted(names[c] for c in ls))

    for split, (fns, labels, (lo, hi, log_uniform)) in splits.items():
        (root / split).mkdir()
        for i, (fn, ls) in enumerate(zip(fns, labels)):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
            seconds = _logu(rng, lo, hi) if log_uniform else rng.uniform(lo, hi)
            _write_wav(root / split / fn, _render_clip(rng, split, ls, seconds, table, sr), sr)

    def rows(fns, labels):
        return sorted((fn, joined(ls)) for fn, ls in zip(fns, labels))

    _write_csv(root / "train_curated.csv", ["fname", "labels"], rows(splits["train_curated"][0], curated))
    noisy_fns = splits["train_noisy"][0]
    _write_csv(root / "train_noisy.csv", ["fname", "labels"], rows(noisy_fns, noisy_given))
    _write_csv(root / "train_noisy_truth.csv", ["fname", "labels"], rows(noisy_fns, noisy_truth))
    _write_csv(root / "test_truth.csv", ["fname", "labels"], rows(splits["test"][0], test))
    _write_csv(root / "sample_submission.csv", ["fname"] + sorted(names),
               [[fn] + [0] * n_classes for fn in sorted(splits["test"][0])])


def _read_marker(path: Path):
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def make_demo_dataset(out_dir=None, seed: int = 42, *, n_classes: int = 12, curated_per_class: int = 24,
                      noisy_per_class: int = 48, n_test: int = 120, sample_rate: int = 16000,
                      force: bool = False) -> Path:
    """Write the demo dataset (FAT2019 layout) and return its folder; reuse it when already complete.

    Generation goes to a temporary sibling folder renamed into place at the end, and the completion marker
    (holding the parameters) is written last inside it, so an interrupted run never leaves a folder that
    looks complete. A folder made with other parameters is replaced; a non-empty folder without a marker
    is not ours and is refused.
    """
    if min(curated_per_class, noisy_per_class, n_test) < 1:
        raise ValueError("curated_per_class, noisy_per_class and n_test must be >= 1")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be >= 8000, got {sample_rate}")
    _class_table(n_classes)  # validates n_classes before any file is touched
    out = Path(out_dir) if out_dir is not None else default_demo_dir(seed)
    params = dict(version=DEMO_VERSION, seed=int(seed), n_classes=int(n_classes),
                  curated_per_class=int(curated_per_class), noisy_per_class=int(noisy_per_class),
                  n_test=int(n_test), sample_rate=int(sample_rate))
    if out.exists():
        if not force and _read_marker(out) == params:
            return out
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists, is not empty and is not a demo dataset; not overwriting it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _generate(tmp, int(seed), int(n_classes), int(curated_per_class), int(noisy_per_class),
                  int(n_test), int(sample_rate))
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True), encoding="utf-8")
        if out.exists():
            if not force and _read_marker(out) == params:  # another process finished first
                shutil.rmtree(tmp)
                return out
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, aside / "data")
            os.replace(tmp, out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def demo_truth(data_dir, which: str = "test") -> pd.DataFrame:
    """The hidden true labels (fname, labels) of the demo's test or noisy clips, for evaluation only."""
    files = {"test": "test_truth.csv", "noisy": "train_noisy_truth.csv"}
    if which not in files:
        raise ValueError(f"which must be 'test' or 'noisy', got {which!r}")
    return pd.read_csv(Path(data_dir) / files[which], dtype={"fname": str, "labels": str})
''')

_add('src/fattag/features.py', r'''
"""Log-mel features: computed once per clip on the device, kept in memory as float16, cropped per item.

Why a log-mel store rather than raw audio: FAT2019's noisy set decodes to ~25 GB of int16 audio, more than a
Kaggle machine's RAM; its float16 log-mel (128 bands x ~64 frames/s) is ~5x smaller and needs no per-epoch STFT.
Augmentations (random crop, SpecAugment, mixup) still differ every epoch because they act on the stored mels.

Padding policy: a clip shorter than one crop is *repeated* (tiled) in the waveform up to the crop length before
its spectrogram is taken, so a 0.3 s door knock becomes a 4 s train of knocks rather than a knock and silence.
Training and inference use the same policy.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torchaudio

from .config import Config
from .data import ClipTable, iter_decoded

log = logging.getLogger("fattag")


class LogMel(torch.nn.Module):
    """Waveform (B, N) -> log-mel in dB (B, n_mels, T), top_db clipped per clip."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
            n_mels=cfg.n_mels, f_min=cfg.f_min, f_max=min(cfg.f_max, cfg.sample_rate / 2), power=2.0)
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=cfg.top_db)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # (B, 1, F, T): AmplitudeToDB clips top_db per item only for 4-D input; 3-D input is clipped per batch.
        spec = self.mel(wave.unsqueeze(1))
        return self.to_db(spec).squeeze(1)


def tile_to_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Repeat a short clip until it is at least `length` samples long."""
    if len(wave) >= length:
        return wave
    reps = -(-length // max(len(wave), 1))
    return np.tile(wave, reps)[:length]


@dataclass
class MelStore:
    """Per-clip float16 log-mels (n_mels, T) for one clip table; None where the clip could not be decoded."""
    table: ClipTable
    mels: list
    errors: list = field(default_factory=list)   # (fname, reason) of clips that could not be decoded
    seconds: float = 0.0                          # audio decoded, for throughput logs and reports

    @property
    def ok(self) -> np.ndarray:
        return np.array([m is not None for m in self.mels], dtype=bool)

    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.mels if m is not None)


def build_store(table: ClipTable, cfg: Config, device: torch.device | str = "cpu", progress: bool = True) -> MelStore:
    """Decode every clip (threads), take its log-mel on `device`, keep it as float16 on the host."""
    device = torch.device(device)
    logmel = LogMel(cfg).to(device)
    min_samples = max(int(round(cfg.crop_seconds * cfg.sample_rate)), cfg.n_fft)
    mels: list = [None] * len(table)
    errors, seconds, t0 = [], 0.0, time.time()
    with torch.inference_mode():
        for i, wave, err in iter_decoded(table, cfg.sample_rate, trim=cfg.trim_silence, trim_db=cfg.trim_db,
                                         progress=progress, desc=f"decode {table.name}"):
            if wave is None:
                errors.append((table.fnames[i], err))
                continue
            seconds += len(wave) / cfg.sample_rate
            x = torch.from_numpy(tile_to_length(wave, min_samples)).to(device)
            mels[i] = logmel(x[None])[0].to(torch.float16).cpu().numpy()
    store = MelStore(table, mels, errors, seconds)
    took = time.time() - t0
    log.info("%s: %d clips, %.1f min of audio -> %.0f MB of float16 log-mel in %.1f s (%.1f clips/s)%s",
             table.name, len(table), seconds / 60, store.nbytes() / 1e6, took, len(table) / max(took, 1e-9),
             f"; {len(errors)} skipped" if errors else "")
    return store


def store_stats(store: MelStore, max_clips: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Global mean/std of the log-mel values (on a seeded sample of clips), for the model's input normalisation."""
    idx = np.flatnonzero(store.ok)
    if len(idx) == 0:
        raise ValueError(f"{store.table.name}: no decodable clip to compute statistics from")
    if len(idx) > max_clips:
        idx = np.random.default_rng(seed).choice(idx, max_clips, replace=False)
    vals = np.concatenate([store.mels[i].astype(np.float32).ravel() for i in idx])
    return float(vals.mean()), float(vals.std() + 1e-6)


# ---------------------------------------------------------------- crops and windows


def crop(mel: np.ndarray, length: int, start: int) -> np.ndarray:
    """Frames [start, start+length) of a (n_mels, T) mel; a mel shorter than `length` is tiled first."""
    if mel.shape[1] < length:
        mel = np.tile(mel, (1, -(-length // mel.shape[1])))
    return mel[:, start:start + length]


def window_starts(n_frames: int, length: int, step: int) -> list[int]:
    """Window starts that cover every frame of a clip: regular steps plus one flush with the end."""
    if n_frames <= length:
        return [0]
    step = max(1, step)
    starts = list(range(0, n_frames - length + 1, step))
    if starts[-1] != n_frames - length:
        starts.append(n_frames - length)
    return starts


class CropDataset(torch.utils.data.Dataset):
    """One random crop per clip per epoch (seeded generator: same seed, same crops)."""

    def __init__(self, store: MelStore, indices, crop_frames: int, seed: int = 0):
        self.store, self.indices, self.length = store, np.asarray(indices), crop_frames
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        mel = self.store.mels[j]
        start = int(self.rng.integers(0, max(mel.shape[1] - self.length, 0) + 1))
        x = torch.from_numpy(np.ascontiguousarray(crop(mel, self.length, start)))[None]
        return x, torch.from_numpy(self.store.table.targets[j])


class WindowDataset(torch.utils.data.Dataset):
    """Every window of every listed clip, in clip order; `clip_of[w]` says which clip window w belongs to.

    With `center_only`, one centred window per clip: the "no TTA" baseline that whole-clip windows are judged by.
    """

    def __init__(self, store: MelStore, indices, crop_frames: int, step_frac: float, center_only: bool = False):
        self.store, self.length = store, crop_frames
        step = int(round(crop_frames * step_frac))

        def starts(n_frames):
            if center_only:
                return [max(n_frames - crop_frames, 0) // 2]
            return window_starts(n_frames, crop_frames, step)

        items = [(k, s) for k, j in enumerate(indices) for s in starts(store.mels[j].shape[1])]
        self.indices = np.asarray(indices)
        self.items = items
        self.clip_of = np.array([k for k, _ in items], dtype=np.int64)
        n_classes = 0 if store.table.targets is None else store.table.targets.shape[1]
        self._no_target = torch.zeros(n_classes)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, w):
        k, start = self.items[w]
        j = self.indices[k]
        x = torch.from_numpy(np.ascontiguousarray(crop(self.store.mels[j], self.length, start)))[None]
        y = self._no_target if self.store.table.targets is None else torch.from_numpy(self.store.table.targets[j])
        return x, y


def aggregate_windows(window_probs: torch.Tensor, clip_of: torch.Tensor, n_clips: int, how: str) -> torch.Tensor:
    """Per-clip scores from per-window probabilities: mean, max, or meanmax (the average of both)."""
    if how not in ("mean", "max", "meanmax"):
        raise ValueError(f"unknown aggregation {how!r}: mean, max or meanmax")
    idx = clip_of[:, None].expand_as(window_probs)
    zeros = torch.zeros(n_clips, window_probs.shape[1], dtype=window_probs.dtype, device=window_probs.device)
    out = []
    if how in ("mean", "meanmax"):
        out.append(zeros.scatter_reduce(0, idx, window_probs, "mean", include_self=False))
    if how in ("max", "meanmax"):
        out.append(zeros.scatter_reduce(0, idx, window_probs, "amax", include_self=False))
    return sum(out) / len(out)


# ---------------------------------------------------------------- batch augmentations (on the device)


def spec_augment(x: torch.Tensor, n_time: int, time_frac: float, n_freq: int, freq_frac: float,
                 fill: float = 0.0) -> torch.Tensor:
    """SpecAugment masks on a batch (B, 1, F, T): each item gets its own random time and frequency stripes.

    Random numbers come from torch's global CPU generator, so a seeded run masks the same way on any device.
    """
    b, _, f, t = x.shape
    keep = torch.ones(b, 1, f, t, dtype=torch.bool, device=x.device)
    for n, size, frac, shape in ((n_time, t, time_frac, (b, 1, 1, t)), (n_freq, f, freq_frac, (b, 1, f, 1))):
        widest = int(size * frac)
        if n <= 0 or widest < 1:
            continue
        pos = torch.arange(size)
        for _ in range(n):
            width = torch.randint(0, widest + 1, (b,))
            start = (torch.rand(b) * (size - width + 1)).long()
            stripe = (pos[None] >= start[:, None]) & (pos[None] < (start + width)[:, None])  # (B, size)
            keep &= ~stripe.view(shape).to(x.device)
    return torch.where(keep, x, torch.full_like(x, fill))


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
''')

_add('src/fattag/metrics.py', r'''
"""lwlrap, the FAT2019 metric (label-weighted label-ranking average precision), exact and vectorised.

It must be computed over a whole validation set at once: an average of per-batch values weights clips
wrongly. Ties are ranked pessimistically, as sklearn's `label_ranking_average_precision_score` does, so
the two agree exactly (with `sample_weight=truth.sum(1)`) even when scores tie.
"""
from __future__ import annotations

import numpy as np

__all__ = ["lwlrap", "per_class_lwlrap"]


def _check(truth, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validated (bool truth, float64 scores); errors name what is wrong."""
    truth = np.asarray(truth)
    scores = np.asarray(scores, dtype=np.float64)
    if truth.ndim != 2 or scores.shape != truth.shape:
        raise ValueError(f"truth and scores must be 2-D (clips, classes) arrays of the same shape; "
                         f"got truth {truth.shape} and scores {scores.shape}")
    bad = int(np.size(scores) - np.count_nonzero(np.isfinite(scores)))
    if bad:
        raise ValueError(f"scores contain {bad} non-finite value(s) (NaN or inf)")
    if truth.dtype != bool:
        if not np.isin(truth, (0, 1)).all():
            raise ValueError("truth must hold only 0 and 1 (or booleans)")
        truth = truth == 1
    if not truth.any():
        raise ValueError("truth has no positive label: lwlrap is undefined")
    return truth, scores


def _label_precisions(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n, C) array: for each true (clip, class) its ranking precision, 0 where the class is not true.

    Each row is sorted once. The rank of a class is the number of classes scoring >= it (the last
    position of its tie group), and the hit count is the number of true classes within that rank.
    """
    n_classes = scores.shape[1]
    order = np.argsort(-scores, axis=1, kind="stable")
    s_sorted = np.take_along_axis(scores, order, axis=1)
    t_sorted = np.take_along_axis(truth, order, axis=1)
    # index of the last member of each position's tie group: a suffix minimum over group ends
    is_group_end = np.ones(s_sorted.shape, dtype=bool)
    is_group_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    ends = np.where(is_group_end, np.arange(n_classes), n_classes)
    ends = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]
    hits = np.cumsum(t_sorted, axis=1)
    prec_sorted = np.take_along_axis(hits, ends, axis=1) / (ends + 1.0) * t_sorted
    prec = np.empty_like(prec_sorted)
    np.put_along_axis(prec, order, prec_sorted, axis=1)
    return prec


def lwlrap(truth, scores) -> float:
    """Mean ranking precision over all (clip, true label) pairs; clips without labels add nothing."""
    truth, scores = _check(truth, scores)
    return float(_label_precisions(truth, scores).sum() / truth.sum())


def per_class_lwlrap(truth, scores) -> tuple[np.ndarray, np.ndarray]:
    """Per-class average precision (NaN for classes without positives) and each class's share of all
    true labels, so that `np.nansum(per_class * weights) == lwlrap(truth, scores)`."""
    truth, scores = _check(truth, scores)
    prec_sum = _label_precisions(truth, scores).sum(axis=0)
    positives = truth.sum(axis=0).astype(np.float64)
    per_class = np.full(positives.shape, np.nan)
    np.divide(prec_sum, positives, out=per_class, where=positives > 0)
    return per_class, positives / positives.sum()
''')

_add('src/fattag/model.py', r'''
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


def save_checkpoint(path, model: nn.Module, meta: dict) -> None:
    """Atomic: write a temporary file, then rename, so a kill never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"meta": meta, "state_dict": state}, tmp)
    tmp.replace(path)


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
''')

_add('src/fattag/predict.py', r'''
"""Whole-clip inference: every window of every clip, batched on the device, aggregated per clip.

The seed predicted from four random 2-second crops, so most of a long clip was never seen; sliding windows that
cover every frame (the winners' choice) look at all of it. Optional augmented passes add light SpecAugment.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .config import Config
from .features import MelStore, WindowDataset, aggregate_windows, spec_augment


@torch.inference_mode()
def predict_clips(model: torch.nn.Module, store: MelStore, indices, cfg: Config, device="cpu",
                  aug_passes: int = 0, center_only: bool = False, batch_size: int | None = None,
                  seed: int = 0) -> np.ndarray:
    """Probabilities (len(indices), C) for the listed clips of `store`; clips must be decodable.

    Default: all windows of each clip (whole-clip TTA) plus `aug_passes` augmented passes; `center_only` scores
    one centred window per clip instead (the no-TTA baseline).
    """
    device = torch.device(device)
    indices = np.asarray(indices)
    ds = WindowDataset(store, indices, cfg.crop_frames, cfg.tta_step_frac, center_only=center_only)
    bs = batch_size or max(cfg.batch_size * 2, 8)
    model = model.to(device).eval()
    clip_of = torch.from_numpy(ds.clip_of).to(device)
    passes = []
    cpu_rng_state = torch.get_rng_state()
    torch.manual_seed(seed)  # augmented passes are reproducible and leave the training RNG untouched
    try:
        for p in range(1 + aug_passes):
            probs = []
            for start in range(0, len(ds), bs):
                x = torch.stack([ds[w][0] for w in range(start, min(start + bs, len(ds)))]).to(device)
                if p > 0:
                    x = spec_augment(x, 1, cfg.time_mask_frac / 2, 1, cfg.freq_mask_frac / 2,
                                     fill=float(model[0].mean) if hasattr(model[0], "mean") else 0.0)
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    probs.append(torch.sigmoid(model(x).float()))
            window_probs = torch.cat(probs) if probs else torch.zeros(0, n_outputs(model), device=device)
            passes.append(aggregate_windows(window_probs, clip_of, len(indices), cfg.tta_aggregate))
    finally:
        torch.set_rng_state(cpu_rng_state)
    return torch.stack(passes).mean(0).cpu().numpy().astype(np.float64)


def n_outputs(model: torch.nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def timed_predict(*args, **kwargs) -> tuple[np.ndarray, float]:
    t0 = time.time()
    out = predict_clips(*args, **kwargs)
    return out, time.time() - t0


def ensemble(fold_probs: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """Combine per-fold probabilities: arithmetic mean, or geometric mean (rewards agreement between folds)."""
    stack = np.stack(fold_probs)
    if how == "mean":
        return stack.mean(0)
    if how == "geomean":
        return np.exp(np.log(np.clip(stack, 1e-7, 1.0)).mean(0))
    raise ValueError(f"unknown fold ensemble {how!r}: mean or geomean")
''')

_add('src/fattag/session.py', r'''
"""One run's context: resolved data folder, config, work folder, device, log file and the clock."""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import KAGGLE_WORK_DIR, Config, make_config, parse_duration
from .data import find_data_dir

log = logging.getLogger("fattag")
PROCESS_START = time.time()  # the time budget counts from here (module import = process start, near enough)


@dataclass
class Session:
    cfg: Config
    preset: str
    data_dir: Path
    work_dir: Path
    device: torch.device
    is_demo: bool
    started: float = PROCESS_START

    @property
    def deadline(self) -> float | None:
        """Wall-clock time by which a submission must be on disk (budget minus safety margin), or None."""
        if not self.cfg.time_budget:
            return None
        return self.started + self.cfg.time_budget * (1 - self.cfg.safety_margin)

    def elapsed(self) -> float:
        return time.time() - self.started


def setup_logging(log_file: Path | None = None) -> None:
    """INFO lines with wall-clock offsets to stderr and, when given, to the run's log file."""
    logger = logging.getLogger("fattag")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.propagate = False


def open_session(args) -> Session:
    """Resolve where data comes from (Kaggle, a folder, or the generated demo), the preset and the work folder."""
    data_dir = find_data_dir(args.data_dir)
    is_demo = data_dir is None
    if is_demo:
        from .demo import make_demo_dataset
        setup_logging()
        log.info("no --data-dir and no Kaggle input: using the synthetic demo dataset")
        data_dir = make_demo_dataset(seed=42)
    preset = args.preset or ("demo" if is_demo else "kaggle-1h")
    overrides = {"seed": args.seed}
    for name in ("folds",):
        overrides[name] = getattr(args, name, None)
    if getattr(args, "time_budget", None) is not None:
        overrides["time_budget"] = parse_duration(args.time_budget)
    cfg = make_config(preset, overrides, args.sets)
    if args.work_dir:
        work_dir = Path(args.work_dir)
    elif Path(KAGGLE_WORK_DIR).is_dir():
        work_dir = Path(KAGGLE_WORK_DIR)
    else:
        work_dir = Path("runs") / preset
    work_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(work_dir / "log.txt")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    (work_dir / "config.json").write_text(cfg.to_json() + "\n")
    log.info("data %s%s | preset %s | work dir %s | device %s%s", data_dir, " (demo)" if is_demo else "", preset,
             work_dir, device, f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else "")
    return Session(cfg, preset, Path(data_dir), work_dir, device, is_demo)
''')

_add('src/fattag/submission.py', r'''
"""submission.csv: validated against sample_submission.csv, written atomically, a row for every test clip."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("fattag")


class SubmissionError(ValueError):
    pass


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame) -> None:
    """The header must equal sample_submission's, rows in its order, every value a probability in [0, 1]."""
    if list(sub.columns) != list(sample.columns):
        raise SubmissionError(f"columns differ from sample_submission.csv: got {list(sub.columns)[:4]}..., "
                              f"expected {list(sample.columns)[:4]}... ({len(sample.columns)} columns)")
    if len(sub) != len(sample) or list(sub["fname"]) != list(sample["fname"]):
        raise SubmissionError(f"rows differ from sample_submission.csv ({len(sub)} vs {len(sample)} rows, "
                              "or another order)")
    values = sub.iloc[:, 1:].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise SubmissionError(f"{int((~np.isfinite(values)).sum())} non-finite values")
    if values.min() < 0 or values.max() > 1:
        raise SubmissionError(f"values outside [0, 1]: min {values.min()}, max {values.max()}")


def fill_missing(probs: np.ndarray, ok: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Rows of clips that could not be decoded (or not predicted) get the class prior: a row, never a hole."""
    out = np.array(probs, dtype=np.float64, copy=True)
    bad = ~ok | ~np.isfinite(out).all(1)
    out[bad] = prior[None, :]
    if bad.any():
        log.warning("%d test clips could not be predicted: they get the class prior", int(bad.sum()))
    return out


def class_prior(targets: np.ndarray) -> np.ndarray:
    """Share of clips carrying each class: the best guess for a clip we cannot hear."""
    if targets is None or len(targets) == 0:
        raise ValueError("no training targets to derive a prior from")
    return np.clip(targets.mean(0), 1e-4, 1.0)


def write_submission(path, sample_submission, fnames: list[str], classes: list[str], probs: np.ndarray) -> Path:
    """Validate, then write to a temporary file and rename: a partial submission.csv never remains."""
    path = Path(path)
    sample = pd.read_csv(sample_submission)
    sub = pd.DataFrame(np.clip(probs, 0.0, 1.0), columns=classes)
    sub.insert(0, "fname", list(fnames))
    validate_submission(sub, sample)
    tmp = path.with_name(path.name + ".tmp")
    sub.to_csv(tmp, index=False, float_format="%.6f")
    os.replace(tmp, path)
    log.info("wrote %s (%d clips x %d classes)", path, len(sub), len(classes))
    return path
''')

_add('src/fattag/train.py', r'''
"""Training: K folds on the curated set, one fastai Learner per stage, small callbacks for each concern.

Stage 1 learns from the large noisy set; stage 2 fine-tunes fold k of the curated set from stage-1 weights.
Every epoch each fold is scored by exact lwlrap over whole validation clips (all windows, aggregated per clip),
and the best epoch's weights are kept.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner, Metric
from fastai.losses import BCEWithLogitsLossFlat
from fastai.torch_core import set_seed
from fastcore.basics import noop

from .config import Config
from .features import CropDataset, MelStore, WindowDataset, aggregate_windows, mixup, spec_augment
from .metrics import lwlrap
from .model import build_model, model_meta, save_checkpoint
from .predict import predict_clips
from .session import Session

log = logging.getLogger("fattag")


def make_folds(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id per clip, stratified by each clip's rarest label so that every class is spread over all folds."""
    n = len(targets)
    if k < 2 or k > n:
        raise ValueError(f"folds must be between 2 and the number of clips ({n}), got {k}")
    counts = targets.sum(0)
    rarity = np.where(targets > 0, counts[None, :], np.inf)
    key = rarity.argmin(1)  # rarest label of each clip
    rng = np.random.default_rng(seed)
    folds = np.empty(n, dtype=np.int64)
    offset = 0
    for label in np.unique(key):
        members = rng.permutation(np.flatnonzero(key == label))
        folds[members] = (offset + np.arange(len(members))) % k
        offset += len(members)  # continue the round-robin so small groups do not all start at fold 0
    return folds


# ---------------------------------------------------------------- callbacks


class BatchAugment(Callback):
    """SpecAugment and mixup on each training batch, on the device (validation batches untouched)."""
    order = 60

    def __init__(self, cfg: Config, specaug: bool, mixup_alpha: float, fill: float):
        self.cfg, self.specaug, self.alpha, self.fill = cfg, specaug, mixup_alpha, fill

    def before_batch(self):
        if not self.training:
            return
        x, y = self.xb[0], self.yb[0]
        if self.specaug:
            c = self.cfg
            x = spec_augment(x, c.time_masks, c.time_mask_frac, c.freq_masks, c.freq_mask_frac, fill=self.fill)
        if self.alpha > 0:
            x, y = mixup(x, y, self.alpha)
        self.learn.xb, self.learn.yb = (x,), (y,)


class ClipLwlrap(Metric):
    """Exact lwlrap over whole validation clips: window predictions are aggregated per clip, then scored at once."""

    def __init__(self, clip_of: np.ndarray, truth: np.ndarray, how: str):
        self.clip_of, self.truth, self.how = torch.from_numpy(clip_of), truth, how
        self.last_probs = None

    def reset(self):
        self.preds = []

    def accumulate(self, learn):
        self.preds.append(torch.sigmoid(learn.pred.detach().float()).cpu())

    @property
    def value(self):
        window_probs = torch.cat(self.preds)
        self.last_probs = aggregate_windows(window_probs, self.clip_of, len(self.truth), self.how).numpy()
        if not np.isfinite(self.last_probs).all():
            return float("nan")
        return lwlrap(self.truth, self.last_probs)

    @property
    def name(self):
        return "lwlrap"


class KeepBest(Callback):
    """Keep the weights of the best-scoring epoch in memory and restore them at the end.

    An epoch whose training loss is NaN/inf is discarded: the best weights so far are restored at once and
    training stops (a NaN never reaches a checkpoint or a prediction).
    """
    order = 70

    def __init__(self):
        self.best_score, self.best_epoch, self.best_state, self.nan_epochs = -math.inf, -1, None, 0

    def after_epoch(self):
        train_loss = float(self.recorder.log[1]) if len(self.recorder.log) > 1 else float("nan")
        score = self.recorder.log[self.recorder.metric_names.index("lwlrap")]
        if not np.isfinite(train_loss) or score is None or not np.isfinite(score):
            self.nan_epochs += 1
            log.warning("epoch %d: non-finite loss or score (loss %s, lwlrap %s): discarded, back to the best "
                        "weights (epoch %d)", self.epoch, train_loss, score, self.best_epoch)
            self._restore()
            raise CancelFitException()
        if score > self.best_score:
            self.best_score, self.best_epoch = float(score), self.epoch
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})

    def after_fit(self):
        self._restore()

    def _restore(self):
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


class EpochLog(Callback):
    """One plain log line per epoch (Kaggle logs have no terminal), with the epoch's wall time."""
    order = 80

    def __init__(self, label: str):
        self.label = label

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        vals = self.recorder.log[1:len(names) + 1]
        shown = "  ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in zip(names, vals))
        log.info("%s epoch %d/%d  %s  (%.1f s)", self.label, self.epoch + 1, self.n_epoch, shown, time.time() - self.t0)


class Deadline(Callback):
    """Stop between epochs when the next epoch would not end before `deadline` (a time.time() value)."""
    order = 90

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        if self.deadline and time.time() + (time.time() - self.t0) > self.deadline:
            log.warning("time budget: stopping after epoch %d of %d", self.epoch + 1, self.n_epoch)
            raise CancelFitException()


# ---------------------------------------------------------------- one stage


@dataclass
class StageResult:
    history: pd.DataFrame     # one row per epoch: epoch, train_loss, valid_loss, lwlrap, time
    best_score: float
    best_epoch: int
    seconds: float
    nan_epochs: int = 0


def fit_stage(model: torch.nn.Module, train: MelStore, train_idx, valid: MelStore, valid_idx, cfg: Config, *,
              epochs: int, lr: float, mixup_alpha: float, specaug: bool, label: str, device,
              seed: int, deadline: float | None = None) -> StageResult:
    """Train `model` in place with one-cycle on random crops; keep the epoch with the best whole-clip lwlrap."""
    device = torch.device(device)
    set_seed(seed, reproducible=True)
    train_ds = CropDataset(train, train_idx, cfg.crop_frames, seed=seed)
    valid_ds = WindowDataset(valid, valid_idx, cfg.crop_frames, cfg.tta_step_frac)
    bs = min(cfg.batch_size, len(train_ds))
    dls = DataLoaders(
        DataLoader(train_ds, bs=bs, shuffle=True, drop_last=len(train_ds) > bs, num_workers=cfg.num_workers,
                   device=device),
        DataLoader(valid_ds, bs=cfg.batch_size * 2, shuffle=False, num_workers=cfg.num_workers, device=device),
        device=device)
    keep = KeepBest()
    metric = ClipLwlrap(valid_ds.clip_of, valid.table.targets[np.asarray(valid_idx)], cfg.tta_aggregate)
    fill = float(model[0].mean) if hasattr(model[0], "mean") else 0.0
    learn = Learner(dls, model, loss_func=BCEWithLogitsLossFlat(), metrics=[metric], wd=cfg.wd,
                    cbs=[BatchAugment(cfg, specaug, mixup_alpha, fill), keep, EpochLog(label), Deadline(deadline)])
    learn.logger = noop  # EpochLog writes the per-epoch lines
    if not sys.stderr.isatty():
        learn.remove_cb(ProgressCallback)
    if device.type == "cuda":
        learn.to_fp16()
    t0 = time.time()
    log.info("%s: %d training clips, %d validation clips (%d windows), %d epochs, lr %.2g, mixup %s, specaug %s",
             label, len(train_ds), len(valid_idx), len(valid_ds), epochs, lr, mixup_alpha or "off",
             "on" if specaug else "off")
    learn.fit_one_cycle(epochs, lr)
    values = [list(v) for v in learn.recorder.values]
    cols = ["train_loss", "valid_loss", "lwlrap"]
    history = pd.DataFrame([dict(zip(cols, v)) for v in values], columns=cols)
    history.insert(0, "epoch", np.arange(1, len(history) + 1))
    model.to("cpu")
    return StageResult(history, keep.best_score, keep.best_epoch + 1, time.time() - t0, keep.nan_epochs)


# ---------------------------------------------------------------- the two stages, with their outputs on disk


def holdout_split(indices: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, holdout) split of the given clip indices; the holdout has at least one clip."""
    perm = np.random.default_rng(seed).permutation(indices)
    n_hold = max(1, int(round(len(perm) * share)))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def train_stage1(s: Session, noisy: MelStore | None, classes: list[str], mean: float, std: float,
                 out_dir: Path | None = None, seed_offset: int = 0) -> dict | None:
    """Stage 1 on the noisy set (watched on a small noisy holdout); returns its weights, or None when skipped."""
    cfg = s.cfg
    if noisy is None or cfg.epochs_noisy <= 0 or not noisy.ok.any():
        log.info("stage 1 skipped (%s)", "no noisy set" if noisy is None else
                 "epochs_noisy=0" if cfg.epochs_noisy <= 0 else "no decodable noisy clip")
        return None
    out_dir = out_dir or s.work_dir / "stage1"
    seed = cfg.seed + 1000 + seed_offset
    train_idx, hold_idx = holdout_split(np.flatnonzero(noisy.ok), cfg.noisy_holdout, seed)
    model = build_model(cfg, len(classes), mean, std)
    res = fit_stage(model, noisy, train_idx, noisy, hold_idx, cfg, epochs=cfg.epochs_noisy, lr=cfg.lr_noisy,
                    mixup_alpha=cfg.mixup_noisy, specaug=cfg.specaug_noisy, label="stage 1 (noisy)",
                    device=s.device, seed=seed, deadline=s.deadline)
    _save_stage(out_dir, model, res, model_meta(cfg, classes, stage="noisy", score=res.best_score))
    return model.state_dict()


@dataclass
class FoldsResult:
    folds: np.ndarray          # fold id per curated clip (-1 for clips that could not be decoded)
    model_paths: list          # one checkpoint per fold
    results: list              # StageResult per fold
    oof_center: np.ndarray     # OOF probabilities, one centred window per clip (no TTA); NaN rows for skipped clips
    oof_windows: np.ndarray    # OOF probabilities over whole-clip windows
    oof_tta: np.ndarray        # whole-clip windows plus augmented passes (equals oof_windows when there are none)


def train_folds(s: Session, curated: MelStore, noisy: MelStore | None, classes: list[str], mean: float, std: float,
                shared_stage1: dict | None) -> FoldsResult:
    """Stage 2 on each curated fold, warm-started from stage 1; writes fold weights and out-of-fold predictions."""
    cfg = s.cfg
    ok = np.flatnonzero(curated.ok)
    folds = np.full(len(curated.table), -1, dtype=np.int64)
    folds[ok] = make_folds(curated.table.targets[ok], cfg.folds, cfg.seed)
    n, c = len(curated.table), len(classes)
    oof = {name: np.full((n, c), np.nan) for name in ("center", "windows", "tta")}
    paths, results = [], []
    for k in range(cfg.folds):
        train_idx, valid_idx = np.flatnonzero((folds >= 0) & (folds != k)), np.flatnonzero(folds == k)
        init = shared_stage1
        if cfg.stage1_per_fold:
            init = train_stage1(s, noisy, classes, mean, std, s.work_dir / f"fold{k}" / "stage1", seed_offset=k)
        model = build_model(cfg, len(classes), mean, std)
        if init is not None:
            model.load_state_dict(init)
        res = fit_stage(model, curated, train_idx, curated, valid_idx, cfg, epochs=cfg.epochs_curated,
                        lr=cfg.lr_curated, mixup_alpha=cfg.mixup_curated, specaug=cfg.specaug_curated,
                        label=f"fold {k} (curated)", device=s.device, seed=cfg.seed + k, deadline=s.deadline)
        out_dir = s.work_dir / f"fold{k}"
        _save_stage(out_dir, model, res, model_meta(cfg, classes, stage="curated", fold=k, score=res.best_score,
                                                     warm_start=init is not None))
        oof["center"][valid_idx] = predict_clips(model, curated, valid_idx, cfg, s.device, center_only=True)
        oof["windows"][valid_idx] = predict_clips(model, curated, valid_idx, cfg, s.device)
        oof["tta"][valid_idx] = (oof["windows"][valid_idx] if cfg.tta_aug_passes == 0 else
                                 predict_clips(model, curated, valid_idx, cfg, s.device, aug_passes=cfg.tta_aug_passes))
        log.info("fold %d: best lwlrap %.4f at epoch %d; whole-clip OOF %.4f (centre crop %.4f) in %.0f s", k,
                 res.best_score, res.best_epoch, lwlrap(curated.table.targets[valid_idx], oof["windows"][valid_idx]),
                 lwlrap(curated.table.targets[valid_idx], oof["center"][valid_idx]), res.seconds)
        paths.append(out_dir / "model.pth")
        results.append(res)
    return FoldsResult(folds, paths, results, oof["center"], oof["windows"], oof["tta"])


def _save_stage(out_dir: Path, model: torch.nn.Module, res: StageResult, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    res.history.to_csv(out_dir / "history.csv", index=False)
    save_checkpoint(out_dir / "model.pth", model, {**meta, "best_epoch": res.best_epoch, "seconds": res.seconds})
''')

_add('src/run.py', r'''
"""Entry point: `python src/run.py --help`. Reads top-down as the pipeline's named steps.

The bundled Kaggle kernel (kernel/kernel.py) runs this same file with baked-in defaults.
"""
from __future__ import annotations

import json
import logging
import os
import sys

if __package__ in (None, "") and "fattag" not in sys.modules:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fattag.cli import parse_args  # noqa: E402
from fattag.data import load_dataset  # noqa: E402
from fattag.features import build_store, store_stats  # noqa: E402
from fattag.metrics import lwlrap  # noqa: E402
from fattag.model import model_from_checkpoint  # noqa: E402
from fattag.predict import ensemble, predict_clips  # noqa: E402
from fattag.session import open_session  # noqa: E402
from fattag.submission import class_prior, fill_missing, write_submission  # noqa: E402
from fattag.train import train_folds, train_stage1  # noqa: E402

log = logging.getLogger("fattag")


def main(argv=None, defaults: dict | None = None) -> int:
    args = parse_args(argv, defaults)
    s = open_session(args)
    cfg = s.cfg

    # 1. Clip tables (vocabulary from sample_submission.csv) and log-mel stores (unreadable clips counted).
    data = load_dataset(s.data_dir)
    log.info(data.summary())
    curated = build_store(data.curated, cfg, s.device)
    noisy = build_store(data.noisy, cfg, s.device) if data.noisy is not None and cfg.epochs_noisy > 0 else None
    test = build_store(data.test, cfg, s.device)
    mean, std = store_stats(curated, seed=cfg.seed)

    # 2. Stage 1 on the noisy set (one shared model), 3. stage 2 on each curated fold, warm-started from it.
    stage1 = None if cfg.stage1_per_fold else train_stage1(s, noisy, data.classes, mean, std)
    folds = train_folds(s, curated, noisy, data.classes, mean, std, stage1)

    # 4. Out-of-fold scores: centre crop, whole-clip windows, windows + augmented passes.
    ok = folds.folds >= 0
    truth = data.curated.targets[ok]
    scores = {name: lwlrap(truth, probs[ok]) for name, probs in
              (("oof_center", folds.oof_center), ("oof_windows", folds.oof_windows), ("oof_tta", folds.oof_tta))}
    log.info("OOF lwlrap: centre crop %.4f | whole-clip windows %.4f | + augmented passes %.4f",
             scores["oof_center"], scores["oof_windows"], scores["oof_tta"])
    write_oof(s.work_dir / "oof.csv", data.curated.fnames, data.classes, folds.oof_tta)

    # 5. Test predictions: whole-clip TTA per fold model, fold ensemble, every test clip gets a row.
    test_idx = [i for i, m in enumerate(test.mels) if m is not None]
    fold_probs = []
    for path in folds.model_paths:
        model, _ = model_from_checkpoint(path, cfg, data.classes)
        probs = predict_clips(model, test, test_idx, cfg, s.device, aug_passes=cfg.tta_aug_passes)
        full = fill_missing_rows(len(test.mels), test_idx, probs)
        fold_probs.append(full)
    probs = fill_missing(ensemble(fold_probs, cfg.fold_ensemble), test.ok, class_prior(data.curated.targets))
    write_submission(s.work_dir / "submission.csv", data.sample_submission, data.test.fnames, data.classes, probs)
    (s.work_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    log.info("done in %.0f s", s.elapsed())
    return 0


def fill_missing_rows(n, idx, probs):
    import numpy as np
    full = np.full((n, probs.shape[1]), np.nan)
    full[idx] = probs
    return full


def write_oof(path, fnames, classes, probs):
    import pandas as pd
    df = pd.DataFrame(probs, columns=classes)
    df.insert(0, "fname", fnames)
    df.to_csv(path, index=False, float_format="%.6f")


if __name__ == "__main__":
    sys.exit(main())
''')

# ==== start ======================================================================================
if __name__ == "__main__":
    if "ipykernel" in sys.modules:  # a notebook cell: sys.argv holds the kernel's own arguments
        _rc = main([])
        if _rc:
            raise SystemExit(_rc)
    else:
        sys.exit(main(sys.argv[1:]))
