"""End-of-run report: `<work_dir>/report.md` with PNG figures beside it.

`write_report` gathers what a run already has in hand (dataset summary, stage timings, fold scores,
out-of-fold and test probabilities) plus the per-epoch histories the trainer wrote
(`stage1/history.csv`, `fold{k}/history.csv`) into one readable Markdown page. Each section is one
small function that returns Markdown lines; a section whose inputs are missing says so in one line,
and a section that fails on odd inputs is replaced by a one-line note (and a log warning), so the
report never costs a finished run.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import atomic_write, atomic_write_text
from .metrics import per_class_lwlrap
from .progress import fmt_seconds
from .thresholds import MIN_POSITIVES, threshold_scores

__all__ = ["write_report"]

log = logging.getLogger("fattag")

REPORT_NAME = "report.md"
MAX_SKIPPED_LISTED = 20
DASH = "–"


# ---------------------------------------------------------------- small formatting helpers

def _cell(value) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
    return f"`{str(value).replace('`', '')}`"


def _num(value, fmt: str = ".4f") -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DASH
    return format(value, fmt) if math.isfinite(value) else DASH


def _secs(value) -> str:
    return DASH if value is None else fmt_seconds(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


class _Figures:
    """Saves numbered figures beside the report and returns their Markdown (image + caption line)."""

    def __init__(self, work_dir: Path, plt):
        self.work_dir, self.plt, self.count = work_dir, plt, 0

    def save(self, fig, name: str, caption: str) -> list[str]:
        self.count += 1
        try:
            atomic_write(self.work_dir / name, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        finally:
            self.plt.close(fig)
        return [f"![Figure {self.count}]({name})", "", f"*Figure {self.count}: {caption}*"]


# ---------------------------------------------------------------- sections

def _header(mode: str, work_dir: Path, classes: list[str], test_audio: str | None = None) -> list[str]:
    title = "training run" if mode == "train" else "prediction run"
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return [f"# fattag report: {title}", "",
            f"Generated {when} in {_code(work_dir)}; {len(classes)} classes."
            + (f" Test audio {test_audio}." if test_audio else "")]


def _dataset_section(dataset: dict | None) -> list[str]:
    if not dataset:
        return ["No dataset summary was recorded."]
    lines = []
    if dataset.get("data_dir") is not None:
        demo = " (synthetic demo data)" if dataset.get("demo") else ""
        lines += [f"Data: {_code(dataset['data_dir'])}{demo}", ""]
    sets = dataset.get("sets") or []
    if not sets:
        return lines + ["No clip sets were recorded."]
    rows, skipped_files = [], []
    tot_clips = tot_hours = tot_skipped = 0.0
    for s in sets:
        files = list(s.get("skipped_files") or [])
        skipped = s.get("skipped", len(files))
        rows.append([_code(s.get("name", "?")), s.get("clips", DASH), _num(s.get("hours"), ".2f"), skipped])
        skipped_files += [f"{s.get('name', '?')}/{f}" for f in files]
        tot_clips += float(s.get("clips") or 0)
        tot_hours += float(s.get("hours") or 0)
        tot_skipped += float(skipped or 0)
    rows.append(["**total**", int(tot_clips), f"{tot_hours:.2f}", int(tot_skipped)])
    lines += _table(["set", "clips", "hours", "skipped"], rows)
    if skipped_files:
        lines += ["", f"Skipped files ({len(skipped_files)}):", ""]
        lines += [f"- {_cell(f)}" for f in skipped_files[:MAX_SKIPPED_LISTED]]
        if len(skipped_files) > MAX_SKIPPED_LISTED:
            lines.append(f"- ... and {len(skipped_files) - MAX_SKIPPED_LISTED} more")
    elif tot_skipped:
        lines += ["", f"{int(tot_skipped)} file(s) skipped; their names were not recorded."]
    else:
        lines += ["", "No file was skipped."]
    return lines


def _loaded_section(loaded: list[str] | None) -> list[str]:
    if not loaded:
        return ["No weight files were recorded."]
    return [f"{len(loaded)} weight file(s):", ""] + [f"- {_cell(item)}" for item in loaded]


def _budget_section(use: dict | None) -> list[str]:
    """Where the budget went: used and unused seconds, why the rest could not be used, what was cut or re-planned."""
    if not use:
        return ["The run had no time budget: every step ran the requested recipe."]
    lines = [f"Used {_secs(use['used_s'])} of {_secs(use['usable_s'])} usable (the budget less its safety margin); "
             f"{_secs(use['unused_s'])} ({use['unused_share']:.0%}) unused: {use['why']}."]
    notes = use.get("notes") or []
    return lines + ([""] + [f"- {_cell(n)}" for n in notes] if notes else ["", "Nothing was cut or re-planned."])


def _timings_section(timings: list[dict] | None) -> list[str]:
    if not timings:
        return ["No stage timings were recorded."]
    rows, tot_plan, tot_act, tot_diff, any_plan = [], 0.0, 0.0, 0.0, False
    for t in timings:
        planned, actual = t.get("planned_s"), t.get("actual_s")
        diff = DASH
        if planned is not None and actual is not None:
            delta = float(actual) - float(planned)
            diff = ("+" if delta >= 0 else "-") + fmt_seconds(abs(delta))
            tot_plan, tot_diff, any_plan = tot_plan + float(planned), tot_diff + delta, True
        tot_act += float(actual or 0)
        rows.append([t.get("stage", "?"), _secs(planned), _secs(actual), diff])
    total_diff = (("+" if tot_diff >= 0 else "-") + fmt_seconds(abs(tot_diff))) if any_plan else DASH
    rows.append(["**total**", fmt_seconds(tot_plan) if any_plan else DASH, fmt_seconds(tot_act), total_diff])
    lines = _table(["stage", "planned", "actual", "actual - planned"], rows)
    if any_plan and len([t for t in timings if t.get("planned_s") is not None]) < len(timings):
        lines += ["", "Planned totals cover only the stages that had a plan."]
    return lines


def _folds_section(folds: list[dict] | None) -> list[str]:
    if not folds:
        return ["No fold results were recorded."]
    ranks = len({f.get("rank", 0) for f in folds}) > 1   # several ranks trained them: say which
    rows = [[f.get("fold", DASH), _num(f.get("best_lwlrap")), f.get("best_epoch", DASH),
             f.get("epochs_run", DASH), _secs(f.get("seconds"))] + ([f.get("rank", DASH)] if ranks else [])
            for f in folds]
    best = np.array([float(f["best_lwlrap"]) for f in folds if f.get("best_lwlrap") is not None], dtype=float)
    if best.size:
        rows.append(["**mean ± sd**", f"{best.mean():.4f} ± {best.std():.4f}", "", "", ""] + ([""] if ranks else []))
    return _table(["fold", "best lwlrap", "best epoch", "epochs run", "time"] + (["rank"] if ranks else []), rows)


_SCORE_NAMES = [("oof_center", "centre crop"), ("oof_windows", "whole-clip windows"),
                ("oof_tta", "whole clip + augmented passes (TTA)")]


def _stage1_section(stage1: dict | None) -> list[str]:
    if not stage1:
        return ["Stage 1 did not train in this run (skipped, or reused from an earlier run in the same work dir)."]
    per_epoch = " ".join(DASH if v is None else f"{v:.3f}" for v in stage1.get("per_epoch", []))
    best, chance = stage1.get("best"), stage1.get("chance")
    lines = [f"Noisy-holdout lwlrap per epoch: {per_epoch}", "",
             f"Best {_num(best, '.3f')}; random scores get {_num(chance, '.3f')} on the same clips."]
    if best is None or chance is None or not best > chance + 0.05:
        lines += ["", "**Warning: stage 1 stayed near chance on its holdout: it learned little from the noisy set "
                      "(too few epochs, too high a learning rate, or labels too noisy).**"]
    return lines


def _scores_section(scores: dict | None) -> list[str]:
    if not scores:
        return ["No out-of-fold scores were recorded."]
    rows = [[label, _num(scores.get(key))] for key, label in _SCORE_NAMES]
    rows += [[key, _num(value)] for key, value in scores.items() if key not in dict(_SCORE_NAMES)]
    return ["Out-of-fold lwlrap over the clips of the K-fold split, each predicted by the fold model that "
            "did not train on it:", ""] + _table(["prediction", "OOF lwlrap"], rows)


def _histories(work_dir: Path) -> tuple[list[tuple[str, pd.DataFrame]], list[str]]:
    """[(label, numeric history frame)] for stage 1 and every fold, and notes on unreadable files."""
    found = []
    if (work_dir / "stage1" / "history.csv").is_file():
        found.append(("stage 1", work_dir / "stage1" / "history.csv"))
    fold_files = []
    for path in work_dir.glob("fold*/history.csv"):
        m = re.fullmatch(r"fold(\d+)", path.parent.name)
        if m:
            fold_files.append((int(m.group(1)), path))
    found += [(f"fold {k}", path) for k, path in sorted(fold_files)]
    runs, notes = [], []
    for label, path in found:
        try:
            df = pd.read_csv(path)
        except Exception as e:  # noqa: BLE001 - one bad file must not hide the others
            notes.append(f"{path.relative_to(work_dir)} could not be read ({type(e).__name__}).")
            continue
        df = df.apply(pd.to_numeric, errors="coerce")
        if "epoch" not in df.columns:
            df["epoch"] = np.arange(1, len(df) + 1)
        if len(df):
            runs.append((label, df))
        else:
            notes.append(f"{path.relative_to(work_dir)} has no epochs.")
    return runs, notes


def _curves_section(work_dir: Path, figs: _Figures) -> list[str]:
    runs, notes = _histories(work_dir)
    if not runs:
        return ["No training histories found (looked for stage1/history.csv and fold*/history.csv)."] + notes
    fig, (ax_loss, ax_score) = figs.plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, df) in enumerate(runs):
        color = f"C{i % 10}"
        labelled = False  # one legend entry per run; the title says which line style is which loss
        for column, style in (("train_loss", "-"), ("valid_loss", "--")):
            if column in df and df[column].notna().any():
                ax_loss.plot(df["epoch"], df[column], style, marker=".", color=color,
                             label=None if labelled else label)
                labelled = True
        if "lwlrap" in df and df["lwlrap"].notna().any():
            ax_score.plot(df["epoch"], df["lwlrap"], "-", marker=".", color=color, label=label)
            best = df["lwlrap"].idxmax()
            ax_score.plot([df.loc[best, "epoch"]], [df.loc[best, "lwlrap"]], "o", color=color, markersize=7)
    ax_loss.set(title="Loss per epoch (solid: train, dashed: validation)", xlabel="epoch", ylabel="loss")
    ax_score.set(title="Validation lwlrap per epoch (dot: best epoch)", xlabel="epoch", ylabel="lwlrap")
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2 if len(runs) > 4 else 1)
    fig.tight_layout()
    names = ", ".join(label for label, _ in runs)
    caption = (f"training curves per epoch for {names}: train and validation loss (left) and validation "
               f"lwlrap with each run's best epoch marked (right).")
    return figs.save(fig, "report_curves.png", caption) + ([""] + notes if notes else [])


def _check_probs(name: str, probs, n_classes: int, truth=None) -> tuple[np.ndarray | None, str | None]:
    """(float array, None) or (None, a one-line reason the array cannot be used)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        return None, f"{name} has shape {probs.shape}, not (clips, {n_classes} classes); section skipped."
    if truth is not None and np.shape(truth) != probs.shape:
        return None, f"OOF truth {np.shape(truth)} and {name} {probs.shape} differ in shape; section skipped."
    if probs.shape[0] == 0:
        return None, f"{name} has no rows; section skipped."
    return probs, None


