"""Shared fixtures: a tiny FAT2019-shaped dataset and settings that make a whole pipeline run take seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "src" / "run.py"

# Every pipeline test uses these: both stages, two folds, one or two epochs, the demo preset's tiny model.
TINY = ["--preset", "demo", "--seed", "0", "--folds", "2",
        "--set", "noisy.epochs=1", "--set", "curated.epochs=2", "--set", "batch_size=16"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from fattag.demo import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("tiny") / "data", seed=3, n_classes=4, curated_per_class=6,
                             noisy_per_class=6, n_test=8)


def run_pipeline(args, cwd=None, timeout=600, env_extra=None) -> subprocess.CompletedProcess:
    """`python src/run.py ARGS` in a subprocess on the CPU; output captured, failure shows the log tail."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", **(env_extra or {}))
    proc = subprocess.run([sys.executable, str(RUN), *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


# In-process training tests (test_train.py, test_guarantees.py): one- and two-epoch stages, three folds.
TRAIN_SETS = ["noisy.epochs=1", "curated.epochs=2", "batch_size=16", "folds=3", "curated.top_up=0.3"]


@pytest.fixture(scope="session")
def stores(tiny_data):
    """(cfg, data, curated store, noisy store) of the tiny dataset under TRAIN_SETS, decoded once."""
    from fattag.config import make_config
    from fattag.data import load_dataset
    from fattag.features import build_store
    cfg = make_config("demo", sets=TRAIN_SETS)
    data = load_dataset(tiny_data)
    return (cfg, data, build_store(data.curated, cfg, "cpu", progress=False),
            build_store(data.noisy, cfg, "cpu", progress=False))


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """One finished training run on the tiny dataset, shared by the tests that only read its outputs."""
    work = tmp_path_factory.mktemp("run")
    proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", work, *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def fit_fresh_model(cfg, n_classes, store, device, out_dir, epochs, lr, n_valid, label="test", watch=None):
    """A fresh model (seed 0) of `cfg` trained by fit_stage on `store`'s decodable clips, the first `n_valid`
    validating; `watch(model)` is called before training (e.g. to hook its layers). Returns (StageResult, model)."""
    import numpy as np
    import torch
    from fattag.features import Clips
    from fattag.model import build_model
    from fattag.stage import StageSpec, fit_stage
    idx = np.flatnonzero(store.ok)
    torch.manual_seed(0)
    model = build_model(cfg, n_classes, -40.0, 20.0)
    if watch is not None:
        watch(model)
    spec = StageSpec(label, cfg.curated, out_dir, epochs=epochs, lr=lr, loss="bce", seed=0, cfg=cfg, device=device)
    return fit_stage(model, Clips(store, idx[n_valid:]), Clips(store, idx[:n_valid]), spec), model
