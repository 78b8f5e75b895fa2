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
