"""GPU paths: float16 autocast training through the stage learner, autocast inference, GradScaler timing, log-mel
on CUDA.

They run when CUDA is present and are reported as skipped otherwise (`pytest -rs` lists them).
"""
import numpy as np
import pytest
import torch
from conftest import fit_fresh_model

from fattag.throughput import measure_throughput
from fattag.config import make_config
from fattag.data import load_dataset
from fattag.features import build_store
from fattag.model import build_model
from fattag.predict import predict_clips

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU paths)")


@pytest.fixture(scope="module")
def setup(tiny_data):
    cfg = make_config("demo", sets=["batch_size=16"])
    data = load_dataset(tiny_data)
    return cfg, data


def test_logmel_on_cuda_matches_cpu(setup):
    cfg, data = setup
    cpu = build_store(data.curated, cfg, "cpu", progress=False)
    gpu = build_store(data.curated, cfg, "cuda", progress=False)
    for a, b in zip(cpu.mels, gpu.mels):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=0.1)


def test_fp16_training_on_cuda_gives_finite_usable_weights(setup, tmp_path):
    cfg, data = setup
    store = build_store(data.curated, cfg, "cuda", progress=False)
    res, model = fit_fresh_model(cfg, len(data.classes), store, "cuda", tmp_path, epochs=2, lr=3e-3, n_valid=6)
    assert res.usable and len(res.history) == 2
    assert res.history[["train_loss", "valid_loss", "lwlrap"]].notna().all().all()
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert next(model.parameters()).dtype == torch.float32  # mixed precision keeps float32 master weights


def test_autocast_inference_matches_cpu(setup):
    cfg, data = setup
    store = build_store(data.test, cfg, "cpu", progress=False)
    torch.manual_seed(0)
    model = build_model(cfg, len(data.classes), -40.0, 20.0).eval()
    idx = np.flatnonzero(store.ok)
    cpu = predict_clips(model, store, idx, cfg, "cpu")
    gpu = predict_clips(model, store, idx, cfg, "cuda")
    np.testing.assert_allclose(cpu, gpu, atol=2e-2)


def test_throughput_measurement_with_grad_scaler_on_cuda(setup):
    cfg, data = setup
    tp = measure_throughput(cfg, len(data.classes), "cuda")
    assert tp.device.startswith("cuda")
    assert 0 < tp.train_s_per_clip < 1 and 0 < tp.infer_s_per_window < tp.train_s_per_clip * 10


def test_kaggle_model_trains_under_fp16_autocast_on_cuda(setup, tmp_path):
    """The kernel's default model (three input channels, PCEN included) through the stage learner in float16."""
    _, data = setup
    cfg = make_config("kaggle-1h", sets=["n_mels=64", "crop_seconds=1.5", "batch_size=8"])
    store = build_store(data.curated, cfg, "cuda", progress=False)
    res, _ = fit_fresh_model(cfg, len(data.classes), store, "cuda", tmp_path, epochs=1, lr=1e-3, n_valid=8)
    assert res.usable and res.history[["train_loss", "valid_loss", "lwlrap"]].notna().all().all()


def test_every_input_channel_on_cuda_matches_cpu(setup):
    """The input channels (PCEN's IIR smoother included) run on the device, under autocast as in training."""
    _, data = setup
    cfg = make_config("demo", sets=["input_norm=global+band+pcen"])
    norm = build_model(cfg, len(data.classes), -40.0, 20.0)[0]
    x = torch.randn(4, 1, cfg.n_mels, 128) * 8 - 45
    with torch.autocast("cuda", dtype=torch.float16):
        gpu = norm.cuda()(x.cuda().half())
    np.testing.assert_allclose(norm.cpu()(x.half()).numpy(), gpu.float().cpu().numpy(), atol=2e-2)
