"""Training and inference throughput of each preset's model, and the rate of the real input pipeline feeding it.

    python bench/train.py [--preset P] [--quick] [--batch B] [--clips N] [--set name=value ...]

Model rate: fattag.throughput.measure_throughput, the step the run's planner times (forward + backward + AdamW on random
float16 input of the crop size, batch = the preset's, AMP on CUDA; inference: forward passes of one batch).

Input rate: one epoch of the real CropDataset over a synthetic MelStore (float16 mels of curated-like lengths,
0.3-30 s), batched by fastai's DataLoader exactly as fit_stage builds it (and by a plain torch DataLoader for
comparison), moved to the device, then the stage-2 augmentation policy's batch callbacks (augment.augment_policy,
the costlier stage). The rule checked: input rate >= 10 x model rate.

Without --preset every preset's model is measured (demo: xresnet_tiny, kaggle-1h: xresnet18, kaggle-9h: xresnet34).
"""
from __future__ import annotations

import sys

from common import base_parser, best_of, pick_device, print_json, print_machine, print_table

N_CLASSES = 80
RULE = 10.0


def synthetic_store(cfg, n_clips: int, seed: int = 0):
    """A MelStore of random float16 mels with curated-like lengths (0.3-30 s), no audio decoded."""
    import numpy as np
    from fattag.data import ClipTable
    from fattag.features import MelStore
    rng = np.random.default_rng(seed)
    fps = cfg.sample_rate / cfg.hop_length
    min_frames = int(np.ceil(max(cfg.crop_seconds * cfg.sample_rate, cfg.n_fft) / cfg.hop_length))  # build_store tiles
    lengths = np.maximum(rng.uniform(0.3, 30.0, n_clips) * fps, min_frames).astype(int) + 1
    mels = [rng.standard_normal((cfg.n_mels, t), dtype=np.float32).astype(np.float16) * 10 - 40 for t in lengths]
    targets = np.zeros((n_clips, N_CLASSES), dtype=np.float32)
    targets[np.arange(n_clips), rng.integers(0, N_CLASSES, n_clips)] = 1.0
    names = [f"c{i}" for i in range(n_clips)]
    table = ClipTable("synthetic", names, names, targets)
    return MelStore(table, mels, [], float(lengths.sum() / fps))


def model_rates(cfg, bs: int, device, runs: int, repeat: int) -> dict:
    """Training clips/s and inference windows/s of the preset's model, timed by fattag.throughput.measure_throughput (the
    step the run's planner times), best of `repeat`; plus the model's size."""
    import dataclasses
    from fattag.throughput import measure_throughput
    from fattag.model import build_model
    cfg = dataclasses.replace(cfg, batch_size=bs)
    n_params = sum(p.numel() for p in build_model(cfg, N_CLASSES).parameters())
    tps = [measure_throughput(cfg, N_CLASSES, device, runs=runs) for _ in range(repeat)]
    return dict(params_M=n_params / 1e6, train_clips_s=max(1 / t.train_s_per_clip for t in tps),
                infer_windows_s=max(1 / t.infer_s_per_window for t in tps),
                train_runs_clips_s=[1 / t.train_s_per_clip for t in tps])


class SliceLoader:
    """Reference, not fattag code: the same random crops, sliced straight into one preallocated batch array
    (no per-item tensors, no collate); shows what the per-item path costs the real loader."""

    def __init__(self, store, crop_frames: int, bs: int, device):
        import numpy as np
        import torch
        self.np, self.torch = np, torch
        self.mels, self.length, self.bs, self.device = store.mels, crop_frames, bs, device
        self.targets = store.table.targets
        self.rng = np.random.default_rng(0)

    def __iter__(self):
        np, torch, L = self.np, self.torch, self.length
        order = self.rng.permutation(len(self.mels))
        n_mels = self.mels[0].shape[0]
        for s in range(0, len(order) - self.bs + 1, self.bs):
            j = order[s:s + self.bs]
            out = np.empty((len(j), 1, n_mels, L), dtype=np.float16)
            starts = self.rng.random(len(j))
            for b, k in enumerate(j):  # build_store mels are never shorter than one crop
                m = self.mels[k]
                a = int(starts[b] * (m.shape[1] - L + 1))
                out[b, 0] = m[:, a:a + L]
            yield torch.from_numpy(out).to(self.device), torch.from_numpy(self.targets[j]).to(self.device)


