"""Smoke test of the bench scripts: each runs in-process with --quick and tiny sizes, prints its table and ends
with one JSON line that parses. (In-process, so torch and fastai are imported once, not once per script.)
"""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# Tiny sizes: the whole module stays well under 30 s on a 2-core CPU.
CASES = {
    "decode": ["--quick", "--preset", "demo", "--clips", "2", "--seconds", "1", "--workers", "1"],
    "features": ["--quick", "--preset", "demo", "--clips", "1", "--batch", "1", "--seconds", "1", "--threads", "1"],
    "train": ["--quick", "--preset", "demo", "--batch", "4", "--clips", "8", "--threads", "1"],
    "memory": ["--quick", "--preset", "demo", "--hours", "0.002", "--clip-seconds", "2", "--threads", "1"],
    "project": ["--quick", "--preset", "demo", "--batch", "4", "--clips", "2", "--threads", "1", "--set",
                "noisy.epochs=3"],
    "gpu_check": ["--dry-run", "--batch", "2", "--threads", "1"],  # the kaggle-1h model, as on a GPU
}
EXPECT = {  # a figure each script must print in its table, and a key of its JSON results
    "decode": ("audio s/s", "workers_1"),
    "features": ("audio s/s", "store_bytes_per_audio_s"),
    "train": ("train clips/s", "demo"),
    "memory": ("projected peak RSS", "store_bytes_per_audio_s"),
    "project": ("needed training rate", "needed_train_clips_s"),
    "gpu_check": ("2 ranks, DDP step (half batch each)", "fitted_2_devices"),   # its 2-rank part too
}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"fattag_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(CASES))
def test_bench_script_prints_figures_and_json(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FATTAG_BENCH_DIR", str(tmp_path))  # generated clips go to a temporary folder
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their shared `common` module
    import torch
    threads = torch.get_num_threads()
    try:
        record = _load(name).main(CASES[name])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith("== ") and lines[1].startswith("machine: ")
    figure, key = EXPECT[name]
    assert figure in out
    parsed = json.loads(lines[-1])
    assert parsed["bench"] == name and key in parsed["results"]
    assert parsed["results"] == json.loads(json.dumps(record["results"]))  # returned == printed
    if name == "project":   # its --set reaches the plan: the demo preset's 12 stage-1 epochs would fit on T4s
        assert [p["epochs_noisy"] for p in parsed["results"]["t4_plans"].values()] == [3, 3]


def test_tag_bench_tags_a_folder_and_checks_it_against_predict_mode(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    record = _load("tag").main(["--weights", str(tiny_run), "--files", "9", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "all checks hold" in out and "seconds of audio per second" in out
    results = json.loads(out.splitlines()[-1])["results"]
    assert results == json.loads(json.dumps(record["results"]))
    assert results["checks_hold"] and results["rows"] == 9 and results["errors"] == 2 and results["max_diff"] <= 1e-5


def test_ensemble_bench_scores_the_mean_of_the_runs_submissions_in_the_truths_order(tmp_path, capsys):
    import numpy as np
    import pandas as pd
    from fattag.metrics import lwlrap
    truth = pd.DataFrame({"fname": ["a.wav", "b.wav", "c.wav", "d.wav"], "X": [1, 0, 1, 1], "Y": [0, 1, 1, 0],
                          "Z": [0, 0, 0, 0]})
    truth.to_csv(tmp_path / "test_labels.csv", index=False)
    a = np.array([[0.9, 0.1, 0.5], [0.6, 0.5, 0.55], [0.8, 0.1, 0.5], [0.9, 0.1, 0.0]])  # b's Y third (1/3), c's Y
    b = np.array([[0.5, 0.1, 0.6], [0.3, 0.9, 0.2], [0.3, 0.9, 0.45], [0.5, 0.1, 0.95]])  # a's and d's X second (1/2)
    runs = []
    for i, pred in enumerate([a, b]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        sub = pd.DataFrame(pred, columns=["X", "Y", "Z"]).assign(fname=truth["fname"])[["fname", "X", "Y", "Z"]]
        sub.iloc[::-1].to_csv(run / "submission.csv", index=False)   # rows in another order than the truth's
        runs.append(run)
    results = _load("ensemble").main([*map(str, runs), "--data", str(tmp_path)])
    y = truth[["X", "Y", "Z"]].to_numpy(float)
    assert results["single"] == pytest.approx([lwlrap(y, a), lwlrap(y, b)])
    assert results["ensemble"] == pytest.approx(lwlrap(y, (a + b) / 2))
    # the mean repairs what each run ranked wrong; a max of the runs would not (d's X)
    assert results["ensemble"] == 1.0 > max(results["single"])
    assert (results["missed"], results["missed_by_all"], results["missed_by_ensemble"]) == ([1, 0], 0, 0)
    precisions = [[1, 1 / 3, 1, 2 / 3, 1], [1 / 2, 1, 2 / 3, 1, 1 / 2]]    # a's X, b's Y, c's X, c's Y, d's X
    assert results["precision_corr"] == pytest.approx([np.corrcoef(precisions)[0, 1]])
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == json.loads(json.dumps(results))


def test_realdev_scores_a_submission_against_the_truth_whatever_its_row_and_column_order(tmp_path):
    import numpy as np
    import pandas as pd
    from fattag.metrics import lwlrap
    truth = pd.DataFrame({"fname": ["a.wav", "b.wav", "c.wav"], "X": [1, 0, 1], "Y": [0, 1, 1]})
    truth.to_csv(tmp_path / "test_labels.csv", index=False)
    pred = np.array([[0.2, 0.9], [0.1, 0.8], [0.7, 0.4]])   # a's X ranked second (1/2), the other labels first
    sub = pd.DataFrame(pred, columns=["X", "Y"]).assign(fname=truth["fname"])[["fname", "Y", "X"]].iloc[::-1]
    sub.to_csv(tmp_path / "submission.csv", index=False)
    score = _load("realdev").test_lwlrap(tmp_path, tmp_path / "submission.csv")
    assert score == pytest.approx(lwlrap(truth[["X", "Y"]].to_numpy(float), pred)) == pytest.approx(3.5 / 4)


def test_realdev_reuses_a_finished_run_only_while_every_setting_is_the_same_and_force_starts_afresh(
        tmp_path, monkeypatch):
    import subprocess
    from types import SimpleNamespace
    import pandas as pd
    from fattag import config
    realdev = _load("realdev")
    data = tmp_path / "data"
    data.mkdir()
    truth = pd.DataFrame({"fname": ["a.wav", "b.wav"], "X": [1, 0], "Y": [0, 1]})
    truth.to_csv(data / "test_labels.csv", index=False)
    runs = []

    def fake_run(cmd, **kwargs):   # a finished src/run.py: its submission and scores in its work dir
        work = Path(cmd[cmd.index("--work-dir") + 1])
        truth.to_csv(work / "submission.csv", index=False)
        (work / "scores.json").write_text(json.dumps({"oof_tta": 0.9}))
        runs.append(cmd)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = SimpleNamespace(preset="cpu", sets=[], keep_budget=True, devices=1, predict_from=None, force=False,
                           out=str(tmp_path / "runs"), data_seed=0, threads=None)
    first = realdev.run_one(args, "base", [], "everyday", 0, data)
    assert (len(runs), first["test"], first["oof"]) == (1, 1.0, 0.9)
    assert realdev.run_one(args, "base", [], "everyday", 0, data)["test"] == 1.0 and len(runs) == 1   # reused
    monkeypatch.setitem(config.PRESETS["cpu"], "noisy.epochs", 7)    # the preset changed, not the command line
    realdev.run_one(args, "base", [], "everyday", 0, data)
    assert len(runs) == 2
    work = realdev.work_dir(args, "base", "everyday", 0)
    (work / "stage1").mkdir()     # a finished stage src/run.py would reuse
    realdev.run_one(SimpleNamespace(**{**vars(args), "force": True}), "base", [], "everyday", 0, data)
    assert len(runs) == 3 and not (work / "stage1").exists()   # --force: a run from scratch
