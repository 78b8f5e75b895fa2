import re

import numpy as np
import pandas as pd
import pytest

from fattag.metrics import lwlrap
from fattag.report import write_report

CLASSES = ["Bark", "Hiss", "Slam", "Zipper_(clothing)", "Accordion"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_history(path, n_epochs, seed):
    rng = np.random.default_rng(seed)
    e = np.arange(1, n_epochs + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"epoch": e, "train_loss": 0.1 / e + rng.uniform(0, 0.01, n_epochs),
                  "valid_loss": 0.12 / e + rng.uniform(0, 0.01, n_epochs),
                  "lwlrap": 1 - 0.5 / e - rng.uniform(0, 0.05, n_epochs)}).to_csv(path, index=False)


def fake_probs(rng, truth, signal=0.5):
    return np.clip(signal * truth + rng.uniform(0, 0.6, truth.shape), 0, 1)


@pytest.fixture
def train_inputs(tmp_path):
    rng = np.random.default_rng(0)
    write_history(tmp_path / "stage1" / "history.csv", 4, 1)
    for k in range(3):
        write_history(tmp_path / f"fold{k}" / "history.csv", 6, 10 + k)
    truth = (rng.random((60, 5)) < 0.3).astype(np.float32)
    truth[np.arange(60), rng.integers(0, 5, 60)] = 1
    return dict(
        mode="train", classes=CLASSES,
        dataset={"data_dir": "/data/fat2019", "demo": True,
                 "sets": [{"name": "train_curated", "clips": 60, "hours": 0.12, "skipped": 0, "skipped_files": []},
                          {"name": "train_noisy", "clips": 300, "hours": 0.61, "skipped": 25,
                           "skipped_files": [f"bad{i:02d}.wav: file is empty" for i in range(25)]},
                          {"name": "test", "clips": 40, "hours": 0.08, "skipped": 0}]},
        timings=[{"stage": "decode", "planned_s": 60.0, "actual_s": 65.0},
                 {"stage": "stage 1 (noisy)", "planned_s": 600.0, "actual_s": 590.0},
                 {"stage": "fold 0", "planned_s": None, "actual_s": 185.0},
                 {"stage": "predict test", "planned_s": 30.0, "actual_s": 12.34}],
        scores={"oof_center": 0.81234, "oof_windows": 0.82345, "oof_tta": 0.83456},
        folds=[{"fold": k, "best_lwlrap": 0.7777 + 0.01 * k, "best_epoch": 4 + k, "epochs_run": 6, "seconds": 185.0}
               for k in range(3)],
        oof_truth=truth, oof_probs=fake_probs(rng, truth),
        test_probs=rng.uniform(0, 1, (40, 5)))


def images(md_path):
    """Every image the markdown links, checked to exist as a real, non-trivial PNG."""
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    for name in names:
        png = md_path.parent / name
        assert png.is_file(), name
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 5000, name
    return names


def captions(text):
    return re.findall(r"^\*Figure \d+: .+\*$", text, flags=re.M)


def test_train_report_has_numbers_and_figures(tmp_path, train_inputs):
    path = write_report(tmp_path, **train_inputs)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    names = images(path)
    assert sorted(names) == sorted(["report_curves.png", "report_per_class.png", "report_test_max_prob.png",
                                    "report_test_class_mean.png"])
    assert len(captions(text)) == len(names)  # one caption line per figure
    assert "could not be built" not in text
    for section in ["## Dataset", "## Time: plan vs actual", "## Folds", "## Out-of-fold lwlrap",
                    "## Training curves", "## Per-class lwlrap", "## Decision thresholds", "## Test predictions"]:
        assert section in text
    # the numbers passed in
    assert "| centre crop | 0.8123 |" in text and "0.8235" in text and "0.8346" in text
    assert "| 0 | 0.7777 | 4 | 6 | 3m05s |" in text
    assert "0.7877 ± 0.0082" in text  # mean ± sd of the three folds
    assert "| decode | 1m00s | 1m05s | +5.0s |" in text and "| fold 0 | – | 3m05s | – |" in text
    assert "| predict test | 30.0s | 12.3s | -17.7s |" in text
    overall = lwlrap(train_inputs["oof_truth"], train_inputs["oof_probs"])
    assert f"{overall:.4f}" in text
    # dataset: counts, the first 20 skipped files, then a count of the rest
    assert "| `train_noisy` | 300 | 0.61 | 25 |" in text and "| **total** | 400 | 0.81 | 25 |" in text
    assert "train_noisy/bad19.wav: file is empty" in text and "bad20.wav" not in text
    assert "... and 5 more" in text
    assert "stage 1, fold 0, fold 1, fold 2" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_rewriting_a_report_replaces_it(tmp_path, train_inputs):
    write_report(tmp_path, **train_inputs)
    train_inputs["scores"] = {"oof_center": 0.5, "oof_windows": 0.6, "oof_tta": 0.7}
    text = write_report(tmp_path, **train_inputs).read_text()
    assert "0.8123" not in text and "| centre crop | 0.5000 |" in text


