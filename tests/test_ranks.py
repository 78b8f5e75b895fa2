"""One process's view of several ranks, with torch.distributed, the GPUs and the spawner stood in for: which device
and backend a rank takes, how a torchrun rank hides the world from fastai, how the cores are split, which failure
the error line names, each rank's batches and seed. Each test fails with a one-line bug an audit planted (the commit
that added this file lists them); the spawned-rank tests of test_devices.py cover what needs real processes."""
from __future__ import annotations

import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fattag.dataparallel as dataparallel
from fattag import world as w


def fake_gpus(monkeypatch, n: int) -> list:
    """torch sees `n` CUDA devices (none when 0); returns the list that torch.cuda.set_device calls append to."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_a_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    """On a node's 2 GPUs global rank 2 (local rank 1 of the second node) takes cuda:1; one rank takes torch's
    current device; no GPU: the CPU."""
    chosen = fake_gpus(monkeypatch, 2)
    assert w.World(rank=2, size=4, local_rank=1).device() == torch.device("cuda", 1) and chosen == [1]
    assert w.World(rank=3, size=4, local_rank=3).device() == torch.device("cuda", 1)   # more ranks than GPUs: shared
    assert w.World().device() == torch.device("cuda") and chosen == [1, 1]
    fake_gpus(monkeypatch, 0)
    assert w.World(rank=1, size=2, local_rank=1).device() == torch.device("cpu")


def test_the_default_is_one_rank_per_gpu_and_one_on_the_cpu(monkeypatch):
    """--devices defaults to every visible GPU (a Kaggle T4 x2: 2), and to one process without a GPU."""
    fake_gpus(monkeypatch, 2)
    assert w.default_devices() == 2
    fake_gpus(monkeypatch, 0)
    assert w.default_devices() == 1


@pytest.fixture
def joined(monkeypatch):
    """w.join with the process group's start recorded instead of made: returns the list of its keyword arguments."""
    calls = []
    monkeypatch.setattr(w.dist, "init_process_group", lambda backend, **kw: calls.append(dict(backend=backend, **kw)))
    monkeypatch.setattr(w.atexit, "register", lambda fn: None)
    return calls


def test_a_spawned_rank_joins_with_nccl_only_when_every_rank_has_a_gpu(monkeypatch, joined):
    """NCCL when there are at least as many GPUs as ranks, gloo when GPUs would be shared or there are none."""
    monkeypatch.setattr(w, "_spawned", (1, 2, "file:///tmp/group", "/tmp"))
    for gpus, backend in ((2, "nccl"), (3, "nccl"), (1, "gloo"), (0, "gloo")):
        fake_gpus(monkeypatch, gpus)
        assert w.join(2) == w.World(1, 2, 1)
        assert joined[-1]["backend"] == backend, gpus
    assert (joined[-1]["rank"], joined[-1]["world_size"], joined[-1]["init_method"]) == (1, 2, "file:///tmp/group")


def test_a_torchrun_rank_joins_torchruns_group_and_fastai_sees_one_process(monkeypatch, joined):
    """Under torchrun a rank takes RANK, WORLD_SIZE and LOCAL_RANK, then sets WORLD_SIZE=1, RANK=0 for fastai (which
    would otherwise all-gather every batch's predictions across ranks training different folds)."""
    fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(w, "_spawned", None)
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert w.torchrun_size() == 4 and not w.should_spawn(4)
    assert w.join(4) == w.World(3, 4, 1)
    assert (joined[-1]["rank"], joined[-1]["world_size"], joined[-1]["init_method"]) == (3, 4, "env://")
    assert w.torchrun_size() == 1 and (w.os.environ["WORLD_SIZE"], w.os.environ["RANK"]) == ("1", "0")


