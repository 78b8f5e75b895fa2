import logging
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

import fattag.data as data_mod
from fattag.audio import write_wav
from fattag.data import (ClipTable, DataError, decode_report, find_data_dir, iter_decoded, load_dataset,
                         read_test_table, read_train_csv, read_vocabulary)

# 7 classes in a deliberately non-alphabetical order: the vocabulary must follow the file.
CLASSES = ["Slam", "Bark", "Walk_and_footsteps", "Accordion", "Zipper_(clothing)", "Hiss", "Cheering"]
SR = 8000


def write_csv(path, rows, columns=("fname", "labels")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)


def tone(n, hz=440.0, amp=0.5):
    return amp * np.sin(2 * np.pi * hz * np.arange(n) / SR)


def make_dataset(root, with_noisy=True, n_test=3):
    """A tiny FAT2019-layout folder; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    sub = pd.DataFrame(0.0, index=range(n_test), columns=CLASSES)
    sub.insert(0, "fname", [f"t{i}.wav" for i in range(n_test)][::-1])  # not sorted
    sub.to_csv(root / "sample_submission.csv", index=False)
    curated = [("c0.wav", "Slam,Bark"), ("c1.wav", "Hiss"), ("c2.wav", "Cheering,Accordion,Slam")]
    write_csv(root / "train_curated.csv", curated)
    sets = {"train_curated": [f for f, _ in curated], "test": list(sub["fname"])}
    if with_noisy:
        noisy = [("n0.wav", "Zipper_(clothing)"), ("n1.wav", "Walk_and_footsteps,Bark")]
        write_csv(root / "train_noisy.csv", noisy)
        sets["train_noisy"] = [f for f, _ in noisy]
    for folder, fnames in sets.items():
        (root / folder).mkdir(exist_ok=True)
        for i, fname in enumerate(fnames):
            write_wav(root / folder / fname, tone(200 + 50 * i), SR)
    return root


# ---------- vocabulary ----------

def test_vocabulary_follows_sample_submission(tmp_path):
    root = make_dataset(tmp_path / "d")
    assert read_vocabulary(root / "sample_submission.csv") == CLASSES


@pytest.mark.parametrize("header, message", [
    ("name,A,B", "no 'fname' column"),
    ("fname", "no class columns"),
    ("fname,A,B,A", "duplicate class columns: ['A']"),
])
def test_vocabulary_errors(tmp_path, header, message):
    path = tmp_path / "sample_submission.csv"
    path.write_text(header + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_vocabulary(path)


def test_vocabulary_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_vocabulary(tmp_path / "nope.csv")


# ---------- training CSVs ----------

def test_quoted_multilabels_become_multi_hot(tmp_path):
    csv_path = tmp_path / "train_curated.csv"
    write_csv(csv_path, [("a.wav", "Walk_and_footsteps,Slam"), ("b.wav", "Hiss"), ("c.wav", "Bark , Cheering")])
    assert '"Walk_and_footsteps,Slam"' in csv_path.read_text()  # the quoting is real
    table = read_train_csv(csv_path, tmp_path / "train_curated", CLASSES)
    assert table.name == "train_curated" and len(table) == 3
    assert table.fnames == ["a.wav", "b.wav", "c.wav"]
    assert table.paths[1] == tmp_path / "train_curated" / "b.wav"
    expected = np.zeros((3, len(CLASSES)), dtype=np.float32)
    for row, labels in enumerate([["Walk_and_footsteps", "Slam"], ["Hiss"], ["Bark", "Cheering"]]):
        expected[row, [CLASSES.index(c) for c in labels]] = 1.0
    assert table.targets.dtype == np.float32
    np.testing.assert_array_equal(table.targets, expected)


def test_unknown_label_names_file_row_and_label(tmp_path):
    csv_path = tmp_path / "train_noisy.csv"
    write_csv(csv_path, [("a.wav", "Hiss"), ("b.wav", "Bark"), ("c.wav", "Slam,Meow")])
    with pytest.raises(DataError) as err:
        read_train_csv(csv_path, tmp_path, CLASSES)
    msg = str(err.value)
    assert "train_noisy.csv" in msg and "row 3" in msg and "'Meow'" in msg and "c.wav" in msg


@pytest.mark.parametrize("rows, message", [
    ([("a.wav", "Hiss"), ("b.wav", "")], "row 2"),
    ([("a.wav", "Hiss,,Bark")], "empty label"),
    ([("a.wav", "Hiss"), ("b.wav", "Bark"), ("a.wav", "Slam")], "more than once"),
])
def test_bad_rows(tmp_path, rows, message):
    csv_path = tmp_path / "t.csv"
    write_csv(csv_path, rows)
    with pytest.raises(DataError, match=message):
        read_train_csv(csv_path, tmp_path, CLASSES)


def test_missing_columns_error_lists_the_columns(tmp_path):
    csv_path = tmp_path / "train_curated.csv"
    write_csv(csv_path, [("a.wav", "Hiss")], columns=("fname", "label"))
    with pytest.raises(DataError) as err:
        read_train_csv(csv_path, tmp_path, CLASSES)
    msg = str(err.value)
    assert "train_curated.csv" in msg and "'labels'" in msg and "['fname', 'label']" in msg


def test_missing_and_empty_csv(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_train_csv(tmp_path / "absent.csv", tmp_path, CLASSES)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_train_csv(tmp_path / "empty.csv", tmp_path, CLASSES)


def test_clip_table_subset():
    targets = np.eye(4, 3, dtype=np.float32)
    table = ClipTable("x", list("abcd"), [f"/p/{c}" for c in "abcd"], targets)
    sub = table.subset([3, 1])
    assert len(sub) == 2 and sub.fnames == ["d", "b"] and sub.paths == ["/p/d", "/p/b"]
    np.testing.assert_array_equal(sub.targets, targets[[3, 1]])
    masked = table.subset(np.array([True, False, True, False]))
    assert masked.fnames == ["a", "c"]
    assert ClipTable("t", ["a"], ["/a"], None).subset([0]).targets is None


# ---------- dataset ----------

def test_load_dataset(tmp_path):
    root = make_dataset(tmp_path / "d", with_noisy=True)
    ds = load_dataset(root)
    assert ds.classes == CLASSES and ds.sample_submission == root / "sample_submission.csv"
    assert (len(ds.curated), len(ds.noisy), len(ds.test)) == (3, 2, 3)
    assert ds.test.targets is None and ds.test.fnames == ["t2.wav", "t1.wav", "t0.wav"]
    assert ds.test.paths[0] == root / "test" / "t2.wav"
    assert ds.noisy.targets[1, CLASSES.index("Walk_and_footsteps")] == 1.0
    summary = ds.summary()
    assert "7 classes" in summary and "train_curated 3" in summary and "train_noisy 2" in summary
    assert "test 3" in summary


def test_noisy_absent_is_none(tmp_path):
    ds = load_dataset(make_dataset(tmp_path / "d", with_noisy=False))
    assert ds.noisy is None and "train_noisy absent" in ds.summary()


def test_read_test_table_keeps_submission_order(tmp_path):
    root = make_dataset(tmp_path / "d", n_test=5)
    table = read_test_table(root / "sample_submission.csv", root / "test")
    assert table.fnames == pd.read_csv(root / "sample_submission.csv")["fname"].tolist()
    assert table.targets is None and table.name == "test"


def test_find_data_dir(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d")
    assert find_data_dir(str(root)) == root
    with pytest.raises(DataError, match="does not exist"):
        find_data_dir(str(tmp_path / "missing"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="sample_submission.csv"):
        find_data_dir(str(tmp_path / "bare"))
    monkeypatch.setattr(data_mod, "KAGGLE_DATA_DIR", str(root))
    assert find_data_dir(None) == root
    monkeypatch.setattr(data_mod, "KAGGLE_DATA_DIR", str(tmp_path / "no_kaggle_here"))
    assert find_data_dir(None) is None


# ---------- decoding ----------

def mixed_table(tmp_path):
    """Good and broken files interleaved; returns (table, {index: expected wave or None})."""
    d = tmp_path / "train_curated"
    d.mkdir()
    expected = {}
    files = []
    for i, kind in enumerate(["good", "missing", "good", "empty", "text", "good", "header_only", "good"]):
        path = d / f"{i}_{kind}.wav"
        files.append(path)
        if kind == "good":
            expected[i] = tone(100 + 37 * i, hz=300 + 50 * i)
            write_wav(path, expected[i], SR)
        else:
            expected[i] = None
            if kind == "empty":
                path.write_bytes(b"")
            elif kind == "text":
                path.write_text("fname,labels\n")
            elif kind == "header_only":
                write_wav(path, tone(10), SR)
                path.write_bytes(path.read_bytes()[:44])
    return ClipTable("train_curated", [p.name for p in files], files, None), expected


@pytest.mark.parametrize("workers", [1, 3])
def test_iter_decoded_skips_and_counts_bad_files(tmp_path, workers):
    table, expected = mixed_table(tmp_path)
    results = list(iter_decoded(table, SR, workers=workers, progress=False))
    assert [i for i, _, _ in results] == list(range(len(table)))
    errors = []
    for i, wave, error in results:
        if expected[i] is None:
            assert wave is None and error
            errors.append((table.fnames[i], error))
        else:
            assert error is None
            np.testing.assert_allclose(wave, expected[i], atol=1 / 32768)
    reasons = dict(errors)
    assert len(errors) == 4
    assert "not found" in reasons["1_missing.wav"] and "empty" in reasons["3_empty.wav"]
    assert "RIFF" in reasons["4_text.wav"] and "no audio" in reasons["6_header_only.wav"]


def test_training_clips_in_other_formats_decode_and_without_soundfile_are_skipped_with_the_reason(tmp_path,
                                                                                                   monkeypatch):
    soundfile = pytest.importorskip("soundfile", reason="soundfile (requirements.txt) reads the non-WAV formats")
    write_wav(tmp_path / "a.wav", tone(SR), SR)
    soundfile.write(str(tmp_path / "b.flac"), tone(SR, hz=300), SR, subtype="PCM_16")
    table = ClipTable("train_curated", ["a.wav", "b.flac"], [tmp_path / "a.wav", tmp_path / "b.flac"], None)
    waves = [w for _, w, _ in iter_decoded(table, SR, progress=False)]
    np.testing.assert_allclose(waves[1], tone(SR, hz=300), atol=1 / 32768)
    monkeypatch.setitem(sys.modules, "soundfile", None)   # as if it were not installed
    results = list(iter_decoded(table, SR, progress=False))
    assert results[0][2] is None and results[1][1] is None
    assert results[1][2] == "reading .flac files needs the soundfile package (pip install soundfile)"


def test_iter_decoded_resamples_and_trims(tmp_path):
    path = tmp_path / "a.wav"
    write_wav(path, np.concatenate([np.zeros(4000), tone(SR), np.zeros(4000)]), SR)
    table = ClipTable("x", ["a.wav"], [path], None)
    [(_, plain, _)] = iter_decoded(table, 16000, progress=False)
    [(_, trimmed, _)] = iter_decoded(table, 16000, trim=True, progress=False)
    assert abs(len(plain) - 32000) <= 1
    assert 16000 <= len(trimmed) <= 16000 + 2 * 512


def test_iter_decoded_wraps_unexpected_exceptions(tmp_path, monkeypatch):
    def boom(path, *args, **kwargs):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(data_mod, "load_clip", boom)
    table = ClipTable("x", ["a", "b"], [tmp_path / "a", tmp_path / "b"], None)
    results = list(iter_decoded(table, SR, workers=2, progress=False))
    assert [(i, w, e) for i, w, e in results] == [(0, None, "RuntimeError: disk on fire"),
                                                  (1, None, "RuntimeError: disk on fire")]


def test_iter_decoded_bounds_clips_in_flight(tmp_path, monkeypatch):
    started = []
    lock = threading.Lock()

    def fake_load(path, *args, **kwargs):
        with lock:
            started.append(path)
        return np.zeros(4, dtype=np.float32)
    monkeypatch.setattr(data_mod, "load_clip", fake_load)
    monkeypatch.setattr(data_mod.os.path, "getsize", lambda p: 0)
    n, workers = 200, 2
    table = ClipTable("x", [str(i) for i in range(n)], [tmp_path / str(i) for i in range(n)], None)
    gen = iter_decoded(table, SR, workers=workers, progress=False)
    next(gen)
    time.sleep(0.2)  # give the pool every chance to run ahead
    assert len(started) <= 4 * workers + 1
    gen.close()  # stopping early must not hang or decode the rest
    assert len(started) <= 4 * workers + 1


def test_iter_decoded_progress_bar_and_log(tmp_path, capsys, caplog):
    table, _ = mixed_table(tmp_path)
    with caplog.at_level(logging.INFO, logger="fattag"):
        n = sum(1 for _ in iter_decoded(table, SR, workers=2, progress=True, desc="curated"))
    assert n == len(table)
    assert "curated" in capsys.readouterr().err
    assert any("8 clips (4 skipped)" in r.getMessage() and "MB/s" in r.getMessage() for r in caplog.records)


def test_decode_report(caplog):
    with caplog.at_level(logging.WARNING, logger="fattag"):
        text = decode_report("train_curated", [("x.wav", "file is empty"), ("y.wav", "not a RIFF/WAVE file")])
    assert text.splitlines() == ["skipped train_curated/x.wav: file is empty",
                                 "skipped train_curated/y.wav: not a RIFF/WAVE file",
                                 "train_curated: 2 file(s) skipped"]
    assert [r.getMessage() for r in caplog.records] == text.splitlines()
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    assert decode_report("test", []) == "test: 0 file(s) skipped" and not caplog.records
