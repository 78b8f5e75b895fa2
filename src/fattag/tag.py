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
