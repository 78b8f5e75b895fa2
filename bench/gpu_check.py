"""GPU check for the first machine that has one: can this torch run here, do the GPU tests pass, how fast is the
kernel's model under mixed precision, and what does the kaggle-1h plan look like on FAT2019's sizes at that speed.

    python bench/gpu_check.py             # on a GPU machine: under 5 minutes
    python bench/gpu_check.py --dry-run   # the same code on the CPU (bfloat16 autocast, small batches): for CI

Steps: (1) the device: name, compute capability, torch / CUDA / cuDNN versions, the architectures this torch was
built for and `fattag.precision.unsupported_gpu`'s verdict; (2) `pytest tests/test_gpu.py` in a child process
(skipped test by test without CUDA); (3) `fattag.throughput.measure_throughput` of the preset's model (the
planner's own timing) under its mixed precision and in float32; (4) the same timing in 2 ranks through DDP
(`fattag.world.spawn`: on two GPUs, or two processes sharing one GPU or the CPU cores, a functional check), each
rank a half batch, as stage 1 trains; (5) `fattag.cost.plan_run` on FAT2019's sizes (`bench/project.py`'s
workload) at the measured rates for 1 and 2 devices, with the preset's budget less the data preparation time
(`--prep-s`). With fewer than 2 GPUs the 2-device plan assumes ideal data-parallel scaling (the measured 2-rank
rate on shared hardware says nothing of two devices).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, base_parser, print_json, print_machine, print_table
from project import N_CLASSES, fat2019_workload

# Decode + log-mel of FAT2019's 103 h before training: decode at ~13,900 audio-s/s on 2 CPU cores (README), the
# log-mel on the GPU. Kaggle's T4 x2 machine has 4 cores; 120 s leaves room for a slower disk.
PREP_S = 120.0


def device_facts(device) -> dict:
    import torch
    from fattag.precision import unsupported_gpu
    facts = dict(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 arch_list=torch.cuda.get_arch_list() if torch.cuda.is_available() else [])
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        facts.update(name=torch.cuda.get_device_name(device), capability=f"{cap[0]}.{cap[1]}",
                     memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1),
                     devices=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
        facts["unsupported"] = unsupported_gpu(facts["name"], cap, facts["arch_list"])
    else:
        facts.update(name="cpu (dry run)", capability="-", devices=0, unsupported=None)
    return facts


def run_gpu_tests(timeout: float) -> dict:
    """The GPU tests (each skipped without CUDA), in a child process as CI runs them."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        last = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
        return dict(rc=proc.returncode, summary=last[0], seconds=time.perf_counter() - t0,
                    tail=proc.stdout[-2000:] if proc.returncode else "")
    except subprocess.TimeoutExpired:
        return dict(rc=None, summary=f"timed out after {timeout:.0f} s", seconds=timeout, tail="")


def ddp_rates(argv, defaults=None) -> int:
    """One of the 2 spawned ranks: measure_throughput with its DDP step; rank 0 writes the rates to argv[0]."""
    from fattag.config import make_config
    from fattag.throughput import measure_throughput
    from fattag.world import join
    out, preset, batch, amp, runs = argv
    world = join(2)
    cfg = dataclasses.replace(make_config(preset, sets=[f"amp={amp}"]), batch_size=int(batch))
    tp = measure_throughput(cfg, N_CLASSES, world.device(), runs=int(runs), world=world)
    if world.is_main:
        Path(out).write_text(json.dumps(dataclasses.asdict(tp)))
    return 0


