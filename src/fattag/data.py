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
