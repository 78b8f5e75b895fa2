# GENERATED FILE -- DO NOT EDIT BY HAND.
# Built by `python build_kernel.py --mode train --preset kaggle-1h` from src/fattag/**/*.py and src/run.py
# (source hash a1337ef806d2). Edit the sources, rebuild, and check with `python build_kernel.py --check`.
#
# A self-contained Kaggle kernel: runs src/run.py with the baked-in defaults below; the
# command line (`python kernel.py --help`) can override them. The package is imported from the
# source strings at the end of this file by an in-memory importer: no file is written, no
# process is started, and tracebacks name the original files (src/fattag/...).
#
# Embedded files:
#   src/fattag/__init__.py                      15 lines
#   src/fattag/audio.py                        267 lines
#   src/fattag/augment.py                      236 lines
#   src/fattag/budget.py                       196 lines
#   src/fattag/callbacks.py                    249 lines
#   src/fattag/checkpoint.py                   137 lines
#   src/fattag/cli.py                           81 lines
#   src/fattag/config.py                       289 lines
#   src/fattag/context.py                      214 lines
#   src/fattag/cost.py                         273 lines
#   src/fattag/data.py                         242 lines
#   src/fattag/dataparallel.py                  85 lines
#   src/fattag/demo.py                         592 lines
#   src/fattag/features.py                     306 lines
#   src/fattag/losses.py                        90 lines
#   src/fattag/metrics.py                       76 lines
#   src/fattag/model.py                        201 lines
#   src/fattag/precision.py                     77 lines
#   src/fattag/predict.py                      159 lines
#   src/fattag/progress.py                     180 lines
#   src/fattag/pseudo.py                       117 lines
#   src/fattag/report.py                       457 lines
#   src/fattag/select.py                        76 lines
#   src/fattag/splits.py                        93 lines
#   src/fattag/stage.py                        187 lines
#   src/fattag/stages.py                        51 lines
#   src/fattag/submission.py                    70 lines
#   src/fattag/tag.py                          250 lines
#   src/fattag/thresholds.py                    92 lines
#   src/fattag/throughput.py                    78 lines
#   src/fattag/train.py                        178 lines
#   src/fattag/weights.py                      191 lines
#   src/fattag/world.py                        230 lines
#   src/run.py                                 199 lines

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

BUILD_HASH = 'a1337ef806d2'
BAKED_DEFAULTS = {'mode': 'train', 'preset': 'kaggle-1h'}

# ==== embedded sources (verbatim) ===============================================================

_add('src/fattag/__init__.py', r'''
"""fattag: two-stage K-fold audio tagging for FAT2019-shaped data (Kaggle-kernel style)."""
__version__ = "0.1.0"

import warnings

# fastai 2.8 calls torch.jit.script at import time; newer torch warns about it on every run. Noise, not news.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


def __getattr__(name):
    """`from fattag import Tagger` without importing torch for the modules that need none (cost.py, config.py)."""
    if name == "Tagger":
        from .tag import Tagger
        return Tagger
    raise AttributeError(f"module 'fattag' has no attribute {name!r}")
''')

_add('src/fattag/audio.py', r'''
"""Audio input: WAV with the standard library and numpy, every other format through soundfile (libsndfile); WAV
output, resampling and silence trimming.

The RIFF parser is our own because the stdlib `wave` module reads neither IEEE float nor
WAVE_FORMAT_EXTENSIBLE files, and `torchaudio.load` depends on backends (torchcodec/ffmpeg) whose
presence differs between machines. Every sample format is decoded with `np.frombuffer`, never a
Python loop per sample, so decoding keeps up with disk reads on the ~100 h of FAT2019 audio.
FLAC, OGG/Vorbis, MP3, AIFF and the rest go through `soundfile`, imported only when such a file is read, so that
WAV-only data needs nothing beyond numpy.
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
WAV_SUFFIXES = (".wav", ".wave")  # read by read_wav; any other file goes to soundfile
# File name endings taken as audio when a folder is searched (tag mode): WAV and what libsndfile reads.
AUDIO_SUFFIXES = (*WAV_SUFFIXES, ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd",
                  ".caf", ".w64", ".rf64")
NEEDS_SOUNDFILE = "reading {suffix} files needs the soundfile package (pip install soundfile)"


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


def _wav_parts(path: Path) -> tuple[tuple[int, int, int, int], bytes]:
    """The `fmt ` fields and the whole frames of the data chunk of a WAV file; AudioError when unreadable."""
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

    _tag, channels, _rate, width = fmt
    frames = len(data) // (width * channels)
    if frames == 0:
        raise AudioError(path, "has no audio (0 frames)")
    return fmt, data[:frames * width * channels]


def read_wav(path) -> tuple[np.ndarray, int]:
    """Read a WAV file as float32 mono (channels averaged) in [-1, 1]; return (wave, sample_rate).

    Unknown chunks are skipped. A data chunk cut short (truncated download) yields the whole frames
    that are present; a file with no whole frame raises AudioError, as does anything else unreadable.
    """
    (tag, channels, rate, width), data = _wav_parts(Path(path))
    wave = _decode(tag, width, data)
    if channels > 1:
        wave = wave.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32), rate


def _soundfile(path: Path):
    """The soundfile module, or AudioError naming the package when it is not installed."""
    try:
        import soundfile
    except (ImportError, OSError):   # OSError: the module is there but its libsndfile is not
        raise AudioError(path, NEEDS_SOUNDFILE.format(suffix=path.suffix or "such")) from None
    return soundfile


def _check_file(path: Path) -> None:
    """The reasons read_wav gives for a missing or empty file, for the files soundfile reads."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AudioError(path, "file not found") from None
    except OSError as e:
        raise AudioError(path, f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise AudioError(path, "file is empty")


def read_soundfile(path) -> tuple[np.ndarray, int]:
    """Read any format libsndfile knows (FLAC, OGG/Vorbis, MP3, AIFF, ...) as float32 mono in [-1, 1]."""
    path = Path(path)
    _check_file(path)
    soundfile = _soundfile(path)
    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile's errors differ between versions; all mean unreadable
        raise AudioError(path, f"cannot decode ({str(e).strip() or type(e).__name__})") from None
    if len(wave) == 0:
        raise AudioError(path, "has no audio (0 frames)")
    wave = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    return np.ascontiguousarray(np.clip(wave, -1.0, 1.0), dtype=np.float32), int(rate)


def read_audio(path) -> tuple[np.ndarray, int]:
    """Any audio file as float32 mono in [-1, 1] and its sample rate: WAV by read_wav, the rest by soundfile."""
    path = Path(path)
    return read_wav(path) if path.suffix.lower() in WAV_SUFFIXES else read_soundfile(path)


def audio_frames(path) -> tuple[int, int]:
    """(frames, sample rate) of an audio file from its header, without decoding it: a file's duration."""
    path = Path(path)
    if path.suffix.lower() in WAV_SUFFIXES:
        (_tag, channels, rate, width), data = _wav_parts(path)
        return len(data) // (width * channels), rate
    _check_file(path)
    soundfile = _soundfile(path)
    try:
        info = soundfile.info(str(path))
    except Exception as e:  # noqa: BLE001 - as in read_soundfile
        raise AudioError(path, f"cannot decode ({str(e).strip() or type(e).__name__})") from None
    return int(info.frames), int(info.samplerate)


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


def prepare_wave(wave: np.ndarray, sr: int, sample_rate: int, trim: bool = False,
                 trim_db: float = 60.0) -> np.ndarray:
    """A decoded mono wave at `sample_rate`, optionally silence-trimmed: what every clip goes through after reading."""
    wave = resample(wave, sr, sample_rate)
    if trim:
        wave = trim_silence(wave, trim_db)
    return wave


def load_clip(path, sample_rate: int, trim: bool = False, trim_db: float = 60.0) -> np.ndarray:
    """Read a clip (any format read_audio reads) at `sample_rate`, optionally silence-trimmed. Any length >= 1;
    padding happens later."""
    return prepare_wave(*read_audio(path), sample_rate, trim, trim_db)


__all__ = ["AUDIO_SUFFIXES", "AudioError", "TRIM_FRAME", "audio_frames", "load_clip", "prepare_wave", "read_audio",
           "read_soundfile", "read_wav", "resample", "trim_silence", "write_wav"]
''')

_add('src/fattag/augment.py', r'''
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
''')

_add('src/fattag/budget.py', r'''
"""Budget: the run's time plan while it runs: what each stage may spend, when each must stop, and re-planning.

It starts from the requested recipe (`Plan.requested`); once the throughput is measured (`start`) it plans with
the cost model (cost.py), and after every stage it re-plans the work still to do from the seconds that stage really
took, upward as well as downward: epochs and folds that were cut come back when the stages run faster than
predicted, and go when they run slower. It never plans more than the requested recipe. Without a deadline every
step gets the requested recipe and no deadline, so the steps never ask whether there is a budget.

With N devices (`Throughput.devices`) each rank keeps its own Budget for the folds it trains, in rounds of N
(which rank trains which fold, and in which round: stages.fold_rank, stages.fold_round); rank 0's plan is shared
after the throughput is measured and after stage 1, and the decisions taken when all ranks meet (pseudo-label
epochs, test passes) are rank 0's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from .config import Config
from .cost import (MIN_EPOCHS_CURATED, Plan, Throughput, Workload, fit_pseudo, fold_s, plan_run, pseudo_s,
                   replan_folds, stage_costs)
from .stages import fold_round, holdout_size, round_start, rounds

log = logging.getLogger("fattag")


class Budget:
    """The plan of one run, from the requested recipe and a deadline (a wall-clock time, or None: no budget)."""

    def __init__(self, requested: Config, deadline: float | None = None):
        self.requested, self.deadline = requested, deadline
        self.workload = Workload(0, 0, 0, 0, 0)
        self.tp = Throughput(0.0, 0.0, "not measured")
        self.scale: dict = {}               # measured / predicted seconds, per kind of work done so far
        self.folds_done = 0
        self.fold_epochs: list = []         # epochs each trained fold ran
        self.plan = self.first_plan = Plan.requested(requested)

    def start(self, workload: Workload, tp: Throughput) -> Plan:
        """The first plan: the requested recipe priced with the measured throughput, cut to the time left."""
        self.workload, self.tp = workload, tp
        self.plan = self.first_plan = plan_run(self.requested, workload, tp, self.remaining())
        return self.plan

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def planned(self, stage: str) -> float | None:
        """The seconds the plan gives a stage (None: not planned)."""
        return dict(self.plan.stages).get(stage)

    def rounds(self, n: int) -> int:
        """Rounds of side-by-side work that `n` folds (or models) take on this run's devices."""
        return rounds(n, self.tp.devices)

    def costs(self, passes: int | None = None) -> dict:
        passes = self.plan.tta_aug_passes if passes is None else passes
        return stage_costs(self.requested, self.workload, self.tp, passes, self.scale)

    def measured(self, kind: str, seconds: float, units: float) -> None:
        """Record that `units` of work of `kind` (e.g. 4 fold epochs) took `seconds`: later costs follow it."""
        predicted = stage_costs(self.requested, self.workload, self.tp, self.plan.tta_aug_passes)[kind] * units
        if units > 0 and predicted > 0 and seconds > 0:
            self.scale[kind] = seconds / predicted

    def _note(self, text: str, **changes) -> None:
        self.plan = replace(self.plan, notes=(*self.plan.notes, text), **changes)

    def stage1_deadline(self) -> float | None:
        """Stage 1 must stop in time to leave the planned folds their planned time."""
        if self.deadline is None:
            return None
        return self.deadline - self.rounds(self.plan.folds_trained) * fold_s(self.costs(), self.plan.epochs_curated,
                                                                             self.plan.epochs_pseudo)

    def select_deadline(self) -> float | None:
        """Noisy-clip selection must stop in time to leave stage 1 and the folds their planned time."""
        if self.deadline is None:
            return None
        return self.stage1_deadline() - self.plan.epochs_noisy * self.costs()["noisy_epoch"]

    def noisy_kept(self, n_kept: int) -> None:
        """Selection kept `n_kept` noisy clips: stage 1 trains on fewer than counted, and its epochs cost less."""
        hold = holdout_size(n_kept, self.requested.noisy_holdout)
        self.workload = replace(self.workload, noisy_train=n_kept - hold, noisy_clips=n_kept)

    def replan_stage1(self, done: int, fastest_s: float) -> int:
        """Stage 1's epochs, re-planned after its `done`-th epoch from its fastest epoch so far (`fastest_s`): the
        throughput measured before training may have been slowed by another process, and stage 1 is the first
        stage whose real epochs show the machine's speed. The run is planned again from now, the epochs done
        counted as spent; more epochs come back (up to the requested number) when the machine is faster than
        measured, and go when it is slower."""
        self.measured("noisy_epoch", fastest_s, 1)
        if self.deadline is None:
            return self.plan.epochs_noisy
        cost = self.costs()["noisy_epoch"]
        start = replace(self.requested, select_noisy=False)   # selection, where it ran, is done
        plan = plan_run(start, self.workload, self.tp, self.remaining() + done * cost, self.scale)
        epochs = max(plan.epochs_noisy, done)
        if epochs != self.plan.epochs_noisy:
            note = (f"stage 1 re-planned after epoch {done} ({fastest_s:.1f} s at its fastest): "
                    f"{self.plan.epochs_noisy} -> {epochs} epochs")
            self.plan = replace(plan, epochs_noisy=epochs, notes=(*self.plan.notes, note))
            log.info("time budget: %s", note)
        return epochs

    def epochs_for(self, k: int) -> int:
        """Re-plan folds k.. from the time left, and return fold k's epochs (0: no time for fold k). A fold gets
        at most twice the epochs of the shortest fold trained so far, so that the ensemble's members stay
        comparable; the time that frees goes to the pseudo-label round and the test passes. With N devices the
        re-plan starts at fold k's round, the folds of earlier rounds counted as trained."""
        start = round_start(k, self.tp.devices)
        done = self.folds_done if self.tp.devices == 1 else start   # the other ranks' folds are not known here
        self.plan = replan_folds(self.requested, self.workload, self.tp, self.scale, self.plan, start, done,
                                 self.remaining())
        even = 2 * min(self.fold_epochs) if self.fold_epochs else self.plan.epochs_curated
        if self.plan.epochs_curated > even:
            self._note(f"fold {k}: {self.plan.epochs_curated} -> {even} epochs, twice the shortest fold's",
                       epochs_curated=even)
        return self.plan.epochs_curated if k < self.plan.folds_trained else 0

    def fold_deadline(self, k: int) -> float | None:
        """Fold k trains until: the deadline, less its OOF predictions, test TTA and the pseudo-label round for the
        k + 1 models trained by then, and the planned later folds at their floor."""
        if self.deadline is None:
            return None
        c, models = self.costs(), self.rounds(k + 1)
        later = max(self.rounds(self.plan.folds_trained) - models, 0) * fold_s(c, MIN_EPOCHS_CURATED)
        return (self.deadline - c["oof_predict"] - models * (c["test_predict"] + pseudo_s(c, self.plan.epochs_pseudo))
                - later)

    def fold_done(self, k: int, epochs_run: int) -> None:
        self.folds_done = k + 1
        self.fold_epochs.append(epochs_run)

    def pseudo_epochs(self, n_models: int) -> int:
        """Epochs of the pseudo-label round for each of `n_models` fold models, decided when stage 2 is over: the
        plan's, fewer when they no longer fit before the plain test pass, more (up to the requested number) when
        time is left; 0 when not even one epoch fits."""
        if n_models == 0 or self.requested.test_round_epochs <= 0:
            return 0
        if self.deadline is None:
            return self.requested.test_round_epochs
        planned, c = self.plan.epochs_pseudo, self.costs(0)
        epochs = fit_pseudo(self.requested.test_round_epochs,
                            lambda p: self.rounds(n_models) * (c["test_predict"] + pseudo_s(c, p)), self.remaining())
        if epochs != planned:
            self._note(f"pseudo-label round: {epochs} epochs per model (planned {planned}) fit the time left",
                       epochs_pseudo=epochs)
        return epochs

    def pseudo_deadline(self, k: int, n_models: int) -> float | None:
        """Model k's pseudo-label epochs stop in time for the later models' one epoch each and the plain test pass
        (with N devices: the later models of its rank, after fold k's round)."""
        if self.deadline is None:
            return None
        c, per_rank = self.costs(0), self.rounds(n_models)
        later = per_rank - fold_round(k, self.tp.devices) - 1
        return self.deadline - per_rank * c["test_predict"] - later * c["pseudo_epoch"]

    def usage(self, started: float) -> dict | None:
        """How the run used its budget (None without one): usable, used and unused seconds, why what is unused could
        not be used, and the plan's notes (what was cut or re-planned, and when)."""
        if self.deadline is None:
            return None
        usable, used = self.deadline - started, time.time() - started
        unused = max(usable - used, 0.0)
        req, plan = self.requested, self.plan
        whole = ((plan.epochs_noisy >= req.noisy.epochs or not self.workload.noisy_train)
                 and plan.epochs_curated >= req.curated.epochs and plan.folds_trained >= req.folds
                 and plan.epochs_pseudo >= req.test_round_epochs
                 and plan.tta_aug_passes >= max(req.tta_aug_passes, req.tta_fill_passes))
        if unused <= 0.05 * usable:
            why = "used up to the safety margin"
        elif whole:
            why = (f"the whole requested recipe ran, with the most augmented TTA passes (tta_fill_passes "
                   f"{req.tta_fill_passes}): there was nothing more to spend it on")
        else:
            why = "the work left after the last re-plan took less time than the plan priced it at"
        return dict(usable_s=round(usable, 1), used_s=round(used, 1), unused_s=round(unused, 1),
                    unused_share=round(unused / usable, 3), why=why, notes=list(plan.notes))

    def test_passes(self, n_models: int) -> int:
        """Augmented TTA passes for the test set, decided when training is over: the plan's, fewer if they no longer
        fit, more (up to `tta_fill_passes`) when time is left over, so that time is not wasted."""
        planned = self.plan.tta_aug_passes
        if self.deadline is None or n_models == 0:
            return planned
        per_pass = self.rounds(n_models) * self.costs(0)["test_predict"]
        fit = int(self.remaining() // max(per_pass, 1e-9)) - 2   # the plain pass, and one spare for the estimate
        passes = max(0, min(fit, max(planned, self.requested.tta_fill_passes)))
        if passes != planned:
            self._note(f"test TTA: {passes} augmented passes (planned {planned}) fit the time left",
                       tta_aug_passes=passes)
        return passes
''')

_add('src/fattag/callbacks.py', r'''
"""The fastai callbacks of a training stage, one concern each: NaN guard, best epoch, weight averaging,
checkpoints, log, deadline, and the epoch plan that a re-plan may change while the stage trains.

Augmentations of training batches are callbacks too; they live in `augment.py`.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import TrackerCallback
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import Resume, StageDir, cpu_state

log = logging.getLogger("fattag")


class StageCallback(Callback):
    """Base of the per-epoch callbacks. A resumed stage replays its finished epochs (fastai's `start_epoch` skips
    their batches but still runs `after_epoch`); those must not be scored, checkpointed or logged again, so a
    subclass's `after_epoch` does not run for them (as fastai's `run` flag switches a callback off)."""

    @property
    def replayed(self) -> bool:
        return self.epoch < getattr(self.learn, "resume_epoch", 0)

    def __call__(self, event_name):
        if event_name == "after_epoch" and self.replayed:
            return None
        return super().__call__(event_name)

    def epoch_values(self) -> dict:
        """This epoch's recorded values by name: train_loss, valid_loss, lwlrap."""
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        return {n: (None if v is None else float(v)) for n, v in zip(names, self.recorder.log[1:len(names) + 1])}

    def agree(self, value):
        """`value` as every rank of a data-parallel stage sees it (rank 0's: dataparallel.DataParallel); as is on
        one rank."""
        agree = getattr(self.learn, "agree", None)
        return value if agree is None else agree(value)


class NanGuard(StageCallback):
    """Stop at the first epoch whose training loss or score is NaN/inf. KeepBest then restores the best weights, so a
    NaN never reaches a checkpoint or a prediction."""
    order = 55  # after the Recorder (50), before KeepBest and the checkpoint

    def __init__(self):
        self.nan_epochs = 0

    def after_epoch(self):
        v = self.epoch_values()
        if not self.agree(all(x is not None and np.isfinite(x) for x in (v.get("train_loss"), v.get("lwlrap")))):
            self.nan_epochs += 1
            log.warning("epoch %d: non-finite loss or score (%s): discarded, back to the best weights",
                        self.epoch + 1, v)
            raise CancelFitException()


class KeepBest(StageCallback, TrackerCallback):
    """fastai's tracker on whole-clip lwlrap, keeping the best epoch's weights in memory and restoring them at the
    end (SaveModelCallback without the disk round trip: files are EpochCheckpoint's job)."""
    order = TrackerCallback.order + 1

    def __init__(self, resume: Resume):
        TrackerCallback.__init__(self, monitor="lwlrap", comp=np.greater, reset_on_fit=False)
        self.best, self.best_epoch, self.best_state = resume.best_score, resume.best_epoch, resume.best_state
        self.new_best = False

    def after_epoch(self):
        self.new_best = False
        super().after_epoch()
        if self.new_best:
            self.best, self.best_epoch, self.best_state = float(self.best), self.epoch, cpu_state(self.model)

    def after_fit(self):
        super().after_fit()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


class WeightAverage(StageCallback):
    """An exponential moving average of the weights (torch's AveragedModel, batch-norm statistics included), updated
    after every training step. Validation, the best-epoch choice and so the saved model use the averaged weights;
    training goes on from the raw ones. `epochs` is the averaging horizon (the EMA decay per step follows from it)."""
    order = KeepBest.order + 4  # after_epoch: once KeepBest has taken the averaged weights, the raw ones come back

    def __init__(self, epochs: float, state: dict | None = None):
        self.horizon, self.state, self.averaged, self.raw = epochs, state, None, None

    def before_fit(self):
        decay = math.exp(-1.0 / max(self.horizon * len(self.dls.train), 1.0))
        self.averaged = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        if self.state is not None:  # a resumed stage continues its average
            self.averaged.load_state_dict(self.state)

    def after_step(self):
        self.averaged.update_parameters(self.model)

    def before_validate(self):
        self.raw = cpu_state(self.model)
        self.model.load_state_dict(self.averaged.module.state_dict())

    def after_epoch(self):
        if self.raw is not None:
            self.model.load_state_dict(self.raw)
            self.raw = None


class MeanTeacher(StageCallback):
    """Consistency with a mean teacher (Tarvainen & Valpola 2017; DCASE 2018 Task 4's winner): an exponential moving
    average of the model scores its own augmented view of each training crop, and the loss gains `weight` times the
    mean squared difference of the student's and the teacher's probabilities. The teacher's view is the batch after
    mixing and before the student's SpecAugment (order 68), with stripes of its own (`view`); it needs no labels, so
    the noisy clips' audio teaches beyond their labels. The teacher is not saved: a resumed stage starts a new one."""
    order = 68

    def __init__(self, weight: float, decay: float, view):
        self.weight, self.decay, self.view, self.teacher, self.teacher_x = weight, decay, view, None, None

    def before_fit(self):
        self.teacher = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.teacher.eval()

    def before_batch(self):
        if self.training:
            self.teacher_x = self.view(self.xb[0].clone())

    def after_loss(self):
        if not self.training or self.teacher_x is None:
            return
        with torch.no_grad():
            target = torch.sigmoid(self.teacher(self.teacher_x).float())     # (B, C): the main head in eval mode
        student = torch.sigmoid(self.pred[:, :target.shape[1]].float())
        self.learn.loss_grad = self.loss_grad + self.weight * F.mse_loss(student, target)
        self.learn.loss = self.loss_grad.clone()
        self.teacher_x = None

    def after_step(self):
        self.teacher.update_parameters(self.model)


class EpochCheckpoint(StageCallback):
    """After every new epoch: its history row, and the resume files (model + optimiser (+ weight average), best
    weights, progress)."""
    order = KeepBest.order + 10

    def __init__(self, stage_dir: StageDir, keep: KeepBest, epochs: int, history: list, write: bool = True):
        self.stage_dir, self.keep, self.epochs, self.history, self.write = stage_dir, keep, epochs, history, write

    def after_epoch(self):
        self.history.append({"epoch": self.epoch + 1, **self.epoch_values()})
        if not self.write:   # a data-parallel stage's other ranks: rank 0 writes the stage's files
            return
        epochs = getattr(self.learn, "epochs_planned", self.epochs)   # the plan as it stands (EpochPlan)
        state = Resume(self.epoch + 1, epochs, self.keep.best, self.keep.best_epoch, self.keep.best_state,
                       self.history)
        average = next((cb.averaged for cb in self.learn.cbs if isinstance(cb, WeightAverage)), None)
        extra = {"average": average.state_dict()} if average is not None else {}
        self.stage_dir.save_epoch(state, self.model, self.opt.state_dict(), new_best=self.keep.new_best, **extra)


class EpochLog(StageCallback):
    """One plain log line per epoch (Kaggle logs have no terminal), with the epoch's wall time."""
    order = EpochCheckpoint.order + 5

    def __init__(self, label: str):
        self.label = label

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        shown = "  ".join(f"{n} {v:.4f}" for n, v in self.epoch_values().items() if v is not None)
        log.info("%s epoch %d/%d  %s  (%.1f s)", self.label, self.epoch + 1, getattr(self.learn, "epochs_planned",
                 self.n_epoch), shown, time.time() - self.t0)


class Deadline(StageCallback):
    """Stop between epochs when another epoch like the last one would not end before the deadline: a wall-clock
    time from the run's Budget, or a function returning it (re-planned while the stage trains); None: no deadline."""
    order = EpochLog.order + 5

    def __init__(self, deadline: float | Callable[[], float | None] | None):
        self.deadline = deadline

    def before_epoch(self):
        self.t0 = time.time()

    def after_epoch(self):
        deadline = self.deadline() if callable(self.deadline) else self.deadline
        if not deadline:
            return
        now = time.time()
        if self.agree(now + (now - self.t0) > deadline):
            log.warning("time budget: stopping after epoch %d of %d", self.epoch + 1,
                        getattr(self.learn, "epochs_planned", self.n_epoch))
            raise CancelFitException()


class EpochPlan(StageCallback):
    """The stage's one-cycle schedule spread over `epochs`, a number a re-plan may change between epochs, while
    fastai's loop runs up to its `n_epoch` (the most the stage may get). After every epoch `replan(epochs_done,
    fastest_epoch_s)` may return a new count: the rest of the schedule, from where it stands, is stretched or
    squeezed over the epochs left (no epoch is lost, the learning rate stays continuous) and the stage ends when the
    count is reached. While the count equals `n_epoch` nothing differs from fastai's own schedule."""
    order = Deadline.order + 5   # last: the epoch is scored, saved and logged before the stage may end

    def __init__(self, epochs: int, replan: Callable[[int, float], int] | None = None):
        self.epochs, self.replan, self.seconds = epochs, replan, []   # seconds: each epoch of this fit
        self.from_epoch, self.from_pct = 0, 0.0   # where the schedule stood at the last re-plan

    def pct(self, epochs_done: float) -> float:
        """The schedule's position after `epochs_done` epochs: the rest spread evenly over the epochs left."""
        left = (epochs_done - self.from_epoch) / max(self.epochs - self.from_epoch, 1)
        return min(self.from_pct + (1.0 - self.from_pct) * left, 1.0)

    def before_fit(self):
        self.learn.epochs_planned = self.epochs

    def before_epoch(self):
        self.t0 = time.time()

    def before_train(self):
        if self.epochs != self.n_epoch:
            self.learn.pct_train = self.pct(self.epoch)

    def after_batch(self):
        if self.training and self.epochs != self.n_epoch:
            self.learn.pct_train = self.pct(self.epoch + (self.iter + 1) / self.n_iter)

    def after_epoch(self):
        self.seconds.append(time.time() - self.t0)
        if self.replan is not None:   # the fastest epoch: contention only ever slows an epoch down
            epochs = min(max(self.replan(self.epoch + 1, min(self.seconds)), self.epoch + 1), self.n_epoch)
            epochs = self.agree(epochs)
            if epochs != self.epochs:
                self.from_epoch, self.from_pct = self.epoch + 1, self.pct(self.epoch + 1)
                self.epochs = self.learn.epochs_planned = epochs
        if self.epochs < self.n_epoch and self.epoch + 1 >= self.epochs:
            raise CancelFitException()
''')