def _per_class_section(classes: list[str], oof_truth, oof_probs, figs: _Figures) -> list[str]:
    if oof_truth is None or oof_probs is None:
        return ["No out-of-fold predictions were passed, so there is no per-class lwlrap."]
    probs, problem = _check_probs("OOF probabilities", oof_probs, len(classes), oof_truth)
    if problem:
        return [problem]
    truth = np.asarray(oof_truth)
    if not (truth > 0).any():
        return ["The OOF truth has no positive label, so per-class lwlrap is undefined."]
    ap, weights = per_class_lwlrap(truth, probs)
    positives = (truth > 0).sum(axis=0)
    overall = float(np.nansum(ap * weights))
    valid = np.flatnonzero(~np.isnan(ap))
    order = valid[np.argsort(ap[valid], kind="stable")]  # worst first
    k = len(order)
    fig, ax = figs.plt.subplots(figsize=(8, min(max(3.0, 0.2 * k + 1.5), 30)))
    ax.barh(np.arange(k), ap[order], color="C0")
    ax.axvline(overall, color="C3", linestyle="--")
    ax.set_yticks(np.arange(k))
    ax.set_yticklabels([classes[i] for i in order], fontsize=7 if k > 30 else 9)
    ax.set_ylim(k - 0.5, -0.5)  # worst at the top, no empty margins
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set(xlim=(0, 1.25), xlabel="lwlrap of the class (label-ranking average precision)", ylabel="class",
           title=f"Per-class OOF lwlrap, worst first (dashed: overall {overall:.4f})")
    for y, i in enumerate(order):  # a column of "value (positives)" right of the axis' 1.0
        ax.text(1.02, y, f"{ap[i]:.2f} (n={positives[i]})", va="center", fontsize=6 if k > 30 else 8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    lines = [f"OOF lwlrap from these probabilities: {overall:.4f} (the class-weighted sum of the values below).", ""]
    lines += figs.save(fig, "report_per_class.png",
                       f"per-class OOF lwlrap of {k} classes, sorted worst first (bar label: value and number "
                       f"of positive clips); the dashed line is the overall lwlrap.")
    lines += ["", "Worst classes:", ""]
    lines += _table(["class", "lwlrap", "positives", "weight"],
                    [[_code(classes[i]), f"{ap[i]:.4f}", int(positives[i]), f"{weights[i]:.4f}"] for i in order[:10]])
    missing = [classes[i] for i in np.flatnonzero(np.isnan(ap))]
    if missing:
        lines += ["", f"{len(missing)} class(es) have no positive OOF clip and no score: "
                  + ", ".join(_code(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")]
    return lines


def class_means(probs: np.ndarray, truth=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Each class's mean test probability and, given the training clips' targets, its label frequency among them."""
    freq = None
    if truth is not None:
        truth = np.asarray(truth)
        if truth.ndim == 2 and truth.shape[1] == probs.shape[1] and len(truth):
            freq = (truth > 0).mean(axis=0)
    return probs.mean(axis=0), freq


def _predictions_section(classes: list[str], test_probs, figs: _Figures, oof_truth=None) -> list[str]:
    if test_probs is None:
        return ["No test predictions were passed."]
    probs, problem = _check_probs("test probabilities", test_probs, len(classes))
    if problem:
        return [problem]
    predicted = np.isfinite(probs).all(axis=1)   # a clip that could not be decoded has no probabilities
    if not predicted.any():
        return ["No test clip was predicted (none could be decoded); section skipped."]
    left_out = int((~predicted).sum())
    probs = probs[predicted]
    top = probs.max(axis=1)
    top1 = np.bincount(probs.argmax(axis=1), minlength=len(classes))
    common = np.argsort(-top1, kind="stable")[:5]
    lines = [f"{len(probs)} test clips"
             + (f" ({left_out} that could not be decoded left out)" if left_out else "")
             + ", the fold ensemble's probabilities before any class balancing (the model's own view; a balanced "
               "submission ranks them divided by each class's mean). "
             f"Highest class probability per clip: median {np.median(top):.3f}, "
             f"{(top < 0.5).mean():.1%} of clips below 0.5. Expected labels per clip (row sum): "
             f"{probs.sum(axis=1).mean():.2f}. Range of all probabilities: [{probs.min():.3g}, {probs.max():.3g}].",
             "",
             "Most frequent top-1 classes: " + ", ".join(f"{_code(classes[i])} ({top1[i]})" for i in common)
             + f"; {int((top1 == 0).sum())} class(es) are never top-1.", ""]

    fig, ax = figs.plt.subplots(figsize=(7, 4))
    ax.hist(top, bins=20, range=(0.0, max(1.0, float(top.max()))), color="C0", edgecolor="white")
    ax.set(xlabel="highest predicted probability of the clip", ylabel="test clips",
           title="Confidence of the test predictions")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    lines += figs.save(fig, "report_test_max_prob.png",
                       "histogram over test clips of the highest predicted class probability of each clip.")

    mean, freq = class_means(probs, oof_truth)
    order = np.argsort(-mean, kind="stable")
    k = len(classes)
    fig, ax = figs.plt.subplots(figsize=(8, min(max(3.0, 0.2 * k + 1.5), 30)))
    ax.barh(np.arange(k), mean[order], color="C0")
    title, prior_note = "Mean test probability per class (before class balancing)", ""
    if freq is not None:
        ax.plot(freq[order], np.arange(k), "o", color="C3", markersize=3)
        title += "\n(red dots: label frequency in the training clips)"
        prior_note = (" Red dots: how often each class is a label of the training clips: a bar far beyond its dot is "
                      "a class the model favours.")
    ax.set_yticks(np.arange(k))
    ax.set_yticklabels([classes[i] for i in order], fontsize=7 if k > 30 else 9)
    ax.set_ylim(k - 0.5, -0.5)  # highest at the top, no empty margins
    ax.set(xlabel="mean predicted probability over test clips", ylabel="class", title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    lines += [""] + figs.save(fig, "report_test_class_mean.png",
                              "mean predicted probability of each class over the test clips (before class "
                              "balancing), highest first." + prior_note)
    header = ["class", "mean test probability"] + (["label frequency (training clips)"] if freq is not None else [])
    rows = [[_code(classes[i]), f"{mean[i]:.4f}"] + ([f"{freq[i]:.4f}"] if freq is not None else []) for i in order]
    return lines + ["", "The figure's values:", ""] + _table(header, rows)


def _thresholds_section(classes: list[str], thresholds: dict | None, oof_truth, oof_probs) -> list[str]:
    """The decision thresholds the run chose and what they do on the OOF clips: precision, recall, F1 per class."""
    if not thresholds or oof_truth is None or oof_probs is None:
        return ["No decision thresholds were chosen (no out-of-fold predictions)."]
    probs, problem = _check_probs("OOF probabilities", oof_probs, len(classes), oof_truth)
    if problem:
        return [problem]
    cut = np.array([thresholds[c] for c in classes])
    table = threshold_scores(oof_truth, probs, cut)
    rows = [[_code(c) + (" (pooled)" if table["positives"][i] < MIN_POSITIVES else ""), f"{cut[i]:.3f}",
             int(table["positives"][i]), _num(table["precision"][i], ".3f"), _num(table["recall"][i], ".3f"),
             _num(table["f1"][i], ".3f")] for i, c in enumerate(classes)]
    rows.append(["**all (micro)**", "", int(table["positives"].iloc[-1]), _num(table["precision"].iloc[-1], ".3f"),
                 _num(table["recall"].iloc[-1], ".3f"), _num(table["f1"].iloc[-1], ".3f")])
    return [f"A clip carries a class when its probability is at least the class's threshold: the one with the best "
            f"F1 on the OOF clips, or, for a class with fewer than {MIN_POSITIVES} positive OOF clips (pooled), the "
            f"one with the best F1 over every class's pairs together. Saved in inference.json; the tag mode's "
            f"labels use them. On the OOF clips they were chosen on (so a little optimistic):", ""] + \
        _table(["class", "threshold", "OOF positives", "precision", "recall", "F1"], rows)


# ---------------------------------------------------------------- assembly

def _run_section(title: str, build, *args) -> list[str]:
    """`## title` and the section's lines, or a one-line note if building it failed."""
    try:
        body = build(*args)
    except Exception as e:  # noqa: BLE001 - a report must never cost the run that produced it
        log.warning("report section %r failed: %s: %s", title, type(e).__name__, e)
        body = [f"_This section could not be built: {type(e).__name__}: {_cell(e)}_"]
    return [f"## {title}", ""] + body


def write_report(work_dir, *, mode: str, classes: list[str], dataset: dict, timings: list[dict],
                 scores: dict | None = None, folds: list[dict] | None = None,
                 oof_truth=None, oof_probs=None, test_probs=None,
                 loaded: list[str] | None = None, stage1: dict | None = None, budget_use: dict | None = None,
                 thresholds: dict | None = None, test_audio: str | None = None) -> Path:
    """Write `<work_dir>/report.md` (and its PNG figures beside it) and return its path.

    mode "train": dataset, time plan vs actual, per-fold lwlrap, OOF scores, training curves from
    `stage1/history.csv` and `fold{k}/history.csv`, per-class OOF lwlrap, the decision thresholds (`thresholds`,
    {class: threshold}) with their OOF precision and recall, and the test predictions (`test_probs`: before class
    balancing).
    mode "predict": dataset, the weight files loaded, timings and the test predictions.
    """
    if mode not in ("train", "predict"):
        raise ValueError(f"mode must be 'train' or 'predict', not {mode!r}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    figs = _Figures(work_dir, plt)
    if mode == "train":
        sections = [("Dataset", _dataset_section, dataset),
                    ("Time: plan vs actual", _timings_section, timings),
                    ("Time budget", _budget_section, budget_use),
                    ("Stage 1 on the noisy set", _stage1_section, stage1),
                    ("Folds", _folds_section, folds),
                    ("Out-of-fold lwlrap", _scores_section, scores),
                    ("Training curves", _curves_section, work_dir, figs),
                    ("Per-class lwlrap", _per_class_section, classes, oof_truth, oof_probs, figs),
                    ("Decision thresholds", _thresholds_section, classes, thresholds, oof_truth, oof_probs),
                    ("Test predictions", _predictions_section, classes, test_probs, figs, oof_truth)]
    else:
        sections = [("Dataset", _dataset_section, dataset),
                    ("Weights loaded", _loaded_section, loaded),
                    ("Time: plan vs actual", _timings_section, timings),
                    ("Test predictions", _predictions_section, classes, test_probs, figs)]
    lines = _header(mode, work_dir, classes, test_audio)
    for title, build, *args in sections:
        lines += [""] + _run_section(title, build, *args)
    path = atomic_write_text(work_dir / REPORT_NAME, "\n".join(lines) + "\n")
    log.info("report written to %s (%d figure(s))", path, figs.count)
    return path
