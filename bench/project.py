"""Projected wall time of a preset's whole run on FAT2019 sizes, from throughputs measured on this machine.

    python bench/project.py [--preset kaggle-1h] [--quick]

Measured here: decode (iter_decoded over cached synthetic 15 s clips), log-mel per clip (build_store's path) and
fattag.throughput.measure_throughput (training s/clip and inference s/window of the preset's model). The run's work
(decode + features of curated+noisy+test, stage 1, K folds of stage 2 with per-epoch validation, OOF and test TTA)
is then priced by fattag.cost's cost model (stage_costs, plan_run): once as configured (no budget), once fitted into
the preset's budget.
Then: the training rate a GPU would need for the preset's full recipe (without the test pseudo-label round, which
only gets the time left) to fit its budget. Finally the plan on Kaggle's T4s at assumed rates (--t4-clips-s per
T4, inference at --t4-infer-ratio times that, --ddp-speedup for stage 1 on two, --prep-s of data preparation) for
1 and 2 devices, as the run's planner would fit it into the budget.
"""
from __future__ import annotations

import dataclasses
import sys
import time

from common import (FAT2019, base_parser, best_of, clip_table, make_wavs, pick_device, print_json, print_machine,
                    print_table, synth_clip)

N_CLASSES = 80


def windows_per_clip(cfg, seconds: float) -> int:
    """Whole-clip TTA windows of a clip of `seconds` (after build_store's tiling to one crop)."""
    from fattag.features import window_starts
    samples = max(int(round(seconds * cfg.sample_rate)), int(round(cfg.crop_seconds * cfg.sample_rate)), cfg.n_fft)
    frames = 1 + samples // cfg.hop_length   # torch.stft with center=True
    return len(window_starts(frames, cfg.crop_frames, int(round(cfg.crop_frames * cfg.tta_step_frac))))


def fat2019_workload(cfg):
    from fattag.cost import Workload
    mean_s = {k: d["hours"] * 3600 / d["clips"] for k, d in FAT2019.items()}
    noisy = FAT2019["noisy"]["clips"]
    hold = max(1, int(round(noisy * cfg.noisy_holdout)))
    w = Workload(
        noisy_train=(noisy - hold) if cfg.noisy.epochs > 0 else 0,
        noisy_holdout_windows=hold * windows_per_clip(cfg, mean_s["noisy"]),
        curated=FAT2019["curated"]["clips"],
        curated_windows=FAT2019["curated"]["clips"] * windows_per_clip(cfg, mean_s["curated"]),
        test_windows=FAT2019["test"]["clips"] * windows_per_clip(cfg, mean_s["test"]),
        test_clips=FAT2019["test"]["clips"],
        noisy_clips=noisy if cfg.noisy.epochs > 0 else 0,
    )
    return w, mean_s


def breakdown(cfg, w, tp, plan) -> dict:
    """Seconds per part of the run, from fattag.cost's own cost model (their sum is the plan's total)."""
    from fattag.cost import pseudo_s, stage_costs
    c = stage_costs(cfg, w, tp, plan.tta_aug_passes)
    return {
        "stage 1 (training + holdout validation)": plan.epochs_noisy * c["noisy_epoch"],
        "stage 2 epochs (training + validation, all folds)": plan.folds_trained * plan.epochs_curated * c["fold_epoch"],
        "OOF predictions": plan.folds_trained * c["oof_predict"],
        "test TTA (all fold models)": plan.folds_trained * c["test_predict"],
        "test pseudo-label round (all fold models)": plan.folds_trained * pseudo_s(c, plan.epochs_pseudo),
    }


def measure_prep(cfg, device, n: int, repeat: int) -> tuple[float, float]:
    """(decode audio s/s with iter_decoded's default workers, log-mel audio s/s per clip on `device`)."""
    import torch
    from fattag.data import iter_decoded
    from fattag.features import LogMel
    table = clip_table(make_wavs(n, 15.0, cfg.sample_rate))

    def decode():
        for _ in iter_decoded(table, cfg.sample_rate, trim=cfg.trim_silence, trim_db=cfg.trim_db, progress=False):
            pass

    t_dec, _ = best_of(decode, repeat=repeat, warmup=1)
    logmel = LogMel(cfg).to(device)
    waves = [torch.from_numpy(synth_clip(15.0, cfg.sample_rate, i)) for i in range(min(n, 8))]

    def feats():
        with torch.inference_mode():
            for w in waves:
                logmel(w.to(device)[None])[0].to(torch.float16).cpu()

    t_feat, _ = best_of(feats, repeat=repeat, warmup=1, device=device)
    return n * 15.0 / t_dec, len(waves) * 15.0 / t_feat


