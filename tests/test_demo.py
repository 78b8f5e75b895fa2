import hashlib
import json
import time
import wave
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fattag import demo
from fattag.demo import DEMO_VERSION, default_demo_dir, demo_classes, demo_truth, make_demo_dataset

# The first 7 classes: Bell_tone, Rising_chirp, Falling_chirp, Click_train, Noise_burst, Hum, Whistle.
SMALL = dict(n_classes=7, curated_per_class=12, noisy_per_class=5, n_test=70, sample_rate=8000)
# Every built-in class plus one melody pattern, one clip each: exercises all renderers cheaply.
ALL_CLASSES = dict(n_classes=17, curated_per_class=1, noisy_per_class=1, n_test=6, sample_rate=8000)
SPLITS = ("train_curated", "train_noisy", "test")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "small", seed=0, **SMALL)


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_wav(path: Path):
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0, w.getframerate()


def _labels(series) -> list[set]:
    return [set(s.split(",")) for s in series]


def _power(x, n_fft=256, hop=64):
    x = np.pad(x, (0, max(0, n_fft - x.size)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    return np.abs(np.fft.rfft(frames, axis=1)) ** 2


def _single_label_clips(root, cls):
    df = pd.read_csv(root / "train_curated.csv")
    return [_read_wav(root / "train_curated" / f) for f in df.fname[df.labels == cls]]


# --------------------------------------------------------------------------- determinism and caching

def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=5, **ALL_CLASSES)
    b = make_demo_dataset(tmp_path / "b", seed=5, **ALL_CLASSES)
    c = make_demo_dataset(tmp_path / "c", seed=6, **ALL_CLASSES)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) == 17 + 17 + 6 + 5 + 1  # wavs, 5 csv files, marker
    assert ha == hb
    wav_a = {h for name, h in ha.items() if name.endswith(".wav")}
    wav_c = {h for name, h in hc.items() if name.endswith(".wav")}
    assert not wav_a & wav_c
    assert ha["train_curated.csv"] != hc["train_curated.csv"]


