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

from fattag.cli import parse_args  # noqa: E402
from fattag.context import check_before_spawn, devices_asked, open_run, open_tag  # noqa: E402
from fattag.cost import count_workload  # noqa: E402
from fattag.data import load_dataset  # noqa: E402
from fattag.features import build_shared_store  # noqa: E402
from fattag.metrics import lwlrap  # noqa: E402
from fattag.precision import check_device  # noqa: E402
from fattag.predict import predict_and_submit, submit_fold_models  # noqa: E402
from fattag.pseudo import pseudo_label_round  # noqa: E402
from fattag.report import write_report  # noqa: E402
from fattag.select import select_noisy_pool  # noqa: E402
from fattag.submission import class_prior, write_oof, write_submission  # noqa: E402
from fattag.tag import tag_files  # noqa: E402
from fattag.thresholds import oof_thresholds  # noqa: E402
from fattag.throughput import measure_throughput  # noqa: E402
from fattag.splits import TrainingData  # noqa: E402
from fattag.train import train_folds, train_stage1  # noqa: E402
from fattag.weights import load_fold_models, prediction_config, save_thresholds, saved_thresholds  # noqa: E402
from fattag.world import should_spawn, spawn  # noqa: E402

log = logging.getLogger("fattag")
MEASURE_SHARE = 0.03  # at most this share of the budget goes to measuring throughput


def main(argv=None, defaults: dict | None = None) -> int:
    args = parse_args(argv, defaults)
    if args.mode == "tag":   # the user's own files with a training run's models: one process, no dataset
        cfg, explicit, work_dir = open_tag(args)
        return tag_files(cfg, explicit, args.weights, args.paths, work_dir)
    if should_spawn(devices_asked(args)):   # several devices: one process (rank) each, every one running main()
        check_before_spawn(args)
        return spawn(main, argv, defaults, devices_asked(args))
    run = open_run(args)
    data = load_dataset(run.data_dir)
    log.info(data.summary())
    prior = class_prior(data.curated.targets)

    # 1. A prior-based submission at once, so a valid file exists whatever happens next (a resumed run keeps the
    #    one it has); a clear stop on a GPU this torch cannot run on; then the log-mel stores (with several ranks:
    #    built once by rank 0, shared by all).
    write_prior_submission(run, data, prior)
    check_device(run.device)
    if args.mode == "predict":
        return predict_only(run, data, args.weights, prior)
    test, curated, noisy = build_stores(run, data)
    d = TrainingData.make(data.classes, curated, noisy, run.cfg)

    # 2. Plan epochs, folds and TTA passes to fit the time budget, from measured throughput.
    plan_budget(run, len(data.classes), noisy, curated, test)

    # 3. Stage 1 on the noisy set (one shared model, data-parallel over the ranks; optionally only the noisy clips
    #    a curated-trained scorer agrees with), 4. stage 2 on each curated fold (N ranks: N folds at a time),
    #    warm-started from it.
    select_noisy_pool(run, d)
    stage1 = train_stage1(run, d)
    folds = train_folds(run, d, stage1.weights)

    # 5. Out-of-fold scores: centre crop (no TTA), whole-clip windows, windows + augmented passes; oof.csv; the
    #    decision threshold of each class, chosen on them.
    scores = score_oof(run, data, folds)
    thresholds = oof_thresholds(data.classes, data.curated.targets, folds.oof_tta)

    # 6. Test pseudo-labels: the fold ensemble labels the test clips, each fold model trains on them as well.
    folds = pseudo_label_round(run, d, folds, test)

    # 7. Test: whole-clip TTA with every fold model (augmented passes as the time left allows), fold ensemble;
    #    every test clip gets a row. inference.json records how it was done.
    _, unbalanced = submit_fold_models(run, data, folds, test, prior)

    # 8. What the run did: config.json, scores.json, the decision thresholds (in inference.json), the time plan
    #    against actual, and the run report (dataset, fold scores, curves, per-class lwlrap, thresholds, predictions).
    write_outputs(run, data, [curated, noisy, test], stage1, folds, scores, thresholds, unbalanced)
    return 0


def write_prior_submission(run, data, prior) -> None:
    """submission.csv from the class prior, unless the run (resumed) already has one: rank 0 writes it."""
    if run.world.is_main and not (run.work_dir / "submission.csv").exists():
        write_submission(run.work_dir / "submission.csv", data.sample_submission, data.test.fnames, data.classes,
                         np.tile(prior, (len(data.test), 1)))


def build_stores(run, data) -> tuple:
    """The log-mel stores (test, curated, noisy): no noisy store without a noisy set or stage-1 epochs."""
    t0, cfg = time.time(), run.cfg
    test, curated = (build_shared_store(t, cfg, run.device, run.world, run.work_dir / "stores")
                     for t in (data.test, data.curated))
    noisy = (build_shared_store(data.noisy, cfg, run.device, run.world, run.work_dir / "stores")
             if data.noisy is not None and cfg.noisy.epochs > 0 else None)
    run.record("decode + log-mel", time.time() - t0)
    return test, curated, noisy


