"""Entry point: `python src/run.py --help`. Reads top-down as the pipeline's named steps.

The bundled Kaggle kernel (kernel/kernel.py) runs this same file with baked-in defaults.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import numpy as np

if __package__ in (None, "") and "fattag" not in sys.modules:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fattag.budget import apply_plan, count_workload, measure_throughput, plan_run  # noqa: E402
from fattag.cli import parse_args  # noqa: E402
from fattag.data import load_dataset  # noqa: E402
from fattag.features import build_store, store_stats  # noqa: E402
from fattag.metrics import lwlrap  # noqa: E402
from fattag.model import model_from_checkpoint  # noqa: E402
from fattag.predict import load_fold_models, predict_test  # noqa: E402
from fattag.report import write_report  # noqa: E402
from fattag.session import open_session  # noqa: E402
from fattag.submission import class_prior, fill_missing, write_oof, write_submission  # noqa: E402
from fattag.train import train_folds, train_stage1  # noqa: E402

log = logging.getLogger("fattag")


def main(argv=None, defaults: dict | None = None) -> int:
    args = parse_args(argv, defaults)
    s = open_session(args)
    data = load_dataset(s.data_dir)
    log.info(data.summary())
    prior = class_prior(data.curated.targets)
    if args.mode == "predict":
        return predict_only(s, data, args.weights, prior)

    # 1. A prior-based submission at once, so a valid file exists whatever happens next (a resumed run keeps the
    #    one it has); then the log-mel stores.
    if not (s.work_dir / "submission.csv").exists():
        write_submission(s.work_dir / "submission.csv", data.sample_submission, data.test.fnames, data.classes,
                         np.tile(prior, (len(data.test), 1)))
    t0 = time.time()
    test = build_store(data.test, s.cfg, s.device)
    curated = build_store(data.curated, s.cfg, s.device)
    noisy = build_store(data.noisy, s.cfg, s.device) if data.noisy is not None and s.cfg.epochs_noisy > 0 else None
    s.record("decode + log-mel", time.time() - t0)
    mean, std = store_stats(curated, seed=s.cfg.seed)

    # 2. Plan epochs, folds and TTA passes to fit the time budget, from measured throughput.
    plan = make_plan(s, data.classes, noisy, curated, test)

    # 3. Stage 1 on the noisy set (one shared model), 4. stage 2 on each curated fold, warm-started from it.
    stage1_deadline = s.deadline - plan.folds_s if s.deadline else None
    stage1 = None if s.cfg.stage1_per_fold else train_stage1(s, noisy, data.classes, mean, std,
                                                             deadline=stage1_deadline)
    folds = train_folds(s, curated, noisy, data.classes, mean, std, stage1, plan.folds_trained,
                        predict_reserve_s=plan.predict_test_s)

    # 5. Out-of-fold scores: centre crop (no TTA), whole-clip windows, windows + augmented passes.
    scores = score_oof(data.curated.targets, folds)
    write_oof(s.work_dir / "oof.csv", data.curated.fnames, data.classes, folds.oof_tta)

    # 6. Test: whole-clip TTA with every fold model, fold ensemble; every test clip gets a row.
    t0 = time.time()
    models = [model_from_checkpoint(path, s.cfg, data.classes)[0] for path in folds.model_paths]
    if models:
        probs = fill_missing(predict_test(models, test, s.cfg, s.device, s.cfg.tta_aug_passes), test.ok, prior)
        write_submission(s.work_dir / "submission.csv", data.sample_submission, data.test.fnames, data.classes,
                         probs)
    else:
        probs = np.tile(prior, (len(data.test), 1))
        log.error("NO MODEL WAS TRAINED IN TIME: submission.csv holds class priors only")
    s.record("predict test", time.time() - t0)
    (s.work_dir / "scores.json").write_text(json.dumps(dict(scores, folds=folds.results), indent=2) + "\n")
    log.info("time plan vs actual:\n%s", s.timing_table())

    # 7. The run report: dataset, time plan vs actual, fold scores, curves, per-class lwlrap, predictions.
    rows = folds.predicted
    write_report(s.work_dir, mode="train", classes=data.classes, timings=s.timings, scores=scores,
                 dataset=dataset_summary(s, [curated, noisy, test]), folds=folds.results,
                 oof_truth=data.curated.targets[rows], oof_probs=folds.oof_tta[rows], test_probs=probs)
    return 0


def dataset_summary(s, stores) -> dict:
    return dict(data_dir=str(s.data_dir), demo=s.is_demo, sets=[st.summary() for st in stores if st is not None])


def make_plan(s, classes, noisy, curated, test):
    """Measure this machine's speed and fit the preset into what is left of the budget (or keep it as is)."""
    tp = measure_throughput(s.cfg, len(classes), s.device)
    workload = count_workload(s.cfg, noisy, curated, test)
    plan = plan_run(s.cfg, workload, tp, s.remaining())
    s.cfg = apply_plan(s.cfg, plan)
    s.planned.update(dict(plan.stages))
    log.info("measured %s\n%s", tp.describe(), plan.table())
    return plan


def score_oof(targets, folds) -> dict:
    rows = folds.predicted
    if not rows.any():
        return {}
    scores = {name: lwlrap(targets[rows], probs[rows]) for name, probs in
              (("oof_center", folds.oof_center), ("oof_windows", folds.oof_windows), ("oof_tta", folds.oof_tta))}
    log.info("OOF lwlrap over %d clips: centre crop %.4f | whole-clip windows %.4f | + augmented passes %.4f",
             int(rows.sum()), scores["oof_center"], scores["oof_windows"], scores["oof_tta"])
    return scores


def predict_only(s, data, weights_dir, prior) -> int:
    """Kaggle-style inference from attached fold weights: no training data is decoded."""
    if not weights_dir:
        raise SystemExit("--mode predict needs --weights DIR (a training run's work dir)")
    t0 = time.time()
    models = load_fold_models(weights_dir, s.cfg, data.classes)
    log.info("loaded %d fold models from %s", len(models), weights_dir)
    test = build_store(data.test, s.cfg, s.device)
    probs = fill_missing(predict_test([m for _, m, _ in models], test, s.cfg, s.device, s.cfg.tta_aug_passes),
                         test.ok, prior)
    write_submission(s.work_dir / "submission.csv", data.sample_submission, data.test.fnames, data.classes, probs)
    s.record("predict test", time.time() - t0)
    log.info("time:\n%s", s.timing_table())
    write_report(s.work_dir, mode="predict", classes=data.classes, timings=s.timings, test_probs=probs,
                 dataset=dataset_summary(s, [test]),
                 loaded=[f"{path} (fold {meta.get('fold')}, lwlrap {meta.get('score', float('nan')):.4f}, "
                         f"{meta['model']['arch']})" for path, _, meta in models])
    return 0


if __name__ == "__main__":
    sys.exit(main())