_add('src/fattag/checkpoint.py', r'''
"""Everything a restart trusts on disk: atomic writes, model checkpoints, and each stage's resume state.

A stage folder (`stage1/`, `fold{k}/`) holds, while it trains, `last.pth` (model + optimiser after the last
finished epoch), `best.pth` (the best epoch's weights) and `progress.json`; when it is done, `model.pth` (best
weights + the metadata prediction needs) and `history.csv`, and the resume files go. Every file is written to a
temporary name and renamed, so a kill never leaves a half-written file that a restart would read.

Both files also record the stage's recipe (`weights.stage_recipe`): a later run in the same work dir
reuses or resumes a stage only when its own recipe is the same, and trains it again (with a warning naming the
differences) when it is not, so changed settings never silently come back with old weights.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .config import upgrade_settings

log = logging.getLogger("fattag")


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_torch_save(obj, path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def cpu_state(model: torch.nn.Module) -> dict:
    """A detached CPU copy of the model's weights (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(path, model: torch.nn.Module, meta: dict) -> Path:
    return atomic_torch_save({"meta": meta, "state_dict": cpu_state(model)}, path)


def load_checkpoint(path) -> tuple[dict, dict]:
    """(meta, state_dict) of a model.pth."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["meta"], ckpt["state_dict"]


@dataclass
class Resume:
    """Where an interrupted stage stopped: continue after `epochs_done` of `epochs`, with its best so far."""
    epochs_done: int = 0
    epochs: int = 0
    best_score: float = float("-inf")
    best_epoch: int = -1            # 0-based; -1 when no epoch was usable yet
    best_state: dict | None = None
    history: list = field(default_factory=list)
    last: dict | None = None        # {"model": state_dict, "opt": optimiser state, ...} after epochs_done


class StageDir:
    """One stage's folder: finished-stage reuse, per-epoch resume files, and the final model, all guarded by the
    stage's `recipe` (a dict of the settings its weights depend on)."""

    def __init__(self, path, recipe: dict | None = None):
        self.path = Path(path)
        self.recipe = json.loads(json.dumps(recipe or {}, default=str))  # as it reads back from disk
        self.model_file = self.path / "model.pth"
        self.last_file, self.best_file = self.path / "last.pth", self.path / "best.pth"
        self.progress_file = self.path / "progress.json"

    def same_recipe(self, saved: dict | None, what: str) -> bool:
        """True when `saved` (the recipe stored with `what`, under today's setting names) is this run's; else a
        warning that names the changes."""
        saved = upgrade_settings(saved or {})
        if saved == self.recipe:
            return True
        changed = sorted(k for k in set(saved) | set(self.recipe) if saved.get(k) != self.recipe.get(k))
        shown = ", ".join(f"{k} {saved.get(k, '?')!r} -> {self.recipe.get(k, '?')!r}" for k in changed[:6])
        log.warning("%s: the saved %s was trained with other settings (%s%s); training it again", self.path.name,
                    what, shown or "no recipe recorded", ", ..." if len(changed) > 6 else "")
        return False

    def finished(self) -> tuple[dict, dict] | None:
        """(meta, state_dict) of a stage that an earlier run with the same recipe finished (same --work-dir)."""
        if not self.model_file.exists():
            return None
        meta, state = load_checkpoint(self.model_file)
        if not self.same_recipe(meta.get("recipe"), "model"):
            return None
        log.info("%s: already finished, reusing its weights", self.path.name)
        return meta, state

    def resume(self) -> Resume:
        """The state of an interrupted stage with the same recipe, or a fresh Resume when there is none (or it is
        incomplete, or from other settings)."""
        try:
            p = json.loads(self.progress_file.read_text())
            if not self.last_file.exists() or (p["best_epoch"] >= 0 and not self.best_file.exists()):
                return Resume()
            if not self.same_recipe(p.get("recipe"), "progress"):
                return Resume()
            best = torch.load(self.best_file, map_location="cpu", weights_only=True) if p["best_epoch"] >= 0 else None
            last = torch.load(self.last_file, map_location="cpu", weights_only=False)
            return Resume(p["epochs_done"], p["epochs"], p["best_score"], p["best_epoch"], best, p["history"], last)
        except (OSError, ValueError, KeyError):
            return Resume()

    def save_epoch(self, state: Resume, model: torch.nn.Module, opt_state: dict, new_best: bool, **extra) -> None:
        """After a finished epoch: best weights (when they changed), model + optimiser (+ `extra` states), then the
        progress."""
        if new_best:
            atomic_torch_save(state.best_state, self.best_file)
        atomic_torch_save({"model": model.state_dict(), "opt": opt_state, **extra}, self.last_file)
        atomic_write_text(self.progress_file, json.dumps(dict(
            epochs_done=state.epochs_done, epochs=state.epochs, best_score=state.best_score,
            best_epoch=state.best_epoch, history=state.history, recipe=self.recipe)))

    def finish(self, model: torch.nn.Module, meta: dict, history: pd.DataFrame) -> None:
        """The best weights become model.pth (which marks the stage done); the resume files go."""
        atomic_write(self.path / "history.csv", lambda tmp: history.to_csv(tmp, index=False))
        save_checkpoint(self.model_file, model, {**meta, "recipe": self.recipe})
        for f in (self.last_file, self.best_file, self.progress_file):
            f.unlink(missing_ok=True)
''')

_add('src/fattag/cli.py', r'''
"""Command line: one set of options shared by `python src/run.py` and the bundled Kaggle kernel."""
from __future__ import annotations

import argparse
import textwrap

from .config import KAGGLE_DATA_DIR, PRESET_USE, PRESETS, parse_duration


def _preset_lines() -> str:
    return "\n".join(f"  {name:<10} {PRESET_USE[name]}" for name in PRESETS)


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    epilog = textwrap.dedent("""\
        presets (values in src/fattag/config.py; any value can be overridden with --set name=value;
        default: demo on the demo data, on real data kaggle-1h with a GPU and cpu without one):
        {presets}

        examples:
          python src/run.py                                  # demo dataset, demo preset, CPU
          python src/run.py --data-dir /data/fat2019 --preset kaggle-1h --work-dir runs/full
          python src/run.py --data-dir /data/small --preset cpu  # real recordings, no GPU
          python src/run.py --set curated.epochs=5 --set arch=xresnet34
          python src/run.py --time-budget 55m --folds 5
          python src/run.py --mode predict --weights runs/demo --work-dir runs/predict
          python src/run.py --mode tag --weights runs/demo --work-dir runs/tags my_audio/ clip.flac
          python src/run.py --mode tag --weights runs/demo --segments 5 long_recording.mp3
          python src/run.py --devices 2                      # two processes (Kaggle's T4 x2: the default there)
          torchrun --nnodes 2 --nproc-per-node 2 ... src/run.py --data-dir /shared/data --work-dir /shared/run
        """).format(presets=_preset_lines())
    p = argparse.ArgumentParser(
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
                   help="named set of values (default: demo for the demo dataset; on real data kaggle-1h with a "
                        "GPU, cpu without one)")
    p.add_argument("--seed", type=int, default=None, help="random seed for folds, crops and weights (default 42)")
    p.add_argument("--folds", type=int, default=None, help="number of curated folds K (default: the preset's)")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="deadline for the whole run, counted from process start: 3600, 55m, 1h "
                        "(default: the preset's; kaggle-1h plans for 55 min)")
    p.add_argument("--mode", default="train", choices=("train", "predict", "tag"),
                   help="train: both stages then predict; predict: only predict the test set from --weights; "
                        "tag: tag the audio files and folders given as PATH with --weights' models (tags.csv)")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="tag mode: audio files (WAV, FLAC, OGG, MP3, ...) and folders, searched recursively")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="predict and tag modes: folder with fold*/model.pth from a training run (e.g. an attached "
                        "Kaggle dataset)")
    p.add_argument("--segments", type=float, default=None, metavar="SECONDS",
                   help="tag mode: also score consecutive windows of SECONDS over each file (segments.csv), "
                        "for long recordings (the setting tag_segments)")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="processes, one device each, in one torch.distributed group: stage 1 data-parallel, the "
                        "folds N at a time (default: every visible CUDA device, one process on the CPU; under "
                        "torchrun: its ranks)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="override one setting, e.g. --set curated.epochs=10 or --set arch=xresnet34 (repeatable; "
                        "docs/settings.md lists every setting)")
    if defaults:
        p.set_defaults(**defaults)
    return p


def parse_args(argv=None, defaults: dict | None = None) -> argparse.Namespace:
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    if args.paths and args.mode != "tag":
        parser.error(f"PATH arguments ({args.paths[0]}, ...) are for --mode tag")
    return args


__all__ = ["build_parser", "parse_args", "parse_duration"]
''')

_add('src/fattag/config.py', r'''
"""Every setting in one place: `Config`, with one `StageSettings` per training stage, and named presets.

Each field's comment is its documentation: `docs/settings.md` is generated from them (`docs/settings_page.py`).
A preset is a plain dict of setting -> value; a stage's setting is named `noisy.x` (stage 1) or `curated.x`
(stage 2). The command line overrides any setting with `--set name=value` (`--set curated.union_mix=0.5`), so no
value needs a code edit. Derived quantities (frames per crop, ...) are properties, never stored twice.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields

KAGGLE_DATA_DIR = "/kaggle/input/freesound-audio-tagging-2019"
KAGGLE_WORK_DIR = "/kaggle/working"
STAGES = ("noisy", "curated")  # stage 1 trains on the noisy set, stage 2 on each curated fold


@dataclass
class StageSettings:
    """What differs between stage 1 (`cfg.noisy`) and stage 2 (`cfg.curated`): schedule, loss and augmentation."""
    epochs: int = 30              # one-cycle epochs (stage 1: 0 skips it; stage 2: per fold)
    lr: float = 2e-3              # one-cycle peak learning rate
    loss: str = "bce"             # bce, focal, lsep or lsoft (losses.py)
    top_up: float = 0.0           # share of training items from the other set (stage 1: curated, at most all; 2: noisy)
    mixup: float = 0.0            # mixup alpha (0 = off)
    specaug: bool = True          # SpecAugment time and frequency stripes
    union_mix: float = 0.0        # share of items mixed with a partner, labels = the union (0 = off)
    concat_mix: float = 0.0       # share of items whose crop ends with a partner's frames, labels = the union
    freq_shift: int = 0           # largest shift of the spectrum, in mel bands, per item (0 = off)
    time_stretch: float = 0.0     # per item, crop tempo times a factor in [1/(1+s), 1+s] (0 = off)
    freq_mixstyle: float = 0.0    # share of items whose per-band mean and std are mixed with a partner's (0 = off)
    consistency: float = 0.0      # mean teacher: weight of the MSE to an averaged model's scores (0 = off)


@dataclass
class Config:
    # --- audio and log-mel features (seed / 1st place values for FAT2019) ---
    sample_rate: int = 44100      # every clip is resampled to this rate
    n_fft: int = 2560             # FFT size of the log-mel
    win_length: int = 1024        # STFT window, in samples
    hop_length: int = 690         # STFT hop, in samples: ~64 frames per second at 44.1 kHz
    n_mels: int = 128             # mel bands
    f_min: float = 20.0           # lowest mel frequency, Hz
    f_max: float = 20000.0        # highest mel frequency, Hz
    top_db: float = 60.0          # log-mel floor, dB below the clip's peak
    trim_silence: bool = True     # cut leading/trailing audio quieter than trim_db below the clip's peak
    trim_db: float = 60.0         # level below the peak that counts as silence, dB
    crop_seconds: float = 4.0     # training crop and inference window (256 frames at 44.1 kHz / hop 690)

    # --- model (fastai xresnet family) ---
    arch: str = "xresnet18"       # xresnet18/34/50, or xresnet_tiny / _small / _medium (CPU runs)
    self_attention: bool = True   # fastai's simple self-attention in the residual blocks
    mish: bool = True             # Mish activations (else ReLU)
    dropout: float = 0.2          # dropout before the classifier
    input_norm: str = "global"    # input channels: global (mean/std), band (median off), pcen; "+"-joined; both
    pool: str = "avg"             # avg: global average; freqmean_timemax: mean over frequency, mean + max over time
    freq_norm: bool = False       # frequency-wise norm at each residual stage's input: x + instance norm over freq
    freq_rf: int = 0              # the last this-many residual stages see 1 band at a time (3x3 convs -> 1x3)
    temporal: str = "none"        # over the last feature map's frames before pooling: none, gru or attention
    noisy_head: bool = False      # a second output head for noisy-labelled clips; the curated head predicts

    # --- training, both stages ---
    folds: int = 5                # curated folds K: one stage-2 model each
    batch_size: int = 64          # training batch (inference batches are twice this)
    wd: float = 1e-2              # weight decay
    average_epochs: float = 0.0   # weight averaging: EMA of the weights over about this many epochs (0 = off)
    noisy: StageSettings = field(default_factory=lambda: StageSettings(epochs=12, lr=3e-3))  # stage 1
    curated: StageSettings = field(default_factory=lambda: StageSettings(epochs=30, lr=2e-3, mixup=0.4))  # stage 2
    noisy_holdout: float = 0.05   # share of the noisy set used to watch stage 1 (its labels are noisy too)
    select_noisy: bool = False    # before stage 1: score the noisy clips with a curated-trained model, keep agreeing
    select_epochs: int = 10       # epochs of that scorer (on the curated clips, from scratch, stage 2's augmentation)
    select_margin: int = 1        # a clip agrees when each of its n labels ranks in the model's top n + margin
    pseudo_epochs: int = 0        # test pseudo-labels: epochs of each fold model on its clips + the labelled test clips
    pseudo_threshold: float = 0.5  # a test clip's pseudo-labels: the ensemble's top class, plus classes scored >= this
    lr_pseudo: float = 1e-3       # peak learning rate of the pseudo-label epochs (stage 2's augmentation)
    train_on_test: bool = True    # test clips may be trained on (the pseudo-label round); false: DCASE's rule
    mixstyle_alpha: float = 0.3   # Freq-MixStyle: own share of the statistics ~ Beta(alpha, alpha)
    teacher_decay: float = 0.99   # mean teacher: the averaged model's EMA decay per training batch
    mix_gain_db: float = 6.0      # partner level relative to the item, uniform in +-this (union and concat mixing)
    time_masks: int = 2           # SpecAugment time stripes per item
    time_mask_frac: float = 0.1   # widest time stripe, as a share of the crop
    freq_masks: int = 2           # SpecAugment frequency stripes per item
    freq_mask_frac: float = 0.1   # widest frequency stripe, as a share of the mel bands
    num_workers: int = 0          # DataLoader worker processes (0: in the main process)
    channels_last: bool = True    # on the CPU, the model in channels-last memory layout (faster there; CUDA keeps its)
    amp: str = "auto"             # mixed precision: auto (float16 on CUDA, float32 on CPU), fp16, bf16 or off

    # --- inference / TTA ---
    tta_step_frac: float = 0.5    # window step as a share of the window (0.5 = half-overlapping windows)
    tta_aggregate: str = "meanmax"  # per clip over windows: mean, max, or meanmax (their average)
    tta_aug_passes: int = 0       # extra passes with light SpecAugment over the windows
    fold_ensemble: str = "mean"   # over folds: arithmetic "mean" or "geomean"
    class_balance: bool = False   # divide each class's test scores by their mean over the test set (predict.py)
    tta_fill_passes: int = 4      # with a time budget, time left at the end buys up to this many augmented passes
    tag_segments: float = 0.0     # tag mode: also score consecutive windows of this many seconds (segments.csv)

    # --- run control ---
    seed: int = 42                # folds, crops, augmentation and initial weights
    time_budget: float = 0.0      # seconds for the whole run, from process start (55m, 1h also read); 0 = no budget
    safety_margin: float = 0.08   # share of the budget kept free

    def __post_init__(self):
        for stage in STAGES:   # a share of 1 would leave no item of the stage's own set (and divide by zero)
            share = getattr(self, stage).top_up
            if not 0.0 <= share < 1.0:
                raise ValueError(f"{stage}.top_up must be at least 0 and below 1, got {share!r}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"unknown amp {self.amp!r}: {', '.join(AMP_CHOICES)}")
        if self.temporal not in TEMPORAL_CHOICES:
            raise ValueError(f"unknown temporal {self.temporal!r}: {', '.join(TEMPORAL_CHOICES)}")

    @property
    def test_round_epochs(self) -> int:
        """Epochs of the test pseudo-label round as the run will plan them: none when test audio is kept out of
        training (`train_on_test` false), whatever `pseudo_epochs` asks."""
        return self.pseudo_epochs if self.train_on_test else 0

    @property
    def crop_frames(self) -> int:
        return max(1, int(round(self.crop_seconds * self.sample_rate / self.hop_length)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict:
        """Every setting by its --set name: {'arch': ..., 'noisy.lr': ..., 'curated.lr': ...}."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, StageSettings):
                out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
            else:
                out[f.name] = value
        return out


AMP_CHOICES = ("auto", "off", "fp16", "bf16")
TEMPORAL_CHOICES = ("none", "gru", "attention")  # model.Temporal  # precision.amp_dtype says what each means on which device


# Small, fast and CPU-friendly: the synthetic demo dataset on a 2-core machine.
_DEMO = {
    "sample_rate": 16000, "n_fft": 512, "win_length": 400, "hop_length": 250, "n_mels": 48,  # 64 frames/s
    "f_min": 20.0, "f_max": 8000.0, "crop_seconds": 2.0,
    "arch": "xresnet_tiny", "self_attention": False, "mish": False, "dropout": 0.1,
    "folds": 3, "batch_size": 32, "noisy.lr": 4e-3, "curated.lr": 3e-3,
    "noisy.epochs": 12, "curated.epochs": 30, "curated.mixup": 0.2,
}
# What won on real recordings (realdev, docs/ablation.md): union mixing in both stages, stage-2 batches half noisy,
# the log-mel as three input channels (global, per-band and PCEN normalised), test scores balanced per class, and
# a test pseudo-label round (pseudo.py) in whatever time the rest of the recipe leaves in the budget.
_REAL_DATA_RECIPE = {"noisy.union_mix": 0.5, "curated.union_mix": 0.5, "curated.top_up": 0.5,
                     "input_norm": "global+band+pcen", "class_balance": True, "pseudo_epochs": 10}

PRESETS: dict[str, dict] = {
    "demo": _DEMO,
    # Real recordings without a GPU (the default on real data when there is no CUDA): a dataset of ~1,500 clips,
    # 1-2 h of audio and ~20 classes trains and predicts in under 10 minutes on 2 CPU cores. The demo preset plus
    # the changes measured on the realdev sets (docs/ablation.md): the real-data recipe, a small xresnet and a
    # stage 1 of 60 epochs (+0.028 test lwlrap on instruments, -0.007 on everyday, group 12); the budget keeps a
    # slower machine inside the 10 minutes (the pseudo-label round goes first, then epochs).
    "cpu": {**_DEMO, **_REAL_DATA_RECIPE, "arch": "xresnet_small", "noisy.epochs": 60, "time_budget": 570.0},
    # Default of the bundled kernel: the whole two-stage K-fold run plus TTA inside 60 minutes on a
    # Kaggle GPU (T4, float16 autocast). The cpu preset's recipe at FAT2019's feature settings; sized for ~700
    # training clips/s (about 42 min of training and prediction on FAT2019 before the round). The planner cuts
    # the round, then epochs (then folds) to what the measured GPU speed allows.
    "kaggle-1h": {**_REAL_DATA_RECIPE, "arch": "xresnet18", "folds": 5, "batch_size": 64, "noisy.epochs": 15,
                  "curated.epochs": 25, "time_budget": 3300.0},
    # A long Kaggle GPU session (9 h allowed; planned for 8.5 h): deeper model, more epochs, TTA passes; stage 1
    # doubled to 60 epochs as in the cpu preset, which the 8.5 h give even on one T4 at 200 clips/s (docs/budget.md).
    # kaggle-1h keeps its 15: on one T4 a doubling would take the pseudo-label round and stage-2 epochs.
    "kaggle-9h": {**_REAL_DATA_RECIPE, "arch": "xresnet34", "folds": 5, "batch_size": 64, "noisy.epochs": 60,
                  "curated.epochs": 40, "tta_aug_passes": 2, "time_budget": 8.5 * 3600},
}

# One line per preset for --help: what it is for.
PRESET_USE = {
    "demo": "the synthetic demo data (a smoke test of the pipeline) on the CPU",
    "cpu": "real recordings without a GPU: ~1,500 clips / 1-2 h of audio on 2 cores, inside a 9.5-min budget",
    "kaggle-1h": "FAT2019 on a Kaggle GPU: two stages, 5 folds and TTA inside the 1-hour kernel limit",
    "kaggle-9h": "a long Kaggle GPU session: xresnet34, more epochs, augmented TTA passes (8.5 h)",
}

# Settings renamed when the per-stage values became `StageSettings` (old flat name -> new name): --set and
# saved stages that use an old name are read under the new one (upgrade_settings).
RENAMED = {f"{name}_{stage}": f"{stage}.{name}" for stage in STAGES for name in (
    "epochs", "lr", "loss", "mixup", "specaug", "union_mix", "concat_mix", "freq_shift", "time_stretch")}
RENAMED.update(noisy_share_curated="curated.top_up", curated_share_noisy="noisy.top_up")
# Settings removed with their code (docs/ablation.md, "Removed options"), and the value that meant "off": saved
# stages that had them off still match; a checkpoint that used one is an error naming it.
REMOVED = dict(background_noisy=0.0, background_curated=0.0, background_snr_min=10.0, background_snr_max=25.0,
               level_eq_noisy=False, level_eq_curated=False, level_gain_db=10.0, eq_tilt_db=10.0, lowpass_p=0.25,
               adapt_bn=False, union_mix_rounds=1, pseudo_soft=False)


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


def check_name(name: str, known) -> None:
    """A clear error for a setting name that is not one: renamed, removed, or unknown."""
    if name in known:
        return
    if name in RENAMED:
        raise ValueError(f"setting {name!r} is now {RENAMED[name]!r}")
    if name in REMOVED:
        raise ValueError(f"setting {name!r} was removed (it did not win on real recordings: docs/ablation.md)")
    raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(known))}")


def parse_sets(sets: list[str] | None, cfg: Config | None = None) -> dict:
    """`name=value` strings (from --set) -> {name: value}, each converted to its setting's type."""
    current = (cfg or Config()).flat_dict()
    out = {}
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects name=value, got {item!r}")
        name, raw = item.split("=", 1)
        name = name.strip().replace("-", "_")
        check_name(name, current)
        out[name] = _coerce(name, raw, current[name])
    return out


def with_settings(cfg: Config, values: dict) -> Config:
    """`cfg` with `values` ({'arch': ..., 'curated.lr': ...}) replaced: a new Config, validated."""
    known = cfg.flat_dict()
    top, per_stage = {}, {stage: {} for stage in STAGES}
    for name, value in values.items():
        check_name(name, known)
        stage, dot, key = name.partition(".")
        if dot:
            per_stage[stage][key] = value
        else:
            top[name] = value
    top.update({stage: dataclasses.replace(getattr(cfg, stage), **kv) for stage, kv in per_stage.items() if kv})
    return dataclasses.replace(cfg, **top)


def make_config(preset: str | None = None, overrides: dict | None = None, sets: list[str] | None = None) -> Config:
    """Defaults, then the preset, then explicit overrides, then `name=value` strings from --set."""
    cfg = Config()
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        cfg = with_settings(cfg, PRESETS[preset])
    if overrides:
        cfg = with_settings(cfg, {k: v for k, v in overrides.items() if v is not None})
    return with_settings(cfg, parse_sets(sets, cfg))


def upgrade_settings(saved: dict) -> dict:
    """Settings saved under the names before `StageSettings` (a stage's recipe) under today's names: renamed ones
    renamed, removed ones dropped where they were off (kept where they were on, so that the recipe differs and the
    difference is named); a nested round recipe ("pseudo": {...}) likewise."""
    out = {}
    for name, value in saved.items():
        if isinstance(value, dict):
            value = upgrade_settings(value)
        if name in REMOVED and value == REMOVED[name]:
            continue
        out[RENAMED.get(name, name)] = value
    return out
''')

_add('src/fattag/context.py', r'''
"""One run's context: resolved data folder, config, work folder, device, log file, the clock and its Budget.

The config is the recipe as requested and never changes during a run; what the budget allows of it is the
Budget's plan (budget.py), which the steps read. Each step returns its results; none are kept here.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budget import Budget
from .checkpoint import atomic_write_text
from .config import KAGGLE_WORK_DIR, Config, make_config, parse_duration, parse_sets
from .data import find_data_dir
from .world import SINGLE, World, default_devices, join

log = logging.getLogger("fattag")


def process_start_time() -> float:
    """When this process started (Linux: from /proc), so that slow imports count against the budget too."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= time.time() - started < 7 * 24 * 3600:
            return started
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return time.time()  # elsewhere: this module's import, the nearest point we know


PROCESS_START = process_start_time()  # the time budget counts from here


@dataclass
class Run:
    cfg: Config                                   # the recipe as requested (preset, then --set)
    preset: str
    data_dir: Path
    work_dir: Path
    device: torch.device
    is_demo: bool = False
    started: float = PROCESS_START
    explicit: dict = field(default_factory=dict)  # the values given with --set (predict mode needs to know them)
    timings: list = field(default_factory=list)   # {"stage", "planned_s", "actual_s", "ended_s"} per finished stage
    world: World = SINGLE                         # this process's rank among the run's (world.py)
    budget: Budget = field(init=False)            # the time plan: without a deadline, the requested recipe

    def __post_init__(self):
        self.budget = Budget(self.cfg, self.deadline)

    @property
    def deadline(self) -> float | None:
        """Wall-clock time by which a submission must be on disk (budget minus safety margin), or None."""
        if not self.cfg.time_budget:
            return None
        return self.started + self.cfg.time_budget * (1 - self.cfg.safety_margin)

    def elapsed(self) -> float:
        return time.time() - self.started

    def record(self, stage: str, seconds: float) -> None:
        self.timings.append(dict(stage=stage, planned_s=self.budget.planned(stage), actual_s=round(seconds, 2),
                                 ended_s=round(self.elapsed(), 1)))

    def share_plan(self) -> None:
        """Rank 0's Budget on every rank, so that all plan alike from here (one rank: nothing to do)."""
        if self.world.size > 1:
            self.budget = self.world.broadcast(self.budget)

    def gather_timings(self) -> None:
        """Every rank's stage timings in the order they ended: rank 0's, and the stages only another rank ran
        (its folds), named with that rank."""
        ranks = self.world.gather(self.timings)
        mine = {t["stage"] for t in ranks[0]}
        others = [dict(t, stage=f"{t['stage']} (rank {r})") for r, rows in enumerate(ranks[1:], 1) for t in rows
                  if t["stage"] not in mine]
        self.timings = sorted(ranks[0] + others, key=lambda t: t["ended_s"])

    def save_config(self, cfg: Config | None = None, **extra) -> None:
        """config.json: the settings (the requested ones, or those a step ran with: `cfg`), the plan the budget
        made of them, and what ran (rank 0 writes it)."""
        if not self.world.is_main:
            return
        record = dict(preset=self.preset, data_dir=str(self.data_dir), settings=(cfg or self.cfg).to_dict(),
                      plan=self.budget.plan.to_dict(), devices=self.world.size, **extra)
        atomic_write_text(self.work_dir / "config.json", json.dumps(record, indent=2, default=str) + "\n")

    def timing_table(self) -> str:
        rows = [f"{'stage':<24}{'planned':>10}{'actual':>10}"]
        for t in self.timings:
            planned = "-" if t["planned_s"] is None else f"{t['planned_s']:.0f}s"
            rows.append(f"{t['stage']:<24}{planned:>10}{t['actual_s']:>9.0f}s")
        rows.append(f"{'total (from start)':<24}{'':>10}{self.elapsed():>9.0f}s")
        return "\n".join(rows)


def setup_logging(log_file: Path | None = None, world: World = SINGLE) -> None:
    """INFO lines with wall-clock offsets to stderr and, when given, to the run's log file; with several ranks
    each line names its rank."""
    logger = logging.getLogger("fattag")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    tag = f"[rank {world.rank}] " if world.size > 1 else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.propagate = False


def default_preset(is_demo: bool) -> str:
    """demo for the demo data; on real data kaggle-1h with a GPU, cpu without one."""
    if is_demo:
        return "demo"
    return "kaggle-1h" if torch.cuda.is_available() else "cpu"


def resolve_data(args) -> tuple[Path, bool]:
    """The data folder (Kaggle's, `--data-dir`, or the demo data, generated on first use) and whether it is the
    demo."""
    data_dir = find_data_dir(args.data_dir)
    if data_dir is not None:
        return Path(data_dir), False
    from .demo import make_demo_dataset
    log.info("no --data-dir and no Kaggle input: using the synthetic demo dataset")
    return Path(make_demo_dataset(seed=42)), True


def requested_config(args, is_demo: bool) -> tuple[str, Config]:
    """The preset and the recipe the command line asks for; a bad --set ends the run with one line naming it."""
    preset = args.preset or default_preset(is_demo)
    overrides = {"seed": args.seed}
    for name in ("folds",):
        overrides[name] = getattr(args, name, None)
    if getattr(args, "time_budget", None) is not None:
        overrides["time_budget"] = parse_duration(args.time_budget)
    if getattr(args, "segments", None) is not None:
        overrides["tag_segments"] = args.segments
    try:
        return preset, make_config(preset, overrides, args.sets)
    except ValueError as e:   # a bad --set: one line naming the setting, not a traceback
        raise SystemExit(f"run.py: error: {e}") from None


def devices_asked(args) -> int:
    """--devices, or by default every visible CUDA device (one process on the CPU)."""
    return args.devices if getattr(args, "devices", None) else default_devices()


def check_before_spawn(args) -> None:
    """What the ranks would each find wrong, found once before they start: the data folder (the demo data is made
    here, not by N ranks at once) and the settings."""
    setup_logging()
    _, is_demo = resolve_data(args)
    requested_config(args, is_demo)


def open_work_dir(args, name: str, world: World = SINGLE) -> Path:
    """The folder for every output of the run: --work-dir, else /kaggle/working on Kaggle, else runs/<name>;
    made if missing, with the log file there from now on."""
    if args.work_dir:
        work_dir = Path(args.work_dir)
    elif Path(KAGGLE_WORK_DIR).is_dir():
        work_dir = Path(KAGGLE_WORK_DIR)
    else:
        work_dir = Path("runs") / name
    work_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(work_dir / "log.txt", world)
    return work_dir


def open_run(args) -> Run:
    """Resolve where data comes from (Kaggle, a folder, or the generated demo), the preset, the work folder and
    this process's rank and device."""
    world = join(devices_asked(args))
    setup_logging(world=world)
    data_dir, is_demo = resolve_data(args)
    preset, cfg = requested_config(args, is_demo)
    work_dir = open_work_dir(args, preset, world)
    device = world.device()
    log.info("data %s%s | preset %s | work dir %s | device %s%s%s", data_dir, " (demo)" if is_demo else "", preset,
             work_dir, device, f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
             f" | {world.describe()}" if world.size > 1 else "")
    if getattr(args, "mode", "train") == "train":   # DCASE's rules forbid training on test audio (docs/kaggle.md)
        log.info("test audio: %s", "trained on in the pseudo-label round (train_on_test=true)"
                 if cfg.test_round_epochs > 0 else "kept out of training (" + (
                     "train_on_test=false)" if not cfg.train_on_test else "no pseudo-label round)"))
    if world.size > 1 and getattr(args, "devices", None) not in (None, world.size):
        log.warning("--devices %s ignored: torchrun started %d ranks", args.devices, world.size)
    return Run(cfg, preset, data_dir, work_dir, device, is_demo, explicit=parse_sets(args.sets), world=world)


def open_tag(args) -> tuple[Config, dict, Path]:
    """The tag mode's settings (the preset a run on real data gets here, then --set), the values given with --set
    and its work folder (default runs/tag), with the log file there; no dataset is read."""
    setup_logging()
    _, cfg = requested_config(args, is_demo=False)
    return cfg, parse_sets(args.sets), open_work_dir(args, "tag")
''')