def dataset_summary(run, stores) -> dict:
    return dict(data_dir=str(run.data_dir), demo=run.is_demo, sets=[st.summary() for st in stores if st is not None])


def plan_budget(run, n_classes, noisy, curated, test) -> None:
    """Measure this machine's speed and fit the recipe into what is left of the budget (or keep it as is)."""
    t0 = time.time()
    remaining = run.budget.remaining()
    tp = measure_throughput(run.cfg, n_classes, run.device, max_seconds=remaining and remaining * MEASURE_SHARE,
                            world=run.world)
    run.record("measure throughput", time.time() - t0)
    run.budget.start(count_workload(run.cfg, noisy, curated, test), tp)
    run.share_plan()   # every rank measured its own device; rank 0's figures plan the run
    run.save_config()
    log.info("measured %s\n%s", tp.describe(), run.budget.plan.table())


def score_oof(run, data, folds) -> dict:
    """The OOF lwlrap of each kind of prediction over the clips the fold models predicted; rank 0 writes oof.csv."""
    targets, rows = data.curated.targets, folds.predicted
    if run.world.is_main:
        write_oof(run.work_dir / "oof.csv", data.curated.fnames, data.classes, folds.oof_tta)
    if not rows.any():
        return {}
    scores = {name: lwlrap(targets[rows], probs[rows]) for name, probs in
              (("oof_center", folds.oof_center), ("oof_windows", folds.oof_windows), ("oof_tta", folds.oof_tta))}
    log.info("OOF lwlrap over %d clips: centre crop %.4f | whole-clip windows %.4f | + augmented passes %.4f",
             int(rows.sum()), scores["oof_center"], scores["oof_windows"], scores["oof_tta"])
    return scores


def write_outputs(run, data, stores, stage1, folds, scores, thresholds, test_probs) -> None:
    """Rank 0's record of the training run (every rank's stage timings gathered first): how it used its budget,
    config.json, scores.json, the decision thresholds beside the inference settings, the time plan against actual,
    report.md (`test_probs`: before class balancing)."""
    run.gather_timings()
    if not run.world.is_main:
        return
    save_thresholds(run.work_dir, thresholds)
    usage = run.budget.usage(run.started)
    if usage:
        log.info("time budget: used %.0f of %.0f usable s; %.0f s (%.0f %%) unused: %s", usage["used_s"],
                 usage["usable_s"], usage["unused_s"], 100 * usage["unused_share"], usage["why"])
    run.save_config(folds_run=folds.results, budget_use=usage, timings=run.timings)
    (run.work_dir / "scores.json").write_text(json.dumps(dict(scores, folds=folds.results,
                                                              stage1_holdout=stage1.holdout), indent=2) + "\n")
    log.info("time plan vs actual:\n%s", run.timing_table())
    rows = folds.predicted
    write_report(run.work_dir, mode="train", classes=data.classes, timings=run.timings, scores=scores,
                 test_audio=test_audio_use(run.cfg, folds.results),
                 dataset=dataset_summary(run, stores), folds=folds.results, stage1=stage1.holdout, budget_use=usage,
                 thresholds=thresholds, oof_truth=data.curated.targets[rows], oof_probs=folds.oof_tta[rows],
                 test_probs=test_probs)


def test_audio_use(cfg, fold_rows: list[dict]) -> str:
    """Whether this run trained on test audio, in words for the report (DCASE's rules forbid it; docs/kaggle.md)."""
    rounds = sum("pseudo_epoch" in row for row in fold_rows)
    if rounds:
        return f"trained on: the pseudo-label round trained {rounds} fold model(s) on the test clips"
    why = "train_on_test=false" if not cfg.train_on_test else "the pseudo-label round did not run"
    return f"not trained on ({why})"


def predict_only(run, data, weights_dir, prior) -> int:
    """Kaggle-style inference from attached fold weights: the weights say how to predict; no training data is read."""
    if not weights_dir:
        raise SystemExit("--mode predict needs --weights DIR (a training run's work dir)")
    models = load_fold_models(weights_dir, data.classes)
    cfg = prediction_config(run.cfg, models, run.explicit)
    run.save_config(cfg, weights=str(weights_dir))
    log.info("loaded %d fold models from %s", len(models), weights_dir)
    test = build_shared_store(data.test, cfg, run.device, run.world, run.work_dir / "stores")
    mine = run.world.mine([(meta.get("fold", k), model) for k, (_, model, meta) in enumerate(models)])
    _, unbalanced = predict_and_submit(run, cfg, data, [model for _, model in mine], test, prior,
                                       [k for k, _ in mine])
    if not run.world.is_main:
        return 0
    save_thresholds(run.work_dir, saved_thresholds([path for path, _, _ in models]))
    log.info("time:\n%s", run.timing_table())
    write_report(run.work_dir, mode="predict", classes=data.classes, timings=run.timings, test_probs=unbalanced,
                 dataset=dataset_summary(run, [test]),
                 loaded=[f"{path} (fold {meta.get('fold')}, lwlrap {meta.get('score', float('nan')):.4f}, "
                         f"{meta['model']['arch']})" for path, _, meta in models])
    return 0


if __name__ == "__main__":
    sys.exit(main())
