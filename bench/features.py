"""Log-mel throughput of `fattag.features.LogMel` on the device, and the feature store's size per audio second.

    python bench/features.py [--preset kaggle-1h] [--quick] [--clips N] [--batch B]

"per clip" is what build_store does: one 15 s clip per call, host -> device, log-mel, float16, back to the host.
"batched" stacks B clips per call (an upper bound for a batched build_store).
"""
from __future__ import annotations

import sys

from common import (FAT2019, GB, base_parser, best_of, pick_device, print_json, print_machine, print_table,
                    synth_clip)


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=None, help="clips per timed run (default 32, --quick 4)")
    p.add_argument("--batch", type=int, default=None, help="clips per batched call (default 16, --quick 4)")
    p.add_argument("--seconds", type=float, default=15.0)
    a = p.parse_args(argv)
    import numpy as np
    import torch
    from fattag.config import make_config
    from fattag.features import LogMel

    device = pick_device(a.threads)
    cfg = make_config(a.preset)
    n = a.clips or (4 if a.quick else 32)
    bsz = min(a.batch or (4 if a.quick else 16), n)
    repeat = a.repeat or (1 if a.quick else 3)
    info = print_machine("features: fattag.features.LogMel", device, notes=(
        f"preset {a.preset}: sr {cfg.sample_rate}, n_fft {cfg.n_fft}, win {cfg.win_length}, hop {cfg.hop_length}, "
        f"{cfg.n_mels} mels; {n} clips x {a.seconds:g} s; best of {repeat} runs after a warm-up"))
    logmel = LogMel(cfg).to(device)
    waves = [synth_clip(a.seconds, cfg.sample_rate, i) for i in range(n)]
    audio_s = n * a.seconds

    def per_clip():
        out = []
        for w in waves:  # exactly build_store's per-clip path
            x = torch.from_numpy(w).to(device)
            out.append(logmel(x[None])[0].to(torch.float16).cpu().numpy())
        return out

    stacked = torch.from_numpy(np.stack(waves))

    def batched():
        out = []
        for s in range(0, n, bsz):
            out.append(logmel(stacked[s:s + bsz].to(device)).to(torch.float16).cpu().numpy())
        return out

    rows, results = [], {}
    with torch.inference_mode():
        for name, fn in (("per clip (build_store)", per_clip), (f"batched x{bsz}", batched)):
            best, times = best_of(fn, repeat=repeat, warmup=1, device=device)
            rows.append([name, n / best, audio_s / best, best / n * 1e3])
            results["per_clip" if name.startswith("per") else "batched"] = dict(
                clips_s=n / best, audio_s_per_s=audio_s / best, batch=1 if name.startswith("per") else bsz,
                runs_s=times)
        mel = per_clip()[0]
    print_table(["mode", "clips/s", "audio s/s", "ms/clip"], rows, f"log-mel on {device}")

    frames_per_s = mel.shape[1] / a.seconds
    store_bps = mel.nbytes / a.seconds
    int16_bps = 2 * cfg.sample_rate
    fat_h = sum(d["hours"] for d in FAT2019.values())
    size_rows = [
        [f"float16 log-mel ({mel.shape[0]} x {frames_per_s:.1f} frames/s)", store_bps, 1.0,
         store_bps * fat_h * 3600 / GB],
        ["int16 audio", float(int16_bps), int16_bps / store_bps, int16_bps * fat_h * 3600 / GB],
        ["float32 audio", float(2 * int16_bps), 2 * int16_bps / store_bps, 2 * int16_bps * fat_h * 3600 / GB],
    ]
    print_table(["representation", "bytes / audio s", "x store", f"GB for FAT2019 ({fat_h:.1f} h)"], size_rows,
                "feature store size")
    results["store_bytes_per_audio_s"] = store_bps
    results["int16_bytes_per_audio_s"] = int16_bps
    results["int16_over_store"] = int16_bps / store_bps
    results["mel_shape_15s"] = list(mel.shape)
    return print_json("features", info, results, preset=a.preset, clips=n, clip_seconds=a.seconds, repeat=repeat)


if __name__ == "__main__":
    main(sys.argv[1:])