def input_rates(cfg, store, bs: int, device, repeat: int) -> dict:
    """Clips/s of CropDataset -> DataLoader collate -> device -> the stage-2 batch augmentations."""
    import numpy as np
    import torch
    from fastai.data.load import DataLoader as FastaiDataLoader
    from fattag.augment import augment_policy
    from fattag.features import Clips, CropDataset

    idx = np.arange(len(store.mels))
    ds = CropDataset(Clips(store, idx), cfg.crop_frames, seed=0)
    fill = -40.0

    policy = augment_policy(cfg, cfg.curated, fill)  # the stage-2 batch callbacks, as fit_stage attaches them

    def augment(x, y):
        for cb in policy:
            x, y = cb.augment(x, y)
        return x, y

    loaders = {
        "fastai DataLoader (fit_stage)": lambda: FastaiDataLoader(
            ds, bs=bs, shuffle=True, drop_last=True, num_workers=cfg.num_workers, device=device),
        "torch DataLoader": lambda: torch.utils.data.DataLoader(
            ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=cfg.num_workers),
    }
    loaders["reference: slices into a batch array"] = lambda: SliceLoader(store, cfg.crop_frames, bs, device)
    out = {}
    repeat = max(repeat, 5)  # an epoch here takes well under a second: more runs make the best-of robust
    xb, yb = next(iter(loaders["torch DataLoader"]()))
    xb, yb = xb.to(device), yb.to(device)
    n_batches = len(ds) // bs

    def augment_epoch():  # as many batches as an epoch, so both timings span the same length of time
        for _ in range(n_batches):
            augment(xb, yb)

    best_aug, _ = best_of(augment_epoch, repeat=repeat, warmup=1, device=device)
    for name, make in loaders.items():
        dl = make()
        n_clips = (len(ds) // bs) * bs

        def epoch():
            for xb, yb in dl:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                xb, yb = augment(xb, yb)

        def loader_only():
            for xb, yb in dl:
                xb.to(device), yb.to(device)

        best, runs = best_of(epoch, repeat=repeat, warmup=1, device=device)
        best_load, _ = best_of(loader_only, repeat=repeat, warmup=0, device=device)
        out[name] = dict(clips_s=n_clips / best, loader_only_clips_s=n_clips / best_load,
                         augment_only_clips_s=n_batches * bs / best_aug, runs_s=runs)
    return out


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0], default_preset=None)
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's; --quick on CPU: 8)")
    p.add_argument("--clips", type=int, default=None, help="clips in the synthetic store (default 512, --quick 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up step (default 1 CPU, 3 CUDA)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a setting of every preset measured, e.g. --set n_mels=64 (repeatable)")
    a = p.parse_args(argv)
    from fattag.config import PRESETS, make_config

    device = pick_device(a.threads)
    cuda = device.type == "cuda"
    presets = [a.preset] if a.preset else list(PRESETS)
    repeat = a.repeat or (1 if a.quick else 3)
    steps = a.steps or (3 if cuda else 1)
    n_clips = a.clips or (64 if a.quick else 512)
    info = print_machine("train: model throughput vs input pipeline", device, notes=(
        f"presets {', '.join(presets)}{' with ' + ' '.join(a.set) if a.set else ''}; "
        f"best of {steps} timed step(s) after a warm-up, best of {repeat} runs; "
        f"AMP {'on' if cuda else 'off (CPU)'}; input pipeline over {n_clips} synthetic clips"))

    model_rows, input_rows, results = [], [], {}
    for name in presets:
        cfg = make_config(name, sets=a.set)
        bs = a.batch or (min(cfg.batch_size, 8) if a.quick and not cuda else cfg.batch_size)
        store = synthetic_store(cfg, max(n_clips, 2 * bs))
        m = model_rates(cfg, bs, device, steps + 1, repeat)
        inp = input_rates(cfg, store, bs, device, repeat)
        fa = inp["fastai DataLoader (fit_stage)"]["clips_s"]
        ratio = fa / m["train_clips_s"]
        shape = f"{cfg.n_mels}x{cfg.crop_frames}"
        model_rows.append([name, cfg.arch, m["params_M"], shape, bs, m["train_clips_s"], m["infer_windows_s"]])
        for loader, r in inp.items():
            input_rows.append([name, loader, r["loader_only_clips_s"], r["augment_only_clips_s"], r["clips_s"],
                               r["clips_s"] / m["train_clips_s"],
                               "yes" if r["clips_s"] >= RULE * m["train_clips_s"] else "NO"])
        results[name] = dict(arch=cfg.arch, batch=bs, input_shape=shape, **m, input=inp,
                             input_over_model=ratio, rule_10x=bool(ratio >= RULE),
                             max_model_clips_s_for_rule=fa / RULE)
        del store
    print_table(["preset", "arch", "params M", "input", "batch", "train clips/s", "infer windows/s"], model_rows,
                f"model throughput on {device}")
    print_table(["preset", "loader", "load only clips/s", "specaug+mixup only", "load+aug clips/s", "input/model",
                 ">= 10x"],
                input_rows, f"input pipeline on {device} (num_workers as the preset: 0) vs the model's training rate")
    for name, r in results.items():
        if not r["rule_10x"]:
            print(f"{name}: input pipeline is only {r['input_over_model']:.1f}x the model's rate (rule: {RULE:g}x)")
    print("the 10x rule holds on this device for any model training at up to "
          + ", ".join(f"{results[n]['max_model_clips_s_for_rule']:.0f} clips/s ({n})" for n in results))
    return print_json("train", info, results, steps=steps, repeat=repeat, synthetic_clips=n_clips)


if __name__ == "__main__":
    main(sys.argv[1:])
