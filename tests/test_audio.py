import struct
import sys

import numpy as np
import pytest

from fattag.audio import (AudioError, audio_frames, load_clip, read_audio, read_wav, resample, trim_silence,
                          write_wav)

SR = 16000
# Largest round-trip error per written format: half a quantisation step (float32: its own rounding).
TOLERANCE = {"pcm8": 0.5 / 128, "pcm16": 0.5 / 32768, "pcm24": 0.5 / 2 ** 23, "pcm32": 1e-7, "float32": 1e-7}
WIDTH = {"pcm8": 1, "pcm16": 2, "pcm24": 3, "pcm32": 4, "float32": 4}
PCM_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def riff(*chunks: tuple[bytes, bytes]) -> bytes:
    """A RIFF/WAVE file from (id, payload) chunks, with the pad byte after odd-sized ones."""
    body = b"".join(cid + struct.pack("<I", len(p)) + p + b"\x00" * (len(p) & 1) for cid, p in chunks)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def fmt_chunk(tag: int, channels: int, sr: int, width: int) -> tuple[bytes, bytes]:
    return b"fmt ", struct.pack("<HHIIHH", tag, channels, sr, sr * channels * width, channels * width, 8 * width)


def extensible_fmt(subformat: int, channels: int, sr: int, width: int, valid_bits: int) -> tuple[bytes, bytes]:
    base = fmt_chunk(0xFFFE, channels, sr, width)[1]
    ext = struct.pack("<HHI", 22, valid_bits, 0x3) + struct.pack("<H", subformat) + PCM_GUID_TAIL
    return b"fmt ", base + ext