def test_cached_call_is_fast_and_does_not_rewrite(data):
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    t0 = time.perf_counter()
    assert make_demo_dataset(data, seed=0, **SMALL) == data
    assert time.perf_counter() - t0 < 0.5
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    assert not [p for p in data.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    marker = json.loads((data / demo.MARKER).read_text())
    assert marker["version"] == DEMO_VERSION and marker["n_classes"] == 7


def test_other_parameters_or_force_regenerate(tmp_path):
    small = dict(ALL_CLASSES, n_classes=3)
    out = make_demo_dataset(tmp_path / "d", seed=1, **small)
    old = _hashes(out)
    make_demo_dataset(out, seed=1, **dict(small, n_test=4))
    assert len(pd.read_csv(out / "sample_submission.csv")) == 4
    make_demo_dataset(out, seed=1, **small)
    assert _hashes(out) == old
    (out / "train_curated.csv").write_text("damaged")
    make_demo_dataset(out, seed=1, force=True, **small)
    assert _hashes(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_csv", fail)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path / "e", seed=1, **ALL_CLASSES)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_demo_dataset(tmp_path / "mine", seed=1, **ALL_CLASSES)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_bad_parameters_raise(tmp_path):
    with pytest.raises(ValueError, match="n_classes"):
        make_demo_dataset(tmp_path / "x", n_classes=1)
    with pytest.raises(ValueError, match="n_test"):
        make_demo_dataset(tmp_path / "x", n_test=0)
    assert not (tmp_path / "x").exists()


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FATTAG_CACHE", str(tmp_path))
    assert default_demo_dir(7) == tmp_path / f"demo-{DEMO_VERSION}-seed7"
    monkeypatch.delenv("FATTAG_CACHE")
    repo = Path(demo.__file__).resolve().parents[2]
    assert default_demo_dir() == repo / ".cache" / f"demo-{DEMO_VERSION}-seed42"
    # bundled into one file (not under src/), or run without __file__: the user cache
    monkeypatch.setenv("HOME", str(tmp_path))
    source = Path(demo.__file__).read_text()
    for namespace in ({"__name__": "bundled", "__file__": str(tmp_path / "kernel.py")}, {"__name__": "bundled"}):
        exec(compile(source, "<kernel>", "exec"), namespace)
        assert namespace["default_demo_dir"](3) == tmp_path / ".cache" / "fattag" / f"demo-{DEMO_VERSION}-seed3"


# --------------------------------------------------------------------------- layout

def test_layout_and_csvs(data):
    classes = demo_classes(7)
    assert classes == sorted(classes) and len(set(classes)) == 7
    sub = pd.read_csv(data / "sample_submission.csv")
    assert list(sub.columns) == ["fname"] + classes
    assert (sub[classes] == 0).all().all()
    names = {}
    for split, csv_name in zip(SPLITS, ("train_curated.csv", "train_noisy.csv", "test_truth.csv")):
        df = pd.read_csv(data / csv_name)
        assert list(df.columns) == ["fname", "labels"]
        assert set(df.fname) == {p.name for p in (data / split).iterdir()}
        assert all(ls <= set(classes) for ls in _labels(df.labels))
        names[split] = set(df.fname)
    assert set(sub.fname) == names["test"]
    assert sum(map(len, names.values())) == len(set.union(*names.values()))  # names unique across splits
    assert len(names["train_curated"]) == 7 * 12 and len(names["train_noisy"]) == 7 * 5
    assert set(demo_truth(data, "noisy").fname) == names["train_noisy"]
    with pytest.raises(ValueError):
        demo_truth(data, "curated")


def test_multi_labels_are_quoted_and_parse_back(data):
    raw = (data / "train_curated.csv").read_text().splitlines()
    multi = [line for line in raw if '"' in line]
    assert multi and all(line.count(",") == 2 and line.endswith('"') for line in multi)
    cur = _labels(pd.read_csv(data / "train_curated.csv").labels)
    share = np.mean([len(ls) == 2 for ls in cur])
    assert 0.1 <= share <= 0.2 and max(map(len, cur)) == 2
    test = _labels(demo_truth(data, "test").labels)
    assert np.mean([len(ls) > 1 for ls in test]) == pytest.approx(0.4, abs=0.03)
    assert {len(ls) for ls in test} == {1, 2, 3}


def test_noisy_labels_are_about_30_percent_wrong(data):
    given = pd.read_csv(data / "train_noisy.csv")
    truth = demo_truth(data, "noisy")
    both = given.merge(truth, on="fname", suffixes=("_given", "_true"))
    assert len(both) == len(given) == len(truth)
    wrong = np.array([set(a.split(",")) != set(b.split(",")) for a, b in zip(both.labels_given, both.labels_true)])
    assert wrong.mean() == pytest.approx(0.3, abs=0.05)
    # a wrong clip still has as many labels, one of them changed
    for a, b in zip(both.labels_given[wrong], both.labels_true[wrong]):
        assert len(set(a.split(",")) & set(b.split(","))) == len(b.split(",")) - 1


def test_wav_format_and_durations(data):
    limits = {"train_curated": (0.3, 10), "train_noisy": (5, 10), "test": (1, 10)}
    for split, (lo, hi) in limits.items():
        for path in (data / split).iterdir():
            x, sr = _read_wav(path)
            assert sr == 8000
            assert lo - 0.01 <= x.size / sr <= hi + 0.01
            assert 0.25 < np.abs(x).max() < 0.95  # normalised, not clipped


# --------------------------------------------------------------------------- audio matches labels

def test_tonal_classes_put_energy_where_they_generate_it(data):
    def band_share(x, sr, lo, hi):
        spectrum = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(x.size, 1 / sr)
        return spectrum[(f >= lo) & (f <= hi)].sum() / spectrum.sum()

    hums, whistles = _single_label_clips(data, "Hum"), _single_label_clips(data, "Whistle")
    assert hums and whistles
    assert all(band_share(x, sr, 0, 1200) > 0.9 for x, sr in hums)        # f0 50-180 Hz, 6 harmonics
    assert all(band_share(x, sr, 600, 3800) > 0.9 for x, sr in whistles)  # 800-3000 Hz +- 0.3 octave


def test_chirps_sweep_in_their_direction(data):
    def pitch_steps(x):
        power = _power(x)
        loud = power.sum(1) > 0.1 * power.sum(1).max()
        steps = np.diff(power.argmax(1))[loud[1:] & loud[:-1]]
        return steps[(steps != 0) & (np.abs(steps) < 10)]  # within a chirp, not jumps between chirps

    for cls, sign in (("Rising_chirp", 1), ("Falling_chirp", -1)):
        clips = _single_label_clips(data, cls)
        assert clips
        assert all(np.sign(np.median(pitch_steps(x))) == sign for x, _ in clips)


def test_nearest_centroid_on_curated_beats_chance_on_test(data):
    """Labels carry information that a simple classifier on hand-made spectro-temporal statistics picks
    up (far from all of it: classes share frequency ranges by design)."""
    def features(path):
        x, sr = _read_wav(path)
        power = _power(x)
        edges = np.unique(np.geomspace(2, power.shape[1], 33).astype(int))
        bands = np.log(np.add.reduceat(power, edges[:-1], axis=1) + 1e-10)
        lo, hi = np.percentile(bands, [50, 95], axis=0)  # how far each band rises above its background
        energy = power.sum(1)
        loud = energy > 0.1 * energy.max()
        env = np.log(energy + 1e-10)
        env_power = np.abs(np.fft.rfft(env - env.mean())) ** 2
        fm = np.fft.rfftfreq(env.size, 64 / sr)
        mod = np.log([env_power[(fm >= a) & (fm < b)].sum() + 1e-6  # envelope modulation (rhythm)
                      for a, b in ((0.5, 3), (3, 8), (8, 16), (16, 32), (32, 62))])
        steps = np.diff(power.argmax(1))[loud[1:] & loud[:-1]]
        steps = steps[np.abs(steps) < 10]
        direction = np.mean(steps > 0) - np.mean(steps < 0) if steps.size else 0.0  # pitch going up/down
        flatness = np.exp(np.mean(np.log(power[loud] + 1e-12), 1)) / (power[loud].mean(1) + 1e-12)
        return np.concatenate([hi - lo, mod - mod.mean(), [direction, np.log(flatness.mean() + 1e-9)]])

    classes = list(pd.read_csv(data / "sample_submission.csv").columns[1:])
    cur = pd.read_csv(data / "train_curated.csv")
    cur = cur[~cur.labels.str.contains(",")]
    x_cur = np.stack([features(data / "train_curated" / f) for f in cur.fname])
    mu, sd = x_cur.mean(0), x_cur.std(0) + 1e-6
    y_cur = cur.labels.map(classes.index).to_numpy()
    centroids = np.stack([((x_cur - mu) / sd)[y_cur == k].mean(0) for k in range(len(classes))])
    test = demo_truth(data, "test")
    x_test = (np.stack([features(data / "test" / f) for f in test.fname]) - mu) / sd
    pred = ((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    hit = np.mean([classes[p] in ls for p, ls in zip(pred, _labels(test.labels))])
    chance = np.mean([len(ls) for ls in _labels(test.labels)]) / len(classes)
    assert hit > 1.5 * chance  # 1.8x to 2.6x over seeds 0-11


def test_many_classes_get_pattern_families():
    names = demo_classes(20)
    assert len(set(names)) == 20
    assert sum(n.startswith("Pattern_") for n in names) == 20 - len(demo._BUILTIN)
    assert demo_classes(2) == sorted(["Bell_tone", "Rising_chirp"])
