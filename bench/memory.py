"""Peak memory of building a MelStore (build_store) from H hours of generated audio, extrapolated to FAT2019.

    python bench/memory.py [--preset kaggle-1h] [--quick] [--hours H] [--clip-seconds 15]

The clips are generated (and cached) by a child process, so this process's peak RSS is imports + build_store +
store_stats only. Measured: RSS after imports, peak RSS (VmHWM; ru_maxrss as a fallback), RSS after the build,
store bytes per second of audio. The FAT2019 projection adds, with printed assumptions, what the measured run does
not contain (all three stores at once, short-clip tiling, store_stats on 2000 curated clips, training state).
Bound checked: peak RSS <= 12 GB for the whole run. For an outside check run it under `/usr/bin/time -v`.
With `--ranks N` (default 2, Kaggle's T4 x2) it also projects the machine's memory for a run of N ranks, where
rank 0 decodes each store and writes it to one file that every rank maps (features.build_shared_store): the stores
then sit once in the page cache, shared, and each rank adds its own baseline and training state.
"""
from __future__ import annotations

import math
import sys
import time

from common import (FAT2019, GB, MB, base_parser, generated_clips, make_wavs_in_child, peak_rss_bytes, pick_device,
                    print_json, print_machine, print_table, rss_bytes)

