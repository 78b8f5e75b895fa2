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