def test_spawned_ranks_share_the_cores(monkeypatch):
    """N spawned ranks get a thread count of the cores / N each (at least one), by the spawn start method."""
    started = []

    def start_processes(fn, args, nprocs, join, start_method):
        started.append(dict(threads=args[-1], nprocs=nprocs, start_method=start_method))
        return SimpleNamespace(join=lambda grace_period: True, processes=[])

    monkeypatch.setattr(w.torch.multiprocessing, "start_processes", start_processes)
    monkeypatch.setattr(w.torch, "get_num_threads", lambda: 8)
    assert w.spawn(print, [], None, 2) == 0 and w.spawn(print, [], None, 16) == 0
    assert started == [dict(threads=4, nprocs=2, start_method="spawn"), dict(threads=1, nprocs=16,
                                                                            start_method="spawn")]


def test_the_error_line_names_the_first_failure(tmp_path):
    """A rank killed by a signal other than the SIGTERM that ended the others, with no failure of its own recorded,
    died first; else the earliest recorded failure, not the latest; else torch's last line."""
    def proc(code):
        return SimpleNamespace(exitcode=code)

    (tmp_path / "rank1.step").write_text("fold 1 (curated)")
    ended = [proc(-signal.SIGTERM), proc(-signal.SIGKILL)]
    assert w.first_failure(ended, str(tmp_path), ValueError("x")) == (
        "rank 1 died (signal SIGKILL) during fold 1 (curated); the other ranks were stopped")
    (tmp_path / "rank0.failed").write_text("200.0\trank 0 failed during stage 1: late")
    (tmp_path / "rank1.failed").write_text("100.0\trank 1 failed during stage 1: first")
    assert w.first_failure([proc(1), proc(-signal.SIGKILL)], str(tmp_path), ValueError("x")) == (
        "rank 1 failed during stage 1: first")
    (tmp_path / "rank0.failed").unlink()
    (tmp_path / "rank1.failed").unlink()
    assert w.first_failure([proc(-signal.SIGTERM), proc(1)], str(tmp_path), ValueError("a\nlast line\n")) == "last line"


# ---------------------------------------------------------------- stage 1 data-parallel


def test_a_small_stage_keeps_its_one_short_batch_on_every_rank():
    """The last short batch is dropped only when a rank has more than one batch: 12 crops on 2 ranks of 8 (a batch
    of 16) are one batch of 6 each, not none; 40 crops are 2 full batches each."""
    for n, batches, per_batch in ((12, 1, 6), (40, 2, 8)):
        for rank in (0, 1):
            dl = dataparallel.training_loader(list(range(n)), 16, w.World(rank, 2))
            assert (len(dl), dl.bs) == (batches, 8) and len(list(dl)) == batches, (n, rank)
            assert len(list(dl)[-1]) == per_batch
    one = dataparallel.training_loader(list(range(12)), 12, w.SINGLE)
    assert len(one) == 1 and len(list(one)[0]) == 12


def test_data_parallel_seeds_each_ranks_augmentation_apart_and_shares_rank_0s_state(monkeypatch):
    """Before the fit each rank adds its rank to torch's seed (the ranks' augmentations differ) and decisions are
    rank 0's; after an epoch's training the BatchNorm statistics, after the fit every weight, come from rank 0."""
    sources, wrapped = [], []
    monkeypatch.setattr(dataparallel, "DistributedDataParallel",
                        lambda model, device_ids: wrapped.append(device_ids) or SimpleNamespace(train=lambda: None))
    monkeypatch.setattr(dataparallel.dist, "broadcast", lambda tensor, src: sources.append(src))
    seeds = []
    for rank in (0, 1):
        torch.manual_seed(7)
        world = w.World(rank, 2)
        cb = dataparallel.DataParallel(world)
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        cb.learn = SimpleNamespace(model=model)
        cb.before_fit()
        seeds.append(torch.initial_seed())
        assert cb.learn.agree == world.broadcast and wrapped[-1] is None   # the CPU: no device ids
        cb.before_train()
        assert cb.learn.model is cb.ddp                                     # training goes through DDP
        cb.after_train()
        assert cb.learn.model is model
        cb.after_fit()
    assert seeds == [7, 8]
    n_buffers, n_state = len(list(model.buffers())), len(model.state_dict())
    assert len(sources) == 2 * (n_buffers + n_state) and set(sources) == {0}
