"""What an ensemble of finished runs would score: test lwlrap of each run's submission and of their mean.

    python bench/ensemble.py RUN_DIR [RUN_DIR ...] --data .cache/realdev/realdev-everyday

RUN_DIR is a training run's work dir holding submission.csv, e.g. bench/realdev.py's
`<out>/<variant>/<family>-d0/seed<k>`: several seeds of one variant give a seed ensemble (at that many times one
run's compute), runs of two variants an ensemble of two recipes. Test lwlrap is scored against realdev's
test_labels.csv; the ensemble averages the submissions' scores clip by clip. Whether the runs miss the same labels:
the test labels each run ranks with precision under 0.5 (lwlrap's per-label term), those all runs miss, those the
ensemble misses, and the correlation of the labels' precisions between runs. Reads CSVs only: seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from fattag.metrics import _label_precisions, lwlrap  # noqa: E402
from gap import aligned  # noqa: E402  (a submission in the truth's clip and class order)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", type=Path, required=True, help="the realdev family's folder (test_labels.csv)")
    args = p.parse_args(argv)
    truth = pd.read_csv(args.data / "test_labels.csv").set_index("fname")
    y = truth.to_numpy(np.float64)
    scores = np.stack([aligned(run / "submission.csv", truth)[1] for run in args.runs])   # (runs, clips, classes)
    ensemble_scores = scores.mean(0)
    single = [lwlrap(y, s) for s in scores]
    mean = lwlrap(y, ensemble_scores)
    for run, value in zip(args.runs, single):
        print(f"{value:.4f}  {run}")
    print(f"{np.mean(single):.4f}  mean of the {len(single)} runs' scores")
    print(f"{mean:.4f}  their ensemble (mean of the submissions)")
    positive = y > 0
    precisions = np.stack([_label_precisions(y, s)[positive] for s in scores])   # (runs, true labels)
    missed = precisions < 0.5
    corr = np.corrcoef(precisions)[np.triu_indices(len(scores), 1)].tolist() if len(scores) > 1 else []
    ensemble_missed = int((_label_precisions(y, ensemble_scores)[positive] < 0.5).sum())
    print(f"of {positive.sum()} test labels ranked with precision < 0.5: {', '.join(map(str, missed.sum(1)))} by the "
          f"runs, {missed.all(0).sum()} by all of them, {ensemble_missed} by the ensemble; "
          f"precision correlation between runs {', '.join(f'{c:.2f}' for c in corr)}")
    results = {"runs": [str(r) for r in args.runs], "single": single, "ensemble": mean,
               "missed": missed.sum(1).tolist(), "missed_by_all": int(missed.all(0).sum()),
               "missed_by_ensemble": ensemble_missed, "precision_corr": corr}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
