"""Stage 1 on several ranks: torch's DistributedDataParallel in a small fastai callback, and each rank's share of the
crops.

The single-device recipe is kept step for step: every rank shuffles the crops in the same order (one seed) and
takes every N-th of them, with batches of batch_size / N, so that each optimiser step averages the gradients of one
batch of `batch_size` crops, the epoch has as many steps, and the one-cycle schedule and learning rate are those of
one device. BatchNorm stays per rank (no SyncBatchNorm): its statistics come from each rank's half batch, and
before validation every rank takes rank 0's, so that all ranks score, keep and stop alike.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.data.load import DataLoader
from torch.nn.parallel import DistributedDataParallel

from .world import World


class RankShare(DataLoader):
    """fastai's DataLoader over this rank's share of an epoch: the shuffled order every rank draws alike (the
    loader's own seeded generator), every `world.size`-th item from `world.rank` on, the same count on every rank
    (DDP needs as many steps everywhere; the few items left over wait for the next epoch's shuffle)."""

    def __init__(self, dataset, world: World, **kwargs):
        super().__init__(dataset, **kwargs)
        self.world = world

    @property
    def share(self) -> int:
        return self.n // self.world.size

    def __len__(self):
        return self.share // self.bs + (0 if self.drop_last or self.share % self.bs == 0 else 1)

    def get_idxs(self):
        return list(super().get_idxs())[self.world.rank::self.world.size][:self.share]


def training_loader(dataset, bs: int, world: World, **kwargs) -> DataLoader:
    """The training batches of one stage: all of them on one rank; with several, this rank's share of each batch
    of `bs` crops (its own crop generator, so the ranks' crops do not repeat each other's offsets). The last short
    batch is dropped when there is more than one batch."""
    per_rank = max(bs // world.size, 1)
    drop_last = len(dataset) // world.size > per_rank
    if world.size == 1:
        return DataLoader(dataset, bs=bs, drop_last=drop_last, **kwargs)
    if hasattr(dataset, "rng"):
        dataset.rng = np.random.default_rng([int(dataset.rng.integers(2 ** 31)), world.rank])
    return RankShare(dataset, world, bs=per_rank, drop_last=drop_last, **kwargs)


class DataParallel(Callback):
    """Train through torch's DDP (gradients averaged across the ranks in the backward pass); validate, keep and
    save with the plain model. Decisions taken between epochs (the deadline, a re-plan, the NaN guard) are rank 0's
    (`learn.agree`), so that no rank stops while another waits for it; at the end every rank holds rank 0's
    weights."""
    order = 200   # after every other callback: KeepBest has restored the best weights before after_fit shares them

    def __init__(self, world: World):
        self.world = world

    def before_fit(self):
        self.plain = self.learn.model
        device = next(self.plain.parameters()).device
        self.ddp = DistributedDataParallel(self.plain, device_ids=[device] if device.type == "cuda" else None)
        self.learn.agree = self.world.broadcast
        torch.manual_seed(torch.initial_seed() + self.world.rank)   # the ranks' augmentations differ

    def before_train(self):
        self.learn.model = self.ddp
        self.ddp.train()

    def after_train(self):
        self.learn.model = self.plain
        for b in self.plain.buffers():   # BatchNorm statistics: rank 0's everywhere, so validation agrees
            dist.broadcast(b.data, 0)

    def after_fit(self):
        self.learn.model = self.plain
        for t in self.plain.state_dict().values():
            dist.broadcast(t, 0)
        del self.learn.agree