BOUND_GB = 12.0
# Host memory of training on a GPU that this CPU measurement cannot contain: CUDA context and libraries (cuDNN,
# cuBLAS), model + AdamW state + best-weights copies, fastai Learner, batches. An allowance, not a measurement.
TRAINING_ALLOWANCE_GB = 3.0  # --training-allowance-gb
STATS_CLIPS = 2000  # store_stats samples at most this many clips


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Give free heap pages back to the OS (glibc); shows how much of the RSS growth is allocator slack."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--hours", type=float, default=None, help="hours of audio to generate (default 1, --quick 0.25)")
    p.add_argument("--clip-seconds", type=float, default=15.0)
    p.add_argument("--ranks", type=int, default=2, help="ranks of the multi-process projection (default 2)")
    p.add_argument("--training-allowance-gb", type=float, default=TRAINING_ALLOWANCE_GB,
                   help="host memory assumed for training on a GPU (not measurable on a CPU-only machine)")
    a = p.parse_args(argv)
    import numpy as np
    import torch  # noqa: F401  (counted in the baseline, as in a run)
    from fattag.config import make_config
    from fattag.features import build_store, store_stats

    device = pick_device(a.threads)
    cfg = make_config(a.preset)
    hours = a.hours if a.hours is not None else (0.25 if a.quick else 1.0)
    n = max(1, math.ceil(hours * 3600 / a.clip_seconds))
    info = print_machine("memory: build_store peak RSS", device, notes=(
        f"preset {a.preset}; {n} generated clips x {a.clip_seconds:g} s = {n * a.clip_seconds / 3600:.2f} h at "
        f"{cfg.sample_rate} Hz 16-bit mono"))
    paths, table, wav_bytes, gen_s = generated_clips(make_wavs_in_child, n, a.clip_seconds, cfg.sample_rate)

    rss0 = rss_bytes() or 0
    peak_imports = peak_rss_bytes()
    # A first small build pays the one-time costs (mel filterbank, FFT plans, thread pool, lazily loaded
    # libraries), so the main build's RSS growth per store byte is the marginal cost that scales to FAT2019.
    warm = build_store(table.subset(range(min(8, n))), cfg, device, progress=False)
    rss_w = rss_bytes() or 0
    one_time = max(rss_w - rss0 - warm.nbytes(), 0)
    reset = reset_peak()
    # Two builds, as run.py makes several. RSS growth per store byte over both (after the warm-up build) is the
    # allocator factor the projection scales by; the second build's alone is printed too, but it is noisier (it
    # depends on how many holes the first build left that it can reuse). Over 10 h they agree (~1.24).
    from fattag.features import MelStore
    half = max(1, n // 2)
    t0 = time.perf_counter()
    store_a = build_store(table.subset(range(half)), cfg, device, progress=False)
    rss_a = rss_bytes() or 0
    store_b = build_store(table.subset(range(half, n)), cfg, device, progress=False) if n > half else None
    build_s = time.perf_counter() - t0
    peak_build = peak_rss_bytes()
    rss1 = rss_bytes() or 0
    store = MelStore(table, store_a.mels + (store_b.mels if store_b else []),
                     store_a.errors + (store_b.errors if store_b else []),
                     store_a.seconds + (store_b.seconds if store_b else 0.0))
    store_bytes = store.nbytes()
    if store.errors:
        raise RuntimeError(f"{len(store.errors)} clips failed: {store.errors[:3]}")
    overall = (rss1 - rss_w) / store_bytes
    marginal = (rss1 - rss_a) / store_b.nbytes() if store_b else overall
    factor = max(overall, 1.0)
    trimmed = malloc_trim()
    rss_trim = rss_bytes() or 0
    reset_peak()
    t0 = time.perf_counter()
    store_stats(store)
    stats_s = time.perf_counter() - t0
    peak_stats = max(peak_rss_bytes(), peak_build)
    sampled = sum(sorted(m.nbytes for m in store.mels)[-STATS_CLIPS:])  # all clips when <= STATS_CLIPS (same size here)
    stats_factor = max(peak_rss_bytes() - rss_trim, 0) / sampled          # transient bytes per float16 byte sampled
    bps = store_bytes / store.seconds              # per decoded (trimmed) second
    frames = np.mean([m.shape[1] for m in store.mels])

    measured = [
        ["RSS after imports (baseline)", rss0 / MB],
        ["peak RSS during imports", peak_imports / MB],
        ["peak RSS during build_store" + ("" if reset else " (incl. imports)"), peak_build / MB],
        ["one-time cost of the first build_store", one_time / MB],
        ["RSS after build_store", rss1 / MB],
        ["store bytes (float16 log-mel)", store_bytes / MB],
        ["RSS growth / store bytes, both builds", overall],
        ["RSS growth / store bytes, 2nd build (marginal)", marginal],
        ["transient: peak - RSS after build", (peak_build - rss1) / MB],
        ["RSS after malloc_trim(0)" + ("" if trimmed else " (not glibc: no trim)"), rss_trim / MB],
        ["RSS growth / store bytes after malloc_trim", (rss_trim - rss_w) / store_bytes],
        ["peak RSS during store_stats", peak_stats / MB],
        ["WAV bytes read", wav_bytes / MB],
        ["build_store wall s (both builds)", build_s],
        ["build_store audio s/s", store.seconds / build_s],
        ["store bytes per decoded audio s", bps],
        ["store_stats wall s", stats_s],
        ["store_stats transient / sampled store bytes", stats_factor],
    ]
    print_table(["measured", "MB / value"], measured, f"measured on {store.seconds / 3600:.2f} h of decoded audio "
                f"({n} clips, mean {frames:.0f} frames)")

    # ---- projection to FAT2019
    fat_s = {k: d["hours"] * 3600 for k, d in FAT2019.items()}
    store_fat = bps * sum(fat_s.values())
    min_s = cfg.crop_seconds
    tiling = bps * min_s * (FAT2019["curated"]["clips"] + FAT2019["test"]["clips"])  # bound: every short clip padded
    curated_mean_s = fat_s["curated"] / FAT2019["curated"]["clips"]
    stats_transient = STATS_CLIPS * curated_mean_s * bps * stats_factor
    transient = max(peak_build - rss1, 0)
    rows = [
        ["baseline (imports, measured)", rss0 / GB, "this process after importing torch/fastai/fattag"],
        ["first-build one-time (measured)", one_time / GB, "filterbank, FFT plans, decode pool, lazy libraries"],
        ["stores: curated+noisy+test", store_fat * factor / GB,
         f"{sum(fat_s.values()) / 3600:.1f} h x {bps / 1e3:.2f} kB/s x allocator factor {factor:.2f}; "
         f"untrimmed (trim only lowers it)"],
        ["short-clip tiling bound", tiling / GB, f"every curated+test clip padded by {min_s:g} s (upper bound)"],
        ["build transient (measured)", transient / GB, "in-flight decoded clips, STFT buffers"],
        ["store_stats transient", stats_transient / GB,
         f"{STATS_CLIPS} curated clips x {curated_mean_s:.1f} s x measured factor {stats_factor:.1f} "
         f"(float32 copies + concatenation)"],
        ["training allowance (assumed)", a.training_allowance_gb,
         "CUDA context/libs, model, AdamW, best-weight copies"],
    ]
    total = sum(r[1] for r in rows)
    rows.append(["projected peak RSS", total, f"bound {BOUND_GB:g} GB: {'OK' if total <= BOUND_GB else 'EXCEEDED'}"])
    print_table(["FAT2019 projection", "GB", "assumption"], rows,
                "projected peak RSS of a kaggle run on FAT2019 (all three stores are alive together in run.py)")
    # ---- N ranks: the stores once in the page cache (file pages: no allocator slack), rank 0's decode peak
    noisy_fat = bps * fat_s["noisy"]
    per_rank = rss0 + a.training_allowance_gb * GB + stats_transient
    decoding = (bps * (fat_s["curated"] + fat_s["test"]) + noisy_fat * factor + noisy_fat + one_time + transient
                + a.ranks * rss0)
    training = store_fat + tiling + a.ranks * per_rank
    ranks_rows = [
        ["rank 0 decoding the noisy set", decoding / GB,
         f"curated+test files mapped, the noisy list x {factor:.2f} and its file pages while written, "
         f"{a.ranks} x baseline"],
        ["training", training / GB, f"the stores once ({store_fat / GB:.1f} GB + tiling bound) + {a.ranks} x "
                                    f"(baseline + {a.training_allowance_gb:g} GB training + store_stats)"],
        ["projected peak, machine", max(decoding, training) / GB, f"{a.ranks} ranks; a per-rank copy of the stores "
                                                                  f"would add {(a.ranks - 1) * store_fat / GB:.1f} GB"],
    ]
    print_table([f"FAT2019, {a.ranks} ranks", "GB", "assumption"], ranks_rows,
                f"projected memory of a {a.ranks}-rank run on FAT2019 (stores shared through one mapped file)")
    results = dict(
        ranks=a.ranks, projected_ranks_peak_GB=max(decoding, training) / GB,
        hours=store.seconds / 3600, clips=n, rss_baseline_MB=rss0 / MB, peak_rss_build_MB=peak_build / MB,
        rss_after_build_MB=rss1 / MB, peak_rss_stats_MB=peak_stats / MB, store_MB=store_bytes / MB,
        store_bytes_per_audio_s=bps, rss_growth_over_store=overall, rss_growth_over_store_marginal=marginal,
        one_time_MB=one_time / MB, stats_transient_factor=stats_factor,
        rss_after_malloc_trim_MB=rss_trim / MB, rss_growth_over_store_after_trim=(rss_trim - rss_w) / store_bytes,
        build_wall_s=build_s, build_audio_s_per_s=store.seconds / build_s,
        projected_fat2019_store_GB=store_fat / GB, projected_peak_GB=total, bound_GB=BOUND_GB,
        within_bound=bool(total <= BOUND_GB))
    print(f"(clip generation in a child process took {gen_s:.1f} s; cached under {paths[0].parent})")
    return print_json("memory", info, results, preset=a.preset)


if __name__ == "__main__":
    main(sys.argv[1:])