def time_two_ranks(preset: str, batch: int, amp: str, runs: int):
    """Throughput measured in 2 spawned ranks (per device, and the DDP step over both)."""
    from fattag.cost import Throughput
    from fattag.world import spawn
    entry = importlib.import_module("gpu_check").ddp_rates   # by its module name: the spawned ranks import it
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rates.json"
        spawn(entry, [str(out), preset, str(batch), amp, str(runs)], None, 2)
        return Throughput(**json.loads(out.read_text()))


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU under bfloat16 autocast with small "
                                                          "batches (the same code, for CI)")
    p.add_argument("--batch", type=int, default=None, help="batch for the throughput timing (default: the "
                                                           "preset's; --dry-run: 4)")
    p.add_argument("--prep-s", type=float, default=PREP_S, help="seconds of decode + log-mel before training")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    a = p.parse_args(argv)
    import torch
    from fattag.cost import plan_run
    from fattag.throughput import measure_throughput
    from fattag.config import make_config
    from fattag.precision import amp_dtype

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cpu" if a.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not a.dry_run:
        print("note: no CUDA device is visible; running the dry run on the CPU")
    amp = "bf16" if device.type == "cpu" else "auto"
    cfg = make_config(a.preset, sets=[f"amp={amp}"])
    batch = a.batch or (4 if device.type == "cpu" else cfg.batch_size)
    cfg = dataclasses.replace(cfg, batch_size=batch)
    info = print_machine(f"gpu_check: {a.preset} on {device}", device, notes=(
        f"{cfg.arch}, input {cfg.input_norm}, {cfg.n_mels} mels x {cfg.crop_frames} frames, batch {batch}, "
        f"autocast {amp_dtype(cfg, device)}"))

    facts = device_facts(device)
    print_table(["device fact", "value"], [[k, (", ".join(v) or "-") if isinstance(v, list) else v]
                                            for k, v in facts.items() if k != "unsupported"], "device")
    print(f"\ncan this torch run here: {'no: ' + facts['unsupported'] if facts['unsupported'] else 'yes'}")
    if facts["unsupported"]:
        return print_json("gpu_check", info, dict(device=facts), preset=a.preset)

    tests = None if a.no_tests else run_gpu_tests(timeout=180)
    if tests:
        print(f"\nGPU tests (tests/test_gpu.py): {tests['summary']} "
              f"in {tests['seconds']:.0f} s{chr(10) + tests['tail'] if tests['tail'] else ''}")

    runs = 2 if device.type == "cpu" else 6
    rates = {name: measure_throughput(dataclasses.replace(cfg, amp=setting), N_CLASSES, device, runs=runs)
             for name, setting in (("mixed precision", amp), ("float32", "off"))}
    print_table(["precision", "training clips/s", "inference windows/s"],
                [[k, 1 / t.train_s_per_clip, 1 / t.infer_s_per_window] for k, t in rates.items()],
                f"measure_throughput ({runs} timed batches each, the fastest kept)")

    tp = rates["mixed precision"]
    two = time_two_ranks(a.preset, batch, amp, runs)
    own_devices = device.type == "cuda" and torch.cuda.device_count() >= 2
    speedup = tp.train_s_per_clip / two.ddp_train_s_per_clip
    print_table(["training", "clips/s", "vs 1 rank"],
                [["1 rank", 1 / tp.train_s_per_clip, 1.0], ["2 ranks, per rank alone", 1 / two.train_s_per_clip,
                                                            tp.train_s_per_clip / two.train_s_per_clip],
                 ["2 ranks, DDP step (half batch each)", 1 / two.ddp_train_s_per_clip, speedup]],
                "data-parallel stage-1 step, 2 ranks " + ("on 2 GPUs" if own_devices else
                                                          "sharing one device (a functional check)"))

    w, _ = fat2019_workload(cfg)
    budget_s = cfg.time_budget or 3300.0
    available = max(budget_s * (1 - cfg.safety_margin) - a.prep_s, 0.0)
    full_cfg = dataclasses.replace(cfg, batch_size=make_config(a.preset).batch_size)
    full = plan_run(full_cfg, w, tp, None)
    fitted = plan_run(full_cfg, w, tp, available)
    print(f"\n{a.preset} on FAT2019 sizes at the measured mixed-precision rates, full recipe (no budget):")
    print(full.table())
    print(f"\nfitted into the budget ({available:.0f} s = {budget_s:.0f} s less {cfg.safety_margin:.0%} and "
          f"{a.prep_s:.0f} s of data preparation), 1 device:")
    print(fitted.table())
    tp2 = dataclasses.replace(tp, devices=2, ddp_train_s_per_clip=two.ddp_train_s_per_clip if own_devices else 0.0)
    fitted2 = plan_run(full_cfg, w, tp2, available)
    print(f"\n2 devices ({'measured DDP rate' if own_devices else 'ideal scaling of the 1-device rate'}):")
    print(fitted2.table())
    results = dict(
        device=facts, tests=tests and {k: v for k, v in tests.items() if k != "tail"},
        train_clips_s={k: 1 / t.train_s_per_clip for k, t in rates.items()},
        infer_windows_s={k: 1 / t.infer_s_per_window for k, t in rates.items()},
        plan_full_s=full.total_s, budget_available_s=available,
        fitted=dict(epochs_noisy=fitted.epochs_noisy, epochs_curated=fitted.epochs_curated,
                    epochs_pseudo=fitted.epochs_pseudo, folds=fitted.folds_trained,
                    tta_aug_passes=fitted.tta_aug_passes, total_s=fitted.total_s, notes=list(fitted.notes)),
        ddp=dict(own_devices=own_devices, rank_train_clips_s=1 / two.train_s_per_clip,
                 ddp_train_clips_s=1 / two.ddp_train_s_per_clip, speedup=speedup),
        fitted_2_devices=dict(epochs_noisy=fitted2.epochs_noisy, epochs_curated=fitted2.epochs_curated,
                              epochs_pseudo=fitted2.epochs_pseudo, folds=fitted2.folds_trained,
                              tta_aug_passes=fitted2.tta_aug_passes, total_s=fitted2.total_s))
    if tests and tests["rc"] not in (0, None):
        print("gpu_check: the GPU tests failed (see above)", file=sys.stderr)
    return print_json("gpu_check", info, results, preset=a.preset, batch=batch, dry_run=a.dry_run)


if __name__ == "__main__":
    record = main(sys.argv[1:])
    tests = record["results"].get("tests")
    sys.exit(1 if tests and tests["rc"] not in (0, None) else 0)
