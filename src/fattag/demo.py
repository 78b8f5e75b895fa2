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
