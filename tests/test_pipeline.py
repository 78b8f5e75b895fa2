"""End-to-end runs of `src/run.py` on the tiny dataset: outputs, OOF consistency, predict mode, bad input."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, run_pipeline
from fattag.data import load_dataset
from fattag.metrics import lwlrap
from fattag.weights import INFERENCE_KEYS, THRESHOLDS_KEY, load_fold_models
from fattag.submission import SubmissionError, validate_submission


def test_training_run_writes_every_output(tiny_run):
    for name in ("config.json", "log.txt", "oof.csv", "scores.json", "submission.csv", "inference.json",
                 "stage1/model.pth", "stage1/history.csv", "fold0/model.pth", "fold0/history.csv",
                 "fold1/model.pth", "fold1/history.csv"):
        assert (tiny_run / name).is_file(), name
    for stage in ("stage1", "fold0", "fold1"):  # resume files are removed once a stage is finished
        assert not (tiny_run / stage / "last.pth").exists()
    hist = pd.read_csv(tiny_run / "fold0" / "history.csv")
    assert list(hist.columns) == ["epoch", "train_loss", "valid_loss", "lwlrap"] and len(hist) == 2
    log = (tiny_run / "log.txt").read_text()
    assert "time plan vs actual" in log and "OOF lwlrap" in log
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["settings"]["curated"]["epochs"] == 2 and config["settings"]["noisy"]["epochs"] == 1
    assert (config["plan"]["epochs_noisy"], config["plan"]["epochs_curated"], config["plan"]["folds_trained"]) == \
        (1, 2, 2)
    assert [f["fold"] for f in config["folds_run"]] == [0, 1]
    inference = json.loads((tiny_run / "inference.json").read_text())
    assert set(inference) == {*INFERENCE_KEYS, THRESHOLDS_KEY}
    thresholds = inference[THRESHOLDS_KEY]   # chosen on oof.csv's rows (tests/test_thresholds.py: how)
    oof = pd.read_csv(tiny_run / "oof.csv")
    assert list(thresholds) == list(oof.columns[1:]) and all(0 < t <= 1 for t in thresholds.values())
    assert "## Decision thresholds" in (tiny_run / "report.md").read_text()
    assert (inference["tta_aggregate"], inference["tta_step_frac"], inference["batch_size"]) == ("meanmax", 0.5, 16)
    scores = json.loads((tiny_run / "scores.json").read_text())
    assert len(scores["stage1_holdout"]["per_epoch"]) == 1 and [f["fold"] for f in scores["folds"]] == [0, 1]


def test_oof_lwlrap_equals_recomputed_from_oof_csv(tiny_run, tiny_data):
    data = load_dataset(tiny_data)
    oof = pd.read_csv(tiny_run / "oof.csv")
    assert list(oof.columns) == ["fname", *data.classes]
    truth = data.curated.targets[[data.curated.fnames.index(f) for f in oof["fname"]]]
    scores = json.loads((tiny_run / "scores.json").read_text())
    # oof.csv holds 6 decimals, so the recomputed value agrees to about that precision
    assert lwlrap(truth, oof[data.classes].to_numpy()) == pytest.approx(scores["oof_tta"], abs=1e-4)
    assert len(oof) == len(data.curated)


def test_submission_is_valid_and_ordered(tiny_run, tiny_data):
    sample = pd.read_csv(tiny_data / "sample_submission.csv")
    sub = pd.read_csv(tiny_run / "submission.csv")
    validate_submission(sub, sample)
    assert sub.iloc[:, 1:].std().max() > 0  # real predictions, not a constant prior


def test_validation_rejects_wrong_files(tiny_run, tiny_data):
    sample = pd.read_csv(tiny_data / "sample_submission.csv")
    sub = pd.read_csv(tiny_run / "submission.csv")
    with pytest.raises(SubmissionError, match="columns"):
        validate_submission(sub[[sub.columns[0], *sub.columns[2:], sub.columns[1]]], sample)
    with pytest.raises(SubmissionError, match="rows"):
        validate_submission(sub.iloc[::-1].reset_index(drop=True), sample)
    with pytest.raises(SubmissionError, match="rows"):
        validate_submission(sub.iloc[:-1], sample)
    bad = sub.copy()
    bad.iloc[0, 1] = np.nan
    with pytest.raises(SubmissionError, match="non-finite"):
        validate_submission(bad, sample)
    bad.iloc[0, 1] = 1.5
    with pytest.raises(SubmissionError, match="outside"):
        validate_submission(bad, sample)


OTHER_FEATURES = ["--set", "n_mels=40", "--set", "hop_length=200", "--set", "crop_seconds=1.5", "--set",
                  "tta_aggregate=max", "--set", "tta_step_frac=0.25"]


@pytest.fixture(scope="module")
def other_features_run(tiny_data, tmp_path_factory):
    """A training run whose feature and inference settings are not any preset's, with a test pseudo-label round."""
    work = tmp_path_factory.mktemp("run-other")
    proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", work, *TINY, "--set", "curated.epochs=1",
                         *OTHER_FEATURES, "--set", "pseudo_epochs=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_the_pseudo_label_round_trains_each_fold_on_its_clips_and_the_labelled_test_clips(other_features_run,
                                                                                         tiny_data):
    data = load_dataset(tiny_data)
    labels = pd.read_csv(other_features_run / "pseudo_labels.csv")
    assert labels["fname"].tolist() == data.test.fnames and labels["labels"].str.len().min() > 0
    assert set(",".join(labels["labels"]).split(",")) <= set(data.classes)
    log = (other_features_run / "log.txt").read_text()
    n_curated = len(data.curated)
    for k in (0, 1):  # its fold's training clips (about half the curated set) plus every test clip
        line = next(ln for ln in log.splitlines() if f"fold {k} + test pseudo-labels:" in ln)
        n_train = int(line.split(": ")[1].split(" training clips")[0])
        assert n_train - len(data.test) in range(n_curated // 2 - 2, n_curated // 2 + 3), line
        assert (other_features_run / f"fold{k}" / "pseudo" / "model.pth").is_file()
    loaded = load_fold_models(other_features_run, data.classes)   # prediction uses the weights after the round
    assert [str(path.parent.name) for path, _, _ in loaded] == ["pseudo", "pseudo"]
    assert all(meta["stage"] == "pseudo" and "inference" not in meta for _, _, meta in loaded)
    inference = json.loads((other_features_run / "inference.json").read_text())   # how the test set was predicted
    assert (inference["tta_aggregate"], inference["tta_step_frac"]) == ("max", 0.25)


@pytest.mark.parametrize("run", ["tiny_run", "other_features_run"])
def test_predict_only_from_the_weights_alone_reproduces_the_training_submission(run, tiny_data, tmp_path, request):
    """No --preset, no --set: the checkpoints say which features, model and inference settings to use."""
    weights = request.getfixturevalue(run)
    proc = run_pipeline(["--mode", "predict", "--weights", weights, "--data-dir", tiny_data, "--work-dir", tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = pd.read_csv(weights / "submission.csv")
    b = pd.read_csv(tmp_path / "submission.csv")
    pd.testing.assert_frame_equal(a, b)
    assert not (tmp_path / "fold0").exists()  # nothing was trained
    used = json.loads((tmp_path / "config.json").read_text())["settings"]
    trained = json.loads((weights / "config.json").read_text())["settings"]
    for key in ("n_mels", "hop_length", "crop_seconds", "arch", "tta_aggregate", "tta_step_frac"):
        assert used[key] == trained[key], key
    predicted = json.loads((tmp_path / "inference.json").read_text())
    assert predicted == json.loads((weights / "inference.json").read_text())   # predicted as the training run did


def test_predict_only_may_change_inference_settings(tiny_run, tiny_data, tmp_path):
    proc = run_pipeline(["--mode", "predict", "--weights", tiny_run, "--data-dir", tiny_data, "--work-dir", tmp_path,
                         "--set", "tta_aggregate=max"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = pd.read_csv(tiny_run / "submission.csv").iloc[:, 1:].to_numpy()
    b = pd.read_csv(tmp_path / "submission.csv").iloc[:, 1:].to_numpy()
    assert (b >= a - 1e-6).all() and (b > a + 1e-4).any()  # max over windows >= their mean-max average
    assert json.loads((tmp_path / "config.json").read_text())["settings"]["tta_aggregate"] == "max"
    assert json.loads((tmp_path / "inference.json").read_text())["tta_aggregate"] == "max"


def test_fold_checkpoints_that_disagree_are_a_clear_error(tiny_run, tiny_data, tmp_path):
    import torch
    weights = tmp_path / "weights"
    for k in (0, 1):
        (weights / f"fold{k}").mkdir(parents=True)
        shutil.copy(tiny_run / f"fold{k}" / "model.pth", weights / f"fold{k}" / "model.pth")
    ckpt = torch.load(weights / "fold1" / "model.pth", weights_only=False)
    ckpt["meta"]["features"]["n_mels"] = 64
    torch.save(ckpt, weights / "fold1" / "model.pth")
    proc = run_pipeline(["--mode", "predict", "--weights", weights, "--data-dir", tiny_data, "--work-dir",
                         tmp_path / "w"])
    assert proc.returncode != 0
    assert "disagree on features settings ['n_mels']" in proc.stderr
    assert "fold0/model.pth" in proc.stderr and "fold1/model.pth" in proc.stderr


def test_vocabulary_mismatch_is_a_clear_error(tiny_run, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    old = pd.read_csv(data / "sample_submission.csv").columns[1]
    for name in ("sample_submission.csv", "train_curated.csv", "train_noisy.csv"):  # the data stays consistent
        (data / name).write_text((data / name).read_text().replace(old, "Another_class"))
    proc = run_pipeline(["--mode", "predict", "--weights", tiny_run, "--data-dir", data, "--work-dir", tmp_path / "w"])
    assert proc.returncode != 0
    assert "class vocabulary differs" in proc.stderr


def test_feature_mismatch_is_a_clear_error(tiny_run, tiny_data, tmp_path):
    proc = run_pipeline(["--mode", "predict", "--weights", tiny_run, "--data-dir", tiny_data, "--work-dir", tmp_path,
                         "--set", "n_mels=32"])
    assert proc.returncode != 0
    assert "feature settings differ" in proc.stderr and "n_mels" in proc.stderr


def test_corrupt_clips_are_skipped_counted_and_still_submitted(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    curated = pd.read_csv(data / "train_curated.csv")
    (data / "train_curated" / curated.fname[0]).write_bytes(b"not a wav at all")
    (data / "train_curated" / curated.fname[1]).unlink()
    test_fnames = pd.read_csv(data / "sample_submission.csv").fname
    (data / "test" / test_fnames[2]).write_bytes(b"")
    proc = run_pipeline(["--data-dir", data, "--work-dir", tmp_path / "w", *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped train_curated/{curated.fname[0]}" in proc.stderr
    assert f"skipped train_curated/{curated.fname[1]}" in proc.stderr
    assert "1 test clips could not be predicted" in proc.stderr
    sub = pd.read_csv(tmp_path / "w" / "submission.csv")
    validate_submission(sub, pd.read_csv(data / "sample_submission.csv"))
    # the undecodable test clip's row is the class prior: each class's share of the curated clips' labels
    classes = list(sub.columns[1:])
    labels = [set(str(x).split(",")) for x in curated.labels]
    prior = np.array([max(np.mean([c in lab for lab in labels]), 1e-4) for c in classes])
    assert np.allclose(sub.iloc[2, 1:].to_numpy(float), prior, atol=1e-6)
    assert not np.allclose(sub.iloc[3, 1:].to_numpy(float), prior, atol=1e-3)   # a decoded clip: its predictions
    oof = pd.read_csv(tmp_path / "w" / "oof.csv")
    assert len(oof) == len(curated) - 2
