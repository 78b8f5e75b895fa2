"""Decode throughput of `fattag.data.iter_decoded` (read WAV, int16 -> float32, silence trim) per worker count.

    python bench/decode.py [--preset kaggle-1h] [--quick] [--clips N] [--seconds 15]

Synthetic 44.1 kHz 16-bit mono clips (noise + tones, 0.2 s silent lead-in) are generated once and cached under
$FATTAG_BENCH_DIR or <tmp>/fattag-bench. Files are read from the page cache after the warm-up pass, so the figures
are the CPU cost of decoding; a cold disk (Kaggle's /kaggle/input) adds its read time on top.
"""
from __future__ import annotations

import sys

from common import (base_parser, best_of, generated_clips, make_wavs, print_json, print_machine, print_table,
                    usable_cores)


def worker_counts(cores: int) -> list[int]:
    return [w for w in (1, 2, 4, 8) if w <= max(2, cores)]


def stage_breakdown(paths, cfg, repeat: int) -> list[list]:
    """Single-thread cost per clip of each step load_clip takes (read bytes, parse+convert, trim)."""
    from fattag.audio import read_wav, trim_silence
    waves = [read_wav(p)[0] for p in paths]
    steps = {
        "read file (page cache)": lambda: [p.read_bytes() for p in paths],
        "read_wav (parse + int16->float32)": lambda: [read_wav(p) for p in paths],
        "trim_silence": lambda: [trim_silence(w, cfg.trim_db) for w in waves],
        # reference floor, not fattag code: one read, int16 view, one float32 pass (no bytes-slice copies)
        "floor: np.frombuffer int16 -> float32": lambda: [_floor_decode(p) for p in paths],
    }
    rows = []
    for name, fn in steps.items():
        best, _ = best_of(fn, repeat=repeat, warmup=1)
        rows.append([name, best / len(paths) * 1e3, len(paths) / best])
    del waves
    return rows


def _floor_decode(path):
    import numpy as np
    buf = path.read_bytes()
    x = np.frombuffer(buf, dtype="<i2", offset=44).astype(np.float32)
    x *= np.float32(1 / 32768)
    return x


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=None, help="clips to decode (default 96, --quick 12)")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each clip (FAT2019 noisy: mostly 15 s)")
    p.add_argument("--workers", type=int, nargs="*", default=None, help="worker counts (default 1 2 [4 8])")
    a = p.parse_args(argv)
    from fattag.config import make_config
    from fattag.data import iter_decoded

    cfg = make_config(a.preset)
    n = a.clips or (12 if a.quick else 96)
    repeat = a.repeat or (1 if a.quick else 3)
    info = print_machine("decode: fattag.data.iter_decoded", notes=(
        f"{n} synthetic clips x {a.seconds:g} s, {cfg.sample_rate} Hz 16-bit mono; trim_silence={cfg.trim_silence} "
        f"({cfg.trim_db:g} dB); page-cached files; best of {repeat} runs after a warm-up pass"))
    paths, table, wav_bytes, gen_s = generated_clips(make_wavs, n, a.seconds, cfg.sample_rate)
    audio_s = n * a.seconds

    def run(workers):
        for _i, wave, err in iter_decoded(table, cfg.sample_rate, trim=cfg.trim_silence, trim_db=cfg.trim_db,
                                          workers=workers, progress=False):
            if err is not None:
                raise RuntimeError(err)

    rows, results = [], {}
    base = None
    for w in a.workers or worker_counts(usable_cores()):
        best, times = best_of(lambda: run(w), repeat=repeat, warmup=1)
        base = base or best
        rows.append([w, n / best, wav_bytes / 1e6 / best, audio_s / best, base / best, best])
        results[f"workers_{w}"] = dict(clips_s=n / best, wav_MB_s=wav_bytes / 1e6 / best,
                                       audio_s_per_s=audio_s / best, runs_s=times)
    print_table(["workers", "clips/s", "WAV MB/s", "audio s/s", "speedup", "best run s"], rows,
                f"iter_decoded throughput ({n} clips, {wav_bytes / 1e6:.0f} MB of WAV, {audio_s / 3600:.2f} h)")
    breakdown = stage_breakdown(paths[:min(n, 24)], cfg, repeat)
    print_table(["step (1 thread)", "ms/clip", "clips/s"], breakdown, "where one clip's decode time goes")
    best_key = max(results, key=lambda k: results[k]["audio_s_per_s"])
    fat_s = 103.4 * 3600
    print(f"\nbest: {best_key.replace('_', '=')} -> FAT2019 curated+noisy+test (103.4 h of audio) decodes in "
          f"~{fat_s / results[best_key]['audio_s_per_s']:.0f} s of CPU time at this rate (generation of the "
          f"clips took {gen_s:.1f} s, not counted)")
    results["breakdown_ms_per_clip"] = {r[0]: r[1] for r in breakdown}
    return print_json("decode", info, results, clips=n, clip_seconds=a.seconds, sample_rate=cfg.sample_rate,
                      repeat=repeat)


if __name__ == "__main__":
    main(sys.argv[1:])
