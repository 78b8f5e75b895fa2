"""Ablation on the demo dataset: what two-stage training, SpecAugment and mixup each bring.

Each variant is a full `src/run.py` run (demo preset, same seed) in its own work dir; the table shows OOF lwlrap
(centre crop, whole-clip windows) and the test lwlrap against the demo's hidden test truth.

    python bench/ablation.py [--variants full,curated_only,no_aug] [--out runs/ablation] [--set name=value ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fattag.demo import demo_truth, make_demo_dataset  # noqa: E402
from fattag.metrics import lwlrap  # noqa: E402

VARIANTS = {
    "full": [],                                                             # two-stage, SpecAugment, mixup
    "curated_only": ["epochs_noisy=0"],                                     # no stage 1
    "no_aug": ["specaug_noisy=false", "specaug_curated=false", "mixup_curated=0"],
    "curated_only_no_aug": ["epochs_noisy=0", "specaug_noisy=false", "specaug_curated=false", "mixup_curated=0"],
}


def test_lwlrap(data_dir: Path, submission: Path) -> float:
    sub = pd.read_csv(submission)
    classes = list(sub.columns[1:])
    truth = demo_truth(data_dir, "test").set_index("fname").loc[sub["fname"]]
    t = np.zeros((len(sub), len(classes)))
    for i, labels in enumerate(truth["labels"]):
        for label in labels.split(","):
            t[i, classes.index(label)] = 1
    return lwlrap(t, sub[classes].to_numpy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every variant")
    args = p.parse_args()
    data = make_demo_dataset(seed=42)
    rows = []
    for name in args.variants.split(","):
        work = Path(args.out) / name
        sets = [x for s in VARIANTS[name] + args.sets for x in ("--set", s)]
        t0 = time.time()
        subprocess.run([sys.executable, str(REPO / "src" / "run.py"), "--data-dir", str(data), "--work-dir",
                        str(work), "--preset", "demo", "--seed", "42", *sets], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        scores = json.loads((work / "scores.json").read_text())
        rows.append(dict(variant=name, oof_center=scores["oof_center"], oof_windows=scores["oof_windows"],
                         test=test_lwlrap(data, work / "submission.csv"), seconds=time.time() - t0))
        print(f"{name:<22} OOF centre {rows[-1]['oof_center']:.4f}  OOF windows {rows[-1]['oof_windows']:.4f}  "
              f"test {rows[-1]['test']:.4f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
