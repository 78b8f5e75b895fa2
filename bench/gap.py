"""Where the OOF-test gap is: per-class OOF and test lwlrap of finished realdev runs, and the test sources that fail.

    python bench/gap.py RUN_DIR [RUN_DIR ...] --data .cache/realdev/realdev-everyday

RUN_DIR is a training run's work dir (oof.csv, submission.csv), e.g. one of bench/realdev.py's
`<out>/<variant>/<family>-d0/seed<k>`; several dirs (seeds) are averaged. OOF is scored against train_curated.csv,
test against realdev's test_labels.csv; the test sources are meta.csv's `source` (everyday: a game package) or `bank`
(instruments: a sample bank) column, clips of one source only. A source's score is the mean ranking precision of its clips' true labels (lwlrap restricted to its clips).
Reads CSVs only: seconds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fattag.metrics import _label_precisions, per_class_lwlrap  # noqa: E402


def aligned(pred_csv: Path, truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    pred = pd.read_csv(pred_csv).set_index("fname").loc[truth.index, truth.columns]
    return truth.to_numpy(np.float64), pred.to_numpy(np.float64)


def curated_truth(data: Path) -> pd.DataFrame:
    table = pd.read_csv(data / "train_curated.csv")
    classes = list(pd.read_csv(data / "sample_submission.csv").columns[1:])
    hot = np.array([[c in str(labels).split(",") for c in classes] for labels in table["labels"]], dtype=np.float64)
    return pd.DataFrame(hot, index=table["fname"], columns=classes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", type=Path, required=True, help="the realdev family's folder")
    p.add_argument("--sources", type=int, default=8, help="worst test sources to list")
    args = p.parse_args(argv)
    test_truth = pd.read_csv(args.data / "test_labels.csv").set_index("fname")
    cur_truth = curated_truth(args.data)
    classes = list(test_truth.columns)
    oof_c, test_c, src_rows = [], [], []
    meta = pd.read_csv(args.data / "meta.csv")
    column = "source" if "source" in meta else "bank"   # everyday: game packages; instruments: sample banks
    source = meta[meta["split"] == "test"].set_index("fname")[column].loc[test_truth.index].astype(str).to_numpy()
    for run in args.runs:
        t, s = aligned(run / "oof.csv", cur_truth)
        oof_c.append(per_class_lwlrap(t, s)[0])
        t, s = aligned(run / "submission.csv", test_truth)
        test_c.append(per_class_lwlrap(t, s)[0])
        prec = _label_precisions(t, s)
        src_rows.append({src: prec[source == src].sum() / t[source == src].sum() for src in np.unique(source)
                         if " " not in src})   # clips of one source (a mixture lists several)
    oof, test = np.mean(oof_c, 0), np.mean(test_c, 0)
    positives = test_truth.to_numpy().sum(0).astype(int)
    print(f"per class, mean of {len(args.runs)} run(s): OOF and test lwlrap, the gap, test positives")
    print(f"{'class':<24}{'OOF':>7}{'test':>7}{'gap':>7}{'test n':>8}")
    for i in np.argsort(test):
        print(f"{classes[i]:<24}{oof[i]:>7.3f}{test[i]:>7.3f}{oof[i] - test[i]:>7.3f}{positives[i]:>8d}")
    by_source = pd.DataFrame(src_rows).mean(0).sort_values()
    counts = pd.Series(source).value_counts()
    print(f"\nworst {args.sources} test sources: ranking precision of their clips' labels (clips)")
    for src, value in by_source.head(args.sources).items():
        print(f"  {src:<30}{value:>7.3f}  ({counts[src]})")


if __name__ == "__main__":
    main()
