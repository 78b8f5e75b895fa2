"""Does a run use its time budget? Wall time of whole runs against the usable budget (budget minus safety margin).

    python bench/budget.py --preset demo --budget 120
    python bench/budget.py --preset kaggle-1h --budget 300

Each run is `src/run.py --preset P --time-budget B` on the default data (the demo dataset, or /kaggle/input) in a
fresh work dir, timed from process start to exit. A preset that does not fit its budget should end within 10 % of
the usable budget and never after it: the planner cuts (and restores) epochs and folds from measured times, and
time left at the end buys augmented TTA passes. Run it alone: another job on the same cores skews the timings.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, print_json, print_table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--budget", type=float, default=120.0, help="seconds")
    p.add_argument("--data-dir", default=None, help="dataset (default: the run's own default)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--keep", default=None, help="keep each run's work dir under this folder (default: a temp dir)")
    a = p.parse_args(argv)
    from fattag.config import make_config
    margin = make_config(a.preset).safety_margin
    usable = a.budget * (1 - margin)
    info = machine_info()
    print(f"== budget: preset {a.preset}, budget {a.budget:.0f} s, usable {usable:.0f} s (margin {margin:.0%})\n"
          f"machine: {info['cpu']} | {info['cores']} cores | load avg {info.get('load_avg_1m', '?')}", flush=True)
    rows, runs = [], []
    for i in range(a.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            work = str(Path(a.keep) / f"run{i + 1}") if a.keep else tmp
            cmd = [sys.executable, str(REPO / "src" / "run.py"), "--preset", a.preset, "--time-budget", str(a.budget),
                   "--work-dir", work, *(["--data-dir", a.data_dir] if a.data_dir else [])]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.time() - t0
            if proc.returncode != 0:
                raise SystemExit(f"run failed:\n{proc.stderr[-3000:]}")
            config = json.loads((Path(work) / "config.json").read_text())
            plan = config.get("plan", {})
            folds = config.get("folds_run", [])
        runs.append(dict(wall_s=wall, share_of_usable=wall / usable, folds=len(folds),
                         epochs=[f["epochs_run"] for f in folds], tta_passes=plan.get("tta_aug_passes")))
        rows.append([i + 1, wall, wall / usable, len(folds), " ".join(map(str, runs[-1]["epochs"])),
                     plan.get("epochs_noisy"), runs[-1]["tta_passes"], "yes" if 0.9 <= wall / usable <= 1 else "NO"])
    print_table(["run", "wall s", "of usable", "folds", "fold epochs", "stage-1 epochs", "TTA passes",
                 "within 90-100 %"], rows, "whole runs (process start to exit)")
    return print_json("budget", info, {"runs": runs}, preset=a.preset, budget_s=a.budget, usable_s=usable)


if __name__ == "__main__":
    main(sys.argv[1:])
