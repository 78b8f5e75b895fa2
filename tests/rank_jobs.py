"""Small jobs that tests run in 2 CPU ranks through fattag.world.spawn (or torchrun): each is an `entry(argv,
defaults)` like run.main, importable by the spawned children."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fattag import world as w
from fattag.callbacks import StageCallback


class SnapshotWeights(StageCallback):
    """After every epoch: the whole state (weights and BatchNorm statistics) of the plain model."""

    def __init__(self):
        self.states = []

    def after_epoch(self):
        self.states.append({k: v.detach().clone() for k, v in self.learn.model.state_dict().items()})


def ddp_stage(argv, defaults=None) -> int:
    """Two epochs of a tiny stage 1 trained data-parallel; every rank saves its per-epoch states and its share of
    one epoch's crops to OUT/rank{r}.pt. argv: DATA_DIR OUT."""
    from fastai.torch_core import set_seed

    from fattag.config import make_config
    from fattag.data import load_dataset
    from fattag.features import Clips, build_store, store_stats
    from fattag.model import build_model
    from fattag.stage import StageSpec, stage_learner

    data_dir, out = argv
    world = w.join(2)
    cfg = make_config("demo", sets=["batch_size=16"])
    data = load_dataset(data_dir)
    noisy = build_store(data.noisy, cfg, "cpu", progress=False)
    idx = np.flatnonzero(noisy.ok)
    spec = StageSpec("stage 1 (test)", cfg.noisy, Path(out) / "stage", 2, cfg.noisy.lr, "bce", 7, cfg,
                     world=world)
    set_seed(spec.seed, reproducible=True)   # as fit_stage does: every rank shuffles alike
    torch.manual_seed(world.rank)   # but different initial weights per rank: DDP must start all from rank 0's
    model = build_model(cfg, len(data.classes), *store_stats(noisy))
    learn = stage_learner(model, Clips(noisy, idx[4:]), Clips(noisy, idx[:4]), spec, spec.stage_dir.resume(), None)
    snap = SnapshotWeights()
    learn.add_cb(snap)
    learn.fit_one_cycle(2, spec.lr)
    torch.save(dict(states=snap.states, steps=len(learn.dls.train), bs=learn.dls.train.bs,
                    items=learn.dls.train.get_idxs()), Path(out) / f"rank{world.rank}.pt")
    return 0


def rank1_fails(argv, defaults=None) -> int:
    """Rank 1, during step argv[1], raises (argv[0] "raise") or is killed as the OOM killer would ("kill"), while
    rank 0 waits for it in a collective (it would wait for the group timeout)."""
    how, step = argv
    world = w.join(2)
    w.doing(step)
    if world.rank == 1:
        time.sleep(1)
        if how == "kill":
            os.kill(os.getpid(), 9)
        raise ValueError("a planted failure")
    world.barrier()
    return 0


def gather_ranks(argv, defaults=None) -> int:
    """Each rank's share of range(5) and what fastai sees, gathered; rank 0 prints them (for torchrun)."""
    from fastai.torch_core import num_distrib
    world = w.join(2)
    seen = world.gather(dict(rank=world.rank, mine=world.mine(range(5)), fastai_world=num_distrib()))
    if world.is_main:
        print("GATHERED", seen, "BROADCAST", world.broadcast(world.rank + 41), flush=True)
    else:
        world.broadcast(None)
    return 0


if __name__ == "__main__":   # under torchrun: python -m torch.distributed.run ... tests/rank_jobs.py gather_ranks
    sys.exit(globals()[sys.argv[1]](sys.argv[2:]))