def test_predict_report_is_shorter(tmp_path, train_inputs):
    path = write_report(tmp_path / "pred", mode="predict", classes=CLASSES, dataset=train_inputs["dataset"],
                        timings=[{"stage": "predict test", "planned_s": None, "actual_s": 42.0}],
                        test_probs=train_inputs["test_probs"],
                        loaded=["fold0/best.pth (fold 0, lwlrap 0.7777, epoch 4)", "fold1/best.pth (fold 1)"])
    text = path.read_text()
    assert sorted(images(path)) == ["report_test_class_mean.png", "report_test_max_prob.png"]
    assert len(captions(text)) == 2
    assert "## Weights loaded" in text and "fold0/best.pth (fold 0, lwlrap 0.7777, epoch 4)" in text
    assert "| predict test | – | 42.0s | – |" in text
    assert "40 test clips" in text
    for absent in ["## Folds", "## Training curves", "## Per-class lwlrap", "## Out-of-fold lwlrap"]:
        assert absent not in text
    assert "could not be built" not in text


@pytest.mark.parametrize("mode", ["train", "predict"])
def test_missing_inputs_are_one_line_notes(tmp_path, mode):
    path = write_report(tmp_path, mode=mode, classes=CLASSES, dataset={}, timings=[])
    text = path.read_text()
    assert images(path) == []
    assert "could not be built" not in text
    assert "No dataset summary was recorded." in text and "No stage timings were recorded." in text
    assert "No test predictions were passed." in text
    if mode == "train":
        assert "No fold results were recorded." in text and "No out-of-fold scores were recorded." in text
        assert "No training histories found" in text and "No out-of-fold predictions were passed" in text
    else:
        assert "No weight files were recorded." in text


def test_odd_inputs_do_not_crash(tmp_path, train_inputs):
    (tmp_path / "fold1" / "history.csv").write_text("")          # unreadable history
    train_inputs["oof_truth"][:, 2] = 0                           # a class without positives -> NaN
    train_inputs["test_probs"] = np.zeros((10, 3))                # wrong class count
    train_inputs["scores"] = {"oof_center": 0.8, "oof_windows": None}
    train_inputs["folds"] = [{"fold": 0, "best_lwlrap": None}]
    train_inputs["timings"] = [{"stage": "decode", "planned_s": 10.0, "actual_s": None}]
    path = write_report(tmp_path, **train_inputs)
    text = path.read_text()
    assert "could not be built" not in text
    assert sorted(images(path)) == ["report_curves.png", "report_per_class.png"]
    assert "fold1/history.csv could not be read" in text and "stage 1, fold 0, fold 2" in text
    assert "1 class(es) have no positive OOF clip and no score: `Slam`" in text
    assert "test probabilities has shape (10, 3), not (clips, 5 classes)" in text


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        write_report(tmp_path, mode="eval", classes=CLASSES, dataset={}, timings=[])


def figure_values(text):
    """{class: [mean test probability, label frequency]} from the table under the class-mean figure."""
    table = text.split("The figure's values:")[1].split("\n\n")[1]
    return {row.split("|")[1].strip(" `"): [float(v) for v in row.split("|")[2:-1]]
            for row in table.splitlines()[2:]}


def test_class_mean_figure_shows_the_probabilities_it_is_given_beside_the_label_frequency(tmp_path, train_inputs):
    """The figure's values are the per-class means of the test probabilities passed in (the run passes them before
    class balancing, which would make every mean equal), over the clips that were predicted, beside each class's
    label frequency in the training clips."""
    rng = np.random.default_rng(1)
    probs = rng.uniform(0, 1, (40, 5)) * np.array([0.2, 0.4, 0.6, 0.8, 1.0])   # a biased model: unequal means
    probs[3] = np.nan                                                            # a clip that was not decoded
    train_inputs["test_probs"] = probs
    text = write_report(tmp_path, **train_inputs).read_text()
    got = figure_values(text)
    assert list(got) == [CLASSES[i] for i in np.argsort(-np.nanmean(probs, 0))]   # highest first, as drawn
    truth = train_inputs["oof_truth"]
    for i, name in enumerate(CLASSES):
        assert got[name][0] == pytest.approx(np.delete(probs, 3, axis=0)[:, i].mean(), abs=6e-5)
        assert got[name][1] == pytest.approx(truth[:, i].mean(), abs=6e-5)
    assert "39 test clips (1 that could not be decoded left out)" in text and "before any class balancing" in text


def test_decision_threshold_section_gives_oof_precision_recall_f1_per_class(tmp_path, train_inputs):
    truth, probs = train_inputs["oof_truth"], train_inputs["oof_probs"]
    cut = dict(zip(CLASSES, [0.5, 0.6, 0.7, 0.8, 0.9]))
    text = write_report(tmp_path, **train_inputs, thresholds=cut).read_text()
    section = text.split("## Decision thresholds")[1].split("## ")[0]
    for i, name in enumerate(CLASSES):
        said, real = probs[:, i] >= cut[name], truth[:, i] > 0
        tp = (said & real).sum()
        precision, recall = tp / said.sum(), tp / real.sum()
        f1 = 2 * precision * recall / (precision + recall)
        assert (f"| `{name}` | {cut[name]:.3f} | {real.sum()} | {precision:.3f} | {recall:.3f} | {f1:.3f} |"
                in section), name
    assert "| **all (micro)** |" in section
    assert "No decision thresholds" in write_report(tmp_path, **train_inputs).read_text()
