"""One process with every core, or one process (rank) per core: which runs the pipeline faster on this CPU.

    python bench/devices.py                                   # demo and cpu presets, 1 x 2 threads vs 2 x 1
    python bench/devices.py --presets cpu --family everyday --set noisy.epochs=4 --set curated.epochs=6

Each run is `src/run.py` without a time budget (so both layouts run the same recipe) in its own work dir under
--out: once as one process with --threads torch threads, once as `--devices N` ranks sharing them (N = --ranks,
each rank taking threads / N). The demo preset runs on the demo data, the cpu preset on a realdev family (built
on first use). Printed per run: seconds per stage-1 epoch (stage 1's time over its epochs, data-parallel with
ranks), stage 2's wall time (end of stage 1 to the last fold's end: with ranks the folds run side by side), the
whole run's wall time, and OOF / test lwlrap. A benchmark, not a test: each run takes minutes; run it alone.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from common import machine_info, print_json, print_table  # noqa: E402
from realdev import FAMILIES, default_root, ensure_dataset, run_command, run_env, test_lwlrap  # noqa: E402


def one_run(data_dir: Path | None, work: Path, preset: str, sets: list, threads: int, ranks: int) -> dict:
    """A whole unbudgeted run; its stage timings from config.json."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    extra = ["--devices", str(ranks)] if ranks > 1 else []
    if data_dir is None:   # the demo data
        cmd = [sys.executable, str(REPO / "src" / "run.py"), "--work-dir", str(work), "--preset", preset, *extra,
               *[x for s in ["time_budget=0", *sets] for x in ("--set", s)]]
    else:
        cmd = run_command(data_dir, work, preset, 0, ["time_budget=0", *sets], extra)
    t0 = time.time()
    with open(work / "stdout.txt", "w") as out:
        proc = subprocess.run(cmd, env=run_env(threads), stdout=out, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run in {work} failed (exit {proc.returncode}); see {work}/stdout.txt")
    config = json.loads((work / "config.json").read_text())
    scores = json.loads((work / "scores.json").read_text())
    timings = {t["stage"]: t for t in config["timings"]}
    stage1 = timings.get("stage 1 (noisy)")
    epochs1 = config["plan"]["epochs_noisy"]
    folds = [t for name, t in timings.items() if name.startswith("fold")]
    stage2 = max(t["ended_s"] for t in folds) - (stage1["ended_s"] if stage1 else min(
        t["ended_s"] - t["actual_s"] for t in folds))
    return dict(layout=f"{ranks} x {threads // ranks}" if ranks > 1 else f"1 x {threads}", wall_s=round(wall, 1),
                stage1_epoch_s=round(stage1["actual_s"] / epochs1, 2) if stage1 and epochs1 else None,
                stage2_s=round(stage2, 1), oof=scores.get("oof_tta"),
                test=test_lwlrap(data_dir, work / "submission.csv") if data_dir is not None else None)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="demo,cpu", help="comma-separated: demo (demo data), cpu (realdev)")
    p.add_argument("--family", default="everyday", choices=sorted(FAMILIES), help="the cpu preset's realdev family")
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (default 2: this machine's cores)")
    p.add_argument("--ranks", type=int, default=2, help="processes of the multi-process layout (default 2)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="override a setting in every run (e.g. fewer epochs for a shorter benchmark)")
    p.add_argument("--root", type=Path, default=None, help="folder holding the realdev builds")
    p.add_argument("--out", default=str(REPO / "runs" / "devices"))
    args = p.parse_args(argv)
    info = machine_info()
    print(f"== devices: {args.threads} threads as 1 process or {args.ranks} ranks\nmachine: {info['cpu']} | "
          f"{info['cores']} cores", flush=True)
    rows, results = [], []
    for preset in args.presets.split(","):
        data_dir = None if preset == "demo" else ensure_dataset(args.root or default_root(), args.family, 0)
        for ranks in (1, args.ranks):
            work = Path(args.out) / f"{preset}-{ranks}ranks"
            r = dict(preset=preset, data="demo" if data_dir is None else f"realdev {args.family}",
                     **one_run(data_dir, work, preset, args.sets, args.threads, ranks))
            print(f"  {preset} {r['layout']}: {r['wall_s']:.0f} s", flush=True)
            results.append(r)
            rows.append([preset, r["data"], r["layout"], r["stage1_epoch_s"], r["stage2_s"], r["wall_s"], r["oof"],
                         r["test"]])
    print_table(["preset", "data", "processes x threads", "s / stage-1 epoch", "stage 2 s", "whole run s",
                 "OOF lwlrap", "test lwlrap"], rows, "one process against ranks")
    return print_json("devices", info, dict(sets=args.sets, threads=args.threads, ranks=args.ranks, runs=results))


if __name__ == "__main__":
    main()
