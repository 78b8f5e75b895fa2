"""Throughput: what a training step and an inference window really cost on this machine.

Measured on the real model (its input channels included) with random input of the crop size, on a few warmed-up
batches, under the precision training and prediction use; the cost model (cost.py) prices the run from the
`cost.Throughput` it returns. With several ranks each measures its own device, then all time training steps
together through DDP (each rank a share of the batch, as stage 1 trains): that rate prices stage 1.
"""
from __future__ import annotations

import time

import torch

from .config import Config
from .cost import Throughput
from .model import build_model, to_device
from .precision import amp_dtype, autocast, grad_scaler
from .world import SINGLE, World


def measure_throughput(cfg: Config, n_classes: int, device, max_seconds: float | None = None,
                       runs: int = 4, world: World = SINGLE) -> Throughput:
    """Time training steps and inference batches of the real model on random input of the crop size.

    The first run of each warms up and is not used, unless the next would take the measurement past
    `max_seconds` (a small share of the budget: a slow CPU step is then measured once, and the stages' measured
    times correct the estimate later).
    """
    device = torch.device(device)
    model = to_device(build_model(cfg, n_classes), device, cfg.channels_last)
    bs = cfg.batch_size
    x = torch.randn(bs, 1, cfg.n_mels, cfg.crop_frames, device=device).half()
    y = (torch.rand(bs, n_classes, device=device) < 0.05).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    dtype = amp_dtype(cfg, device)  # as training and prediction run (stage_learner, predict_clips)
    scaler = grad_scaler(device, dtype)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    spent = [0.0]

    def train_step(net=model, n=bs):   # DDP's step below: the DDP-wrapped model on this rank's share of the batch
        with autocast(device, dtype):
            loss = loss_fn(net(x[:n]).float(), y[:n])
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def infer():
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    def timed(fn, share: float, limited: bool = True) -> float:
        times = []
        while len(times) < runs:
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            spent[0] += times[-1]
            if limited and max_seconds and spent[0] + times[-1] > max_seconds * share:
                break
        return min(times[1:] or times)

    model.train()
    t_train = timed(train_step, 0.7) / bs
    model.eval()
    t_infer = timed(infer, 1.0) / bs
    if world.size == 1:
        return Throughput(t_train, t_infer, str(device))
    # stage 1's step: all ranks at once through DDP, each on its share of the batch
    from torch.nn.parallel import DistributedDataParallel
    ddp = DistributedDataParallel(model.train(), device_ids=[device] if cuda else None)
    share = max(bs // world.size, 1)
    # unlimited: every rank times as many steps, so none waits for another in the all-reduce
    t_ddp = timed(lambda: train_step(ddp, share), 1.0, limited=False) / bs
    return Throughput(t_train, t_infer, str(device), world.size, world.broadcast(t_ddp))
