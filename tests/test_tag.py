"""The tag mode, the Tagger API and the installed command: a user's own files in any format, labels, segments."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, RUN, run_pipeline
from fattag.audio import read_wav, write_wav
from fattag.tag import Tagger, find_audio, segment_bounds

soundfile = pytest.importorskip("soundfile", reason="soundfile (requirements.txt) reads the non-WAV formats")


@pytest.fixture(scope="module")
def user_folder(tiny_data, tmp_path_factory) -> Path:
    """The tiny test clips as a user's folder: half WAV, half FLAC (the same samples) in a subfolder, plus a corrupt
    file, an empty file, a clip far shorter than one window and a file that is not audio (left out)."""
    folder = tmp_path_factory.mktemp("user") / "audio"
    (folder / "flac").mkdir(parents=True)
    for k, wav in enumerate(sorted((tiny_data / "test").glob("*.wav"))):
        if k % 2:
            wave, sr = soundfile.read(str(wav), dtype="int16")
            soundfile.write(str(folder / "flac" / (wav.stem + ".flac")), wave, sr, subtype="PCM_16")
        else:
            shutil.copy(wav, folder / wav.name)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + os.urandom(64))
    (folder / "empty.flac").write_bytes(b"")
    write_wav(folder / "short.wav", 0.3 * np.sin(np.arange(1600) / 5.0), 16000)   # 0.1 s; a window is 2 s
    (folder / "notes.txt").write_text("not audio")
    return folder


@pytest.fixture(scope="module")
def tagged(tiny_run, user_folder, tmp_path_factory) -> Path:
    """The README's tag command over the user's folder, with 0.5 s segments."""
    out = tmp_path_factory.mktemp("tags")
    proc = run_pipeline(["--mode", "tag", "--weights", tiny_run, "--work-dir", out, "--segments", "0.5", user_folder])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tagged 11 file(s) (2 could not be read)" in proc.stderr and "files/s" in proc.stderr
    return out


def test_one_row_per_file_with_the_errors_in_their_rows(tagged, user_folder):
    tags = pd.read_csv(tagged / "tags.csv", keep_default_na=False)
    names = {Path(f).name: row for f, row in zip(tags["fname"], tags.to_dict("records"))}
    assert len(tags) == 11 and "notes.txt" not in names                      # 8 clips + corrupt, empty, short
    assert all(f.startswith(str(user_folder)) for f in tags["fname"])           # the path as found
    assert names["corrupt.wav"]["error"] == "no fmt chunk (truncated header?)"
    assert names["empty.flac"]["error"] == "file is empty"
    assert names["short.wav"]["error"] == "" and float(names["short.wav"]["duration"]) == pytest.approx(0.1)
    assert names["corrupt.wav"]["labels"] == "" and all(names["corrupt.wav"][c] == "" for c in tags.columns[4:])
    probs = tags[tags["error"] == ""].iloc[:, 4:].astype(float).to_numpy()
    assert probs.shape == (9, 4) and np.isfinite(probs).all() and probs.std() > 0.01


def test_probabilities_equal_predict_mode_without_class_balancing(tiny_run, tiny_data, tagged, tmp_path):
    proc = run_pipeline(["--mode", "predict", "--weights", tiny_run, "--data-dir", tiny_data, "--work-dir", tmp_path,
                         "--set", "class_balance=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = pd.read_csv(tmp_path / "submission.csv").set_index("fname")
    tags = pd.read_csv(tagged / "tags.csv", keep_default_na=False)
    tags = tags[tags["fname"].map(lambda f: Path(f).stem).isin({Path(f).stem for f in predicted.index})]
    assert len(tags) == len(predicted) == 8
    ours = tags.set_index(tags["fname"].map(lambda f: Path(f).stem + ".wav"))[predicted.columns].astype(float)
    np.testing.assert_allclose(ours.loc[predicted.index].to_numpy(), predicted.to_numpy(), atol=1e-5)


def test_labels_are_the_classes_at_or_above_the_runs_thresholds(tiny_run, tagged):
    thresholds = json.loads((tiny_run / "inference.json").read_text())["thresholds"]
    tags = pd.read_csv(tagged / "tags.csv", keep_default_na=False)
    tags = tags[tags["error"] == ""]
    listed_any = False
    for _, row in tags.iterrows():
        labels = [part.split(":") for part in row["labels"].split(";") if part]
        expected = sorted((c for c in thresholds if float(row[c]) >= thresholds[c]), key=lambda c: -float(row[c]))
        assert [name for name, _ in labels] == expected
        assert all(abs(float(p) - float(row[name])) < 0.006 for name, p in labels)
        listed_any |= bool(labels)
    assert listed_any


def test_segments_cover_each_file_without_gaps(tagged):
    tags = pd.read_csv(tagged / "tags.csv", keep_default_na=False)
    segments = pd.read_csv(tagged / "segments.csv", keep_default_na=False)
    ok = tags[tags["error"] == ""]
    assert set(segments["fname"]) == set(ok["fname"])
    for fname, duration in zip(ok["fname"], ok["duration"]):
        rows = segments[segments["fname"] == fname]
        assert rows["start"].iloc[0] == 0 and rows["end"].iloc[-1] == pytest.approx(float(duration), abs=1e-6)
        np.testing.assert_allclose(rows["start"].iloc[1:].to_numpy(), rows["end"].iloc[:-1].to_numpy())
        assert ((rows["end"] - rows["start"]) <= 0.5 + 1e-9).all()
        assert len(rows) == int(np.ceil(float(duration) / 0.5 - 1e-6))


def test_segment_bounds_by_hand():
    assert segment_bounds(1.3, 0.5) == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.3)]
    assert segment_bounds(1.0, 0.5) == [(0.0, 0.5), (0.5, 1.0)]
    assert segment_bounds(0.2, 5.0) == [(0.0, 0.2)]


def test_api_and_command_give_the_same_table(tiny_run, user_folder, tagged):
    table = Tagger.load(tiny_run, device="cpu").tag([user_folder])
    written = pd.read_csv(tagged / "tags.csv", keep_default_na=False)
    assert list(table.columns) == list(written.columns)
    for column in ("fname", "labels", "error"):
        assert table[column].tolist() == written[column].tolist()
    numbers = written.columns[[1, *range(4, len(written.columns))]]
    np.testing.assert_allclose(table[numbers].to_numpy(float), written[numbers].replace("", np.nan).to_numpy(float),
                               atol=1e-6)


@pytest.fixture(scope="module")
def tagger(tiny_run):
    return Tagger.load(tiny_run, device="cpu")


def test_each_segment_is_scored_as_a_clip_of_its_own(tagger, tiny_data):
    wav = sorted((tiny_data / "test").glob("*.wav"))[0]
    wave, sr = read_wav(wav)
    assert sr == tagger.cfg.sample_rate   # no resampling: a segment is exactly these samples
    segments = tagger.segments([str(wav)], 0.5)
    second = wave[int(0.5 * sr):int(1.0 * sr)]
    alone = tagger.tag_arrays([second], sr)
    np.testing.assert_allclose(segments.iloc[1][tagger.classes].to_numpy(float),
                               alone.iloc[0][tagger.classes].to_numpy(float), atol=1e-6)
    assert not np.allclose(segments.iloc[0][tagger.classes].to_numpy(float),
                           segments.iloc[1][tagger.classes].to_numpy(float), atol=1e-3)


def test_arrays_with_their_sample_rate_equal_the_files_they_came_from(tagger, tmp_path):
    rng = np.random.default_rng(0)
    wave = (0.3 * np.sin(np.arange(33075) * 0.05) + 0.05 * rng.standard_normal(33075)).astype(np.float32)
    write_wav(tmp_path / "a.wav", wave, 22050, fmt="float32")         # 1.5 s at another rate: resampled
    from_file = tagger.tag([tmp_path / "a.wav"])
    from_array = tagger.tag_arrays([wave], 22050, names=["a"])
    np.testing.assert_array_equal(from_file[tagger.classes].to_numpy(), from_array[tagger.classes].to_numpy())
    assert from_array["duration"].iloc[0] == pytest.approx(1.5) and from_array["fname"].iloc[0] == "a"
    empty = tagger.tag_arrays([np.zeros(0)], 22050)
    assert empty["error"].iloc[0] == "has no audio (0 samples)" and empty[tagger.classes].isna().all(axis=None)


def test_a_file_is_trimmed_of_silence_as_the_training_clips_were(tagger):
    assert tagger.cfg.trim_silence   # the demo preset's weights: trained on trimmed clips
    tone = (0.5 * np.sin(np.arange(16384) * 0.07)).astype(np.float32)   # 32 frames of audio.TRIM_FRAME
    padded = np.concatenate([np.zeros(4096, np.float32), tone, np.zeros(4096, np.float32)])
    table = tagger.tag_arrays([tone, padded], 16000)
    np.testing.assert_allclose(table.iloc[1][tagger.classes].to_numpy(float),
                               table.iloc[0][tagger.classes].to_numpy(float), atol=1e-6)
    assert table["duration"].tolist() == [1.024, 1.536]   # the file's own length, silence included


def test_find_audio_searches_folders_recursively_and_keeps_every_file_given(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    clips = [f"{k:02d}.{ending}" for k, ending in enumerate(["wav", "flac", "ogg", "mp3", "WAV", "aiff"] * 2)]
    for name in [*np.random.default_rng(0).permutation(clips), "c/1.MP3", "readme.md"]:   # not created in order
        (tmp_path / "b" / name).write_bytes(b"x")
    found = find_audio([tmp_path / "b", tmp_path / "b" / "readme.md", tmp_path / "missing.ogg"])
    base = str(tmp_path / "b")
    assert found == [f"{base}/{name}" for name in sorted(clips)] + [f"{base}/c/1.MP3", f"{base}/readme.md",
                                                                    str(tmp_path / "missing.ogg")]


def test_tag_mode_needs_weights_and_paths_and_paths_need_tag_mode(tmp_path):
    for args, message in ((["--mode", "tag", "x.wav"], "--mode tag needs --weights DIR"),
                          (["--mode", "tag", "--weights", tmp_path], "--mode tag needs at least one PATH"),
                          (["x.wav"], "PATH arguments (x.wav, ...) are for --mode tag")):
        proc = run_pipeline([*args, "--work-dir", tmp_path / "out"])
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_pip_install_gives_a_fattag_command_with_the_options_of_run_py(tmp_path):
    setuptools = pytest.importorskip("setuptools", reason="building the package offline needs setuptools")
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools {setuptools.__version__} builds a wheel only with the wheel package, not installed")
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    target = tmp_path / "installed"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(target)}
    command = subprocess.run([str(target / "bin" / "fattag"), "--help"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
    script = subprocess.run([sys.executable, str(RUN), "--help"], capture_output=True, text=True, timeout=120)
    assert command.returncode == 0, command.stderr[-2000:]
    assert command.stdout.replace("usage: fattag", "usage: run.py") == script.stdout
    api = subprocess.run([sys.executable, "-c", "import fattag; from fattag import Tagger; print(fattag.__file__)"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert api.returncode == 0 and api.stdout.startswith(str(target)), api.stderr[-2000:]


def test_augmented_passes_are_off_unless_asked_for(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("stores", "*.png"))
    inference = json.loads((run / "inference.json").read_text())
    (run / "inference.json").write_text(json.dumps({**inference, "tta_aug_passes": 3, "tta_step_frac": 0.25}))
    default = Tagger.load(run, device="cpu")
    assert default.cfg.tta_aug_passes == 0 and default.cfg.tta_step_frac == 0.25   # the rest as the run predicted
    assert Tagger.load(run, device="cpu", settings={"tta_aug_passes": 2}).cfg.tta_aug_passes == 2
