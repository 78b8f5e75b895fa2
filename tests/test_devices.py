"""Several ranks on the CPU (gloo): data-parallel stage 1, fold-parallel stage 2, faults, torchrun, the kernel."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, RUN, TINY, run_pipeline

import rank_jobs
from fattag import world as w
from fattag.dataparallel import RankShare, training_loader
from fattag.features import Clips, CropDataset, MelStore, read_store, write_store

ONE_THREAD = {"OMP_NUM_THREADS": "1"}   # both runs of a comparison compute alike: one thread per process


# ---------------------------------------------------------------- in one process


def test_rank_shares_split_each_shuffled_epoch_without_overlap():
    from fastai.data.load import DataLoader
    from fastai.torch_core import set_seed
    ds = list(range(103))
    loaders = []
    for rank in (0, 1):
        set_seed(5)
        loaders.append(RankShare(ds, w.World(rank, 2), bs=8, shuffle=True, drop_last=True))
    set_seed(5)
    single = DataLoader(ds, bs=16, shuffle=True, drop_last=True)
    for _ in range(2):   # two epochs: every rank reshuffles alike
        for dl in loaders:
            dl.randomize()
        single.randomize()
        a, b, whole = loaders[0].get_idxs(), loaders[1].get_idxs(), single.get_idxs()
        assert len(a) == len(b) == 51 and not set(a) & set(b)
        assert [x for pair in zip(a, b) for x in pair] == whole[:102]   # one device's order, dealt out
    assert len(loaders[0]) == len(single) == 6   # as many steps per epoch as on one device


def test_training_loader_halves_the_batch_and_gives_each_rank_its_own_crops(stores):
    cfg, _, curated, _ = stores
    clips = Clips(curated, np.flatnonzero(curated.ok))
    rngs = []
    for rank in (0, 1):
        dl = training_loader(CropDataset(clips, cfg.crop_frames, seed=3), 16, w.World(rank, 2), shuffle=True)
        assert isinstance(dl, RankShare) and dl.bs == 8
        rngs.append(dl.dataset.rng.integers(1 << 30, size=4).tolist())
    assert rngs[0] != rngs[1]
    one = training_loader(CropDataset(clips, cfg.crop_frames, seed=3), 16, w.SINGLE, shuffle=True)
    assert type(one) is not RankShare and one.bs == 16


def test_a_written_store_reads_back_as_mapped_views(tmp_path, stores):
    _, _, curated, _ = stores
    bad = MelStore(curated.table, [None, *curated.mels[1:]], [("x.wav", "bad header")], curated.seconds)
    write_store(bad, tmp_path / "curated")
    back = read_store(curated.table, tmp_path / "curated")
    assert back.mels[0] is None and back.errors == [("x.wav", "bad header")] and back.seconds == curated.seconds
    for a, b in zip(curated.mels[1:], back.mels[1:]):
        np.testing.assert_array_equal(a, b)
        assert isinstance(b.base, np.memmap) or isinstance(b, np.memmap)


def test_one_rank_is_the_single_process_path():
    one = w.SINGLE
    assert one.gather({"a": 1}) == [{"a": 1}] and one.broadcast(3) == 3 and one.mine(range(4)) == [0, 1, 2, 3]
    assert w.World(1, 3).mine(range(7)) == [1, 4]
    assert not w.should_spawn(1) and w.should_spawn(2)


# ---------------------------------------------------------------- spawned ranks


def test_ddp_ranks_hold_equal_weights_after_every_epoch(tmp_path, tiny_data):
    out = tmp_path / "ddp"
    out.mkdir()
    assert w.spawn(rank_jobs.ddp_stage, [str(tiny_data), str(out)], None, 2) == 0
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(r0["states"]) == len(r1["states"]) == 2
    for s0, s1 in zip(r0["states"], r1["states"]):
        for name in s0:
            torch.testing.assert_close(s0[name], s1[name], rtol=0, atol=0, msg=name)
    first = next(k for k, v in s0.items() if v.ndim > 1)   # a layer's weights
    assert not torch.equal(r0["states"][0][first], r0["states"][1][first])   # it did train
    assert r0["bs"] == r1["bs"] == 8 and r0["steps"] == r1["steps"]
    assert not set(r0["items"]) & set(r1["items"])   # each rank trained its own share of the crops
    assert (out / "stage" / "progress.json").exists() or any((out / "stage").iterdir())   # rank 0 wrote


def test_a_rank_that_raises_ends_the_run_with_one_line_naming_it():
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        w.spawn(rank_jobs.rank1_fails, ["raise", "fold 1 (curated)"], None, 2)
    took = time.time() - t0
    assert "rank 1 failed during fold 1 (curated): ValueError: a planted failure" in str(e.value.code)
    assert took < 60, took


def test_a_rank_that_dies_ends_the_run_with_one_line_naming_it():
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        w.spawn(rank_jobs.rank1_fails, ["kill", "stage 1 (noisy)"], None, 2)
    assert "rank 1 died (signal SIGKILL) during stage 1 (noisy)" in str(e.value.code)
    assert time.time() - t0 < 60


def test_torchrun_ranks_join_its_group_and_fastai_sees_one_process():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO / "src"), **ONE_THREAD)
    with socket.socket() as s:   # a free port for torchrun's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), str(REPO / "tests" / "rank_jobs.py"), "gather_ranks"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("GATHERED"))
    assert "{'rank': 0, 'mine': [0, 2, 4], 'fastai_world': 1}" in line
    assert "{'rank': 1, 'mine': [1, 3], 'fastai_world': 1}" in line and line.endswith("BROADCAST 41")


# ---------------------------------------------------------------- the pipeline in 2 ranks


@pytest.fixture(scope="module")
def one_and_two(tiny_data, tmp_path_factory):
    """The tiny run in one process, then in 2 ranks from its stage-1 weights (one thread per process in both)."""
    base = tmp_path_factory.mktemp("devices")
    one, two = base / "one", base / "two"
    proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", one, *TINY], env_extra=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two.mkdir()
    shutil.copytree(one / "stage1", two / "stage1")
    proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", two, *TINY, "--devices", "2"], env_extra=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two, proc.stderr


@pytest.mark.slow
def test_fold_parallel_models_equal_the_single_process_ones(one_and_two):
    one, two, log = one_and_two
    assert "[rank 0]" in log and "[rank 1]" in log
    for k in (0, 1):
        a, b = (torch.load(d / f"fold{k}" / "model.pth", weights_only=False) for d in (one, two))
        state_a, state_b = a["state_dict"], b["state_dict"]
        for name in state_a:
            torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_ranks_train_every_fold_once_and_gather_every_prediction(one_and_two, tiny_data):
    one, two, _ = one_and_two
    scores = pd.read_json(two / "scores.json", typ="series")
    assert sorted((f["fold"], f["rank"]) for f in scores["folds"]) == [(0, 0), (1, 1)]
    oof = pd.read_csv(two / "oof.csv")
    assert len(oof) == len(pd.read_csv(one / "oof.csv")) and np.isfinite(oof.iloc[:, 1:].to_numpy(float)).all()
    sub_one, sub_two = pd.read_csv(one / "submission.csv"), pd.read_csv(two / "submission.csv")
    assert list(sub_two.fname) == list(pd.read_csv(tiny_data / "sample_submission.csv").fname)
    np.testing.assert_allclose(sub_two.iloc[:, 1:].to_numpy(float), sub_one.iloc[:, 1:].to_numpy(float), atol=1e-4)
    report, config = (two / "report.md").read_text(), json.loads((two / "config.json").read_text())
    assert "fold 1 (rank 1)" in report and "| fold | best lwlrap | best epoch | epochs run | time | rank |" in report
    assert config["devices"] == 2 and config["plan"]["devices"] == 2
    assert [f["rank"] for f in config["folds_run"]] == [0, 1]


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes(tiny_data, tmp_path):
    work = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CUDA_VISIBLE_DEVICES="", **ONE_THREAD)
    args = [sys.executable, str(RUN), "--data-dir", str(tiny_data), "--work-dir", str(work), *TINY,
            "--set", "curated.epochs=4", "--devices", "2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(work.glob("fold1/progress*")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (work / "submission.csv").exists()   # the prior-based one, written first
    again = run_pipeline(["--data-dir", tiny_data, "--work-dir", work, *TINY, "--set", "curated.epochs=4",
                          "--devices", "2"], env_extra=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch" in again.stderr or "reusing" in again.stderr, again.stderr[-3000:]
    sub = pd.read_csv(work / "submission.csv")
    assert len(sub) == len(pd.read_csv(tiny_data / "sample_submission.csv"))


@pytest.mark.slow
def test_the_bundled_kernel_alone_runs_two_ranks(tmp_path, tiny_data):
    import build_kernel as bk
    built = bk.build(tmp_path / "bundle")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(built["kernel.py"], alone / "kernel.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CUDA_VISIBLE_DEVICES="", **ONE_THREAD)
    proc = subprocess.run([sys.executable, "kernel.py", "--data-dir", str(tiny_data), "--work-dir", "out", *TINY,
                           "--set", "curated.epochs=1", "--devices", "2"], cwd=alone, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 1]" in proc.stderr
    assert len(pd.read_csv(alone / "out" / "submission.csv")) == len(pd.read_csv(tiny_data / "sample_submission.csv"))


@pytest.mark.slow
def test_predict_mode_in_two_ranks_writes_the_single_process_submission(one_and_two, tiny_data, tmp_path):
    _, two, _ = one_and_two
    subs = []
    for ranks in ("1", "2"):
        out = tmp_path / f"predict{ranks}"
        proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", out, "--mode", "predict", "--weights", two,
                             "--devices", ranks], env_extra=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-3000:]
        subs.append((out / "submission.csv").read_bytes())
    assert subs[0] == subs[1]   # each rank predicts its share of the fold models; rank 0 ensembles them in order
