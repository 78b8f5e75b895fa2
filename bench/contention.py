"""The time plan on a busy machine: one budgeted run with CPU-bound background processes during its first seconds,
beside the same run on a quiet machine.

    python bench/contention.py --family everyday --load-s 60            # loaded run, then the quiet one
    python bench/contention.py --family everyday --load-s 60 --procs 2 --seed 0

Each run is `src/run.py --preset cpu` (its own time budget) on a realdev family in its own work dir under --out.
The loaded run starts --procs busy-loop processes with it and stops them, by their own process ids, after
--load-s seconds (and in any case when the run ends). The throughput measurement at the start of the run then
reads a slow machine; what the budget makes of that shows in: stage 1's epochs against the quiet run's, each
fold's epochs, the share of the usable budget left unused, and test lwlrap. Prints planned against actual seconds
per stage for both runs, then checks: stage 1 gets at least 80 % of its quiet epochs, no fold gets less than half
another's, the run ends within 10 % of its usable budget or ran its whole recipe, and test lwlrap is within 0.015
of the quiet run. A benchmark, not a test: two runs of about 10 minutes.
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

BUSY = "while True:\n    pass\n"   # one CPU-bound background process


def run(data_dir: Path, work: Path, args, load_s: float) -> dict:
    """One budgeted run; with `load_s` > 0, `args.procs` busy processes during its first `load_s` seconds."""
    if work.exists():   # a fresh work dir: a run must not reuse the stages of an earlier one
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cmd, env = run_command(data_dir, work, args.preset, args.seed, args.sets), run_env(args.threads)
    t0 = time.time()
    busy = []
    with open(work / "stdout.txt", "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.procs if load_s > 0 else 0)]
            while proc.poll() is None:
                if busy and time.time() - t0 >= load_s:
                    stop(busy)
                    print(f"  background load stopped after {time.time() - t0:.0f} s (pids "
                          f"{', '.join(str(b.pid) for b in busy)})", flush=True)
                    busy = []
                time.sleep(0.5)
        finally:
            stop(busy)
            if proc.poll() is None:
                proc.kill()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run in {work} failed (exit {proc.returncode}); see {work}/stdout.txt")
    config = json.loads((work / "config.json").read_text())
    stage1 = work / "stage1" / "history.csv"
    return dict(wall_s=wall, test=test_lwlrap(data_dir, work / "submission.csv"), config=config,
                stage1_epochs=max(len(stage1.read_text().splitlines()) - 1, 0) if stage1.is_file() else 0,
                fold_epochs=[f["epochs_run"] for f in config.get("folds_run", [])],
                timings=config.get("timings", []), use=config.get("budget_use") or {})


def stop(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="everyday", choices=sorted(FAMILIES))
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-s", type=float, default=60.0, help="seconds of background load from the run's start")
    p.add_argument("--procs", type=int, default=2, help="busy background processes (default 2: one per core here)")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of the run (default: torch's own)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--root", type=Path, default=None, help="folder holding the realdev builds")
    p.add_argument("--out", default=str(REPO / "runs" / "contention"))
    p.add_argument("--only", choices=("loaded", "quiet"), default=None, help="run just one of the two")
    args = p.parse_args(argv)
    data_dir = ensure_dataset(args.root or default_root(), args.family, 0)
    info = machine_info()
    print(f"== contention: preset {args.preset}, realdev {args.family}, seed {args.seed}, {args.procs} busy "
          f"process(es) for the first {args.load_s:.0f} s\nmachine: {info['cpu']} | {info['cores']} cores",
          flush=True)
    runs = {}
    for name, load in (("loaded", args.load_s), ("quiet", 0.0)):
        if args.only and name != args.only:
            continue
        print(f"- {name} run ...", flush=True)
        runs[name] = run(data_dir, Path(args.out) / f"{args.family}-seed{args.seed}" / name, args, load)
        r = runs[name]
        print(f"  {name}: test {r['test']:.4f}, stage 1 {r['stage1_epochs']} epochs, folds {r['fold_epochs']}, "
              f"wall {r['wall_s']:.0f} s, unused {r['use'].get('unused_share', float('nan')):.0%}", flush=True)
    stages = [t["stage"] for t in next(iter(runs.values()))["timings"]]
    print_table(["stage", *[f"{n} {k}" for n in runs for k in ("planned", "actual")]],
                [[st, *[v for r in runs.values() for t in r["timings"] if t["stage"] == st
                        for v in (t["planned_s"], t["actual_s"])]] for st in stages],
                "planned against actual seconds per stage")
    rows = [[n, r["test"], r["stage1_epochs"], " ".join(map(str, r["fold_epochs"])), r["wall_s"],
             r["use"].get("used_s"), r["use"].get("usable_s"), r["use"].get("unused_share"), r["use"].get("why")]
            for n, r in runs.items()]
    print_table(["run", "test lwlrap", "stage-1 epochs", "fold epochs", "wall s", "used s", "usable s", "unused",
                 "why unused"], rows, "the two runs")
    checks = {}
    if len(runs) == 2:
        loaded, quiet = runs["loaded"], runs["quiet"]
        folds = loaded["fold_epochs"]
        checks = {
            "stage 1 >= 80 % of its quiet epochs": loaded["stage1_epochs"] >= 0.8 * quiet["stage1_epochs"],
            "no fold under half another's": bool(folds) and min(folds) >= max(folds) / 2,
            "within 10 % of the usable budget, or the whole recipe":
                loaded["use"].get("unused_share", 1.0) <= 0.10 or "whole requested recipe" in loaded["use"].get(
                    "why", ""),
            "test within 0.015 of the quiet run": abs(loaded["test"] - quiet["test"]) <= 0.015,
        }
        print_table(["check", "holds"], [[k, "yes" if v else "NO"] for k, v in checks.items()], "checks")
    return print_json("contention", info, {n: {k: v for k, v in r.items() if k != "config"} for n, r in runs.items()},
                      checks=checks, family=args.family, seed=args.seed, load_s=args.load_s, procs=args.procs)


if __name__ == "__main__":
    main()