def t4_plans(cfg, w, available: float, clips_s: float, infer_ratio: float, ddp_speedup: float) -> dict:
    """The preset fitted into `available` seconds on 1 and 2 T4s at the assumed rates (printed with them)."""
    from fattag.cost import Throughput, plan_run
    one = Throughput(1 / clips_s, 1 / (clips_s * infer_ratio), "T4 (assumed)")
    plans = {1: plan_run(cfg, w, one, available),
             2: plan_run(cfg, w, dataclasses.replace(one, devices=2, ddp_train_s_per_clip=1 / (clips_s * ddp_speedup)),
                         available)}
    print_table(["T4s", "training clips/s", "stage-1 clips/s", "stage 1 epochs", "stage 2 epochs x folds",
                 "pseudo epochs", "TTA passes", "planned s"],
                [[n, clips_s, clips_s * (ddp_speedup if n == 2 else 1), p.epochs_noisy,
                  f"{p.epochs_curated} x {p.folds_trained}", p.epochs_pseudo, p.tta_aug_passes, p.total_s]
                 for n, p in plans.items()],
                f"{cfg.arch} on FAT2019 sizes on Kaggle T4s, fitted into {available:.0f} s (assumed: {clips_s:g} "
                f"training clips/s per T4, inference {infer_ratio:g}x that, stage 1 {ddp_speedup:g}x on two)")
    return {n: dict(epochs_noisy=p.epochs_noisy, epochs_curated=p.epochs_curated, folds=p.folds_trained,
                    epochs_pseudo=p.epochs_pseudo, tta_aug_passes=p.tta_aug_passes, total_s=p.total_s)
            for n, p in plans.items()}


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="batch for measure_throughput (default: preset's; "
                                                           "--quick on CPU: 8)")
    p.add_argument("--clips", type=int, default=None, help="clips for the decode/log-mel measurement (default 48, "
                                                           "--quick 8)")
    p.add_argument("--budget", type=float, default=None, help="seconds (default: the preset's time_budget, or 3300)")
    p.add_argument("--t4-clips-s", type=float, default=700.0, help="assumed training clips/s of one T4 (default "
                                                                   "700: kaggle-1h's sizing, not measured)")
    p.add_argument("--t4-infer-ratio", type=float, default=2.4, help="assumed inference windows/s per training "
                                                                     "clip/s (default 2.4)")
    p.add_argument("--ddp-speedup", type=float, default=1.8, help="assumed stage-1 speed-up on two T4s (default 1.8)")
    p.add_argument("--prep-s", type=float, default=120.0, help="decode + log-mel seconds before training on Kaggle")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting over the preset, as run.py's --set (e.g. noisy.epochs=30); repeatable")
    a = p.parse_args(argv)
    from fattag.cost import OVERHEAD, Throughput, plan_run
    from fattag.throughput import measure_throughput
    from fattag.config import make_config

    device = pick_device(a.threads)
    cuda = device.type == "cuda"
    cfg = make_config(a.preset, sets=a.sets)
    if a.batch or (a.quick and not cuda):
        cfg = dataclasses.replace(cfg, batch_size=a.batch or min(cfg.batch_size, 8))
    budget_s = a.budget or cfg.time_budget or 3300.0
    repeat = a.repeat or (1 if a.quick else 2)
    info = print_machine(f"project: {a.preset} on FAT2019 sizes", device, notes=(
        f"{cfg.arch}, batch {cfg.batch_size}, {cfg.folds} folds, epochs {cfg.noisy.epochs} noisy / "
        f"{cfg.curated.epochs} curated, TTA step {cfg.tta_step_frac:g}, {cfg.tta_aug_passes} aug passes; "
        f"budget {budget_s:.0f} s, safety margin {cfg.safety_margin:.0%}; best of {repeat} measurements"))

    t0 = time.perf_counter()
    dec_rate, feat_rate = measure_prep(cfg, device, a.clips or (8 if a.quick else 48), repeat)
    runs = 2 if a.quick and not cuda else 4
    tps = [measure_throughput(cfg, N_CLASSES, device, runs=runs) for _ in range(repeat)]
    tp = Throughput(min(t.train_s_per_clip for t in tps), min(t.infer_s_per_window for t in tps), str(device))
    measure_s = time.perf_counter() - t0

    w, mean_s = fat2019_workload(cfg)
    audio_s = sum(d["hours"] for k, d in FAT2019.items() if k != "noisy" or cfg.noisy.epochs > 0) * 3600
    prep_dec, prep_feat = audio_s / dec_rate, audio_s / feat_rate
    prep = prep_dec + prep_feat  # on a CPU-only machine both share the cores; on a GPU the log-mel part shrinks
    print_table(["measured", "value", "unit"], [
        ["decode (iter_decoded, default workers)", dec_rate, "audio s/s"],
        [f"log-mel per clip on {device}", feat_rate, "audio s/s"],
        ["training (throughput.measure_throughput)", 1 / tp.train_s_per_clip, "clips/s"],
        ["inference", 1 / tp.infer_s_per_window, "windows/s"],
    ], f"throughputs measured on this machine ({measure_s:.0f} s of measuring)")
    print_table(["assumption", "value"], [
        ["audio decoded (curated+noisy+test)", f"{audio_s / 3600:.1f} h"],
        ["mean clip s (curated / noisy / test)", " / ".join(f"{mean_s[k]:.1f}" for k in ("curated", "noisy", "test"))],
        ["windows per clip (curated / noisy / test)", " / ".join(
            str(windows_per_clip(cfg, mean_s[k])) for k in ("curated", "noisy", "test")) + " (at the mean length)"],
        ["stage-1 training clips / holdout windows", f"{w.noisy_train} / {w.noisy_holdout_windows}"],
        ["curated clips / windows, test windows", f"{w.curated} / {w.curated_windows}, {w.test_windows}"],
        ["overhead on model time (cost.OVERHEAD)", f"{OVERHEAD:g}"],
    ], "workload (FAT2019 sizes from /work/shared/FAT2019.md)")

    full = plan_run(cfg, w, tp, None)
    available = budget_s * (1 - cfg.safety_margin) - prep
    parts = breakdown(cfg, w, tp, full)
    rows = [["decode (CPU)", prep_dec], [f"log-mel ({device})", prep_feat]] + [[k, v] for k, v in parts.items()]
    total_rows = sum(r[1] for r in rows)
    rows.append(["total", total_rows])
    print_table(["part of the run (full recipe)", "seconds", "hours"], [r + [r[1] / 3600] for r in rows],
                "projected wall time by part on this machine")
    if abs(sum(parts.values()) - full.total_s) > 1e-6 * max(full.total_s, 1):
        print(f"note: parts sum to {sum(parts.values()):.0f} s, cost.plan_run says {full.total_s:.0f} s")
    print("\nfattag.cost.plan_run, full recipe as configured (no budget):")
    print(full.table())
    total_full = prep + full.total_s
    print(f"projected wall time on this machine: {total_full:.0f} s = {total_full / 3600:.1f} h "
          f"(budget {budget_s:.0f} s = {budget_s / 3600:.2f} h)")
    fitted = plan_run(cfg, w, tp, max(available, 0.0))
    print(f"\nfitted into the budget ({max(available, 0):.0f} s left after data preparation and the safety margin):")
    print(fitted.table())

    # training rate needed for the full recipe to fit: A/R + B/(rho R) <= available on the GPU machine; the test
    # pseudo-label round is left out: the planner gives it only the time the rest of the recipe leaves
    recipe = dataclasses.replace(cfg, pseudo_epochs=0)
    train_work = plan_run(recipe, w, Throughput(1.0, 0.0, "unit"), None).total_s   # clip-equivalents x OVERHEAD
    infer_work = plan_run(recipe, w, Throughput(0.0, 1.0, "unit"), None).total_s   # windows x OVERHEAD
    rho = tp.train_s_per_clip / tp.infer_s_per_window                            # windows/s per clip/s
    avail_gpu = budget_s * (1 - cfg.safety_margin) - prep_dec                    # log-mel on the GPU ~free
    need = (train_work + infer_work / rho) / avail_gpu if avail_gpu > 0 else float("inf")
    have = 1 / tp.train_s_per_clip
    print_table(["to fit the full recipe in the budget", "value"], [
        ["training clips (all epochs, all folds)", train_work / OVERHEAD],
        ["inference windows (validation, OOF, test TTA)", infer_work / OVERHEAD],
        ["inference/training speed ratio (measured)", rho],
        ["seconds available (budget - margin - decode)", avail_gpu],
        ["needed training rate, clips/s", need],
        ["needed inference rate, windows/s", need * rho],
        ["measured training rate here, clips/s", have],
        ["speed-up needed over this machine", need / have],
    ], "GPU throughput needed for the recipe without the pseudo-label round (decode stays on the CPU at the rate "
       "measured here; log-mel on the GPU ~free)")
    t4 = t4_plans(cfg, w, budget_s * (1 - cfg.safety_margin) - a.prep_s, a.t4_clips_s, a.t4_infer_ratio,
                  a.ddp_speedup)
    results = dict(
        t4_plans=t4, decode_audio_s_per_s=dec_rate, logmel_audio_s_per_s=feat_rate, train_clips_s=have,
        infer_windows_s=1 / tp.infer_s_per_window, prep_s=prep, plan_full_s=full.total_s,
        projected_total_s=total_full, budget_s=budget_s,
        fitted=dict(epochs_noisy=fitted.epochs_noisy, epochs_curated=fitted.epochs_curated,
                    epochs_pseudo=fitted.epochs_pseudo,
                    folds=fitted.folds_trained, total_s=fitted.total_s, notes=fitted.notes),
        needed_train_clips_s=need, needed_infer_windows_s=need * rho, speedup_needed=need / have,
        parts_s={"decode": prep_dec, "logmel": prep_feat, **parts}, workload=dataclasses.asdict(w))
    return print_json("project", info, results, preset=a.preset, batch=cfg.batch_size, repeat=repeat)


if __name__ == "__main__":
    main(sys.argv[1:])