_add('src/fattag/cost.py', r'''
"""The cost model and the planner: pure functions from sizes and measured speed to seconds, and to a plan.

Kaggle kills a kernel at its limit (FAT2019: 1 h on GPU) and DCASE 2019 teams were disqualified for running
over. So a run prices its recipe from the measured throughput (throughput.py) and the sizes of its sets, and fits
it into the time it has, cutting in this order: the test pseudo-label round (it only gets time that the rest of the
recipe leaves), epochs of both stages (proportionally, down to a floor), augmented TTA passes, the number of folds
trained, and finally stage 1. Nothing here reads the clock: budget.py re-plans with these functions as the run
goes. With N devices (`Throughput.devices`) stage 1 trains at the measured data-parallel rate (its validation is
not shared), and folds, their test TTA and pseudo-label epochs run N at a time (`rounds`); a stage-1 epoch's real
cost replaces the estimate after its first epoch (budget.replan_stage1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import Config
from .stages import ROUND_STAGE, SELECT_HOLDOUT, SELECT_STAGE, STAGE1, fold_stage, holdout_size, rounds, top_up_size

OVERHEAD = 1.15          # data loading, callbacks and logging on top of the measured model time
MIN_EPOCHS_CURATED = 3   # fewer than this and a fold model is little better than stage 1 alone
MIN_EPOCHS_NOISY = 1


@dataclass(frozen=True)
class Workload:
    """Sizes the plan depends on, counted from the decoded stores."""
    noisy_train: int            # stage-1 training clips (0 = no stage 1)
    noisy_holdout_windows: int  # stage-1 validation windows per epoch
    curated: int                # decodable curated clips
    curated_windows: int        # whole-clip windows over all curated clips
    test_windows: int           # whole-clip windows over all test clips
    noisy_windows: int = 0      # whole-clip windows over all noisy clips (scored once by noisy-clip selection)
    test_clips: int = 0         # decodable test clips (trained on in the pseudo-label round)
    noisy_clips: int = 0        # the noisy clips stage 2 tops its batches up from (training and holdout clips)


@dataclass
class Throughput:
    """This machine's speed, as throughput.measure_throughput times it on the real model."""
    train_s_per_clip: float     # forward + backward + optimiser step, per training crop
    infer_s_per_window: float   # forward pass, per inference window
    device: str
    devices: int = 1            # devices of this speed the run has: stage 1 data-parallel, folds in rounds of them
    ddp_train_s_per_clip: float = 0.0   # a data-parallel training step over all devices, per crop (0: not measured)

    @property
    def stage1_train_s_per_clip(self) -> float:
        """Stage 1's training cost per crop: measured through DDP, else one device's shared by all."""
        return self.ddp_train_s_per_clip or self.train_s_per_clip / self.devices

    def describe(self) -> str:
        ddp = (f"; {self.devices} devices data-parallel: {1 / self.stage1_train_s_per_clip:.0f} clips/s"
               if self.devices > 1 else "")
        return (f"{self.device}: training {1 / self.train_s_per_clip:.0f} clips/s, "
                f"inference {1 / self.infer_s_per_window:.0f} windows/s{ddp}")


def count_workload(cfg: Config, noisy, curated, test) -> Workload:
    """Clips and windows of each stage, from the decoded stores (features.MelStore; noisy may be None)."""
    def windows(store, idx):
        return len(store.windows(idx, cfg.crop_frames, cfg.tta_step_frac)) if len(idx) else 0

    noisy_ok = np.flatnonzero(noisy.ok) if noisy is not None else np.array([], dtype=int)
    n_hold = holdout_size(len(noisy_ok), cfg.noisy_holdout)
    return Workload(noisy_train=len(noisy_ok) - n_hold, noisy_holdout_windows=windows(noisy, noisy_ok[:n_hold]),
                    curated=int(curated.ok.sum()), curated_windows=windows(curated, np.flatnonzero(curated.ok)),
                    test_windows=windows(test, np.flatnonzero(test.ok)), test_clips=int(test.ok.sum()),
                    noisy_windows=windows(noisy, noisy_ok) if cfg.select_noisy else 0, noisy_clips=len(noisy_ok))


@dataclass(frozen=True)
class Plan:
    epochs_noisy: int
    epochs_curated: int
    folds_trained: int
    tta_aug_passes: int
    available_s: float
    stages: tuple = ()           # (stage name, planned seconds)
    notes: tuple = ()            # what was cut, and why
    epochs_pseudo: int = 0       # the test pseudo-label round, per fold model (pseudo.py)
    devices: int = 1             # ranks: stage 1 data-parallel over all, folds side by side

    @classmethod
    def requested(cls, cfg: Config) -> Plan:
        """The recipe as asked for, before anything is measured or cut."""
        return cls(cfg.noisy.epochs, cfg.curated.epochs, cfg.folds, cfg.tta_aug_passes, float("inf"),
                   epochs_pseudo=cfg.test_round_epochs)

    @property
    def total_s(self) -> float:
        """Wall seconds of the planned stages: folds side by side in rounds of `devices`."""
        folds = [secs for name, secs in self.stages if name.startswith("fold")]
        rest = sum(secs for name, secs in self.stages if not name.startswith("fold"))
        return rest + sum(max(folds[i:i + self.devices]) for i in range(0, len(folds), self.devices))

    def table(self) -> str:
        rows = [f"{'stage':<22}{'planned':>10}"]
        rows += [f"{name:<22}{secs:>9.0f}s" for name, secs in self.stages]
        rows.append(f"{'total':<22}{self.total_s:>9.0f}s  (available {self.available_s:.0f}s)")
        head = (f"plan: stage 1 {self.epochs_noisy} epochs, stage 2 {self.epochs_curated} epochs x "
                f"{self.folds_trained} folds, " + (f"{self.epochs_pseudo} pseudo-label epochs per fold, "
                                                   if self.epochs_pseudo else "")
                + f"{self.tta_aug_passes} augmented TTA passes"
                + (f"; {self.devices} devices: stage 1 data-parallel, folds {self.devices} at a time"
                   if self.devices > 1 else ""))
        return "\n".join([head, *rows, *self.notes])

    def to_dict(self) -> dict:
        return dict(epochs_noisy=self.epochs_noisy, epochs_curated=self.epochs_curated,
                    epochs_pseudo=self.epochs_pseudo, folds_trained=self.folds_trained,
                    tta_aug_passes=self.tta_aug_passes, devices=self.devices,
                    available_s=None if math.isinf(self.available_s) else round(self.available_s, 1),
                    stages=[[name, round(secs, 1)] for name, secs in self.stages], notes=list(self.notes))


def stage_costs(cfg: Config, w: Workload, tp: Throughput, passes: int, scale: dict | None = None) -> dict:
    """Seconds per unit of work, from the measured throughput (times `scale[kind]`, the measured/predicted ratio
    of work already done): a stage-1 epoch, a fold epoch, one fold's OOF predictions, one model's test TTA, and for
    the pseudo-label round one model's labelling pass over the test clips and one of its epochs. Both stages'
    training sets include their top-up from the other set (`stages.top_up_size`, as splits.top_up draws it)."""
    k = cfg.folds
    infer = tp.infer_s_per_window * OVERHEAD
    train = tp.train_s_per_clip * OVERHEAD
    per_fold_windows = w.curated_windows / k
    fold_curated = w.curated * (k - 1) / k
    fold_train = fold_curated + top_up_size(fold_curated, cfg.curated.top_up, w.noisy_clips)
    stage1_train = w.noisy_train + top_up_size(w.noisy_train, cfg.noisy.top_up, w.curated)   # 0 without stage 1
    selecting = cfg.select_noisy and w.noisy_train > 0
    # a mean teacher (StageSettings.consistency) scores every training crop once more: one inference window each
    teacher1 = w.noisy_train > 0 and cfg.noisy.consistency > 0
    teacher2 = cfg.curated.consistency > 0
    base = dict(
        noisy_epoch=stage1_train * (tp.stage1_train_s_per_clip * OVERHEAD + teacher1 * infer / tp.devices)
        + w.noisy_holdout_windows * infer,
        fold_epoch=fold_train * (train + teacher2 * infer) + per_fold_windows * infer,
        pseudo_epoch=(fold_train + w.test_clips) * (train + teacher2 * infer) + per_fold_windows * infer,
        teacher_predict=w.test_windows * infer,
        oof_predict=(w.curated / k + per_fold_windows * (1 + passes)) * infer,   # centre crop + windows (+ passes)
        test_predict=w.test_windows * (1 + passes) * infer,
        # noisy-clip selection: a scorer trained on the curated clips, then one pass over every noisy clip
        select=(cfg.select_epochs * (w.curated * train + w.curated_windows * SELECT_HOLDOUT * infer)
                + w.noisy_windows * infer) if selecting else 0.0,
    )
    scale = dict(scale or {})
    default = _geomean(list(scale.values())) if scale else 1.0
    if "oof_predict" in scale:   # test TTA is the same kind of work as OOF prediction: windows through the model
        scale.setdefault("test_predict", scale["oof_predict"])
    return {kind: secs * scale.get(kind, default) for kind, secs in base.items()}


def _geomean(values: list) -> float:
    return float(np.exp(np.mean(np.log(np.clip(values, 1e-3, 1e3)))))


def fold_s(c: dict, epochs: int, pseudo: int = 0) -> float:
    """One fold: its epochs, its OOF predictions, its model's share of test TTA and of the pseudo-label round."""
    return epochs * c["fold_epoch"] + c["oof_predict"] + c["test_predict"] + pseudo_s(c, pseudo)


def pseudo_s(c: dict, epochs: int) -> float:
    """One model's part of the pseudo-label round: labelling the test clips, then `epochs` epochs (0: no round)."""
    return c["teacher_predict"] + epochs * c["pseudo_epoch"] if epochs > 0 else 0.0


def recipe_total(cfg: Config, w: Workload, tp: Throughput, scale: dict | None, pseudo: int,
                 folds_done: int | None = None):
    """total(e1, e2, folds, passes): the seconds of the work still to do with `pseudo` pseudo-label epochs per
    model. From the start (`folds_done` None): noisy-clip selection, stage 1 and the folds. Once `folds_done`
    folds are trained: their models' test TTA and pseudo-label round, and `folds` more folds."""
    def total(e1, e2, folds, passes):
        c = stage_costs(cfg, w, tp, passes, scale)
        start = c["select"] + e1 * c["noisy_epoch"] if folds_done is None else 0.0
        models = folds + (folds_done or 0)   # every model's test TTA and pseudo-label round; N side by side
        return (start + rounds(folds, tp.devices) * (e2 * c["fold_epoch"] + c["oof_predict"])
                + rounds(models, tp.devices) * (c["test_predict"] + pseudo_s(c, pseudo)))
    return total


def fit_pseudo(requested: int, total_with, available_s: float | None) -> int:
    """The most pseudo-label epochs (up to `requested`) with which `total_with(epochs)`, the whole recipe's time, fits
    `available_s`; 0 when the recipe does not fit even without the round. The round is cut first: on realdev it
    gained less under the budget than the stage epochs it would have taken."""
    if available_s is None or requested <= 0:
        return max(requested, 0)
    return next((p for p in range(requested, 0, -1) if total_with(p) <= available_s), 0)


def fit_recipe(e1: int, e2: int, folds: int, passes: int, total, available_s: float | None, min_folds: int = 1):
    """Cut (e1, e2, folds, passes) until total(e1, e2, folds, passes) <= available_s, in this order: both stages'
    epochs in proportion (down to their floors), augmented TTA passes, folds (down to `min_folds`: a run trains at
    least one, a re-plan after a trained fold may add none), then stage 1. Returns the cut values and notes saying
    what was cut."""
    notes = []
    if available_s is None or total(e1, e2, folds, passes) <= available_s:
        return e1, e2, folds, passes, notes

    def fits(a, b, f, p):
        return total(a, b, f, p) <= available_s

    lo, hi = 0.0, 1.0  # the largest common scale of both stages' epochs that fits, above their floors
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(_scaled(e1, mid, MIN_EPOCHS_NOISY), _scaled(e2, mid, MIN_EPOCHS_CURATED),
                                   folds, passes) else (lo, mid)
    a, b = _scaled(e1, lo, MIN_EPOCHS_NOISY), _scaled(e2, lo, MIN_EPOCHS_CURATED)
    if fits(a, b, folds, passes):
        notes.append(f"epochs cut to fit the budget: stage 1 {e1} -> {a}, stage 2 {e2} -> {b}")
        return a, b, folds, passes, notes
    requested_folds = folds
    e1, e2 = _scaled(e1, 0, MIN_EPOCHS_NOISY), min(e2, MIN_EPOCHS_CURATED)
    if passes and not fits(e1, e2, folds, passes):
        notes.append(f"augmented TTA passes cut {passes} -> 0")
        passes = 0
    while folds > min_folds and not fits(e1, e2, folds, passes):
        folds -= 1
    if folds == 0:
        notes.append("no time for another fold at its floor")
    elif folds < requested_folds:
        notes.append(f"only {folds} of {requested_folds} folds fit the budget (the others are not trained)")
    if e1 and not fits(e1, e2, folds, passes):
        notes.append("stage 1 dropped: it does not fit the budget")
        e1 = 0
    notes.append(f"epochs at their floor: stage 1 {e1}, stage 2 {e2}")
    if not fits(e1, e2, folds, passes):
        notes.append("WARNING: even the smallest plan exceeds the budget; the deadline guard will stop training early")
    return e1, e2, folds, passes, notes


def plan_run(cfg: Config, w: Workload, tp: Throughput, available_s: float | None,
             scale: dict | None = None) -> Plan:
    """Fit the preset's epochs, TTA passes and folds into `available_s` seconds (None: no budget, no cuts)."""
    e1 = cfg.noisy.epochs if w.noisy_train else 0
    recipe = (e1, cfg.curated.epochs, cfg.folds, cfg.tta_aug_passes)
    ep = fit_pseudo(cfg.test_round_epochs, lambda p: recipe_total(cfg, w, tp, scale, p)(*recipe), available_s)
    e1, e2, folds, passes, notes = fit_recipe(*recipe, recipe_total(cfg, w, tp, scale, ep), available_s)
    if ep < cfg.test_round_epochs:
        notes.insert(0, f"pseudo-label round cut to fit the budget: {cfg.test_round_epochs} -> {ep} epochs")
    c = stage_costs(cfg, w, tp, passes, scale)
    stages = [(SELECT_STAGE, c["select"])] if c["select"] and e1 else []
    stages += [(STAGE1, e1 * c["noisy_epoch"])] if e1 else []
    stages += [(fold_stage(k), fold_s(c, e2)) for k in range(folds)]
    stages += [(ROUND_STAGE, rounds(folds, tp.devices) * pseudo_s(c, ep))] if ep else []
    return Plan(e1, e2, folds, passes, float("inf") if available_s is None else available_s, tuple(stages),
                tuple(notes), ep, tp.devices)


def replan_folds(cfg: Config, w: Workload, tp: Throughput, scale: dict, plan: Plan, k: int, folds_done: int,
                 available_s: float | None) -> Plan:
    """`plan` with folds k.. fitted into `available_s`, after test TTA for the `folds_done` folds already trained."""
    recipe = (0, cfg.curated.epochs, cfg.folds - k, cfg.tta_aug_passes)
    ep = fit_pseudo(cfg.test_round_epochs, lambda p: recipe_total(cfg, w, tp, scale, p, folds_done)(*recipe),
                    available_s)
    _, e2, n, passes, notes = fit_recipe(*recipe, recipe_total(cfg, w, tp, scale, ep, folds_done), available_s,
                                         min_folds=1 if k == 0 else 0)
    c = stage_costs(cfg, w, tp, passes, scale)
    folds = [st for st in plan.stages if st[0].startswith("fold")]
    kept = [st for st in plan.stages if not st[0].startswith("fold") and st[0] != ROUND_STAGE]
    stages = kept + [(fold_stage(j), secs) for j, (_, secs) in enumerate(folds) if j < k]
    stages += [(fold_stage(j), fold_s(c, e2)) for j in range(k, k + n)]
    stages += [(ROUND_STAGE, rounds(k + n, tp.devices) * pseudo_s(c, ep))] if ep else []
    note = (f"re-planned before fold {k} from measured times: {n} more fold(s) of {e2} epochs"
            + (f" ({'; '.join(notes)})" if notes else ""))
    return Plan(plan.epochs_noisy, e2, k + n, passes, plan.available_s, tuple(stages), (*plan.notes, note), ep,
                tp.devices)


def _scaled(epochs: int, scale: float, floor: int) -> int:
    if epochs <= 0:
        return 0
    return max(min(floor, epochs), int(math.floor(epochs * scale)))
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
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .audio import AudioError, load_clip
from .config import KAGGLE_DATA_DIR
from .progress import progress as progress_bar

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
    bar = progress_bar(range(len(table)), desc=desc, unit="clip", disable=not progress)
    start, n_bytes, n_failed = time.perf_counter(), 0, 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fattag-decode")
    pending: deque = deque()
    try:
        submitted = 0
        for index in bar:
            while submitted < len(table) and len(pending) < max_in_flight:
                pending.append(pool.submit(_decode_one, table.paths[submitted], sample_rate, trim, trim_db))
                submitted += 1
            wave, error, size = pending.popleft().result()
            n_bytes += size
            n_failed += error is not None
            bar.set_postfix(**{"MB/s": f"{n_bytes / 1e6 / max(time.perf_counter() - start, 1e-9):.1f}",
                               "skipped": n_failed})
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

_add('src/fattag/dataparallel.py', r'''
"""Stage 1 on several ranks: torch's DistributedDataParallel in a small fastai callback, and each rank's share of the
crops.

The single-device recipe is kept step for step: every rank shuffles the crops in the same order (one seed) and
takes every N-th of them, with batches of batch_size / N, so that each optimiser step averages the gradients of one
batch of `batch_size` crops, the epoch has as many steps, and the one-cycle schedule and learning rate are those of
one device. BatchNorm stays per rank (no SyncBatchNorm): its statistics come from each rank's half batch, and
before validation every rank takes rank 0's, so that all ranks score, keep and stop alike.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.data.load import DataLoader
from torch.nn.parallel import DistributedDataParallel

from .world import World


class RankShare(DataLoader):
    """fastai's DataLoader over this rank's share of an epoch: the shuffled order every rank draws alike (the
    loader's own seeded generator), every `world.size`-th item from `world.rank` on, the same count on every rank
    (DDP needs as many steps everywhere; the few items left over wait for the next epoch's shuffle)."""

    def __init__(self, dataset, world: World, **kwargs):
        super().__init__(dataset, **kwargs)
        self.world = world

    @property
    def share(self) -> int:
        return self.n // self.world.size

    def __len__(self):
        return self.share // self.bs + (0 if self.drop_last or self.share % self.bs == 0 else 1)

    def get_idxs(self):
        return list(super().get_idxs())[self.world.rank::self.world.size][:self.share]


def training_loader(dataset, bs: int, world: World, **kwargs) -> DataLoader:
    """The training batches of one stage: all of them on one rank; with several, this rank's share of each batch
    of `bs` crops (its own crop generator, so the ranks' crops do not repeat each other's offsets). The last short
    batch is dropped when there is more than one batch."""
    per_rank = max(bs // world.size, 1)
    drop_last = len(dataset) // world.size > per_rank
    if world.size == 1:
        return DataLoader(dataset, bs=bs, drop_last=drop_last, **kwargs)
    if hasattr(dataset, "rng"):
        dataset.rng = np.random.default_rng([int(dataset.rng.integers(2 ** 31)), world.rank])
    return RankShare(dataset, world, bs=per_rank, drop_last=drop_last, **kwargs)


class DataParallel(Callback):
    """Train through torch's DDP (gradients averaged across the ranks in the backward pass); validate, keep and
    save with the plain model. Decisions taken between epochs (the deadline, a re-plan, the NaN guard) are rank 0's
    (`learn.agree`), so that no rank stops while another waits for it; at the end every rank holds rank 0's
    weights."""
    order = 200   # after every other callback: KeepBest has restored the best weights before after_fit shares them

    def __init__(self, world: World):
        self.world = world

    def before_fit(self):
        self.plain = self.learn.model
        device = next(self.plain.parameters()).device
        self.ddp = DistributedDataParallel(self.plain, device_ids=[device] if device.type == "cuda" else None)
        self.learn.agree = self.world.broadcast
        torch.manual_seed(torch.initial_seed() + self.world.rank)   # the ranks' augmentations differ

    def before_train(self):
        self.learn.model = self.ddp
        self.ddp.train()

    def after_train(self):
        self.learn.model = self.plain
        for b in self.plain.buffers():   # BatchNorm statistics: rank 0's everywhere, so validation agrees
            dist.broadcast(b.data, 0)

    def after_fit(self):
        self.learn.model = self.plain
        for t in self.plain.state_dict().values():
            dist.broadcast(t, 0)
        del self.learn.agree
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

DEMO_VERSION = "2"  # bump on any change to the generated files
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
# Synthesis runs in float32 (sin/exp are ~10x faster than in float64) and FFTs in float64 at 5-smooth
# lengths; phases are accumulated in float64 and wrapped before the float32 sin.

F32 = np.float32


def _logu(rng, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _tone(freq, n: int, sr: int, amps=(1.0,)) -> np.ndarray:
    """Additive harmonic tone at a steady frequency (scalar) or following a per-sample f0 track.
    Harmonics near Nyquist are left out and the fundamental is capped below it, so a low sample rate
    never silences an event."""
    cap = 0.45 * sr
    if np.ndim(freq) == 0:
        top = min(float(freq), cap)
        cycles = np.arange(n) * (top / sr)
    else:
        top = float(np.max(freq)) if n else 0.0
        if top > cap:
            freq, top = np.minimum(freq, cap), cap
        cycles = np.cumsum(freq, dtype=np.float64) / sr
    phase = ((cycles - np.floor(cycles)) * (2 * np.pi)).astype(F32)
    out = np.zeros(n, F32)
    for k, a in enumerate(amps, start=1):
        if a and (k == 1 or k * top < cap):
            out += F32(a) * np.sin(k * phase)
    return out


def _fade(x: np.ndarray, sr: int, seconds: float = 0.005) -> np.ndarray:
    m = min(int(seconds * sr), x.size // 2)
    if m > 0:
        ramp = np.linspace(0.0, 1.0, m, dtype=F32)
        x[:m] *= ramp
        x[-m:] *= ramp[::-1]
    return x


def _fft_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: an FFT of an arbitrary clip length can be 100x slower."""
    best, p5 = 2 * max(n, 1), 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _band_gain(fc: float, octaves: float):
    """Gaussian band in log-frequency around fc (kept below 0.4 * sr by the caller's fc)."""
    def gain(f):
        return np.exp(F32(-0.5) * (np.log2(np.maximum(f, F32(1.0)) / F32(fc)) * F32(2.0 / octaves)) ** 2)
    return gain


def _random_spectrum(rng, bins: int) -> np.ndarray:
    """Spectrum of white noise (uniform real and imaginary parts: Gaussian after the inverse FFT)."""
    return (rng.random((bins, 2)) - 0.5).view(np.complex128).ravel()


def _shaped_noise(rng, n: int, sr: int, gain) -> np.ndarray:
    """Unit-RMS noise with a spectral gain(f), synthesised in the frequency domain (one FFT)."""
    size = _fft_len(n)
    f = np.fft.rfftfreq(size, 1.0 / sr).astype(F32)
    x = np.fft.irfft(_random_spectrum(rng, f.size) * gain(f), size)[:n].astype(F32)
    return x / F32(np.sqrt(np.mean(x ** 2)) + 1e-12)


def _filtered(x: np.ndarray, sr: int, gain) -> np.ndarray:
    """x through a zero-phase spectral gain(f)."""
    size = _fft_len(x.size)
    f = np.fft.rfftfreq(size, 1.0 / sr).astype(F32)
    return np.fft.irfft(np.fft.rfft(x, size) * gain(f), size)[:x.size].astype(F32)


def _repeat(rng, n: int, sr: int, event, gap: tuple[float, float]) -> np.ndarray:
    """Events one after another with random gaps until n samples are filled (the last one is cut)."""
    out = np.zeros(n, F32)
    pos = int(rng.uniform(0.0, 0.1) * sr) if n > sr else 0
    while pos < n:
        ev = event()
        m = min(ev.size, n - pos)
        out[pos:pos + m] += ev[:m]
        pos += ev.size + int(rng.uniform(*gap) * sr)
    return out


def _stamp(n: int, onsets, kernel: np.ndarray, amps) -> np.ndarray:
    """Copies of a short kernel, scaled by amps, placed at sample onsets."""
    out = np.zeros(n, F32)
    for at, a in zip(onsets, amps):
        if at < n:
            m = min(kernel.size, n - at)
            out[at:at + m] += F32(a) * kernel[:m]
    return out


def _active_rms(x: np.ndarray, sr: int) -> float:
    """RMS over the louder half of 20-ms frames: a level for sparse events (knocks, clicks) that a
    plain RMS over their silences would understate."""
    hop = max(int(0.02 * sr), 1)
    m = x.size // hop
    if m < 2:
        return float(np.sqrt(np.mean(x ** 2)) + 1e-12)
    energy = np.sort(np.mean(x[:m * hop].reshape(m, hop) ** 2, axis=1))
    return float(np.sqrt(np.mean(energy[m // 2:])) + 1e-12)


def _decay(m: int, sr: int, tau: float) -> np.ndarray:
    return np.exp(np.arange(m, dtype=F32) * F32(-1.0 / (tau * sr)))


def _lfo(n: int, sr: int, rate: float, phase: float = 0.0) -> np.ndarray:
    """Slow sinusoid for modulations (float32 is precise enough at these rates)."""
    return np.sin(np.arange(n, dtype=F32) * F32(2 * np.pi * rate / sr) + F32(phase))


def _background(rng, n: int, sr: int, brown_share: float) -> np.ndarray:
    """Unit-RMS mix of white and brown noise, made in the time domain (FFTs of every clip cost more
    than the rest of the synthesis): brown = a random walk minus its 40-ms moving average, which
    keeps the 1/f^2 slope above ~25 Hz without the walk's inaudible drift."""
    w = max(sr // 25, 2)
    walk = np.cumsum(rng.random(n + w, dtype=F32) - F32(0.5), dtype=np.float64)
    c = np.concatenate(([0.0], np.cumsum(walk)))
    brown = (walk[w // 2:w // 2 + n] - (c[w:w + n] - c[:n]) / w).astype(F32)
    white = rng.random(n, dtype=F32) - F32(0.5)
    return (F32(np.sqrt(1 - brown_share) / (np.sqrt(np.mean(white ** 2)) + 1e-12)) * white
            + F32(np.sqrt(brown_share) / (np.sqrt(np.mean(brown ** 2)) + 1e-12)) * brown)


# ----------------------------------------------------------------------------- sound classes
# Each renderer fills n samples with its sound, drawing pitch, rate, duration, ... from rng per clip.

def _bell_tone(rng, n, sr):
    f0, tau = _logu(rng, 250, 1400), rng.uniform(0.25, 1.0)
    partials = ((1.0, 1.0), (2.0, 0.6), (2.76, 0.5), (4.07, 0.35), (5.4, 0.25))  # (ratio, amplitude)

    def strike():
        m = int(min(4 * tau, 3.0) * sr)
        x = sum(a * _tone(f0 * r, m, sr) * _decay(m, sr, tau / np.sqrt(r))
                for r, a in partials if r == 1.0 or f0 * r < 0.45 * sr)
        return _fade(x, sr, 0.002) * F32(rng.uniform(0.6, 1.0))
    return _repeat(rng, n, sr, strike, (0.05, 0.6))


def _chirp(rising: bool):
    def render(rng, n, sr):
        f_lo, ratio, dur = _logu(rng, 300, 1600), rng.uniform(1.8, 3.5), rng.uniform(0.15, 0.6)
        amps = (1.0, rng.uniform(0.0, 0.4))

        def event():
            m = int(dur * rng.uniform(0.85, 1.15) * sr)
            u = np.arange(m) / m
            f = f_lo * ratio ** (u if rising else 1.0 - u)
            return _tone(f, m, sr, amps) * np.sqrt(np.sin(np.pi * u)).astype(F32)
        return _repeat(rng, n, sr, event, (0.03, 0.4))
    return render


def _click_train(rng, n, sr):
    rate, fc, tau = _logu(rng, 4, 40), _logu(rng, 800, 5000), rng.uniform(0.0005, 0.003)
    m = int(6 * tau * sr) + 1
    kernel = _tone(min(fc, 0.4 * sr), m, sr) * _decay(m, sr, tau)
    onsets = (np.cumsum(rng.uniform(0.9, 1.1, int(n / sr * rate) + 2) / rate) * sr).astype(int)
    return _stamp(n, onsets, kernel, rng.uniform(0.6, 1.0, onsets.size))


def _noise_burst(rng, n, sr):
    gain = _band_gain(min(_logu(rng, 300, 4000), 0.4 * sr), rng.uniform(0.7, 2.0))

    def burst():
        m = int(rng.uniform(0.08, 0.5) * sr)
        return _fade(_shaped_noise(rng, m, sr, gain) * _decay(m, sr, m / 3 / sr), sr, 0.003)
    return _repeat(rng, n, sr, burst, (0.1, 0.8))


def _hum(rng, n, sr):
    f0 = rng.uniform(50, 180)
    f = F32(f0) * (1 + F32(0.004) * _lfo(n, sr, rng.uniform(0.1, 0.5)))
    wobble = 1 + F32(0.15) * _lfo(n, sr, rng.uniform(0.2, 1.0), rng.uniform(0, 2 * np.pi))
    return _tone(f, n, sr, [k ** -1.5 for k in range(1, 7)]) * wobble


def _whistle(rng, n, sr):
    base = _logu(rng, 800, 3000)

    def note():
        m = int(rng.uniform(0.3, 1.5) * sr)
        drift = 1 + F32(0.006) * _lfo(m, sr, rng.uniform(0.2, 1.0))
        return _fade(_tone(F32(base * 2 ** rng.uniform(-0.3, 0.3)) * drift, m, sr), sr, 0.02)
    return _repeat(rng, n, sr, note, (0.05, 0.3))


def _trill(rng, n, sr):
    fc, rate = _logu(rng, 500, 3000), rng.uniform(10, 30)
    amps = (1.0, rng.uniform(0, 0.3))

    def phrase():
        m = int(rng.uniform(0.4, 1.5) * sr)
        env = (F32(0.5) - F32(0.5) * _lfo(m, sr, rate, np.pi / 2)) ** 2
        return _fade(_tone(fc, m, sr, amps) * env, sr, 0.01)
    return _repeat(rng, n, sr, phrase, (0.1, 0.5))


def _vibrato(rng, n, sr):
    fc, rate, depth = _logu(rng, 300, 2000), rng.uniform(4.5, 8.0), rng.uniform(0.02, 0.06)

    def note():
        m = int(rng.uniform(0.6, 2.5) * sr)
        f = F32(fc) * (1 + F32(depth) * _lfo(m, sr, rate, rng.uniform(0, 2 * np.pi)))
        return _fade(_tone(f, m, sr, (1.0, 0.5, 0.25)), sr, 0.03)
    return _repeat(rng, n, sr, note, (0.1, 0.4))


def _knock(rng, n, sr):
    f, tau = _logu(rng, 80, 400), rng.uniform(0.02, 0.06)
    m = int(5 * tau * sr)
    body = _tone(f, m, sr) * _decay(m, sr, tau)
    hit = int(0.003 * sr)
    body[:hit] += F32(0.5) * (rng.random(hit, dtype=F32) - F32(0.5))

    def group():
        times = np.cumsum(rng.uniform(0.12, 0.35, int(rng.integers(2, 6))))
        onsets = ((times - times[0]) * sr).astype(int)
        return _stamp(onsets[-1] + m, onsets, body, rng.uniform(0.6, 1.0, onsets.size))
    return _repeat(rng, n, sr, group, (0.3, 1.0))


def _buzz(rng, n, sr):
    f0 = rng.uniform(80, 300)

    def burst():
        m = int(rng.uniform(0.3, 1.5) * sr)
        f = F32(f0 * (1 + 0.01 * rng.standard_normal())) * (1 + F32(0.003) * _lfo(m, sr, 3.0))
        cycles = np.cumsum(f, dtype=np.float64) / sr
        return _fade((2 * (cycles - np.floor(cycles)) - 1).astype(F32), sr, 0.01)  # (aliased) sawtooth
    return _repeat(rng, n, sr, burst, (0.05, 0.5))


def _rain(rng, n, sr):
    """Dense random droplets (impulses) over a hiss bed, both through one broad high band."""
    x = F32(0.3 * np.sqrt(12)) * (rng.random(n, dtype=F32) - F32(0.5))
    drops = rng.integers(0, n, rng.poisson(rng.uniform(40, 250) * n / sr))
    x[drops] += rng.exponential(4.0, drops.size).astype(F32) * rng.choice(F32([-1, 1]), drops.size)
    return _filtered(x, sr, _band_gain(min(_logu(rng, 2000, 6000), 0.4 * sr), 2.5))


def _siren(rng, n, sr):
    fc, depth, rate = _logu(rng, 500, 1500), rng.uniform(0.15, 0.35), rng.uniform(0.3, 1.5)
    f = F32(fc) * (1 + F32(depth) * _lfo(n, sr, rate, rng.uniform(0, 2 * np.pi)))
    return _tone(f, n, sr, (1.0, 0.4))


def _drip(rng, n, sr):
    f0, glide = _logu(rng, 500, 2000), rng.uniform(1.3, 2.0)

    def drop():
        m = int(rng.uniform(0.04, 0.1) * sr)
        return _tone(f0 * glide ** (np.arange(m) / m), m, sr) * _decay(m, sr, m / 3 / sr)
    return _repeat(rng, n, sr, drop, (0.15, 0.9))


def _engine(rng, n, sr):
    rate = rng.uniform(15, 50)
    pulses = (F32(0.5) + F32(0.5) * _lfo(n, sr, rate, np.pi / 2)) ** 4 + F32(0.1)
    return _shaped_noise(rng, n, sr, _band_gain(_logu(rng, 100, 400), 1.5)) * pulses


def _beep(rng, n, sr):
    f, dur, period = _logu(rng, 600, 3000), rng.uniform(0.05, 0.2), rng.uniform(0.25, 0.6)
    m = int(dur * sr)
    pip = _fade(_tone(f, m, sr), sr)
    return _repeat(rng, n, sr, lambda: pip, (period - dur, period - dur))


def _pattern(k: int):
    """Family of extra classes: a melody (pitch contour + rhythm) fixed per class, played at a random
    pitch and tempo per clip, so these classes differ only by their shape over time."""
    crng = np.random.default_rng([7919, k])
    n_notes = int(crng.integers(3, 7))
    semis = crng.integers(-7, 8, n_notes)
    units = crng.choice([1, 2], n_notes)
    rests = crng.choice([0, 0, 1], n_notes)
    amps = [(1.0,), (1.0, 0.5, 0.3), (1.0, 0.0, 0.33, 0.0, 0.2)][int(crng.integers(0, 3))]

    def render(rng, n, sr):
        base, unit = _logu(rng, 300, 1500), rng.uniform(0.06, 0.14)

        def phrase():
            parts = []
            for s, u, r in zip(semis, units, rests):
                m = int(u * unit * sr)
                parts.append(_fade(_tone(base * 2 ** (s / 12), m, sr, amps), sr))
                parts.append(np.zeros(int(r * unit * sr), F32))
            return np.concatenate(parts)
        return _repeat(rng, n, sr, phrase, (0.1, 0.4))
    return render


_BUILTIN = [
    ("Bell_tone", _bell_tone), ("Rising_chirp", _chirp(True)), ("Falling_chirp", _chirp(False)),
    ("Click_train", _click_train), ("Noise_burst", _noise_burst), ("Hum", _hum), ("Whistle", _whistle),
    ("Trill", _trill), ("Vibrato", _vibrato), ("Knock", _knock), ("Buzz", _buzz), ("Rain", _rain),
    ("Siren", _siren), ("Drip", _drip), ("Engine", _engine), ("Beep", _beep),
]


def _class_table(n_classes: int) -> list:
    """(name, renderer) for the first n_classes classes: the built-ins, then melody patterns."""
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    extra = [(f"Pattern_{k:03d}", _pattern(k)) for k in range(1, n_classes - len(_BUILTIN) + 1)]
    return (_BUILTIN + extra)[:n_classes]


def demo_classes(n_classes: int = 12) -> list[str]:
    """The demo vocabulary, alphabetical like sample_submission.csv's columns."""
    return sorted(name for name, _ in _class_table(n_classes))


# ----------------------------------------------------------------------------- clips

def _event_track(rng, render, n: int, sr: int, span=(0.5, 1.0)) -> np.ndarray:
    """One event, active over a random stretch (a share drawn from span) of the clip, at unit active RMS."""
    m = min(n, max(int(rng.uniform(*span) * n), int(0.3 * sr)))
    start = int(rng.integers(0, n - m + 1))
    x = _fade(render(rng, m, sr), sr)
    out = np.zeros(n, F32)
    out[start:start + m] = x / F32(_active_rms(x, sr))
    return out


def _mains(n: int, sr: int, hz: float) -> np.ndarray:
    """Mains hum: one second (a whole number of cycles) repeated."""
    return np.resize(_tone(hz, sr, sr, (1.0, 0.5, 0.3, 0.2)), n)


def _render_clip(rng, split: str, labels: list[int], seconds: float, table, sr: int) -> np.ndarray:
    """The labelled events mixed, plus the split's background and channel, at a random peak level."""
    n = max(int(round(seconds * sr)), 1)
    # in the long noisy clips the tagged sound covers less of the clip: random crops often miss it
    span = (0.2, 0.7) if split == "train_noisy" else (0.5, 1.0)
    mix = np.zeros(n, F32)
    for j, c in enumerate(labels):
        gain = 1.0 if j == 0 else 10 ** (rng.uniform(-6, 0) / 20)
        mix += _event_track(rng, table[c][1], n, sr, span) * F32(gain)
    level = _active_rms(mix, sr)
    others = [c for c in range(len(table)) if c not in labels]

    def at_db(x, db):
        return x * F32(level * 10 ** (db / 20))

    channel = 0.0
    if split == "train_noisy":  # distractors, maybe mains hum, brown-ish noise, a coloured channel
        for c in rng.choice(others, min(len(others), int(rng.integers(0, 3))), replace=False):
            mix += at_db(_event_track(rng, table[c][1], n, sr), rng.uniform(-22, -12))
        if rng.random() < 0.5:
            mix += at_db(_mains(n, sr, float(rng.choice([50.0, 60.0]))), rng.uniform(-28, -18))
        brown, snr_db, channel = rng.uniform(0.5, 1.0), rng.uniform(-3, 12), rng.uniform(-0.6, 0.6)
    elif split == "test":
        if others and rng.random() < 0.25:
            mix += at_db(_event_track(rng, table[int(rng.choice(others))][1], n, sr), rng.uniform(-25, -18))
        brown, snr_db = rng.uniform(0.2, 0.8), rng.uniform(8, 25)
    else:
        brown, snr_db = rng.uniform(0.0, 0.5), rng.uniform(30, 45)

    mix += at_db(_background(rng, n, sr, brown), -snr_db)
    if channel:  # a 2-tap recording channel: duller (> 0) or brighter (< 0) microphones
        mix[1:] += F32(channel) * mix[:-1]
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
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is ordinary shared data
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
Augmentations (random crops here, batch augmentations in `augment.py`) still differ every epoch: they act on the
stored mels.

Padding policy: a clip shorter than one crop is *repeated* (tiled) in the waveform up to the crop length before
its spectrogram is taken, so a 0.3 s door knock becomes a 4 s train of knocks rather than a knock and silence.
Training and inference use the same policy.
"""
from __future__ import annotations

import ctypes
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchaudio

from .config import Config
from .checkpoint import atomic_write_text
from .data import ClipTable, decode_report, iter_decoded
from .world import World

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
    _windows: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> np.ndarray:
        return np.array([m is not None for m in self.mels], dtype=bool)

    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.mels if m is not None)

    def windows(self, indices, crop_frames: int, step_frac: float, center_only: bool = False) -> WindowDataset:
        """The inference windows of the listed clips, built once per set of clips and window settings: the cost
        model counts them, validation, OOF and test prediction go through them."""
        indices = np.asarray(indices, dtype=np.int64)
        key = (indices.tobytes(), crop_frames, step_frac, center_only)
        if key not in self._windows:
            self._windows[key] = WindowDataset(self, indices, crop_frames, step_frac, center_only)
        return self._windows[key]

    def summary(self) -> dict:
        """Counts for the run report: clips, hours of audio, skipped files and why."""
        return dict(name=self.table.name, clips=len(self.table), hours=self.seconds / 3600,
                    skipped=len(self.errors), skipped_files=[f"{f}: {why}" for f, why in self.errors])


class ClipMel:
    """A decoded clip -> the float16 log-mel a store keeps (taken on `device`), a clip shorter than one crop tiled
    first: the one way every clip, in training and at inference, becomes its features."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.logmel = LogMel(cfg).to(self.device)
        self.min_samples = max(int(round(cfg.crop_seconds * cfg.sample_rate)), cfg.n_fft)

    @torch.inference_mode()
    def __call__(self, wave: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tile_to_length(wave, self.min_samples)).to(self.device)
        return self.logmel(x[None])[0].to(torch.float16).cpu().numpy()


def build_store(table: ClipTable, cfg: Config, device: torch.device | str = "cpu", progress: bool = True) -> MelStore:
    """Decode every clip (threads), take its log-mel on `device`, keep it as float16 on the host."""
    clip_mel = ClipMel(cfg, device)
    mels: list = [None] * len(table)
    errors, seconds, t0 = [], 0.0, time.time()
    for i, wave, err in iter_decoded(table, cfg.sample_rate, trim=cfg.trim_silence, trim_db=cfg.trim_db,
                                     progress=progress, desc=f"decode {table.name}"):
        if wave is None:
            errors.append((table.fnames[i], err))
            continue
        seconds += len(wave) / cfg.sample_rate
        mels[i] = clip_mel(wave)
    store = MelStore(table, mels, errors, seconds)
    release_free_heap()
    if errors:
        decode_report(table.name, errors)  # one warning per skipped file, then the count
    took = time.time() - t0
    log.info("%s: %d clips, %.1f min of audio -> %.0f MB of float16 log-mel in %.1f s (%.1f clips/s)%s",
             table.name, len(table), seconds / 60, store.nbytes() / 1e6, took, len(table) / max(took, 1e-9),
             f"; {len(errors)} skipped" if errors else "")
    return store


def build_shared_store(table: ClipTable, cfg: Config, device, world: World, folder: Path) -> MelStore:
    """build_store with one rank. With several, rank 0 builds the store and writes it to `folder` as one float16
    file that every rank then maps read-only, so that the OS holds one copy for all ranks (FAT2019's stores are
    ~6 GB; a Kaggle T4 x2 machine has ~29 GB of RAM)."""
    if world.size == 1:
        return build_store(table, cfg, device)
    path = Path(folder) / re.sub(r"[^A-Za-z0-9_.-]+", "_", table.name)
    if world.is_main:
        write_store(build_store(table, cfg, device), path)
        release_free_heap()
    world.barrier()
    return read_store(table, path)


def write_store(store: MelStore, path: Path) -> None:
    """The store's mels one after the other in `path`.npy, their shapes and the skipped clips in `path`.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = [None if m is None else list(m.shape) for m in store.mels]
    total = sum(m.size for m in store.mels if m is not None)
    flat = np.lib.format.open_memmap(str(path) + ".npy", mode="w+", dtype=np.float16, shape=(max(total, 1),))
    at = 0
    for m in store.mels:
        if m is not None:
            flat[at:at + m.size] = m.ravel()
            at += m.size
    flat.flush()
    del flat
    atomic_write_text(Path(str(path) + ".json"), json.dumps(dict(shapes=shapes, errors=store.errors,
                                                                 seconds=store.seconds)))


def read_store(table: ClipTable, path: Path) -> MelStore:
    """The store `write_store` wrote, each mel a view of the mapped file."""
    meta = json.loads(Path(str(path) + ".json").read_text())
    flat = np.load(str(path) + ".npy", mmap_mode="c")   # copy-on-write: shared pages, writable views
    mels, at = [], 0
    for shape in meta["shapes"]:
        if shape is None:
            mels.append(None)
            continue
        size = shape[0] * shape[1]
        mels.append(flat[at:at + size].reshape(shape))
        at += size
    return MelStore(table, mels, [tuple(e) for e in meta["errors"]], meta["seconds"])


def store_stats(store: MelStore, max_clips: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Global mean/std of the log-mel values (on a seeded sample of clips), for the model's input normalisation."""
    idx = np.flatnonzero(store.ok)
    if len(idx) == 0:
        raise ValueError(f"{store.table.name}: no decodable clip to compute statistics from")
    if len(idx) > max_clips:
        idx = np.random.default_rng(seed).choice(idx, max_clips, replace=False)
    total = total_sq = count = 0.0
    for i in idx:  # clip by clip in float64: no concatenated copy of the sample (that was ~1 GB on FAT2019)
        m = store.mels[i].astype(np.float64)
        total, total_sq, count = total + m.sum(), total_sq + np.square(m).sum(), count + m.size
    mean = total / count
    return float(mean), float(np.sqrt(max(total_sq / count - mean * mean, 0.0)) + 1e-6)


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc only): decoding leaves 16-39 % of a store's size as slack."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


@dataclass
class Clips:
    """Some clips of a store, by index: what a stage trains or validates on."""
    store: MelStore
    indices: np.ndarray
    noisy_labels: bool = False   # stage 2's noisy top-up: scored on the noisy head where the model has one

    def __post_init__(self):
        self.indices = np.asarray(self.indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> np.ndarray:
        return self.store.table.targets[self.indices]


class CropDataset(torch.utils.data.Dataset):
    """One random crop per clip per epoch (seeded generator: same seed, same crops), over one or more sets of clips
    (e.g. a curated fold's training clips and some noisy clips)."""

    def __init__(self, clips: Clips | list[Clips], crop_frames: int, seed: int = 0, head_flag: bool = False):
        self.parts = [clips] if isinstance(clips, Clips) else list(clips)
        self.head_flag = head_flag   # targets get one more column: 1 for noisy-labelled clips (losses.HeadRouter)
        self.ends = np.cumsum([len(c) for c in self.parts])
        self.length = crop_frames
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i):
        part = int(np.searchsorted(self.ends, i, side="right"))
        clips = self.parts[part]
        j = clips.indices[i - (self.ends[part - 1] if part else 0)]
        mel = clips.store.mels[j]
        start = int(self.rng.integers(0, max(mel.shape[1] - self.length, 0) + 1))
        x = torch.from_numpy(np.ascontiguousarray(crop(mel, self.length, start)))[None]
        y = clips.store.table.targets[j]
        if self.head_flag:
            y = np.append(y, np.float32(clips.noisy_labels)).astype(y.dtype)
        return x, torch.from_numpy(y)


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
''')

_add('src/fattag/losses.py', r'''
"""Multi-label losses on logits (B, C) against targets in [0, 1] (B, C); chosen per stage by name in the config.

- bce:   binary cross-entropy, the default.
- focal: BCE weighted by (1 - p_t)^gamma, so confident easy labels count less (6th place FAT2019: about even).
- lsep:  a pairwise ranking loss, log(1 + sum over (positive i, negative j) of exp(s_j - s_i)); it optimises the
         order of the scores, which is what lwlrap measures (3rd place FAT2019: +0.015 CV, faster convergence).
- lsoft: soft bootstrapping for noisy labels: BCE against beta * label + (1 - beta) * the model's own (detached)
         prediction, so a confidently contradicted noisy label is trusted less (1st place FAT2019, beta 0.7).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.losses import BCEWithLogitsLossFlat
from torch import nn

LOSSES = ("bce", "focal", "lsep", "lsoft")


class FocalBCE(nn.Module):
    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, target):
        logits, target = logits.float(), target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        return ((1 - p_t) ** self.gamma * bce).mean()


class LSEP(nn.Module):
    """Log-sum-exp pairwise ranking loss; a target >= 0.5 is a positive, below it a negative."""

    def forward(self, logits, target):
        s = logits.float()
        pos, neg = target >= 0.5, target < 0.5
        diff = s[:, None, :] - s[:, :, None]                    # [b, i, j] = s_j - s_i
        pair = pos[:, :, None] & neg[:, None, :]                # i positive, j negative
        diff = diff.masked_fill(~pair, float("-inf"))
        flat = torch.cat([torch.zeros(len(s), 1, device=s.device), diff.flatten(1)], 1)  # the "1 +" term
        return torch.logsumexp(flat, 1).mean()


class SoftBootstrap(nn.Module):
    def __init__(self, beta: float = 0.7):
        super().__init__()
        self.beta = beta

    def forward(self, logits, target):
        logits = logits.float()
        soft = self.beta * target.float() + (1 - self.beta) * torch.sigmoid(logits).detach()
        return F.binary_cross_entropy_with_logits(logits, soft)


class HeadRouter(nn.Module):
    """The loss of a model with a noisy head (model.TwoHeads): training logits are (B, 2C) and targets (B, C + 1),
    the last column saying which items carry noisy labels (features.CropDataset); a noisy item is scored on the
    noisy head's logits, any other on the main head's, so the main head receives no gradient from noisy labels.
    Validation logits and targets are (B, C) and pass straight through."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits, target):
        if logits.shape[1] == target.shape[1]:
            return self.loss(logits, target)
        c = target.shape[1] - 1
        noisy = target[:, c:] >= 0.5                            # mixed items: noisy where the noisy part dominates
        return self.loss(torch.where(noisy, logits[:, c:], logits[:, :c]), target[:, :c])


def make_loss(name: str, noisy_head: bool = False) -> nn.Module:
    """The loss `name`, routed between two heads when the model has a noisy head."""
    loss = _base_loss(name)
    return HeadRouter(loss) if noisy_head else loss


def _base_loss(name: str) -> nn.Module:
    if name == "bce":
        return BCEWithLogitsLossFlat()
    if name == "focal":
        return FocalBCE()
    if name == "lsep":
        return LSEP()
    if name == "lsoft":
        return SoftBootstrap()
    raise ValueError(f"unknown loss {name!r}: {', '.join(LOSSES)}")
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


def chance_lwlrap(truth, draws: int = 20, seed: int = 0) -> float:
    """The lwlrap that random scores get on `truth` (mean of `draws` seeded draws): the floor a model must beat."""
    truth = np.asarray(truth)
    rng = np.random.default_rng(seed)
    return float(np.mean([lwlrap(truth, rng.random(truth.shape)) for _ in range(draws)]))
''')

_add('src/fattag/model.py', r'''
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
''')

_add('src/fattag/precision.py', r'''
"""Mixed precision and the GPU check: which autocast dtype a device runs with, and whether torch can use the GPU.

The autocast dtype is a setting of the device (`cfg.amp`), not a `device.type == "cuda"` branch, so that the
same training, throughput and prediction paths run under CPU autocast (bfloat16) in tests that have no GPU.
"""
from __future__ import annotations

import torch
from fastai.callback.fp16 import MixedPrecision

from .config import Config

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_dtype(cfg: Config, device) -> torch.dtype | None:
    """The autocast dtype of `cfg.amp` on `device`: `auto` is float16 on CUDA and float32 (None) on the CPU, where
    bfloat16 is asked for with `bf16`; `off` is float32 everywhere (Config checks the name)."""
    if cfg.amp == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else None
    return AMP_DTYPES.get(cfg.amp)


def autocast(device, dtype: torch.dtype | None):
    """torch's autocast on `device` with `dtype`, or a disabled one for float32 (None)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for float16 (its range is narrow); bfloat16 has float32's range and float32 needs none."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)


class DeviceMixedPrecision(MixedPrecision):
    """fastai's MixedPrecision callback on the data's device with the given dtype: fastai 2.8 always autocasts
    for "cuda", which leaves a CPU run in float32 whatever it asks for. Everything after `before_fit` (loss
    scaling, skipped steps on overflow, float predictions) is fastai's."""

    def __init__(self, dtype: torch.dtype):
        super().__init__(amp_mode="fp16" if dtype == torch.float16 else "bf16")
        self.dtype = dtype

    def before_fit(self):
        device = self.learn.dls.device
        self.autocast, self.learn.scaler = autocast(device, self.dtype), grad_scaler(device, self.dtype)
        self.scales = []


def unsupported_gpu(name: str, capability: tuple[int, int], arch_list: list[str]) -> str | None:
    """Why this torch build cannot run on the GPU (`name`, compute capability `capability`), or None when it can.

    A build runs on a GPU when it ships kernels for its capability (`sm_XY` in `torch.cuda.get_arch_list()`), or
    PTX (`compute_XY`) of an equal or lower capability of the same major version that the driver can compile.
    Kaggle's torch 2.10 is a CUDA 12.8 build from sm_70 up: the retired P100 (6.0) is not among them.
    """
    major, minor = capability
    sm = [tuple(divmod(int(a.split("_")[1]), 10)) for a in arch_list if a.startswith("sm_")]
    ptx = [tuple(divmod(int(a.split("_")[1]), 10)) for a in arch_list if a.startswith("compute_")]
    if (major, minor) in sm or any(p[0] == major and p <= (major, minor) for p in ptx):
        return None
    oldest = min(sm, default=(7, 0))
    return (f"this torch {torch.__version__} (CUDA {torch.version.cuda}) has no kernels for the GPU {name} "
            f"(compute capability {major}.{minor}; built for {', '.join(arch_list) or 'no GPU'}). On Kaggle choose "
            f"the accelerator 'GPU T4 x2' (capability 7.5) in the notebook's settings; elsewhere use a GPU of "
            f"capability {oldest[0]}.{oldest[1]} or newer, or run on the CPU with CUDA_VISIBLE_DEVICES=''.")


def check_device(device) -> None:
    """Stop with one clear error when the device is a GPU this torch build cannot run on (before any training)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    index = device.index or 0
    why = unsupported_gpu(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index),
                          torch.cuda.get_arch_list())
    if why:
        raise SystemExit(f"error: {why}")
''')

_add('src/fattag/predict.py', r'''
"""Whole-clip inference: every window of every clip, batched on the device, aggregated per clip.

The seed predicted from four random 2-second crops, so most of a long clip was never seen; sliding windows that
cover every frame (the winners' choice) look at all of it. Optional augmented passes add light SpecAugment.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from .augment import spec_augment
from .config import Config
from .features import MelStore, aggregate_windows
from .model import input_mean, to_device
from .precision import amp_dtype, autocast
from .progress import progress
from .submission import fill_missing, write_submission
from .weights import save_inference
from .world import SINGLE, World

log = logging.getLogger("fattag")


@torch.inference_mode()
def predict_clips(model: torch.nn.Module, store: MelStore, indices, cfg: Config, device="cpu",
                  aug_passes: int = 0, center_only: bool = False, batch_size: int | None = None,
                  seed: int = 0, desc: str | None = None) -> np.ndarray:
    """Probabilities (len(indices), C) for the listed clips of `store`; clips must be decodable.

    Default: all windows of each clip (whole-clip TTA) plus `aug_passes` augmented passes; `center_only` scores
    one centred window per clip instead (the no-TTA baseline). With `desc`, progress is shown in windows.
    """
    device = torch.device(device)
    indices = np.asarray(indices)
    ds = store.windows(indices, cfg.crop_frames, cfg.tta_step_frac, center_only=center_only)
    bs = batch_size or max(cfg.batch_size * 2, 8)
    model = to_device(model, device, cfg.channels_last).eval()
    clip_of = torch.from_numpy(ds.clip_of).to(device)
    dtype = amp_dtype(cfg, device)
    passes = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # augmented passes are reproducible and leave the training RNG untouched
        for p in range(1 + aug_passes):
            probs = []
            batches = range(0, len(ds), bs)
            bar = progress(batches, desc=f"{desc} pass {p + 1}/{1 + aug_passes}" if desc else "", unit="batch",
                           disable=desc is None)
            for start in bar:
                x = torch.stack([ds[w][0] for w in range(start, min(start + bs, len(ds)))]).to(device)
                if p > 0:
                    x = tta_augment(x, cfg, fill=input_mean(model))
                with autocast(device, dtype):
                    probs.append(torch.sigmoid(model(x).float()))
            window_probs = torch.cat(probs) if probs else torch.zeros(0, n_outputs(model), device=device)
            passes.append(aggregate_windows(window_probs, clip_of, len(indices), cfg.tta_aggregate))
    return torch.stack(passes).mean(0).cpu().numpy().astype(np.float64)


def tta_augment(x: torch.Tensor, cfg: Config, fill: float) -> torch.Tensor:
    """The light augmentation of an augmented TTA pass: one time and one frequency stripe, half the training width."""
    return spec_augment(x, 1, int(x.shape[-1] * cfg.time_mask_frac / 2), 1, int(x.shape[-2] * cfg.freq_mask_frac / 2),
                        fill)


def n_outputs(model: torch.nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features


def ensemble(fold_probs: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """Combine per-fold probabilities: arithmetic mean, or geometric mean (rewards agreement between folds)."""
    stack = np.stack(fold_probs)
    if how == "mean":
        return stack.mean(0)
    if how == "geomean":
        return np.exp(np.log(np.clip(stack, 1e-7, 1.0)).mean(0))
    raise ValueError(f"unknown fold ensemble {how!r}: mean or geomean")


def predict_test(models: list, store: MelStore, cfg: Config, device, aug_passes: int,
                 world: World = SINGLE, folds: list | None = None, desc: str | None = "predict test") -> np.ndarray:
    """Fold-ensembled whole-clip probabilities for every clip of `store`; NaN rows for clips that could not be
    decoded. No class balancing (a submission's step: predict_and_submit). `folds`: the fold id of each of `models`
    (default: their positions), the order the ensemble takes them in. With several ranks, `models` are this rank's:
    every rank's predictions are gathered and ensembled in fold order. `desc` None: no progress bar, and each
    model's timing at debug level (a caller predicting many small sets reports its own progress)."""
    folds = list(range(len(models))) if folds is None else folds
    idx = np.flatnonzero(store.ok)
    n_windows = len(store.windows(idx, cfg.crop_frames, cfg.tta_step_frac))
    per_fold = []
    for k, model in enumerate(models):
        t0 = time.time()
        probs = predict_clips(model, store, idx, cfg, device, aug_passes=aug_passes,
                              desc=desc and f"{desc}, model {k + 1}/{len(models)}")
        took = time.time() - t0
        (log.info if desc else log.debug)(
            "%s, model %d/%d: %d clips, %d windows x %d passes in %.1f s (%.1f clips/s, %.0f windows/s)",
            desc or "predictions", k + 1, len(models), len(idx), n_windows, 1 + aug_passes, took,
            len(idx) / max(took, 1e-9), n_windows * (1 + aug_passes) / max(took, 1e-9))
        full = np.full((len(store.mels), probs.shape[1]), np.nan)
        full[idx] = probs
        per_fold.append((folds[k], full))
    gathered = sorted((p for rank in world.gather(per_fold) for p in rank), key=lambda p: p[0])
    return ensemble([p for _, p in gathered], cfg.fold_ensemble)


BALANCE_MIN_CLIPS = 50  # fewer test clips than this: a class's mean score says too little to correct it by


def balance_classes(probs: np.ndarray) -> np.ndarray:
    """Each class's scores divided by its mean score over the test clips, then one common scale into [0, 1].

    lwlrap ranks the classes of each clip, so a class the model scores high everywhere (a bias from its training
    sources, the noisy set's label mix or the mixing) outranks the true labels of many clips. Dividing by the
    class's mean over the test set ranks p(class | clip) / p(class) instead: the evidence this clip adds. It assumes
    no class dominates the test set, as in FAT2019's test set; it needs no labels."""
    if len(probs) < BALANCE_MIN_CLIPS:
        log.info("class balancing skipped: %d test clips (needs %d)", len(probs), BALANCE_MIN_CLIPS)
        return probs
    ratio = probs / np.maximum(probs.mean(0, keepdims=True), 1e-12)
    return ratio / max(float(ratio.max()), 1e-12)


def predict_and_submit(run, cfg: Config, data, models: list, test: MelStore, prior: np.ndarray,
                       folds: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fold-ensembled whole-clip TTA on every test clip with `cfg`'s inference settings (written to
    inference.json), then submission.csv: a row for every clip (the class prior where a clip could not be decoded,
    or where no model was trained in time). `folds`: the fold id of each of this rank's `models` (predict_test).
    Returns the probabilities written and the ensemble's probabilities before class balancing (NaN rows for clips
    that could not be decoded), which show the model's own bias."""
    t0 = time.time()
    if sum(run.world.gather(len(models))):
        unbalanced = predict_test(models, test, cfg, run.device, cfg.tta_aug_passes, run.world, folds)
        probs = unbalanced.copy()
        if cfg.class_balance:
            probs[test.ok] = balance_classes(unbalanced[test.ok])
        probs = fill_missing(probs, test.ok, prior)
    else:
        probs = unbalanced = np.tile(prior, (len(data.test), 1))
        log.error("NO MODEL WAS TRAINED IN TIME: submission.csv holds class priors only")
    if run.world.is_main:
        write_submission(run.work_dir / "submission.csv", data.sample_submission, data.test.fnames, data.classes,
                         probs)
        save_inference(run.work_dir, cfg)
    run.record("predict test", time.time() - t0)
    return probs, unbalanced


def submit_fold_models(run, data, folds, test: MelStore, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The test step of a training run: this rank's fold models (`folds`, train.FoldsResult, after the pseudo-label
    round) predict every test clip with as many augmented passes as the time left allows (budget.test_passes for
    all the trained folds; rank 0's decision on every rank), then submission.csv (predict_and_submit, whose two
    results it returns)."""
    passes = run.world.broadcast(run.budget.test_passes(len(folds.results)))
    return predict_and_submit(run, replace(run.cfg, tta_aug_passes=passes), data, folds.models, test, prior,
                              folds.model_folds)
''')

_add('src/fattag/progress.py', r'''
"""Progress reporting that suits both a terminal and a log file.

On a terminal (stderr is a TTY) `progress` draws a tqdm bar. Anywhere else (Kaggle kernel logs,
`nohup`, CI) tqdm's carriage-return redraws turn into floods of half-lines, so it writes plain
lines instead, at most one every `interval` seconds plus a final one:

    decode train_noisy: 5000/19815 clips (25%) 130.2 clips/s, eta 1m54s, MB/s=12.1
    decode train_noisy: 19815/19815 clips (100%) in 2m32s, 130.4 clips/s, MB/s=12.3

The lines go through the `fattag` logger when the package's logging is set up (it then carries
handlers, see `context.setup_logging`), and straight to stderr otherwise, so that progress is never
silently dropped by an unconfigured logger.
"""
from __future__ import annotations

import logging
import math
import sys
import time

__all__ = ["Progress", "fmt_seconds", "progress"]

log = logging.getLogger("fattag")

DEFAULT_INTERVAL = 30.0


def fmt_seconds(s) -> str:
    """A short human duration: '12.3s', '3m05s', '1h02m' ('?' for None, NaN or negative)."""
    if s is None:
        return "?"
    s = float(s)
    if not math.isfinite(s) or s < 0:
        return "?"
    if round(s, 1) < 60:
        return f"{s:.1f}s"
    whole = int(round(s))
    if whole < 3600:
        m, sec = divmod(whole, 60)
        return f"{m}m{sec:02d}s"
    h, m = divmod(int(round(s / 60)), 60)
    return f"{h}h{m:02d}m"


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _plural(unit: str) -> str:
    if unit == "it" or unit.endswith("s"):
        return unit
    return unit + ("es" if unit.endswith(("x", "sh", "tch")) else "s")


class Progress:
    """Iterable progress tracker; `set_postfix(**kw)` adds `k=v` fields to the lines (and the bar).

    Use it as `for x in progress(items, ...)`, or without an iterable through `update(n)` and
    `close()` (also a context manager). `close()` writes the final line once; it runs by itself
    when the iteration ends or is abandoned.
    """

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it", interval=None,
                 disable: bool = False, tty: bool | None = None):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.interval = DEFAULT_INTERVAL if interval is None else float(interval)
        self.disable = disable
        self.n = 0
        self.postfix: dict = {}
        self.closed = False
        self.start = self._last = time.perf_counter()
        self._bar = None
        if not disable and (_stderr_is_tty() if tty is None else tty):
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc or None, unit=unit, file=sys.stderr, dynamic_ncols=True)

    # ---- counting ----
    def __iter__(self):
        if self.iterable is None:
            raise TypeError("this Progress has no iterable; use update() and close()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("Progress of unknown total has no len()")
        return int(self.total)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self.closed:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.total is not None and self.n >= self.total:
            return  # the final line, written by close(), follows
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(self.line())

    def set_postfix(self, **kw) -> None:
        """Fields shown after the rate, e.g. `set_postfix(**{"MB/s": "12.3", "skipped": 2})`."""
        self.postfix.update(kw)
        if self._bar is not None:
            self._bar.set_postfix(ordered_dict={k: v for k, v in self.postfix.items()}, refresh=False)

    def close(self) -> None:
        """Finish: close the bar, or write the final plain line (once)."""
        if self.closed:
            return
        self.closed = True
        if self.disable:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._emit(self.line(final=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---- plain lines ----
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def line(self, final: bool = False) -> str:
        """The plain-text status: counts, percent, rate, eta (or total time when final), postfix."""
        elapsed = self.elapsed()
        rate = self.n / elapsed if elapsed > 0 else 0.0
        units = _plural(self.unit)
        if self.total:
            count = f"{self.n}/{self.total} {units} ({100.0 * self.n / self.total:.0f}%)"
        else:
            count = f"{self.n} {units}"
        if final:
            stopped = self.total is not None and self.n < self.total
            parts = [f"{'stopped at ' if stopped else ''}{count} in {fmt_seconds(elapsed)}", f"{rate:.1f} {units}/s"]
        else:
            parts = [f"{count} {rate:.1f} {units}/s"]
            if self.total and rate > 0:
                parts.append(f"eta {fmt_seconds((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        text = ", ".join(parts)
        return f"{self.desc}: {text}" if self.desc else text

    @staticmethod
    def _emit(line: str) -> None:
        line = line.replace("\r", " ")
        if log.handlers:  # the package's logging is configured: one log line
            log.info(line)
        else:             # nobody set up logging: stderr, so the line is not lost
            print(line, file=sys.stderr, flush=True)


def progress(iterable=None, total=None, desc: str = "", unit: str = "it", interval=None,
             disable: bool = False) -> Progress:
    """Wrap `iterable` with a tqdm bar on a TTY or plain throttled lines elsewhere; see `Progress`.

    `interval` is the least number of seconds between plain lines (default 30); a final line is
    always written. `disable=True` counts silently.
    """
    return Progress(iterable, total=total, desc=desc, unit=unit, interval=interval, disable=disable)
''')

_add('src/fattag/pseudo.py', r'''
"""Test pseudo-labels: the fold ensemble labels the test clips, then every fold model trains on them as well.

The test clips come from sources no training clip uses (other sample banks, game packages, speakers), and that
shift is most of what the models lose on them (OOF 0.95, test 0.65-0.70 on realdev). One round of self-training
lets each model hear those sources: the ensemble's plain (unaugmented) predictions give every test clip its top
class (after class balancing, as the submission ranks them) plus any class scored at least `pseudo_threshold`;
then each fold model trains `pseudo_epochs` more epochs on its own training clips plus the labelled test clips,
with stage 2's augmentation (`cfg.curated`) and validation (its fold; the best epoch is kept). No test label is
ever read: this is transductive learning, which a Kaggle kernel may do because it holds the test audio. Under a
time budget the round gets only the time the rest of the recipe leaves (budget.py). Measured on realdev:
docs/ablation.md.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time

import numpy as np
import pandas as pd

from .checkpoint import atomic_write
from .context import Run
from .data import ClipTable
from .features import Clips, MelStore
from .predict import balance_classes, predict_test
from .splits import TrainingData
from .stage import StageSpec, finish_stage, fit_stage
from .stages import ROUND_STAGE
from .train import FoldsResult
from .weights import model_meta, stage_recipe

log = logging.getLogger("fattag")


def pseudo_labels(probs: np.ndarray, threshold: float, balance: bool) -> np.ndarray:
    """Targets (n, C) float32: 1 for each clip's top class (by the class-balanced scores when `balance`) and for
    every class whose probability is at least `threshold`; 0 for the others."""
    labels = (probs >= threshold).astype(np.float32)
    ranked = balance_classes(probs) if balance else probs
    labels[np.arange(len(probs)), ranked.argmax(1)] = 1.0
    return labels


def labelled_test(test: MelStore, labels: np.ndarray) -> Clips:
    """The decodable test clips with `labels` (one row per decodable clip, in store order) as their targets."""
    ok = np.flatnonzero(test.ok)
    targets = np.zeros((len(test.table), labels.shape[1]), dtype=np.float32)
    targets[ok] = labels
    table = ClipTable(f"{test.table.name} (pseudo-labelled)", test.table.fnames, test.table.paths, targets)
    return Clips(MelStore(table, test.mels, test.errors, test.seconds), ok)


def pseudo_label_round(run: Run, d: TrainingData, folds: FoldsResult, test: MelStore) -> FoldsResult:
    """`folds` with this rank's fold models after their pseudo-label epochs (the models as they were where a round is
    off or not possible) and their rows updated; the labels go to pseudo_labels.csv in the work dir. With several
    ranks the teacher's predictions are gathered from all of them and each rank trains its own fold models."""
    models, n_models = folds.models, len(folds.results)
    if run.cfg.test_round_epochs <= 0:
        if run.cfg.pseudo_epochs > 0:
            log.info("test pseudo-labels off: train_on_test=false keeps the test audio out of training")
        return folds
    epochs = run.world.broadcast(run.budget.pseudo_epochs(n_models))
    if not n_models or epochs <= 0 or not test.ok.any():
        log.info("test pseudo-labels skipped (%s)", "no fold model" if not n_models else
                 "no time for an epoch" if epochs <= 0 else "no decodable test clip")
        return folds
    t0, cfg = time.time(), run.cfg
    probs = predict_test(models, test, cfg, run.device, aug_passes=0, world=run.world,   # before any balancing
                         folds=folds.model_folds)[test.ok]
    labels = pseudo_labels(probs, cfg.pseudo_threshold, cfg.class_balance)
    if run.world.is_main:
        write_labels(run.work_dir / "pseudo_labels.csv", test, labels, d.classes)
    log.info("test pseudo-labels: %d clips, %.2f labels per clip (top class + probability >= %.2f); %d epochs "
             "per fold model", len(labels), (labels >= 1).sum(1).mean(), cfg.pseudo_threshold, epochs)
    pseudo = labelled_test(test, labels)
    row_of = {row["fold"]: row for row in folds.results}
    out = [train_on_pseudo(run, d, row_of[k], model, pseudo, epochs, n_models)
           for k, model in zip(folds.model_folds, models)]
    for rows in run.world.gather({k: row_of[k] for k in folds.model_folds}):   # the ranks' rows, updated
        for k, row in rows.items():
            row_of[k].update(row)
    run.record(ROUND_STAGE, time.time() - t0)
    return dataclasses.replace(folds, models=out)


def train_on_pseudo(run: Run, d: TrainingData, row: dict, model, pseudo: Clips, epochs: int, n_models: int):
    """Fold `row['fold']`'s model trained on its training clips, a noisy top-up and the pseudo-labelled test clips,
    with stage 2's loss and augmentation at the round's learning rate."""
    cfg, k = run.cfg, row["fold"]
    spec = StageSpec.for_stage(run, cfg.curated, f"fold {k} + test pseudo-labels",
                               run.work_dir / f"fold{k}" / "pseudo", epochs, cfg.seed + 3000 + k)
    spec = dataclasses.replace(spec, lr=cfg.lr_pseudo, recipe=stage_recipe(cfg, run.data_dir, pseudo_round=True))
    student = copy.deepcopy(model)   # the stage-2 model stays as it is if the round fails
    done = spec.stage_dir.finished()
    if done is not None:
        student.load_state_dict(done[1])
        return student
    train, valid = d.fold_training(k, cfg.curated.top_up, spec.seed)
    parts = [*train, pseudo]   # stage 2's training sets of this fold, plus the pseudo-labelled test clips
    res = fit_stage(student, parts, valid, spec, run.budget.pseudo_deadline(k, n_models))
    run.budget.measured("pseudo_epoch", res.seconds, len(res.history))
    if not res.usable:
        log.warning("fold %d: the pseudo-label epochs produced no usable weights; its stage-2 model is kept", k)
        return model
    finish_stage(spec, student, res, model_meta(cfg, d.classes, stage="pseudo", fold=k))
    row.update(pseudo_lwlrap=res.best_score, pseudo_epoch=res.best_epoch)
    log.info("fold %d after the pseudo-label epochs: best lwlrap %.4f at epoch %d (stage 2: %.4f)", k,
             res.best_score, res.best_epoch, row["best_lwlrap"])
    return student


def write_labels(path, test: MelStore, labels: np.ndarray, classes: list[str]) -> None:
    names = np.array(classes)
    rows = [(test.table.fnames[i], ",".join(names[lab >= 1])) for i, lab in zip(np.flatnonzero(test.ok), labels)]
    atomic_write(path, lambda tmp: pd.DataFrame(rows, columns=["fname", "labels"]).to_csv(tmp, index=False))
''')

_add('src/fattag/report.py', r'''
"""End-of-run report: `<work_dir>/report.md` with PNG figures beside it.

`write_report` gathers what a run already has in hand (dataset summary, stage timings, fold scores,
out-of-fold and test probabilities) plus the per-epoch histories the trainer wrote
(`stage1/history.csv`, `fold{k}/history.csv`) into one readable Markdown page. Each section is one
small function that returns Markdown lines; a section whose inputs are missing says so in one line,
and a section that fails on odd inputs is replaced by a one-line note (and a log warning), so the
report never costs a finished run.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import atomic_write, atomic_write_text
from .metrics import per_class_lwlrap
from .progress import fmt_seconds
from .thresholds import MIN_POSITIVES, threshold_scores

__all__ = ["write_report"]

log = logging.getLogger("fattag")

REPORT_NAME = "report.md"
MAX_SKIPPED_LISTED = 20
DASH = "–"


# ---------------------------------------------------------------- small formatting helpers

def _cell(value) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
    return f"`{str(value).replace('`', '')}`"


def _num(value, fmt: str = ".4f") -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DASH
    return format(value, fmt) if math.isfinite(value) else DASH


def _secs(value) -> str:
    return DASH if value is None else fmt_seconds(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


class _Figures:
    """Saves numbered figures beside the report and returns their Markdown (image + caption line)."""

    def __init__(self, work_dir: Path, plt):
        self.work_dir, self.plt, self.count = work_dir, plt, 0

    def save(self, fig, name: str, caption: str) -> list[str]:
        self.count += 1
        try:
            atomic_write(self.work_dir / name, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        finally:
            self.plt.close(fig)
        return [f"![Figure {self.count}]({name})", "", f"*Figure {self.count}: {caption}*"]


# ---------------------------------------------------------------- sections

def _header(mode: str, work_dir: Path, classes: list[str], test_audio: str | None = None) -> list[str]:
    title = "training run" if mode == "train" else "prediction run"
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return [f"# fattag report: {title}", "",
            f"Generated {when} in {_code(work_dir)}; {len(classes)} classes."
            + (f" Test audio {test_audio}." if test_audio else "")]


def _dataset_section(dataset: dict | None) -> list[str]:
    if not dataset:
        return ["No dataset summary was recorded."]
    lines = []
    if dataset.get("data_dir") is not None:
        demo = " (synthetic demo data)" if dataset.get("demo") else ""
        lines += [f"Data: {_code(dataset['data_dir'])}{demo}", ""]
    sets = dataset.get("sets") or []
    if not sets:
        return lines + ["No clip sets were recorded."]
    rows, skipped_files = [], []
    tot_clips = tot_hours = tot_skipped = 0.0
    for s in sets:
        files = list(s.get("skipped_files") or [])
        skipped = s.get("skipped", len(files))
        rows.append([_code(s.get("name", "?")), s.get("clips", DASH), _num(s.get("hours"), ".2f"), skipped])
        skipped_files += [f"{s.get('name', '?')}/{f}" for f in files]
        tot_clips += float(s.get("clips") or 0)
        tot_hours += float(s.get("hours") or 0)
        tot_skipped += float(skipped or 0)
    rows.append(["**total**", int(tot_clips), f"{tot_hours:.2f}", int(tot_skipped)])
    lines += _table(["set", "clips", "hours", "skipped"], rows)
    if skipped_files:
        lines += ["", f"Skipped files ({len(skipped_files)}):", ""]
        lines += [f"- {_cell(f)}" for f in skipped_files[:MAX_SKIPPED_LISTED]]
        if len(skipped_files) > MAX_SKIPPED_LISTED:
            lines.append(f"- ... and {len(skipped_files) - MAX_SKIPPED_LISTED} more")
    elif tot_skipped:
        lines += ["", f"{int(tot_skipped)} file(s) skipped; their names were not recorded."]
    else:
        lines += ["", "No file was skipped."]
    return lines


def _loaded_section(loaded: list[str] | None) -> list[str]:
    if not loaded:
        return ["No weight files were recorded."]
    return [f"{len(loaded)} weight file(s):", ""] + [f"- {_cell(item)}" for item in loaded]


def _budget_section(use: dict | None) -> list[str]:
    """Where the budget went: used and unused seconds, why the rest could not be used, what was cut or re-planned."""
    if not use:
        return ["The run had no time budget: every step ran the requested recipe."]
    lines = [f"Used {_secs(use['used_s'])} of {_secs(use['usable_s'])} usable (the budget less its safety margin); "
             f"{_secs(use['unused_s'])} ({use['unused_share']:.0%}) unused: {use['why']}."]
    notes = use.get("notes") or []
    return lines + ([""] + [f"- {_cell(n)}" for n in notes] if notes else ["", "Nothing was cut or re-planned."])


def _timings_section(timings: list[dict] | None) -> list[str]:
    if not timings:
        return ["No stage timings were recorded."]
    rows, tot_plan, tot_act, tot_diff, any_plan = [], 0.0, 0.0, 0.0, False
    for t in timings:
        planned, actual = t.get("planned_s"), t.get("actual_s")
        diff = DASH
        if planned is not None and actual is not None:
            delta = float(actual) - float(planned)
            diff = ("+" if delta >= 0 else "-") + fmt_seconds(abs(delta))
            tot_plan, tot_diff, any_plan = tot_plan + float(planned), tot_diff + delta, True
        tot_act += float(actual or 0)
        rows.append([t.get("stage", "?"), _secs(planned), _secs(actual), diff])
    total_diff = (("+" if tot_diff >= 0 else "-") + fmt_seconds(abs(tot_diff))) if any_plan else DASH
    rows.append(["**total**", fmt_seconds(tot_plan) if any_plan else DASH, fmt_seconds(tot_act), total_diff])
    lines = _table(["stage", "planned", "actual", "actual - planned"], rows)
    if any_plan and len([t for t in timings if t.get("planned_s") is not None]) < len(timings):
        lines += ["", "Planned totals cover only the stages that had a plan."]
    return lines


def _folds_section(folds: list[dict] | None) -> list[str]:
    if not folds:
        return ["No fold results were recorded."]
    ranks = len({f.get("rank", 0) for f in folds}) > 1   # several ranks trained them: say which
    rows = [[f.get("fold", DASH), _num(f.get("best_lwlrap")), f.get("best_epoch", DASH),
             f.get("epochs_run", DASH), _secs(f.get("seconds"))] + ([f.get("rank", DASH)] if ranks else [])
            for f in folds]
    best = np.array([float(f["best_lwlrap"]) for f in folds if f.get("best_lwlrap") is not None], dtype=float)
    if best.size:
        rows.append(["**mean ± sd**", f"{best.mean():.4f} ± {best.std():.4f}", "", "", ""] + ([""] if ranks else []))
    return _table(["fold", "best lwlrap", "best epoch", "epochs run", "time"] + (["rank"] if ranks else []), rows)


_SCORE_NAMES = [("oof_center", "centre crop"), ("oof_windows", "whole-clip windows"),
                ("oof_tta", "whole clip + augmented passes (TTA)")]


def _stage1_section(stage1: dict | None) -> list[str]:
    if not stage1:
        return ["Stage 1 did not train in this run (skipped, or reused from an earlier run in the same work dir)."]
    per_epoch = " ".join(DASH if v is None else f"{v:.3f}" for v in stage1.get("per_epoch", []))
    best, chance = stage1.get("best"), stage1.get("chance")
    lines = [f"Noisy-holdout lwlrap per epoch: {per_epoch}", "",
             f"Best {_num(best, '.3f')}; random scores get {_num(chance, '.3f')} on the same clips."]
    if best is None or chance is None or not best > chance + 0.05:
        lines += ["", "**Warning: stage 1 stayed near chance on its holdout: it learned little from the noisy set "
                      "(too few epochs, too high a learning rate, or labels too noisy).**"]
    return lines


def _scores_section(scores: dict | None) -> list[str]:
    if not scores:
        return ["No out-of-fold scores were recorded."]
    rows = [[label, _num(scores.get(key))] for key, label in _SCORE_NAMES]
    rows += [[key, _num(value)] for key, value in scores.items() if key not in dict(_SCORE_NAMES)]
    return ["Out-of-fold lwlrap over the clips of the K-fold split, each predicted by the fold model that "
            "did not train on it:", ""] + _table(["prediction", "OOF lwlrap"], rows)


def _histories(work_dir: Path) -> tuple[list[tuple[str, pd.DataFrame]], list[str]]:
    """[(label, numeric history frame)] for stage 1 and every fold, and notes on unreadable files."""
    found = []
    if (work_dir / "stage1" / "history.csv").is_file():
        found.append(("stage 1", work_dir / "stage1" / "history.csv"))
    fold_files = []
    for path in work_dir.glob("fold*/history.csv"):
        m = re.fullmatch(r"fold(\d+)", path.parent.name)
        if m:
            fold_files.append((int(m.group(1)), path))
    found += [(f"fold {k}", path) for k, path in sorted(fold_files)]
    runs, notes = [], []
    for label, path in found:
        try:
            df = pd.read_csv(path)
        except Exception as e:  # noqa: BLE001 - one bad file must not hide the others
            notes.append(f"{path.relative_to(work_dir)} could not be read ({type(e).__name__}).")
            continue
        df = df.apply(pd.to_numeric, errors="coerce")
        if "epoch" not in df.columns:
            df["epoch"] = np.arange(1, len(df) + 1)
        if len(df):
            runs.append((label, df))
        else:
            notes.append(f"{path.relative_to(work_dir)} has no epochs.")
    return runs, notes


def _curves_section(work_dir: Path, figs: _Figures) -> list[str]:
    runs, notes = _histories(work_dir)
    if not runs:
        return ["No training histories found (looked for stage1/history.csv and fold*/history.csv)."] + notes
    fig, (ax_loss, ax_score) = figs.plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, df) in enumerate(runs):
        color = f"C{i % 10}"
        labelled = False  # one legend entry per run; the title says which line style is which loss
        for column, style in (("train_loss", "-"), ("valid_loss", "--")):
            if column in df and df[column].notna().any():
                ax_loss.plot(df["epoch"], df[column], style, marker=".", color=color,
                             label=None if labelled else label)
                labelled = True
        if "lwlrap" in df and df["lwlrap"].notna().any():
            ax_score.plot(df["epoch"], df["lwlrap"], "-", marker=".", color=color, label=label)
            best = df["lwlrap"].idxmax()
            ax_score.plot([df.loc[best, "epoch"]], [df.loc[best, "lwlrap"]], "o", color=color, markersize=7)
    ax_loss.set(title="Loss per epoch (solid: train, dashed: validation)", xlabel="epoch", ylabel="loss")
    ax_score.set(title="Validation lwlrap per epoch (dot: best epoch)", xlabel="epoch", ylabel="lwlrap")
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2 if len(runs) > 4 else 1)
    fig.tight_layout()
    names = ", ".join(label for label, _ in runs)
    caption = (f"training curves per epoch for {names}: train and validation loss (left) and validation "
               f"lwlrap with each run's best epoch marked (right).")
    return figs.save(fig, "report_curves.png", caption) + ([""] + notes if notes else [])


def _check_probs(name: str, probs, n_classes: int, truth=None) -> tuple[np.ndarray | None, str | None]:
    """(float array, None) or (None, a one-line reason the array cannot be used)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        return None, f"{name} has shape {probs.shape}, not (clips, {n_classes} classes); section skipped."
    if truth is not None and np.shape(truth) != probs.shape:
        return None, f"OOF truth {np.shape(truth)} and {name} {probs.shape} differ in shape; section skipped."
    if probs.shape[0] == 0:
        return None, f"{name} has no rows; section skipped."
    return probs, None


def _per_class_section(classes: list[str], oof_truth, oof_probs, figs: _Figures) -> list[str]:
    if oof_truth is None or oof_probs is None:
        return ["No out-of-fold predictions were passed, so there is no per-class lwlrap."]
    probs, problem = _check_probs("OOF probabilities", oof_probs, len(classes), oof_truth)
    if problem:
        return [problem]
    truth = np.asarray(oof_truth)
    if not (truth > 0).any():
        return ["The OOF truth has no positive label, so per-class lwlrap is undefined."]
    ap, weights = per_class_lwlrap(truth, probs)
    positives = (truth > 0).sum(axis=0)
    overall = float(np.nansum(ap * weights))
    valid = np.flatnonzero(~np.isnan(ap))
    order = valid[np.argsort(ap[valid], kind="stable")]  # worst first
    k = len(order)
    fig, ax = figs.plt.subplots(figsize=(8, min(max(3.0, 0.2 * k + 1.5), 30)))
    ax.barh(np.arange(k), ap[order], color="C0")
    ax.axvline(overall, color="C3", linestyle="--")
    ax.set_yticks(np.arange(k))
    ax.set_yticklabels([classes[i] for i in order], fontsize=7 if k > 30 else 9)
    ax.set_ylim(k - 0.5, -0.5)  # worst at the top, no empty margins
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set(xlim=(0, 1.25), xlabel="lwlrap of the class (label-ranking average precision)", ylabel="class",
           title=f"Per-class OOF lwlrap, worst first (dashed: overall {overall:.4f})")
    for y, i in enumerate(order):  # a column of "value (positives)" right of the axis' 1.0
        ax.text(1.02, y, f"{ap[i]:.2f} (n={positives[i]})", va="center", fontsize=6 if k > 30 else 8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    lines = [f"OOF lwlrap from these probabilities: {overall:.4f} (the class-weighted sum of the values below).", ""]
    lines += figs.save(fig, "report_per_class.png",
                       f"per-class OOF lwlrap of {k} classes, sorted worst first (bar label: value and number "
                       f"of positive clips); the dashed line is the overall lwlrap.")
    lines += ["", "Worst classes:", ""]
    lines += _table(["class", "lwlrap", "positives", "weight"],
                    [[_code(classes[i]), f"{ap[i]:.4f}", int(positives[i]), f"{weights[i]:.4f}"] for i in order[:10]])
    missing = [classes[i] for i in np.flatnonzero(np.isnan(ap))]
    if missing:
        lines += ["", f"{len(missing)} class(es) have no positive OOF clip and no score: "
                  + ", ".join(_code(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")]
    return lines


def class_means(probs: np.ndarray, truth=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Each class's mean test probability and, given the training clips' targets, its label frequency among them."""
    freq = None
    if truth is not None:
        truth = np.asarray(truth)
        if truth.ndim == 2 and truth.shape[1] == probs.shape[1] and len(truth):
            freq = (truth > 0).mean(axis=0)
    return probs.mean(axis=0), freq


def _predictions_section(classes: list[str], test_probs, figs: _Figures, oof_truth=None) -> list[str]:
    if test_probs is None:
        return ["No test predictions were passed."]
    probs, problem = _check_probs("test probabilities", test_probs, len(classes))
    if problem:
        return [problem]
    predicted = np.isfinite(probs).all(axis=1)   # a clip that could not be decoded has no probabilities
    if not predicted.any():
        return ["No test clip was predicted (none could be decoded); section skipped."]
    left_out = int((~predicted).sum())
    probs = probs[predicted]
    top = probs.max(axis=1)
    top1 = np.bincount(probs.argmax(axis=1), minlength=len(classes))
    common = np.argsort(-top1, kind="stable")[:5]
    lines = [f"{len(probs)} test clips"
             + (f" ({left_out} that could not be decoded left out)" if left_out else "")
             + ", the fold ensemble's probabilities before any class balancing (the model's own view; a balanced "
               "submission ranks them divided by each class's mean). "
             f"Highest class probability per clip: median {np.median(top):.3f}, "
             f"{(top < 0.5).mean():.1%} of clips below 0.5. Expected labels per clip (row sum): "
             f"{probs.sum(axis=1).mean():.2f}. Range of all probabilities: [{probs.min():.3g}, {probs.max():.3g}].",
             "",
             "Most frequent top-1 classes: " + ", ".join(f"{_code(classes[i])} ({top1[i]})" for i in common)
             + f"; {int((top1 == 0).sum())} class(es) are never top-1.", ""]

    fig, ax = figs.plt.subplots(figsize=(7, 4))
    ax.hist(top, bins=20, range=(0.0, max(1.0, float(top.max()))), color="C0", edgecolor="white")
    ax.set(xlabel="highest predicted probability of the clip", ylabel="test clips",
           title="Confidence of the test predictions")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    lines += figs.save(fig, "report_test_max_prob.png",
                       "histogram over test clips of the highest predicted class probability of each clip.")

    mean, freq = class_means(probs, oof_truth)
    order = np.argsort(-mean, kind="stable")
    k = len(classes)
    fig, ax = figs.plt.subplots(figsize=(8, min(max(3.0, 0.2 * k + 1.5), 30)))
    ax.barh(np.arange(k), mean[order], color="C0")
    title, prior_note = "Mean test probability per class (before class balancing)", ""
    if freq is not None:
        ax.plot(freq[order], np.arange(k), "o", color="C3", markersize=3)
        title += "\n(red dots: label frequency in the training clips)"
        prior_note = (" Red dots: how often each class is a label of the training clips: a bar far beyond its dot is "
                      "a class the model favours.")
    ax.set_yticks(np.arange(k))
    ax.set_yticklabels([classes[i] for i in order], fontsize=7 if k > 30 else 9)
    ax.set_ylim(k - 0.5, -0.5)  # highest at the top, no empty margins
    ax.set(xlabel="mean predicted probability over test clips", ylabel="class", title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    lines += [""] + figs.save(fig, "report_test_class_mean.png",
                              "mean predicted probability of each class over the test clips (before class "
                              "balancing), highest first." + prior_note)
    header = ["class", "mean test probability"] + (["label frequency (training clips)"] if freq is not None else [])
    rows = [[_code(classes[i]), f"{mean[i]:.4f}"] + ([f"{freq[i]:.4f}"] if freq is not None else []) for i in order]
    return lines + ["", "The figure's values:", ""] + _table(header, rows)


def _thresholds_section(classes: list[str], thresholds: dict | None, oof_truth, oof_probs) -> list[str]:
    """The decision thresholds the run chose and what they do on the OOF clips: precision, recall, F1 per class."""
    if not thresholds or oof_truth is None or oof_probs is None:
        return ["No decision thresholds were chosen (no out-of-fold predictions)."]
    probs, problem = _check_probs("OOF probabilities", oof_probs, len(classes), oof_truth)
    if problem:
        return [problem]
    cut = np.array([thresholds[c] for c in classes])
    table = threshold_scores(oof_truth, probs, cut)
    rows = [[_code(c) + (" (pooled)" if table["positives"][i] < MIN_POSITIVES else ""), f"{cut[i]:.3f}",
             int(table["positives"][i]), _num(table["precision"][i], ".3f"), _num(table["recall"][i], ".3f"),
             _num(table["f1"][i], ".3f")] for i, c in enumerate(classes)]
    rows.append(["**all (micro)**", "", int(table["positives"].iloc[-1]), _num(table["precision"].iloc[-1], ".3f"),
                 _num(table["recall"].iloc[-1], ".3f"), _num(table["f1"].iloc[-1], ".3f")])
    return [f"A clip carries a class when its probability is at least the class's threshold: the one with the best "
            f"F1 on the OOF clips, or, for a class with fewer than {MIN_POSITIVES} positive OOF clips (pooled), the "
            f"one with the best F1 over every class's pairs together. Saved in inference.json; the tag mode's "
            f"labels use them. On the OOF clips they were chosen on (so a little optimistic):", ""] + \
        _table(["class", "threshold", "OOF positives", "precision", "recall", "F1"], rows)


# ---------------------------------------------------------------- assembly

def _run_section(title: str, build, *args) -> list[str]:
    """`## title` and the section's lines, or a one-line note if building it failed."""
    try:
        body = build(*args)
    except Exception as e:  # noqa: BLE001 - a report must never cost the run that produced it
        log.warning("report section %r failed: %s: %s", title, type(e).__name__, e)
        body = [f"_This section could not be built: {type(e).__name__}: {_cell(e)}_"]
    return [f"## {title}", ""] + body


def write_report(work_dir, *, mode: str, classes: list[str], dataset: dict, timings: list[dict],
                 scores: dict | None = None, folds: list[dict] | None = None,
                 oof_truth=None, oof_probs=None, test_probs=None,
                 loaded: list[str] | None = None, stage1: dict | None = None, budget_use: dict | None = None,
                 thresholds: dict | None = None, test_audio: str | None = None) -> Path:
    """Write `<work_dir>/report.md` (and its PNG figures beside it) and return its path.

    mode "train": dataset, time plan vs actual, per-fold lwlrap, OOF scores, training curves from
    `stage1/history.csv` and `fold{k}/history.csv`, per-class OOF lwlrap, the decision thresholds (`thresholds`,
    {class: threshold}) with their OOF precision and recall, and the test predictions (`test_probs`: before class
    balancing).
    mode "predict": dataset, the weight files loaded, timings and the test predictions.
    """
    if mode not in ("train", "predict"):
        raise ValueError(f"mode must be 'train' or 'predict', not {mode!r}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    figs = _Figures(work_dir, plt)
    if mode == "train":
        sections = [("Dataset", _dataset_section, dataset),
                    ("Time: plan vs actual", _timings_section, timings),
                    ("Time budget", _budget_section, budget_use),
                    ("Stage 1 on the noisy set", _stage1_section, stage1),
                    ("Folds", _folds_section, folds),
                    ("Out-of-fold lwlrap", _scores_section, scores),
                    ("Training curves", _curves_section, work_dir, figs),
                    ("Per-class lwlrap", _per_class_section, classes, oof_truth, oof_probs, figs),
                    ("Decision thresholds", _thresholds_section, classes, thresholds, oof_truth, oof_probs),
                    ("Test predictions", _predictions_section, classes, test_probs, figs, oof_truth)]
    else:
        sections = [("Dataset", _dataset_section, dataset),
                    ("Weights loaded", _loaded_section, loaded),
                    ("Time: plan vs actual", _timings_section, timings),
                    ("Test predictions", _predictions_section, classes, test_probs, figs)]
    lines = _header(mode, work_dir, classes, test_audio)
    for title, build, *args in sections:
        lines += [""] + _run_section(title, build, *args)
    path = atomic_write_text(work_dir / REPORT_NAME, "\n".join(lines) + "\n")
    log.info("report written to %s (%d figure(s))", path, figs.count)
    return path
''')

_add('src/fattag/select.py', r'''
"""Noisy-clip selection: keep the noisy clips whose labels a curated-trained model agrees with.

About a third of a FAT-style noisy set is mislabelled. One extra pass, before stage 1: a scorer model is trained on
the curated clips (a small curated holdout watches it), every noisy clip is predicted whole (all windows), and a
clip is kept when each of its n labels is among the scorer's top n + margin classes. Stage 1 then learns from the
kept clips only, and stage 2 may top its batches up with them (`curated.top_up`). The 1st place of FAT2019
kept 1,745 of 19,815 noisy clips this way; the 3rd and 6th used selected noisy clips too.

The scorer has seen every curated clip, so the choice of noisy clips depends a little on each fold's validation
clips; no fold model trains on its own validation clips (see tests/test_train.py).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from .checkpoint import atomic_write
from .context import Run
from .features import Clips
from .model import build_model
from .predict import predict_clips
from .splits import TrainingData, holdout_split
from .stage import StageSpec, fit_stage
from .stages import SELECT_HOLDOUT, SELECT_STAGE

log = logging.getLogger("fattag")


def agreeing(probs: np.ndarray, labels: np.ndarray, margin: int) -> np.ndarray:
    """Per clip: True when each of its n labels ranks among the top n + margin classes of `probs`."""
    rank = (-probs).argsort(1).argsort(1)            # 0 = the highest score
    n = labels.sum(1, keepdims=True)
    worst = np.where(labels > 0, rank, -1).max(1)    # the rank of the clip's lowest-ranked label
    return (n[:, 0] > 0) & (worst < n[:, 0] + margin)


def select_noisy_pool(run: Run, d: TrainingData) -> None:
    """The selection as a step of the run, where it is asked for and stage 1 has epochs planned: the noisy clips
    training may use (`d.noisy_pool`) become the kept ones (rank 0's choice, on every rank), and the budget prices
    stage 1 on them."""
    if not (run.cfg.select_noisy and run.budget.plan.epochs_noisy and len(d.noisy_pool)):
        return
    d.noisy_pool = run.world.broadcast(select_noisy(run, d))
    run.budget.noisy_kept(len(d.noisy_pool))


def select_noisy(run: Run, d: TrainingData) -> np.ndarray:
    """Indices of the noisy clips to keep (all decodable ones when selection finds too few). The scorer trains
    with stage 2's learning rate, loss and augmentation: like a fold model, on curated clips."""
    cfg, pool = run.cfg, np.flatnonzero(d.noisy.ok)
    spec = StageSpec.for_stage(run, cfg.curated, "selection scorer (curated)", run.work_dir / "select",
                               cfg.select_epochs, cfg.seed + 2000)
    kept_file = spec.out_dir / "kept.csv"
    if kept_file.exists() and spec.stage_dir.finished() is not None:  # a restarted run reuses its selection
        return np.sort(pd.read_csv(kept_file)["index"].to_numpy())
    t0 = time.time()
    train_idx, hold_idx = holdout_split(np.flatnonzero(d.curated.ok), SELECT_HOLDOUT, spec.seed)
    model = build_model(cfg, len(d.classes), *d.stats)
    res = fit_stage(model, Clips(d.curated, train_idx), Clips(d.curated, hold_idx), spec,
                    run.budget.select_deadline())
    if not res.usable:
        log.warning("noisy-clip selection: the scorer produced no usable weights; keeping every noisy clip")
        return pool
    probs = predict_clips(model, d.noisy, pool, cfg, run.device, desc="score noisy clips")
    keep = agreeing(probs, d.noisy.table.targets[pool], cfg.select_margin)
    kept = pool[keep] if keep.sum() >= max(10, 0.05 * len(pool)) else pool
    spec.stage_dir.finish(model, {"stage": "select", "score": res.best_score}, res.history)
    atomic_write(kept_file, lambda tmp: pd.DataFrame({"index": kept, "fname": [d.noisy.table.fnames[i] for i in kept]})
                 .to_csv(tmp, index=False))
    run.record(SELECT_STAGE, time.time() - t0)
    log.info("noisy-clip selection: kept %d of %d noisy clips whose labels the curated scorer (holdout lwlrap %.4f) "
             "agrees with", len(kept), len(pool), res.best_score)
    return kept
''')

_add('src/fattag/splits.py', r'''
"""The splits training draws from: the curated folds, holdouts, and the clips each stage tops its set up with.

`TrainingData` holds the decoded sets, the fold id of every curated clip and the noisy clips training may use; the
steps (train.py, select.py, pseudo.py) take their training and validation clips from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import Config
from .features import Clips, MelStore, store_stats
from .stages import holdout_size, top_up_size


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



def holdout_split(indices: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, holdout) split of the given clip indices; the holdout has at least one clip."""
    perm = np.random.default_rng(seed).permutation(indices)
    n_hold = holdout_size(len(perm), share)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])



@dataclass
class TrainingData:
    """What both stages train from: the decoded sets, the class vocabulary, the curated folds."""
    classes: list[str]
    curated: MelStore
    noisy: MelStore | None
    folds: np.ndarray            # fold id per curated clip (-1: could not be decoded)
    stats: tuple[float, float]   # mean and std of the curated log-mels: the model's input normalisation
    noisy_pool: np.ndarray       # the noisy clips training may use: every decodable one, or those selection kept

    @classmethod
    def make(cls, classes: list[str], curated: MelStore, noisy: MelStore | None, cfg: Config) -> TrainingData:
        ok = np.flatnonzero(curated.ok)
        folds = np.full(len(curated.table), -1, dtype=np.int64)
        folds[ok] = make_folds(curated.table.targets[ok], cfg.folds, cfg.seed)
        pool = np.flatnonzero(noisy.ok) if noisy is not None else np.zeros(0, dtype=np.int64)
        return cls(list(classes), curated, noisy, folds, store_stats(curated, seed=cfg.seed), pool)

    def fold(self, k: int) -> tuple[Clips, Clips]:
        """(training clips, validation clips) of fold k: every decodable curated clip is in exactly one of them."""
        return (Clips(self.curated, np.flatnonzero((self.folds >= 0) & (self.folds != k))),
                Clips(self.curated, np.flatnonzero(self.folds == k)))

    def fold_training(self, k: int, share: float, seed: int) -> tuple[list[Clips], Clips]:
        """Stage 2's (training sets, validation clips) of fold k: the other folds' clips, topped up with noisy clips
        so that they are `share` of the training items."""
        train, valid = self.fold(k)
        return [train, *self.noisy_top_up(len(train), share, seed)], valid

    def noisy_top_up(self, n_curated: int, share: float, seed: int) -> list[Clips]:
        """Noisy clips to add to a stage-2 training set of `n_curated` clips so that they are `share` of it (marked as
        noisy-labelled: a noisy head scores them)."""
        return top_up(self.noisy, self.noisy_pool, n_curated, share, seed, noisy_labels=True)

    def curated_top_up(self, n_noisy: int, share: float, seed: int) -> list[Clips]:
        """Curated clips to add to stage 1's `n_noisy` training clips so that they are `share` of the items (at
        most every decodable curated clip). Stage 1 then hears every fold's clean clips, so stage 2's fold scores
        and the OOF predictions over-promise (realdev everyday: OOF 1.000)."""
        return top_up(self.curated, np.flatnonzero(self.curated.ok), n_noisy, share, seed)


def top_up(store: MelStore | None, pool: np.ndarray, n_base: int, share: float, seed: int,
           noisy_labels: bool = False) -> list[Clips]:
    """Clips of `pool` (indices into `store`) to add to a training set of `n_base` clips so that they are `share` of
    the items, capped at the whole pool; drawn without replacement, seeded. [] when there is nothing to add."""
    if share <= 0 or store is None or not len(pool):
        return []
    n = top_up_size(n_base, share, len(pool))
    return [Clips(store, np.sort(np.random.default_rng(seed).choice(pool, n, replace=False)), noisy_labels)]

''')

_add('src/fattag/stage.py', r'''
"""One training stage: a fastai Learner on random crops with the stage's callbacks, fitted and saved.

Stage 1, each fold of stage 2, the selection scorer and the pseudo-label round are all `fit_stage(model, train,
valid, spec, deadline)`: one-cycle on random crops, the stage's augmentation callbacks, and the callbacks of
`callbacks.py` (NaN guard, best epoch by exact whole-clip lwlrap, per-epoch checkpoint for resume, log line,
deadline, epoch plan). They differ only in their StageSpec, made from their StageSettings (`cfg.noisy`,
`cfg.curated`).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner, Metric
from fastai.torch_core import set_seed
from fastcore.basics import noop

from .augment import augment_policy, teacher_view
from .callbacks import (Deadline, EpochCheckpoint, EpochLog, EpochPlan, KeepBest, MeanTeacher, NanGuard,
                        WeightAverage)
from .checkpoint import Resume, StageDir
from .config import Config, StageSettings
from .context import Run
from .dataparallel import DataParallel, training_loader
from .features import Clips, CropDataset, aggregate_windows
from .losses import make_loss
from .metrics import lwlrap
from .model import input_mean, to_device
from .precision import DeviceMixedPrecision, amp_dtype
from .weights import stage_recipe
from .world import SINGLE, World, doing

log = logging.getLogger("fattag")
HISTORY_COLUMNS = ["epoch", "train_loss", "valid_loss", "lwlrap"]


@dataclass
class StageSpec:
    """One training run's recipe. Stage 1 and stage 2 (and the folds) differ only here."""
    label: str           # "stage 1 (noisy)", "fold 2 (curated)": log lines and reports
    augment: StageSettings  # the augmentation policy's settings (cfg.noisy or cfg.curated)
    out_dir: Path        # checkpoints, resume files, history.csv
    epochs: int
    lr: float
    loss: str            # see losses.make_loss
    seed: int            # crops, augmentation and initial weights
    cfg: Config          # shared settings: batch size, weight decay, crop and validation windows, device
    device: str = "cpu"
    recipe: dict = field(default_factory=dict)  # what the saved weights must match to be reused (checkpoint.py)
    max_epochs: int = 0  # the most epochs a re-plan may give the stage while it trains (0: `epochs`, no re-plan)
    replan: Callable[[int, float], int] | None = None  # (epochs done, fastest epoch s) -> epochs (EpochPlan)
    world: World = SINGLE  # the ranks that train this stage together (data-parallel); one for a fold

    @property
    def stage_dir(self) -> StageDir:
        return StageDir(self.out_dir, self.recipe)

    @classmethod
    def for_stage(cls, run: Run, stage: StageSettings, label: str, out_dir, epochs: int, seed: int) -> StageSpec:
        """The spec of a training run of this run with `stage`'s learning rate, loss and augmentation."""
        return cls(label, stage, Path(out_dir), epochs, stage.lr, stage.loss, seed, run.cfg, str(run.device),
                   recipe=stage_recipe(run.cfg, run.data_dir))


@dataclass
class StageResult:
    history: pd.DataFrame     # one row per epoch: epoch, train_loss, valid_loss, lwlrap
    best_score: float
    best_epoch: int           # 1-based; 0 when no epoch produced usable weights
    seconds: float
    epochs_planned: int
    nan_epochs: int = 0
    epoch_seconds: list = field(default_factory=list)  # wall time of each epoch trained in this fit

    @property
    def usable(self) -> bool:
        return self.best_epoch > 0


class ClipLwlrap(Metric):
    """Exact lwlrap over whole validation clips: window predictions are aggregated per clip, then scored at once."""

    def __init__(self, clip_of: np.ndarray, truth: np.ndarray, how: str):
        self.clip_of, self.truth, self.how = torch.from_numpy(clip_of), truth, how

    def reset(self):
        self.preds = []

    def accumulate(self, learn):
        self.preds.append(torch.sigmoid(learn.pred.detach().float()).cpu())

    @property
    def value(self):
        probs = aggregate_windows(torch.cat(self.preds), self.clip_of, len(self.truth), self.how).numpy()
        return lwlrap(self.truth, probs) if np.isfinite(probs).all() else float("nan")

    @property
    def name(self):
        return "lwlrap"


def stage_learner(model: torch.nn.Module, train: Clips | list[Clips], valid: Clips, spec: StageSpec, resume: Resume,
                  deadline) -> Learner:
    """A fastai Learner on random training crops and whole-clip validation windows, with the stage's callbacks."""
    cfg, device = spec.cfg, torch.device(spec.device)
    to_device(model, device, cfg.channels_last)  # the device's fastest layout; fastai's move to the device keeps it
    train_ds = CropDataset(train, cfg.crop_frames, seed=spec.seed, head_flag=cfg.noisy_head)
    valid_ds = valid.store.windows(valid.indices, cfg.crop_frames, cfg.tta_step_frac)
    bs = min(cfg.batch_size, len(train_ds))
    dls = DataLoaders(
        training_loader(train_ds, bs, spec.world, shuffle=True, num_workers=cfg.num_workers, device=device),
        DataLoader(valid_ds, bs=cfg.batch_size * 2, shuffle=False, num_workers=cfg.num_workers, device=device),
        device=device)
    keep = KeepBest(resume)
    cbs = [*augment_policy(cfg, spec.augment, input_mean(model)), NanGuard(), keep,
           EpochCheckpoint(spec.stage_dir, keep, spec.epochs, list(resume.history), write=spec.world.is_main),
           EpochLog(spec.label), Deadline(deadline), EpochPlan(spec.epochs, spec.replan)]
    if spec.world.size > 1:
        cbs.append(DataParallel(spec.world))
    if spec.augment.consistency > 0:
        cbs.append(MeanTeacher(spec.augment.consistency, cfg.teacher_decay, teacher_view(cfg, input_mean(model))))
    if cfg.average_epochs > 0:
        cbs.append(WeightAverage(cfg.average_epochs, (resume.last or {}).get("average")))
    learn = Learner(dls, model, loss_func=make_loss(spec.loss, cfg.noisy_head), wd=cfg.wd, cbs=cbs,
                    metrics=[ClipLwlrap(valid_ds.clip_of, valid.targets, cfg.tta_aggregate)])
    learn.logger = noop  # EpochLog writes the per-epoch lines
    if not sys.stderr.isatty():
        learn.remove_cb(ProgressCallback)
    dtype = amp_dtype(cfg, device)
    if dtype is not None:
        learn.add_cb(DeviceMixedPrecision(dtype))
    learn.resume_epoch = resume.epochs_done
    if resume.last is not None:  # continue an interrupted stage: its weights, optimiser state and schedule
        learn.create_opt()
        model.load_state_dict(resume.last["model"])
        learn.opt.load_state_dict(resume.last["opt"])
    return learn


def fit_stage(model: torch.nn.Module, train: Clips | list[Clips], valid: Clips, spec: StageSpec,
              deadline=None) -> StageResult:
    """Train `model` in place with one-cycle; keep the epoch with the best whole-clip lwlrap on `valid`.

    Progress is checkpointed in `spec.out_dir` after every epoch; a restarted run continues after the last
    finished epoch with the interrupted run's schedule. `deadline`: a wall-clock time, a function returning one,
    or None (callbacks.Deadline).
    """
    doing(spec.label)
    set_seed(spec.seed, reproducible=True)
    resume = spec.stage_dir.resume()
    epochs = resume.epochs or spec.epochs  # a resumed stage keeps the interrupted run's schedule
    spec = StageSpec(**{**spec.__dict__, "epochs": epochs})
    learn = stage_learner(model, train, valid, spec, resume, deadline)
    if resume.epochs_done:
        log.info("%s: resuming after epoch %d of %d (best lwlrap so far %.4f)", spec.label, resume.epochs_done,
                 epochs, resume.best_score)
    log.info("%s: %d training clips, %d validation clips (%d windows), %d epochs, lr %.2g, loss %s, augment: %s",
             spec.label, len(learn.dls.train.dataset), len(valid), len(learn.dls.valid.dataset), epochs, spec.lr,
             spec.loss,
             ", ".join(type(cb).__name__ for cb in augment_policy(spec.cfg, spec.augment, 0.0)) or "none")
    t0 = time.time()
    if learn.resume_epoch < epochs:   # the loop may run up to max_epochs; EpochPlan ends it at the plan's count
        learn.fit_one_cycle(max(epochs, spec.max_epochs), spec.lr, start_epoch=learn.resume_epoch)
    model.to("cpu")
    keep, checkpoint, guard, plan = (next(cb for cb in learn.cbs if isinstance(cb, t))
                                     for t in (KeepBest, EpochCheckpoint, NanGuard, EpochPlan))
    return StageResult(pd.DataFrame(checkpoint.history, columns=HISTORY_COLUMNS), keep.best, keep.best_epoch + 1,
                       time.time() - t0, plan.epochs, guard.nan_epochs, plan.seconds)


def finish_stage(spec: StageSpec, model: torch.nn.Module, res: StageResult, meta: dict) -> None:
    """Save the finished stage's best weights with what prediction needs to know (model.pth marks it done)."""
    meta = {**meta, "score": res.best_score, "best_epoch": res.best_epoch, "seconds": res.seconds,
            "epochs_run": len(res.history), "epochs_planned": res.epochs_planned}
    spec.stage_dir.finish(model, meta, res.history)

''')

_add('src/fattag/stages.py', r'''
"""What the steps and the cost model agree on: the stages' names, the sizes both count, which rank trains a fold.

The steps (train.py, select.py, pseudo.py) record their timings under these names and the plan (cost.py) prices
its rows under the same ones, so that the timing table sets plan against actual; a holdout or a top-up is as large
in the plan as in training. Nothing here imports the rest of the project.
"""
from __future__ import annotations

STAGE1 = "stage 1 (noisy)"            # stage 1 on the noisy set
SELECT_STAGE = "select noisy clips"   # noisy-clip selection, before stage 1
ROUND_STAGE = "pseudo-label round"    # the test pseudo-label round, after stage 2
SELECT_HOLDOUT = 0.1                  # share of the curated clips that watch the selection's scorer


def fold_stage(k: int) -> str:
    """Stage 2 on fold k."""
    return f"fold {k}"


def holdout_size(n: int, share: float) -> int:
    """Clips of n that a holdout of `share` takes: at least one (none of none)."""
    return max(1, int(round(n * share))) if n else 0


def top_up_size(n_base: int, share: float, available: int) -> int:
    """How many clips of the other set make them `share` of a training set of `n_base` clips, at most `available`
    (both stages top up: stage 1 with curated clips, stage 2 with noisy ones)."""
    return min(available, int(round(n_base * share / (1 - share))))


# ---------------------------------------------------------------- folds over the ranks


def fold_rank(k: int, devices: int) -> int:
    """The rank that trains fold k: the folds are dealt out round-robin."""
    return k % devices


def fold_round(k: int, devices: int) -> int:
    """The round fold k trains in: the ranks train `devices` folds side by side, round after round."""
    return k // devices


def round_start(k: int, devices: int) -> int:
    """The first fold of fold k's round: the folds before it trained in earlier rounds."""
    return fold_round(k, devices) * devices


def rounds(n: int, devices: int) -> int:
    """Rounds it takes `devices` ranks to do `n` folds (or models) side by side."""
    return -(-n // devices)
''')

_add('src/fattag/submission.py', r'''
"""submission.csv: validated against sample_submission.csv, written atomically, a row for every test clip."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import atomic_write

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
    atomic_write(path, lambda tmp: sub.to_csv(tmp, index=False, float_format="%.6f"))
    log.info("wrote %s (%d clips x %d classes)", path, len(sub), len(classes))
    return path


def write_oof(path, fnames: list[str], classes: list[str], probs: np.ndarray) -> Path:
    """Out-of-fold probabilities in submission layout, for the clips that were predicted (finite rows)."""
    path = Path(path)
    rows = np.isfinite(probs).all(1)
    df = pd.DataFrame(probs[rows], columns=classes)
    df.insert(0, "fname", [f for f, r in zip(fnames, rows) if r])
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6f"))
    return path
''')

_add('src/fattag/tag.py', r'''
"""Tag your own audio: files or folders in any format audio.py reads, scored by a training run's fold models.

Each file is one clip, predicted as predict mode predicts a test clip (every window of the whole clip, the window
settings and fold ensemble of the run's inference.json) but without class balancing, which assumes a test set whose
classes are evenly mixed (a user's folder is not one), and without augmented passes unless asked for (their random
stripes are drawn per batch: a file's scores would depend on the files tagged with it). `labels` names the
classes whose probability reaches the run's decision threshold (thresholds.py). With segments, each file is also
cut into consecutive windows of that many seconds, each scored as a clip of its own: scores over time for a long
recording.

    from fattag import Tagger
    tagger = Tagger.load("runs/cpu")
    tags = tagger.tag(["a.flac", "recordings/"])          # one row per file
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .audio import AUDIO_SUFFIXES, AudioError, prepare_wave, read_audio, resample
from .checkpoint import atomic_write, atomic_write_text
from .config import Config, make_config
from .context import default_preset
from .data import ClipTable
from .features import ClipMel, MelStore
from .precision import check_device
from .predict import predict_test
from .progress import progress
from .thresholds import label_text, thresholds_for
from .weights import load_fold_models, prediction_config, saved_thresholds

log = logging.getLogger("fattag")

CHUNK_FILES = 64   # files decoded and predicted together: bounded memory for a folder of any size
TAGS_FILE, SEGMENTS_FILE = "tags.csv", "segments.csv"


def find_audio(paths) -> list[str]:
    """The files to tag, as strings: each path given that is not a folder (whatever its name; one that does not
    exist is kept, to get a row with its error), and every audio file (audio.AUDIO_SUFFIXES) under each folder
    given, recursively, in sorted order."""
    found = []
    for given in map(str, paths):
        if not os.path.isdir(given):
            found.append(given)
            continue
        for folder, dirs, files in os.walk(given):
            dirs.sort()
            found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(AUDIO_SUFFIXES)]
    return found


@dataclass
class Decoded:
    """One file or array ready to score: its length, the clip as the model takes it, its segments' waves."""
    duration: float
    clip: np.ndarray
    segments: list = field(default_factory=list)   # (start s, end s, wave) per segment


def segment_bounds(duration: float, seconds: float) -> list[tuple[float, float]]:
    """Consecutive (start, end) windows of `seconds` from 0 to `duration`, the last one cut at the end: no gap,
    no overlap."""
    count = max(1, math.ceil(duration / seconds - 1e-9))
    return [(k * seconds, min((k + 1) * seconds, duration)) for k in range(count)]


class Tagger:
    """A training run's fold models with the settings to predict with and the decision thresholds, for any audio.

    `Tagger.load(run_dir)`, then `tag(paths)` (files and folders), `tag_arrays(waves, sample_rate)` or
    `segments(paths, seconds)`; each returns a table whose probability columns are the run's classes."""

    def __init__(self, models: list, cfg: Config, classes: list[str], thresholds: np.ndarray, device):
        self.models, self.cfg, self.classes, self.thresholds = models, cfg, list(classes), thresholds
        self.device = torch.device(device)
        self.clip_mel = ClipMel(cfg, self.device)

    @classmethod
    def load(cls, weights_dir, device=None, settings: dict | None = None, cfg: Config | None = None) -> Tagger:
        """The fold models under `weights_dir` (a training run's work dir), on `device` (default: CUDA when there
        is one). Feature and model settings come from the weights, inference settings from the run's
        inference.json, then from `settings` ({name: value}, as --set gives them, e.g. {"tta_aug_passes": 2}),
        over `cfg` (default: the preset a run on real data gets on this machine)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_device(device)
        loaded = load_fold_models(weights_dir)
        classes = loaded[0][2]["classes"]
        explicit = settings or {}
        base = cfg or make_config(default_preset(is_demo=False), explicit)
        pred_cfg = prediction_config(base, loaded, explicit)
        if pred_cfg.tta_aug_passes and "tta_aug_passes" not in explicit:
            log.info("augmented TTA passes off (the training run used %d): their random stripes are drawn per batch, "
                     "so a file's scores would depend on the files beside it (--set tta_aug_passes=N turns them on)",
                     pred_cfg.tta_aug_passes)
            pred_cfg = replace(pred_cfg, tta_aug_passes=0)
        thresholds = thresholds_for(classes, saved_thresholds([path for path, _, _ in loaded]), str(weights_dir))
        log.info("loaded %d fold models from %s (%d classes)", len(loaded), weights_dir, len(classes))
        return cls([model for _, model, _ in loaded], pred_cfg, classes, thresholds, device)

    # ------------------------------------------------------------ the three ways in

    def tag(self, paths, show_progress: bool = False) -> pd.DataFrame:
        """One row per file of `paths` (files, and audio files found in folders): fname, duration, labels,
        error, one probability per class."""
        return self.run(find_audio(paths), show_progress=show_progress)[0]

    def tag_arrays(self, waves, sample_rate: int, names: list[str] | None = None) -> pd.DataFrame:
        """As `tag`, for mono waveforms (float, [-1, 1]) at `sample_rate`, named `names` (default array0, ...)."""
        waves = [np.asarray(w, dtype=np.float32) for w in waves]
        names = names or [f"array{k}" for k in range(len(waves))]
        return self.run(list(zip(names, [(w, sample_rate) for w in waves])))[0]

    def segments(self, paths, seconds: float) -> pd.DataFrame:
        """Scores over time: one row per `seconds` window of each file (fname, start, end, labels, classes)."""
        return self.run(find_audio(paths), seconds)[1]

    # ------------------------------------------------------------ the one code path

    def run(self, sources: list, segment_seconds: float = 0.0, show_progress: bool = False,
            workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """Tags of every source (a path, or a (name, (wave, sample_rate)) pair) and, with `segment_seconds`, of
        each file's segments. Files go CHUNK_FILES at a time: decoded by threads, predicted, then let go. A file
        that cannot be read gets a row with its error and no scores; the others go on."""
        if segment_seconds and segment_seconds <= 0:
            raise ValueError(f"segment length must be positive, got {segment_seconds}")
        workers = max(1, workers or min(8, os.cpu_count() or 1))
        files, segs, errors = [], [], 0
        bar = progress(total=len(sources), desc="tag", unit="file", disable=not show_progress)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fattag-tag") as pool:
            for at in range(0, len(sources), CHUNK_FILES):
                chunk = sources[at:at + CHUNK_FILES]
                decoded = list(pool.map(lambda s: self._decode(s, segment_seconds), chunk))
                names = [s if isinstance(s, str) else s[0] for s in chunk]
                files.append(self._file_rows(names, decoded))
                errors += sum(not isinstance(d, Decoded) for d in decoded)
                if segment_seconds:
                    segs.append(self._segment_rows(names, decoded))
                bar.update(len(chunk))
                bar.set_postfix(errors=errors)
        bar.close()
        segments = self._table(segs, ["fname", "start", "end", "labels"]) if segment_seconds else None
        return self._table(files, ["fname", "duration", "labels", "error"]), segments

    def _decode(self, source, segment_seconds: float) -> Decoded | str:
        """A source's Decoded, or the reason it cannot be read (never raises: one bad file costs that file only).
        The clip goes through what load_clip does to a training or test clip: resampling, then the silence trim;
        segments are cut from the resampled file before the trim, so that their times are the file's."""
        try:
            wave, sr = read_audio(source) if isinstance(source, str) else source[1]
            if len(wave) == 0:
                raise AudioError(source if isinstance(source, str) else source[0], "has no audio (0 samples)")
            duration, rate = len(wave) / sr, self.cfg.sample_rate
            wave = resample(wave, sr, rate)
            at = [(a, b, int(round(a * rate)), int(round(b * rate)))
                  for a, b in (segment_bounds(duration, segment_seconds) if segment_seconds else [])]
            segments = [(a, b, self._as_clip(wave[i:max(j, i + 1)])) for a, b, i, j in at]
            return Decoded(duration, self._as_clip(wave), segments)
        except AudioError as e:
            return e.reason
        except Exception as e:  # noqa: BLE001 - any failure of one file is its row's error, not the run's end
            return f"{type(e).__name__}: {e}"

    def _as_clip(self, wave: np.ndarray) -> np.ndarray:
        """A wave already at the model's rate after what every clip goes through (audio.prepare_wave: the trim)."""
        return prepare_wave(wave, self.cfg.sample_rate, self.cfg.sample_rate, self.cfg.trim_silence, self.cfg.trim_db)

    def _probabilities(self, waves: list) -> np.ndarray:
        """The fold ensemble's probabilities (len(waves), C) of decoded waves (None: a NaN row)."""
        mels = [None if w is None else self.clip_mel(w) for w in waves]
        store = MelStore(ClipTable("tag", [str(k) for k in range(len(waves))], [Path(".")] * len(waves)), mels)
        if not store.ok.any():
            return np.full((len(waves), len(self.classes)), np.nan)
        return predict_test(self.models, store, self.cfg, self.device, self.cfg.tta_aug_passes, desc=None)

    def _labels(self, probs: np.ndarray) -> list[str]:
        return ["" if not np.isfinite(p).all() else label_text(p, self.classes, self.thresholds) for p in probs]

    def _file_rows(self, names: list[str], decoded: list) -> pd.DataFrame:
        ok = [isinstance(d, Decoded) for d in decoded]
        probs = self._probabilities([d.clip if good else None for d, good in zip(decoded, ok)])
        rows = pd.DataFrame(dict(fname=names, duration=[d.duration if good else np.nan for d, good in zip(decoded, ok)],
                                 labels=self._labels(probs), error=["" if good else d for d, good in zip(decoded, ok)]))
        return pd.concat([rows, pd.DataFrame(probs, columns=self.classes)], axis=1)

    def _segment_rows(self, names: list[str], decoded: list) -> pd.DataFrame:
        spans = [(name, a, b, w) for name, d in zip(names, decoded) if isinstance(d, Decoded) for a, b, w in d.segments]
        probs = self._probabilities([w for *_, w in spans]) if spans else np.zeros((0, len(self.classes)))
        rows = pd.DataFrame(dict(fname=[s[0] for s in spans], start=[s[1] for s in spans], end=[s[2] for s in spans],
                                 labels=self._labels(probs)))
        return pd.concat([rows, pd.DataFrame(probs, columns=self.classes)], axis=1)

    def _table(self, parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
        if not parts:
            return pd.DataFrame(columns=columns + self.classes)
        return pd.concat(parts, ignore_index=True)


def write_table(path: Path, table: pd.DataFrame) -> Path:
    """A tags or segments table as CSV (probabilities to 6 decimals, as submission.csv), written atomically."""
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    return path


def tag_files(cfg: Config, explicit: dict, weights_dir, paths, work_dir: Path, device=None) -> int:
    """The tag mode: every file of `paths` tagged with the models under `weights_dir`; OUT/tags.csv (and
    segments.csv with cfg.tag_segments seconds), config.json, a closing line with files/s."""
    if not weights_dir:
        raise SystemExit("--mode tag needs --weights DIR (a training run's work dir)")
    if not paths:
        raise SystemExit("--mode tag needs at least one PATH (audio files or folders)")
    t0 = time.time()
    tagger = Tagger.load(weights_dir, device, explicit, cfg)
    sources = find_audio(paths)
    if not sources:
        raise SystemExit(f"no audio files under {', '.join(map(str, paths))} (looked for {', '.join(AUDIO_SUFFIXES)})")
    log.info("tagging %d file(s) on %s%s", len(sources), tagger.device,
             f", with {cfg.tag_segments:g} s segments" if cfg.tag_segments else "")
    t1 = time.time()
    tags, segs = tagger.run(sources, cfg.tag_segments, show_progress=True)
    took = time.time() - t1
    write_table(work_dir / TAGS_FILE, tags)
    if segs is not None:
        write_table(work_dir / SEGMENTS_FILE, segs)
    failed = tags["error"] != ""
    for name, why in zip(tags["fname"][failed], tags["error"][failed]):
        log.warning("could not tag %s: %s", name, why)
    atomic_write_text(work_dir / "config.json", json.dumps(dict(
        mode="tag", weights=str(weights_dir), files=len(tags), errors=int(failed.sum()),
        settings=tagger.cfg.to_dict(), thresholds=dict(zip(tagger.classes, tagger.thresholds.round(6).tolist()))),
        indent=2, default=str) + "\n")
    audio = float(tags["duration"].sum())
    log.info("tagged %d file(s) (%d could not be read), %.1f min of audio, in %.1f s: %.1f files/s, %.0f s of audio "
             "per s; wrote %s%s (total %.1f s with loading)", len(tags), int(failed.sum()), audio / 60, took,
             len(tags) / max(took, 1e-9), audio / max(took, 1e-9), work_dir / TAGS_FILE,
             f" and {SEGMENTS_FILE}" if segs is not None else "", time.time() - t0)
    return 0


__all__ = ["Tagger", "find_audio", "segment_bounds", "tag_files", "write_table"]
''')

_add('src/fattag/thresholds.py', r'''
"""Decision thresholds: when a class's probability means "this clip carries it", chosen on out-of-fold predictions.

A ranking metric (lwlrap) needs no threshold, but a user asking "which sounds are in this file" does. Each class
gets the threshold that maximises its F1 on the training run's out-of-fold predictions (every clip scored by the
fold model that did not train on it). A class with fewer than MIN_POSITIVES positive OOF clips says too little to
place its own threshold: it gets the one that maximises F1 over every class's (clip, class) pairs pooled (micro-F1).
The thresholds are saved with the weights (weights.save_thresholds) and used by the tag mode's `labels` column.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger("fattag")

MIN_POSITIVES = 5        # fewer positive OOF clips than this: the class gets the pooled threshold
DEFAULT_THRESHOLD = 0.5  # for weights saved without thresholds (runs older than them)


def f1_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """The threshold t that maximises F1 of `scores >= t` against `truth` (1-D, 1 = positive).

    Cuts fall between distinct scores: t is midway between the lowest score labelled and the next lower one (the
    lowest score itself when every item is labelled), so a score tied with another is never split. Among cuts of
    equal F1 the highest wins (fewer labels). No positive at all: DEFAULT_THRESHOLD."""
    truth, scores = np.asarray(truth).ravel() > 0, np.asarray(scores, dtype=np.float64).ravel()
    positives = int(truth.sum())
    if positives == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], np.cumsum(truth[order])
    labelled = np.arange(1, len(ranked) + 1)
    f1 = 2 * hits / (labelled + positives)
    cut = np.append(ranked[:-1] > ranked[1:], True)   # the last item of each run of equal scores
    best = int(np.flatnonzero(cut)[np.argmax(f1[cut])])
    return float(ranked[best] if best == len(ranked) - 1 else (ranked[best] + ranked[best + 1]) / 2)


def choose_thresholds(truth: np.ndarray, probs: np.ndarray, min_positives: int = MIN_POSITIVES) -> np.ndarray:
    """Per class (columns of `truth` and `probs`, one row per OOF clip): its F1-optimal threshold, or the pooled
    micro-F1 threshold for a class with fewer than `min_positives` positives."""
    truth, probs = np.asarray(truth) > 0, np.asarray(probs, dtype=np.float64)
    pooled = f1_threshold(truth, probs)
    return np.array([f1_threshold(truth[:, c], probs[:, c]) if truth[:, c].sum() >= min_positives else pooled
                     for c in range(truth.shape[1])])


def oof_thresholds(classes: list[str], targets: np.ndarray, oof: np.ndarray) -> dict | None:
    """{class: threshold} chosen on the OOF rows that were predicted (finite rows of `oof`); None when none were."""
    rows = np.isfinite(oof).all(1)
    if not rows.any():
        return None
    thresholds = choose_thresholds(targets[rows], oof[rows])
    pooled = int(((targets[rows] > 0).sum(0) < MIN_POSITIVES).sum())
    log.info("decision thresholds (F1-optimal on %d OOF clips): median %.3f, range %.3f-%.3f; %d class(es) with "
             "fewer than %d positives take the pooled one", int(rows.sum()), np.median(thresholds), thresholds.min(),
             thresholds.max(), pooled, MIN_POSITIVES)
    return {c: round(float(t), 6) for c, t in zip(classes, thresholds)}


def threshold_scores(truth: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    """Per class, labelling `probs >= thresholds`: positives, precision, recall and F1 against `truth` (NaN where
    a ratio has nothing to count), plus a last row `all` over every (clip, class) pair (micro-averaged)."""
    truth, said = np.asarray(truth) > 0, np.asarray(probs) >= np.asarray(thresholds)[None, :]
    tp, fp, fn = (truth & said).sum(0), (~truth & said).sum(0), (truth & ~said).sum(0)
    tp, fp, fn = (np.append(x, x.sum()).astype(np.float64) for x in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(dict(positives=(tp + fn).astype(int), precision=tp / (tp + fp), recall=tp / (tp + fn),
                                 f1=2 * tp / (2 * tp + fp + fn)))


def thresholds_for(classes: list[str], saved: dict | None, source: str = "the weights") -> np.ndarray:
    """The saved {class: threshold} in `classes`' order; DEFAULT_THRESHOLD, with one warning line, for weights
    saved without them (or without some class)."""
    saved = saved or {}
    missing = [c for c in classes if c not in saved]
    if missing:
        log.warning("%s carry no decision threshold for %d of %d classes (a run older than them): labelling at "
                    "probability >= %.2f there", source, len(missing), len(classes), DEFAULT_THRESHOLD)
    return np.array([float(saved.get(c, DEFAULT_THRESHOLD)) for c in classes])


def label_text(probs: np.ndarray, classes: list[str], thresholds: np.ndarray) -> str:
    """The labels one clip carries, each with its probability, highest first: "Piano:0.91;Flute:0.62" ("" if none)."""
    order = np.argsort(-np.asarray(probs), kind="stable")
    return ";".join(f"{classes[c]}:{probs[c]:.2f}" for c in order if probs[c] >= thresholds[c])


__all__ = ["DEFAULT_THRESHOLD", "MIN_POSITIVES", "choose_thresholds", "f1_threshold", "label_text",
           "oof_thresholds", "threshold_scores", "thresholds_for"]
''')

_add('src/fattag/throughput.py', r'''
"""Throughput: what a training step and an inference window really cost on this machine.

Measured on the real model (its input channels included) with random input of the crop size, on a few warmed-up
batches, under the precision training and prediction use; the cost model (cost.py) prices the run from the
`cost.Throughput` it returns. With several ranks each measures its own device, then all time training steps
together through DDP (each rank a share of the batch, as stage 1 trains): that rate prices stage 1.
"""
from __future__ import annotations

import time

import torch

from .config import Config
from .cost import Throughput
from .model import build_model, to_device
from .precision import amp_dtype, autocast, grad_scaler
from .world import SINGLE, World


def measure_throughput(cfg: Config, n_classes: int, device, max_seconds: float | None = None,
                       runs: int = 4, world: World = SINGLE) -> Throughput:
    """Time training steps and inference batches of the real model on random input of the crop size.

    The first run of each warms up and is not used, unless the next would take the measurement past
    `max_seconds` (a small share of the budget: a slow CPU step is then measured once, and the stages' measured
    times correct the estimate later).
    """
    device = torch.device(device)
    model = to_device(build_model(cfg, n_classes), device, cfg.channels_last)
    bs = cfg.batch_size
    x = torch.randn(bs, 1, cfg.n_mels, cfg.crop_frames, device=device).half()
    y = (torch.rand(bs, n_classes, device=device) < 0.05).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    dtype = amp_dtype(cfg, device)  # as training and prediction run (stage_learner, predict_clips)
    scaler = grad_scaler(device, dtype)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    spent = [0.0]

    def train_step(net=model, n=bs):   # DDP's step below: the DDP-wrapped model on this rank's share of the batch
        with autocast(device, dtype):
            loss = loss_fn(net(x[:n]).float()[:, :n_classes], y[:n])   # a noisy head's half: as costly
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def infer():
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    def timed(fn, share: float, limited: bool = True) -> float:
        times = []
        while len(times) < runs:
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            spent[0] += times[-1]
            if limited and max_seconds and spent[0] + times[-1] > max_seconds * share:
                break
        return min(times[1:] or times)

    model.train()
    t_train = timed(train_step, 0.7) / bs
    model.eval()
    t_infer = timed(infer, 1.0) / bs
    if world.size == 1:
        return Throughput(t_train, t_infer, str(device))
    # stage 1's step: all ranks at once through DDP, each on its share of the batch
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel(model.train(), device_ids=[device] if cuda else None)
    share = max(bs // world.size, 1)
    # unlimited: every rank times as many steps, so none waits for another in the all-reduce
    t_ddp = timed(lambda: train_step(ddp, share), 1.0, limited=False) / bs
    return Throughput(t_train, t_infer, str(device), world.size, world.broadcast(t_ddp))
''')

_add('src/fattag/train.py', r'''
"""The training steps of a run: stage 1 on the noisy set, then stage 2 on each curated fold with its OOF predictions.

Stage 1 learns from the large noisy set; stage 2 fine-tunes fold k of the curated set from the stage-1 weights.
Each trains one stage (stage.py) on its clips (splits.py); the epochs and deadlines come from the run's Budget.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from fastai.torch_core import set_seed

from .config import Config
from .context import Run
from .features import Clips
from .metrics import chance_lwlrap, lwlrap
from .model import build_model, warm_start
from .predict import predict_clips
from .splits import TrainingData, holdout_split
from .stage import StageResult, StageSpec, finish_stage, fit_stage
from .stages import STAGE1, fold_stage
from .weights import model_from_state, model_meta

log = logging.getLogger("fattag")


@dataclass
class Stage1:
    """Stage 1's outcome: its weights (None when it was skipped or learned nothing usable) and its noisy-holdout
    lwlrap per epoch against chance (None when it did not train in this run)."""
    weights: dict | None = None
    holdout: dict | None = None


def train_stage1(run: Run, d: TrainingData) -> Stage1:
    """Stage 1 on the noisy set, watched on a small noisy holdout."""
    cfg, noisy, classes, budget = run.cfg, d.noisy, d.classes, run.budget
    epochs = budget.plan.epochs_noisy
    if noisy is None or epochs <= 0 or len(d.noisy_pool) < 2:
        log.info("stage 1 skipped (%s)", "no noisy set" if noisy is None else
                 "no epochs planned" if epochs <= 0 else "no decodable noisy clip")
        return Stage1()
    spec = StageSpec.for_stage(run, cfg.noisy, STAGE1, run.work_dir / "stage1", epochs, cfg.seed + 1000)
    # its first epochs show the machine's real speed (a throughput measurement under contention reads low): the
    # budget re-plans stage 1's epochs from them, up to the requested number
    spec = replace(spec, max_epochs=cfg.noisy.epochs, replan=budget.replan_stage1, world=run.world)
    done = spec.stage_dir.finished()
    if done is not None:
        return Stage1(done[1])
    t0 = time.time()
    train_idx, hold_idx = holdout_split(d.noisy_pool, cfg.noisy_holdout, spec.seed)
    set_seed(spec.seed, reproducible=True)  # initial weights too: the same seed gives the same run
    model = build_model(cfg, len(classes), *d.stats)
    train = [Clips(noisy, train_idx), *d.curated_top_up(len(train_idx), cfg.noisy.top_up, spec.seed)]
    res = fit_stage(model, train, Clips(noisy, hold_idx), spec, budget.stage1_deadline)
    run.record(STAGE1, time.time() - t0)
    recent = res.epoch_seconds[-3:]   # the machine as it is now prices the folds
    budget.measured("noisy_epoch", sum(recent), len(recent))
    holdout = holdout_summary(res, noisy.table.targets[hold_idx])
    if not run.world.broadcast(res.usable):
        log.warning("stage 1 produced no usable weights: stage 2 starts from scratch")
        return Stage1(None, holdout)
    if run.world.is_main:
        finish_stage(spec, model, res, model_meta(cfg, classes, stage="noisy"))
    return Stage1(model.state_dict(), holdout)


def holdout_summary(res: StageResult, truth: np.ndarray) -> dict:
    """Stage 1's noisy-holdout lwlrap per epoch against what random scores get: a dead stage 1 shows here."""
    chance = chance_lwlrap(truth)
    per_epoch = [None if v is None or not np.isfinite(v) else round(float(v), 4) for v in res.history["lwlrap"]]
    best = max((v for v in per_epoch if v is not None), default=float("nan"))
    log.info("stage 1 noisy-holdout lwlrap per epoch: %s (random scores: %.3f)",
             " ".join(f"{v:.3f}" if v is not None else "nan" for v in per_epoch), chance)
    if not best > chance + 0.05:
        log.warning("stage 1 stayed near chance on its noisy holdout (best %.3f, random %.3f): it learned little "
                    "from the noisy set", best, chance)
    return dict(per_epoch=per_epoch, best=best, chance=round(chance, 4))


@dataclass
class FoldsResult:
    folds: np.ndarray          # fold id per curated clip (-1 for clips that could not be decoded)
    models: list               # this rank's trained fold models (every fold's with one rank), in fold order
    model_folds: list          # the fold id of each of `models`
    results: list              # dict per trained fold (all ranks'): fold, rank, best_lwlrap, best_epoch, epochs_run,
    #                            seconds, OOF scores
    oof_center: np.ndarray     # OOF probabilities from one centred window (no TTA); NaN rows where not predicted
    oof_windows: np.ndarray    # OOF probabilities over whole-clip windows
    oof_tta: np.ndarray        # whole-clip windows plus augmented passes (equals oof_windows when there are none)

    @property
    def predicted(self) -> np.ndarray:
        return np.isfinite(self.oof_windows).all(1)


def train_fold(run: Run, k: int, d: TrainingData, init: dict | None) -> tuple[torch.nn.Module, dict] | None:
    """Stage 2 on fold k: train on the other folds from the stage-1 weights (`init`), validate on fold k.

    Returns (model, meta) with the fold's score, or None when it was not trained (no time, or no usable epoch).
    """
    cfg, budget = run.cfg, run.budget
    epochs = budget.epochs_for(k)
    spec = StageSpec.for_stage(run, cfg.curated, f"fold {k} (curated)", run.work_dir / f"fold{k}", epochs,
                               cfg.seed + k)
    done = spec.stage_dir.finished()
    if done is not None:
        return model_from_state(*done), done[0]
    if epochs <= 0:
        return None
    set_seed(spec.seed, reproducible=True)
    model = build_model(cfg, len(d.classes), *d.stats)
    if init is not None:
        warm_start(model, init)
    train, valid = d.fold_training(k, cfg.curated.top_up, spec.seed)
    res = fit_stage(model, train, valid, spec, budget.fold_deadline(k))
    budget.measured("fold_epoch", res.seconds, len(res.history))
    if not res.usable:
        log.warning("fold %d produced no usable weights: left out of the ensemble", k)
        return None
    meta = model_meta(cfg, d.classes, stage="curated", fold=k, warm_start=init is not None)
    finish_stage(spec, model, res, meta)
    return model, {**meta, "score": res.best_score, "best_epoch": res.best_epoch, "epochs_run": len(res.history),
                   "seconds": res.seconds}


def predict_oof(model: torch.nn.Module, clips: Clips, cfg: Config, device, passes: int) -> dict:
    """Out-of-fold probabilities of a fold model on its own validation clips: centre crop, windows, windows +
    `passes` augmented passes."""
    center = predict_clips(model, clips.store, clips.indices, cfg, device, center_only=True)
    windows = predict_clips(model, clips.store, clips.indices, cfg, device)
    tta = windows if passes == 0 else predict_clips(model, clips.store, clips.indices, cfg, device,
                                                    aug_passes=passes)
    return dict(center=center, windows=windows, tta=tta)


def train_folds(run: Run, d: TrainingData, stage1: dict | None) -> FoldsResult:
    """Stage 2 on as many curated folds as the budget allows, each followed by its out-of-fold predictions. With
    several ranks all start from rank 0's plan, each trains its share of the folds (`World.mine`) and every rank
    gets all folds' rows."""
    run.share_plan()
    models, model_folds, mine, budget = [], [], [], run.budget
    for k in run.world.mine(range(run.cfg.folds)):
        t0 = time.time()
        trained = train_fold(run, k, d, stage1)
        if trained is None:
            if budget.plan.folds_trained <= k:
                log.warning("time budget: %d of %d folds trained", len(models), run.cfg.folds)
                break
            continue
        model, meta = trained
        t_pred, valid = time.time(), d.fold(k)[1]
        oof = predict_oof(model, valid, run.cfg, run.device, budget.plan.tta_aug_passes)
        budget.measured("oof_predict", time.time() - t_pred, 1)
        budget.fold_done(k, meta["epochs_run"])
        summary = dict(fold_summary(k, meta, valid.targets, oof["windows"], oof["center"]), rank=run.world.rank)
        mine.append(dict(rows=valid.indices, summary=summary, **oof))
        run.record(fold_stage(k), time.time() - t0)
        models.append(model)
        model_folds.append(k)
    everyone = sorted((f for rank in run.world.gather(mine) for f in rank), key=lambda f: f["summary"]["fold"])
    oof = {name: np.full((len(d.curated.table), len(d.classes)), np.nan) for name in ("center", "windows", "tta")}
    for f in everyone:
        for name in oof:
            oof[name][f["rows"]] = f[name]
    return FoldsResult(d.folds, models, model_folds, [f["summary"] for f in everyone], oof["center"],
                       oof["windows"], oof["tta"])


def fold_summary(k: int, meta: dict, truth: np.ndarray, windows: np.ndarray, center: np.ndarray) -> dict:
    row = dict(fold=k, best_lwlrap=meta["score"], best_epoch=meta["best_epoch"], epochs_run=meta["epochs_run"],
               seconds=meta["seconds"], oof_windows=lwlrap(truth, windows), oof_center=lwlrap(truth, center))
    log.info("fold %d: best lwlrap %.4f at epoch %d; OOF whole-clip windows %.4f, centre crop %.4f", k,
             row["best_lwlrap"], row["best_epoch"], row["oof_windows"], row["oof_center"])
    return row
''')

_add('src/fattag/weights.py', r'''
"""Saved weights and their settings: what a saved stage depends on, what a checkpoint carries, and how a
predict-only run gets its models and the settings to predict with.

- A stage's *recipe* (`stage_recipe`) is every setting its weights depend on, plus the data dir: a later run in
  the same work dir reuses or resumes the stage only when its own recipe is the same (checkpoint.StageDir).
- A checkpoint's *metadata* (`model_meta`) is what prediction needs to rebuild the model and refuse a mismatched
  dataset: the classes, the feature and the model settings.
- The *inference settings* a run predicted the test set with go once to `inference.json` in its work dir, beside
  the fold folders (`save_inference`); a predict-only run from those weights starts from them. The run's decision
  thresholds per class (thresholds.py) go in the same file, under "thresholds" (`save_thresholds`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from torch import nn

from .checkpoint import atomic_write_text, load_checkpoint
from .config import REMOVED, Config, upgrade_settings, with_settings
from .model import build_model

FEATURE_KEYS = ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "f_min", "f_max", "top_db",
                "trim_silence", "trim_db", "crop_seconds")
MODEL_KEYS = ("arch", "self_attention", "mish", "dropout", "input_norm", "pool", "freq_norm", "freq_rf", "temporal",
              "noisy_head")
INFERENCE_KEYS = ("tta_step_frac", "tta_aggregate", "tta_aug_passes", "fold_ensemble", "class_balance", "batch_size")
# Settings that do not change what a trained stage's weights are: the schedule's length (the budget plans it, and a
# resumed stage keeps its own), the budget, workers, the CPU memory layout and mixed precision (float rounding only,
# like the device itself), how test clips are predicted, and the pseudo-label round's settings (the round adds
# ROUND_KEYS to its own recipe). Every other setting is part of a stage's recipe.
NOT_RECIPE_KEYS = ("noisy.epochs", "curated.epochs", "pseudo_epochs", "pseudo_threshold", "lr_pseudo",
                   "train_on_test", "tag_segments", "time_budget", "safety_margin", "tta_fill_passes", "num_workers",
                   "channels_last", "amp",
                   *(k for k in INFERENCE_KEYS if k != "batch_size"))
# What a saved pseudo-label round depends on besides the recipe: how the teacher predicts and the round's settings.
ROUND_KEYS = ("class_balance", "tta_aggregate", "tta_step_frac", "fold_ensemble", "pseudo_threshold", "lr_pseudo")
# Settings added after stages were first saved, and the value that means "off": left out of a recipe while off, so
# that a stage saved before they existed is still the same recipe.
ADDED = {"noisy.freq_mixstyle": 0.0, "curated.freq_mixstyle": 0.0, "noisy.consistency": 0.0,
         "curated.consistency": 0.0, "mixstyle_alpha": 0.3, "teacher_decay": 0.99, "freq_norm": False, "freq_rf": 0,
         "temporal": "none", "noisy_head": False}
INFERENCE_FILE = "inference.json"
THRESHOLDS_KEY = "thresholds"   # inference.json's entry for the decision thresholds, {class: threshold}
log = logging.getLogger("fattag")


def stage_recipe(cfg: Config, data_dir, pseudo_round: bool = False) -> dict:
    """The settings a saved stage's weights depend on, by --set name, plus the data dir (and, for a pseudo-label
    round, the round's own settings)."""
    flat = cfg.flat_dict()
    recipe = {k: v for k, v in flat.items() if k not in NOT_RECIPE_KEYS and ADDED.get(k, object()) != v}
    recipe["data_dir"] = str(data_dir)
    if pseudo_round:
        recipe["pseudo"] = {k: flat[k] for k in ROUND_KEYS}
    return recipe


def feature_settings(cfg: Config) -> dict:
    """The settings a trained model's input depends on: weights are only valid with the same ones."""
    return {k: getattr(cfg, k) for k in FEATURE_KEYS}


def inference_settings(cfg: Config) -> dict:
    """How test clips are predicted: may differ between training and a later predict-only run."""
    return {k: getattr(cfg, k) for k in INFERENCE_KEYS}


def model_meta(cfg: Config, classes: list[str], **extra) -> dict:
    """What prediction needs to rebuild the model and refuse a mismatched dataset: the classes, the feature and
    the model settings (and `extra`: the stage, the fold, ...)."""
    return dict(classes=list(classes), features=feature_settings(cfg),
                model={k: getattr(cfg, k) for k in MODEL_KEYS}, **extra)


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


def final_weights(fold_model: Path) -> Path:
    """A fold's final weights: those after the test pseudo-label round when it ran (fold*/pseudo/), else stage 2's."""
    after_round = Path(fold_model).parent / "pseudo" / "model.pth"
    return after_round if after_round.is_file() else Path(fold_model)


def load_fold_models(weights_dir, classes: list[str] | None = None) -> list:
    """Every fold's final weights under `weights_dir` (fold*/model.pth, or fold*/pseudo/model.pth where the
    pseudo-label round ran) as (path, model, meta); a clear error when there are none or they mismatch `classes`
    (default: the first fold's, which the others must share)."""
    weights_dir = Path(weights_dir)
    paths = sorted(weights_dir.glob("fold*/model.pth")) or sorted(weights_dir.glob("**/fold*/model.pth"))
    if not paths:
        raise FileNotFoundError(f"no fold*/model.pth under {weights_dir}: point --weights at a training run's "
                                "work dir (or the dataset holding its fold folders)")
    loaded = []
    for path in map(final_weights, paths):
        meta, state = load_checkpoint(path)
        classes = meta["classes"] if classes is None else classes
        check_classes(meta, classes, source=str(path))
        loaded.append((path, model_from_state(meta, state), meta))
    return loaded


def save_inference(work_dir, cfg: Config) -> None:
    """inference.json: how this run predicted the test set, for a later predict-only run from its weights."""
    atomic_write_text(Path(work_dir) / INFERENCE_FILE, json.dumps(inference_settings(cfg), indent=2) + "\n")


def save_thresholds(work_dir, thresholds: dict | None) -> None:
    """The decision thresholds ({class: threshold}) added to the work dir's inference.json (nothing when None)."""
    if thresholds is None:
        return
    path = Path(work_dir) / INFERENCE_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_text(path, json.dumps({**saved, THRESHOLDS_KEY: thresholds}, indent=2) + "\n")


def inference_file(paths: list[Path]) -> Path | None:
    """The inference.json of the training run of these fold checkpoints: in the folder holding the fold folders."""
    for path in paths:
        folds_dir = next((p.parent for p in Path(path).parents if p.name.startswith("fold")), None)
        if folds_dir is not None and (folds_dir / INFERENCE_FILE).is_file():
            return folds_dir / INFERENCE_FILE
    return None


def saved_thresholds(paths: list[Path]) -> dict | None:
    """The decision thresholds the training run of these fold checkpoints saved, or None (a run older than them)."""
    found = inference_file(paths)
    return json.loads(found.read_text()).get(THRESHOLDS_KEY) if found is not None else None


def saved_inference(paths: list[Path], metas: list[dict]) -> dict:
    """The inference settings that the training run of these fold checkpoints used: its inference.json (in the
    folder holding the fold folders), else the settings older checkpoints carried in their metadata."""
    found = inference_file(paths)
    if found is not None:
        return {k: v for k, v in json.loads(found.read_text()).items() if k != THRESHOLDS_KEY}
    legacy = [upgrade_settings(m.get("inference", {})) for m in metas]
    used = sorted({k for group in legacy for k in group if k in REMOVED})
    if used:
        raise ValueError(f"these weights were predicted with settings that no longer exist: {', '.join(used)} "
                         "(removed, docs/ablation.md); predict them with the version that trained them")
    differ = sorted({k for group in legacy for k in group if any(g.get(k) != group.get(k) for g in legacy)})
    if differ:
        raise ValueError(f"the fold checkpoints disagree on inference settings {differ} ({paths[0]} and others)")
    if not legacy or not legacy[0]:
        log.warning("no %s beside the fold folders and no inference settings in the checkpoints: predicting with "
                    "this run's settings (upload the training run's %s with its fold folders)", INFERENCE_FILE,
                    INFERENCE_FILE)
        return {}
    return legacy[0]


def prediction_config(cfg: Config, models: list, explicit: dict) -> Config:
    """The settings to predict with: features and model from the checkpoints (`models`: (path, model, meta); every
    fold must agree), the inference settings the training run used, then the inference settings the user `--set`
    explicitly. Setting a feature or model value other than the weights' is an error: the weights are only valid
    with their own."""
    first_path, _, first = models[0]
    for group in ("features", "model"):
        for path, _, meta in models:
            diff = sorted(k for k in set(first[group]) | set(meta[group]) if first[group].get(k) != meta[group].get(k))
            if diff:
                raise ValueError(f"the fold checkpoints disagree on {group} settings {diff}: {first_path} has "
                                 f"{ {k: first[group].get(k) for k in diff} }, {path} has "
                                 f"{ {k: meta[group].get(k) for k in diff} }")
    fixed = {**first["features"], **first["model"]}
    clash = {k: (fixed[k], v) for k, v in explicit.items() if k in fixed and fixed[k] != v}
    if clash:
        raise ValueError("feature settings differ from the weights (saved, --set): "
                         + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in clash.items())
                         + "; feature and model settings come from the weights")
    inference = {**saved_inference([p for p, _, _ in models], [m for _, _, m in models]),
                 **{k: v for k, v in explicit.items() if k in INFERENCE_KEYS}}
    return with_settings(replace(cfg, **fixed), inference)
''')

_add('src/fattag/world.py', r'''
"""Several devices: one process per device in one torch.distributed group, and the few collectives the run needs.

`--devices N` spawns N ranks (torch.multiprocessing with spawn: CUDA cannot fork), each running the whole pipeline
on its own device (cuda:r, or its share of the CPU cores), in a process group (NCCL on CUDA, gloo on the CPU).
Under torchrun (RANK, WORLD_SIZE set) the ranks join torchrun's group instead, so the same code runs on several
nodes (with a work dir every node sees). Stage 1 trains data-parallel over the ranks (dataparallel.py); stage 2
and the pseudo-label round train whole folds per rank (`World.mine`), and their predictions are gathered
(`World.gather`); only rank 0 writes the shared files. fastai reads WORLD_SIZE/RANK from the environment and, with
a world above 1, all-gathers every batch's predictions, which would hang ranks training different folds: it
never sees the group.

Faults: a rank that raises or dies makes the parent end every other rank (torch's ProcessContext.join: SIGTERM,
then SIGKILL after a grace period) and exit with one line naming the rank and what it was doing; a rank dies with
its parent. A collective that waits past GROUP_TIMEOUT_S fails, as a last guard under torchrun.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .stages import fold_rank

log = logging.getLogger("fattag")
GROUP_TIMEOUT_S = 3600   # longer than any step one rank does alone (rank 0 decoding FAT2019's stores)
GRACE_S = 5              # a failed run's other ranks get this long to stop on their own before they are ended
_spawned: tuple | None = None   # (rank, size, init_method, status_dir) of a rank this process was spawned as


@dataclass(frozen=True)
class World:
    """This process's place among the run's ranks. With one rank every collective returns its input."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run's shared files (submission, oof.csv, scores, config, report)."""
        return self.rank == 0

    def mine(self, items) -> list:
        """This rank's share of `items`: the k-th item where fold k trains (stages.fold_rank)."""
        return [item for k, item in enumerate(items) if fold_rank(k, self.size) == self.rank]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank: decisions taken from one clock (deadlines, re-plans) must agree."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def device(self) -> torch.device:
        """This rank's device: cuda:local_rank (ranks share GPUs round-robin when there are fewer), else the CPU."""
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if self.size == 1:
            return torch.device("cuda")   # one process: torch's current CUDA device, as without ranks
        index = self.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


SINGLE = World()


def default_devices() -> int:
    """Every visible CUDA device; one process on the CPU (bench/devices.py measured 2 ranks on 2 cores)."""
    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def torchrun_size() -> int:
    """The world size torchrun (or any launcher setting RANK/WORLD_SIZE) started this process in; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def should_spawn(devices: int) -> bool:
    """Whether this process must start the ranks: several asked for, and it is neither a rank nor under torchrun."""
    return devices > 1 and _spawned is None and torchrun_size() == 1


def join(devices: int) -> World:
    """This process's World: a spawned rank joins its parent's group, a torchrun rank torchrun's; else one rank."""
    if _spawned is not None:
        rank, size, init, _ = _spawned
        local = rank
    elif torchrun_size() > 1:
        rank, size, init = int(os.environ["RANK"]), torchrun_size(), "env://"
        local = int(os.environ.get("LOCAL_RANK", rank))
        os.environ["WORLD_SIZE"], os.environ["RANK"] = "1", "0"   # fastai must see one process (module docstring)
    else:
        return SINGLE
    world = World(rank, size, local)
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= size else "gloo"
    world.device()   # NCCL's collectives need the rank's device selected first
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    atexit.register(leave)
    return world


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- what a rank is doing (for the error line)


def doing(step: str) -> None:
    """Note what this rank is doing now; if it dies, the parent's error line names it."""
    if _spawned is not None:
        try:
            (Path(_spawned[3]) / f"rank{_spawned[0]}.step").write_text(step)
        except OSError:
            pass


def _step_of(status_dir: str, rank: int) -> str:
    try:
        return (Path(status_dir) / f"rank{rank}.step").read_text() or "start-up"
    except OSError:
        return "start-up"


# ---------------------------------------------------------------- starting the ranks


def spawn(entry, argv, defaults, devices: int) -> int:
    """Run `entry(argv, defaults)` (run.main) in `devices` spawned ranks; wait for all, or end all when one fails.
    Returns 0, or raises SystemExit with one line naming the failed rank and its step."""
    status_dir = tempfile.mkdtemp(prefix="fattag-ranks-")
    init = f"file://{status_dir}/group"
    threads = max(1, torch.get_num_threads() // devices)   # the CPU cores split between the ranks
    log.info("starting %d ranks (%s, %d thread(s) each)", devices,
             "one CUDA device each" if torch.cuda.is_available() else "CPU processes", threads)
    ctx = torch.multiprocessing.start_processes(_rank_main, args=(entry, argv, defaults, devices, init, status_dir,
                                                                  threads), nprocs=devices, join=False,
                                                start_method="spawn")
    try:
        while not ctx.join(grace_period=GRACE_S):
            pass
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException) as e:
        raise SystemExit(f"run.py: {first_failure(ctx.processes, status_dir, e)}") from None
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)
    return 0


def first_failure(processes, status_dir: str, error: Exception) -> str:
    """The line that names what went wrong first. A rank's failure makes the others fail in their next collective,
    and torch reports whichever exit it noticed first: a rank killed by a signal other than the SIGTERM that ended
    the others, with no failure of its own recorded, died first; else the earliest recorded failure."""
    for rank, proc in enumerate(processes):
        code = proc.exitcode
        if (code is not None and code < 0 and -code != signal.SIGTERM
                and not (Path(status_dir) / f"rank{rank}.failed").exists()):
            return (f"rank {rank} died (signal {signal.Signals(-code).name}) during {_step_of(status_dir, rank)}; "
                    f"the other ranks were stopped")
    records = []
    for path in Path(status_dir).glob("rank*.failed"):
        at, _, line = path.read_text().partition("\t")
        records.append((float(at), line))
    if records:
        return min(records)[1]
    return [line for line in str(error).splitlines() if line.strip()][-1]


def _rank_main(rank, entry, argv, defaults, size, init, status_dir, threads) -> None:
    """A spawned rank: die with the parent, take a share of the cores, run the pipeline, report what failed."""
    global _spawned
    _die_with_parent()
    torch.set_num_threads(threads)
    _spawned = (rank, size, init, status_dir)
    try:
        rc = entry(argv, defaults)
    except SystemExit as e:
        if e.code in (None, 0):
            return
        _failed(status_dir, rank, f"rank {rank} stopped during {_step_of(status_dir, rank)}: {e.code}")
        raise
    except Exception as e:
        log.exception("rank %d failed during %s", rank, _step_of(status_dir, rank))
        _failed(status_dir, rank, f"rank {rank} failed during {_step_of(status_dir, rank)}: {type(e).__name__}: {e}")
        raise
    finally:
        leave()
    if rc:
        _failed(status_dir, rank, f"rank {rank} ended with exit code {rc}")
        raise SystemExit(rc)


def _failed(status_dir: str, rank: int, line: str) -> None:
    """Record when and how this rank failed (first_failure picks the earliest), before the group is left."""
    (Path(status_dir) / f"rank{rank}.failed").write_text(f"{time.time()}\t{line.splitlines()[0] if line else ''}")


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed run leaves no rank behind."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
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
import time

import numpy as np

if __package__ in (None, "") and "fattag" not in sys.modules:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fattag.cli import parse_args  # noqa: E402
from fattag.context import check_before_spawn, devices_asked, open_run, open_tag  # noqa: E402
from fattag.cost import count_workload  # noqa: E402
from fattag.data import load_dataset  # noqa: E402
from fattag.features import build_shared_store  # noqa: E402
from fattag.metrics import lwlrap  # noqa: E402
from fattag.precision import check_device  # noqa: E402
from fattag.predict import predict_and_submit, submit_fold_models  # noqa: E402
from fattag.pseudo import pseudo_label_round  # noqa: E402
from fattag.report import write_report  # noqa: E402
from fattag.select import select_noisy_pool  # noqa: E402
from fattag.submission import class_prior, write_oof, write_submission  # noqa: E402
from fattag.tag import tag_files  # noqa: E402
from fattag.thresholds import oof_thresholds  # noqa: E402
from fattag.throughput import measure_throughput  # noqa: E402
from fattag.splits import TrainingData  # noqa: E402
from fattag.train import train_folds, train_stage1  # noqa: E402
from fattag.weights import load_fold_models, prediction_config, save_thresholds, saved_thresholds  # noqa: E402
from fattag.world import should_spawn, spawn  # noqa: E402

log = logging.getLogger("fattag")
MEASURE_SHARE = 0.03  # at most this share of the budget goes to measuring throughput


def main(argv=None, defaults: dict | None = None) -> int:
    args = parse_args(argv, defaults)
    if args.mode == "tag":   # the user's own files with a training run's models: one process, no dataset
        cfg, explicit, work_dir = open_tag(args)
        return tag_files(cfg, explicit, args.weights, args.paths, work_dir)
    if should_spawn(devices_asked(args)):   # several devices: one process (rank) each, every one running main()
        check_before_spawn(args)
        return spawn(main, argv, defaults, devices_asked(args))
    run = open_run(args)
    data = load_dataset(run.data_dir)
    log.info(data.summary())
    prior = class_prior(data.curated.targets)

    # 1. A prior-based submission at once, so a valid file exists whatever happens next (a resumed run keeps the
    #    one it has); a clear stop on a GPU this torch cannot run on; then the log-mel stores (with several ranks:
    #    built once by rank 0, shared by all).
    write_prior_submission(run, data, prior)
    check_device(run.device)
    if args.mode == "predict":
        return predict_only(run, data, args.weights, prior)
    test, curated, noisy = build_stores(run, data)
    d = TrainingData.make(data.classes, curated, noisy, run.cfg)

    # 2. Plan epochs, folds and TTA passes to fit the time budget, from measured throughput.
    plan_budget(run, len(data.classes), noisy, curated, test)

    # 3. Stage 1 on the noisy set (one shared model, data-parallel over the ranks; optionally only the noisy clips
    #    a curated-trained scorer agrees with), 4. stage 2 on each curated fold (N ranks: N folds at a time),
    #    warm-started from it.
    select_noisy_pool(run, d)
    stage1 = train_stage1(run, d)
    folds = train_folds(run, d, stage1.weights)

    # 5. Out-of-fold scores: centre crop (no TTA), whole-clip windows, windows + augmented passes; oof.csv; the
    #    decision threshold of each class, chosen on them.
    scores = score_oof(run, data, folds)
    thresholds = oof_thresholds(data.classes, data.curated.targets, folds.oof_tta)

    # 6. Test pseudo-labels: the fold ensemble labels the test clips, each fold model trains on them as well.
    folds = pseudo_label_round(run, d, folds, test)

    # 7. Test: whole-clip TTA with every fold model (augmented passes as the time left allows), fold ensemble;
    #    every test clip gets a row. inference.json records how it was done.
    _, unbalanced = submit_fold_models(run, data, folds, test, prior)

    # 8. What the run did: config.json, scores.json, the decision thresholds (in inference.json), the time plan
    #    against actual, and the run report (dataset, fold scores, curves, per-class lwlrap, thresholds, predictions).
    write_outputs(run, data, [curated, noisy, test], stage1, folds, scores, thresholds, unbalanced)
    return 0


def write_prior_submission(run, data, prior) -> None:
    """submission.csv from the class prior, unless the run (resumed) already has one: rank 0 writes it."""
    if run.world.is_main and not (run.work_dir / "submission.csv").exists():
        write_submission(run.work_dir / "submission.csv", data.sample_submission, data.test.fnames, data.classes,
                         np.tile(prior, (len(data.test), 1)))


def build_stores(run, data) -> tuple:
    """The log-mel stores (test, curated, noisy): no noisy store without a noisy set or stage-1 epochs."""
    t0, cfg = time.time(), run.cfg
    test, curated = (build_shared_store(t, cfg, run.device, run.world, run.work_dir / "stores")
                     for t in (data.test, data.curated))
    noisy = (build_shared_store(data.noisy, cfg, run.device, run.world, run.work_dir / "stores")
             if data.noisy is not None and cfg.noisy.epochs > 0 else None)
    run.record("decode + log-mel", time.time() - t0)
    return test, curated, noisy


def dataset_summary(run, stores) -> dict:
    return dict(data_dir=str(run.data_dir), demo=run.is_demo, sets=[st.summary() for st in stores if st is not None])


def plan_budget(run, n_classes, noisy, curated, test) -> None:
    """Measure this machine's speed and fit the recipe into what is left of the budget (or keep it as is)."""
    t0 = time.time()
    remaining = run.budget.remaining()
    tp = measure_throughput(run.cfg, n_classes, run.device, max_seconds=remaining and remaining * MEASURE_SHARE,
                            world=run.world)
    run.record("measure throughput", time.time() - t0)
    run.budget.start(count_workload(run.cfg, noisy, curated, test), tp)
    run.share_plan()   # every rank measured its own device; rank 0's figures plan the run
    run.save_config()
    log.info("measured %s\n%s", tp.describe(), run.budget.plan.table())


def score_oof(run, data, folds) -> dict:
    """The OOF lwlrap of each kind of prediction over the clips the fold models predicted; rank 0 writes oof.csv."""
    targets, rows = data.curated.targets, folds.predicted
    if run.world.is_main:
        write_oof(run.work_dir / "oof.csv", data.curated.fnames, data.classes, folds.oof_tta)
    if not rows.any():
        return {}
    scores = {name: lwlrap(targets[rows], probs[rows]) for name, probs in
              (("oof_center", folds.oof_center), ("oof_windows", folds.oof_windows), ("oof_tta", folds.oof_tta))}
    log.info("OOF lwlrap over %d clips: centre crop %.4f | whole-clip windows %.4f | + augmented passes %.4f",
             int(rows.sum()), scores["oof_center"], scores["oof_windows"], scores["oof_tta"])
    return scores


def write_outputs(run, data, stores, stage1, folds, scores, thresholds, test_probs) -> None:
    """Rank 0's record of the training run (every rank's stage timings gathered first): how it used its budget,
    config.json, scores.json, the decision thresholds beside the inference settings, the time plan against actual,
    report.md (`test_probs`: before class balancing)."""
    run.gather_timings()
    if not run.world.is_main:
        return
    save_thresholds(run.work_dir, thresholds)
    usage = run.budget.usage(run.started)
    if usage:
        log.info("time budget: used %.0f of %.0f usable s; %.0f s (%.0f %%) unused: %s", usage["used_s"],
                 usage["usable_s"], usage["unused_s"], 100 * usage["unused_share"], usage["why"])
    run.save_config(folds_run=folds.results, budget_use=usage, timings=run.timings)
    (run.work_dir / "scores.json").write_text(json.dumps(dict(scores, folds=folds.results,
                                                              stage1_holdout=stage1.holdout), indent=2) + "\n")
    log.info("time plan vs actual:\n%s", run.timing_table())
    rows = folds.predicted
    write_report(run.work_dir, mode="train", classes=data.classes, timings=run.timings, scores=scores,
                 test_audio=test_audio_use(run.cfg, folds.results),
                 dataset=dataset_summary(run, stores), folds=folds.results, stage1=stage1.holdout, budget_use=usage,
                 thresholds=thresholds, oof_truth=data.curated.targets[rows], oof_probs=folds.oof_tta[rows],
                 test_probs=test_probs)


def test_audio_use(cfg, fold_rows: list[dict]) -> str:
    """Whether this run trained on test audio, in words for the report (DCASE's rules forbid it; docs/kaggle.md)."""
    rounds = sum("pseudo_epoch" in row for row in fold_rows)
    if rounds:
        return f"trained on: the pseudo-label round trained {rounds} fold model(s) on the test clips"
    why = "train_on_test=false" if not cfg.train_on_test else "the pseudo-label round did not run"
    return f"not trained on ({why})"


def predict_only(run, data, weights_dir, prior) -> int:
    """Kaggle-style inference from attached fold weights: the weights say how to predict; no training data is read."""
    if not weights_dir:
        raise SystemExit("--mode predict needs --weights DIR (a training run's work dir)")
    models = load_fold_models(weights_dir, data.classes)
    cfg = prediction_config(run.cfg, models, run.explicit)
    run.save_config(cfg, weights=str(weights_dir))
    log.info("loaded %d fold models from %s", len(models), weights_dir)
    test = build_shared_store(data.test, cfg, run.device, run.world, run.work_dir / "stores")
    mine = run.world.mine([(meta.get("fold", k), model) for k, (_, model, meta) in enumerate(models)])
    _, unbalanced = predict_and_submit(run, cfg, data, [model for _, model in mine], test, prior,
                                       [k for k, _ in mine])
    if not run.world.is_main:
        return 0
    save_thresholds(run.work_dir, saved_thresholds([path for path, _, _ in models]))
    log.info("time:\n%s", run.timing_table())
    write_report(run.work_dir, mode="predict", classes=data.classes, timings=run.timings, test_probs=unbalanced,
                 dataset=dataset_summary(run, [test]),
                 loaded=[f"{path} (fold {meta.get('fold')}, lwlrap {meta.get('score', float('nan')):.4f}, "
                         f"{meta['model']['arch']})" for path, _, meta in models])
    return 0


if __name__ == "__main__":
    sys.exit(main())
''')

# ==== start ======================================================================================
if __name__ == "__mp_main__":  # a rank spawned by --devices N: it re-runs this file, then unpickles its work,
    load_entry(install(SOURCES))  # which names fattag.world and run.main: both must import from memory first
if __name__ == "__main__":
    if "ipykernel" in sys.modules:  # a notebook cell: sys.argv holds the kernel's own arguments
        _rc = main([])
        if _rc:
            raise SystemExit(_rc)
    else:
        sys.exit(main(sys.argv[1:]))