def signal(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    x = 0.6 * np.sin(2 * np.pi * 440 * np.arange(n) / SR) + 0.3 * rng.uniform(-1, 1, n)
    x[:3] = [-1.0, 0.99, 0.0]  # near full scale (integer formats top out one step below +1)
    return x


@pytest.mark.parametrize("fmt", ["pcm8", "pcm16", "pcm24", "pcm32", "float32"])
def test_roundtrip_each_format(tmp_path, fmt):
    x = signal()
    path = tmp_path / f"{fmt}.wav"
    write_wav(path, x, SR, fmt=fmt)
    assert path.stat().st_size == 44 + len(x) * WIDTH[fmt] + (len(x) * WIDTH[fmt]) % 2
    y, sr = read_wav(path)
    assert sr == SR and y.dtype == np.float32 and y.shape == x.shape
    assert np.max(np.abs(y - x)) <= TOLERANCE[fmt] + 1e-7
    assert y.min() >= -1.0 and y.max() <= 1.0


@pytest.mark.parametrize("fmt", ["pcm8", "pcm16", "pcm24", "float32"])
def test_stereo_is_mixed_down(tmp_path, fmt):
    left = signal(seed=1)
    right = -0.5 * left
    write_wav(tmp_path / "s.wav", np.stack([left, right], axis=1), SR, fmt=fmt)
    y, _ = read_wav(tmp_path / "s.wav")
    assert y.shape == left.shape
    np.testing.assert_allclose(y, 0.25 * left, atol=2 * TOLERANCE[fmt] + 1e-7)


def test_float64_hand_built(tmp_path):
    x = np.array([0.0, 0.5, -0.25, 1.0, -1.0, 0.123456789012])
    (tmp_path / "f64.wav").write_bytes(riff(fmt_chunk(3, 1, 22050, 8), (b"data", x.astype("<f8").tobytes())))
    y, sr = read_wav(tmp_path / "f64.wav")
    assert sr == 22050
    np.testing.assert_allclose(y, x.astype(np.float32), rtol=0, atol=1e-7)


def test_float_out_of_range_is_clipped(tmp_path):
    x = np.array([2.0, -3.0, 0.5, np.nan], dtype="<f4")
    (tmp_path / "hot.wav").write_bytes(riff(fmt_chunk(3, 1, SR, 4), (b"data", x.tobytes())))
    y, _ = read_wav(tmp_path / "hot.wav")
    np.testing.assert_array_equal(y, [1.0, -1.0, 0.5, 0.0])


def test_extensible_pcm24_stereo(tmp_path):
    frames = np.array([[1000, -1000], [-(2 ** 23), 2 ** 23 - 1], [123456, 654321]], dtype=np.int32)
    payload = frames.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    (tmp_path / "ext.wav").write_bytes(riff(extensible_fmt(1, 2, 48000, 3, 24), (b"data", payload)))
    y, sr = read_wav(tmp_path / "ext.wav")
    assert sr == 48000
    np.testing.assert_allclose(y, frames.mean(axis=1) / 2 ** 23, atol=1e-6)


def test_extensible_float32(tmp_path):
    x = np.array([0.1, -0.7, 0.33], dtype="<f4")
    (tmp_path / "extf.wav").write_bytes(riff(extensible_fmt(3, 1, SR, 4, 32), (b"data", x.tobytes())))
    y, _ = read_wav(tmp_path / "extf.wav")
    np.testing.assert_array_equal(y, x)


def test_unknown_chunks_and_odd_padding_are_skipped(tmp_path):
    samples = np.array([100, -200, 300, -32768, 32767], dtype="<i2")
    data = riff((b"LIST", b"INFOx"),  # 5 bytes: padded to 6
                fmt_chunk(1, 1, SR, 2),
                (b"junk", b"abc"),
                (b"data", samples.tobytes()),
                (b"id3 ", b"trailing metadata"))
    (tmp_path / "list.wav").write_bytes(data)
    y, _ = read_wav(tmp_path / "list.wav")
    np.testing.assert_allclose(y, samples / 32768.0, atol=1e-7)


def test_truncated_data_chunk_keeps_whole_frames(tmp_path):
    x = signal(1000)
    write_wav(tmp_path / "full.wav", np.stack([x, x], axis=1), SR, fmt="pcm16")
    full = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(full[:44 + 400 * 4 + 3])  # 400 frames and 3 bytes of the next
    y, _ = read_wav(tmp_path / "cut.wav")
    assert len(y) == 400
    np.testing.assert_allclose(y, x[:400], atol=1 / 32768)


@pytest.mark.parametrize("content, reason", [
    (None, "not found"),
    (b"", "empty"),
    (b"this is a text file, not audio\n", "not a RIFF/WAVE"),
    (b"RIFF\x24\x00\x00\x00WAVEfm", "no fmt chunk"),
    (riff(fmt_chunk(1, 1, SR, 2)), "no data chunk"),
    (riff(fmt_chunk(1, 1, SR, 2), (b"data", b"")), "has no audio"),
    (riff(fmt_chunk(1, 2, SR, 2), (b"data", b"\x01\x02\x03")), "has no audio"),  # less than one frame
    (riff(fmt_chunk(2, 1, SR, 2), (b"data", b"\x00" * 8)), "unsupported"),  # MS ADPCM
    (riff(fmt_chunk(1, 0, SR, 2), (b"data", b"\x00" * 8)), "0 channels"),
])
def test_bad_files_raise_audio_error(tmp_path, content, reason):
    path = tmp_path / "bad.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError) as err:
        read_wav(path)
    assert reason in str(err.value) and "bad.wav" in str(err.value)
    assert err.value.reason in str(err.value)


def dominant_hz(x, sr):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * sr / len(x)


@pytest.mark.parametrize("orig, new", [(48000, 44100), (22050, 44100), (44100, 16000)])
def test_resample_keeps_duration_and_frequency(orig, new):
    x = np.sin(2 * np.pi * 1000.0 * np.arange(orig) / orig).astype(np.float32)  # 1 s at 1 kHz
    y = resample(x, orig, new)
    assert y.dtype == np.float32
    assert abs(len(y) - new) <= 1
    assert abs(dominant_hz(y, new) - 1000.0) <= 2.0


def test_resample_same_rate_is_identity():
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    np.testing.assert_array_equal(resample(x, 44100, 44100), x)


def test_very_short_clips_load(tmp_path):
    write_wav(tmp_path / "3ms.wav", signal(48), SR)  # 3 ms at 16 kHz
    y = load_clip(tmp_path / "3ms.wav", 44100, trim=True)
    assert y.dtype == np.float32 and 130 <= len(y) <= 134
    write_wav(tmp_path / "one.wav", [0.5], 44100)
    y = load_clip(tmp_path / "one.wav", 44100, trim=True)
    np.testing.assert_allclose(y, [0.5], atol=1e-4)


def silence_tone_silence(sr=SR):
    rng = np.random.default_rng(0)
    quiet = lambda n: 1e-6 * rng.standard_normal(n)  # noqa: E731 - far more than 60 dB below the tone
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)
    return np.concatenate([quiet(sr // 2), tone, quiet(sr // 2)]).astype(np.float32)


def test_trim_silence_cuts_to_the_tone():
    x = silence_tone_silence()
    y = trim_silence(x, top_db=60.0, frame=512)
    begin = (SR // 2) // 512 * 512  # the frame holding the tone's first sample
    end = -(-(SR // 2 + SR) // 512) * 512  # ... and the one holding its last
    np.testing.assert_array_equal(y, x[begin:end])


def test_trim_silence_keeps_everything_within_top_db():
    x = silence_tone_silence()
    assert len(trim_silence(x, top_db=200.0)) == len(x)  # the 1e-6 noise is ~110 dB down: kept


def test_trim_silence_edge_cases():
    zeros = np.zeros(5000, dtype=np.float32)
    np.testing.assert_array_equal(trim_silence(zeros, 60.0), zeros)
    click = np.zeros(5000, dtype=np.float32)
    click[2600] = 1.0
    y = trim_silence(click, 60.0, frame=512)
    assert len(y) == 512 and y.max() == 1.0  # only the loudest frame survives, never empty
    one = np.array([0.3], dtype=np.float32)
    np.testing.assert_array_equal(trim_silence(one, 60.0), one)


def test_load_clip_resamples_and_trims(tmp_path):
    write_wav(tmp_path / "c.wav", silence_tone_silence(SR), SR, fmt="pcm24")
    plain = load_clip(tmp_path / "c.wav", 32000)
    trimmed = load_clip(tmp_path / "c.wav", 32000, trim=True, trim_db=60.0)
    assert abs(len(plain) - 2 * 32000) <= 1
    assert 32000 <= len(trimmed) < 32000 + 2 * 512
    assert abs(dominant_hz(trimmed, 32000) - 440.0) <= 2.0


# ---------------------------------------------------------------- other formats, through soundfile

# (format, subtype, file ending, lossy) as libsndfile writes them; a lossy file must come back within codec loss.
CODECS = [("FLAC", "PCM_16", "flac", False), ("FLAC", "PCM_24", "flac", False), ("AIFF", "PCM_16", "aiff", False),
          ("OGG", "VORBIS", "ogg", True), ("OGG", "OPUS", "opus", True), ("MP3", "MPEG_LAYER_III", "mp3", True)]
LOSSY_MIN_SNR_DB = 12.0   # measured 20-22 dB on this signal at libsndfile's default quality; noise at 0 dB fails


def music(n=SR, seed=0):
    """Two tones and a little noise: something a lossy codec keeps most of."""
    t = np.arange(n) / SR
    noise = np.random.default_rng(seed).standard_normal(n)
    return np.clip(0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t) + 0.05 * noise, -1, 1)


def write_codec(soundfile, path, wave, fmt, subtype):
    if fmt not in soundfile.available_formats() or subtype not in soundfile.available_subtypes(fmt):
        pytest.skip(f"this libsndfile ({soundfile.__libsndfile_version__}) cannot write {fmt}/{subtype}")
    soundfile.write(str(path), wave, SR, format=fmt, subtype=subtype)


@pytest.mark.parametrize("fmt, subtype, ending, lossy", CODECS, ids=[f"{c[0]}-{c[1]}" for c in CODECS])
def test_every_format_reads_as_the_wav_of_the_same_samples(tmp_path, fmt, subtype, ending, lossy):
    """The samples of a 16-bit WAV, written in another format: lossless formats read back bit for bit equal to
    read_wav's samples, lossy ones at the same length and rate within codec loss (signal-to-error ratio)."""
    soundfile = pytest.importorskip("soundfile", reason="soundfile (requirements.txt) reads the non-WAV formats")
    write_wav(tmp_path / "x.wav", music(), SR)
    wav, _ = read_wav(tmp_path / "x.wav")
    write_codec(soundfile, tmp_path / f"x.{ending}", wav, fmt, subtype)
    got, sr = read_audio(tmp_path / f"x.{ending}")
    assert sr == SR and got.dtype == np.float32 and got.shape == wav.shape
    assert audio_frames(tmp_path / f"x.{ending}") == (len(wav), SR) == audio_frames(tmp_path / "x.wav")
    if not lossy:
        np.testing.assert_array_equal(got, wav)
        np.testing.assert_array_equal(load_clip(tmp_path / f"x.{ending}", 8000, trim=True),
                                      load_clip(tmp_path / "x.wav", 8000, trim=True))
    else:
        snr = 10 * np.log10(np.sum(wav.astype(np.float64) ** 2) / np.sum((got - wav.astype(np.float64)) ** 2))
        assert snr >= LOSSY_MIN_SNR_DB, f"{fmt}/{subtype}: {snr:.1f} dB"


def test_other_formats_mix_stereo_down_like_wav(tmp_path):
    soundfile = pytest.importorskip("soundfile", reason="soundfile (requirements.txt) reads the non-WAV formats")
    stereo = np.stack([music(seed=1), -0.5 * music(seed=2)], axis=1)
    write_wav(tmp_path / "s.wav", stereo, SR)
    soundfile.write(str(tmp_path / "s.flac"), soundfile.read(str(tmp_path / "s.wav"))[0], SR, subtype="PCM_16")
    np.testing.assert_array_equal(read_audio(tmp_path / "s.flac")[0], read_wav(tmp_path / "s.wav")[0])


@pytest.mark.parametrize("content, reason", [(b"", "file is empty"), (b"fLaC" + b"\x00" * 60, "cannot decode"),
                                             (None, "file not found")])
def test_bad_non_wav_files_raise_audio_error(tmp_path, content, reason):
    pytest.importorskip("soundfile", reason="soundfile (requirements.txt) reads the non-WAV formats")
    path = tmp_path / "bad.flac"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError, match=reason):
        read_audio(path)


def test_without_soundfile_a_non_wav_file_is_one_clear_error_and_wav_still_reads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)   # `import soundfile` now raises ImportError
    write_wav(tmp_path / "x.wav", music(), SR)
    (tmp_path / "x.flac").write_bytes(b"fLaC" + b"\x00" * 60)
    with pytest.raises(AudioError) as e:
        read_audio(tmp_path / "x.flac")
    assert e.value.reason == "reading .flac files needs the soundfile package (pip install soundfile)"
    assert len(read_audio(tmp_path / "x.wav")[0]) == SR
