"""Mixed precision without a GPU: the training, throughput and prediction paths under CPU autocast (bfloat16), for
the kernel's kaggle-1h model with every input channel, against float32; and the stop on an unsupported GPU."""
import numpy as np
import pytest
import torch
from conftest import fit_fresh_model

import fattag.throughput as throughput
from fattag.config import PRESETS, make_config
from fattag.data import load_dataset
from fattag.features import build_store
from fattag.losses import LOSSES, make_loss
from fattag.model import InputNorm, build_model
from fattag.precision import amp_dtype, check_device, unsupported_gpu
from fattag.predict import predict_clips

# kaggle-1h's model (xresnet18 + self-attention, Mish, the three input channels) on smaller crops, for speed.
SMALL = ["n_mels=64", "crop_seconds=1.5", "batch_size=8"]


@pytest.fixture(scope="module")
def setup(tiny_data):
    data = load_dataset(tiny_data)
    cfg = make_config("kaggle-1h", sets=SMALL)
    return data, cfg, build_store(data.curated, cfg, "cpu", progress=False)


class ConvDtypes:
    """Records the dtype of every convolution output of a model while it runs (is autocast really on?)."""

    def __init__(self, model):
        self.seen, self.training, self.eval = set(), set(), set()
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(self.hook)

    def hook(self, module, inp, out):
        self.seen.add(out.dtype)
        (self.training if module.training else self.eval).add(out.dtype)


def test_amp_dtype_is_float16_on_cuda_and_opt_in_on_the_cpu():
    auto, bf16, off = (make_config("kaggle-1h", sets=[f"amp={a}"]) for a in ("auto", "bf16", "off"))
    assert amp_dtype(auto, "cuda") is torch.float16 and amp_dtype(auto, "cpu") is None
    assert amp_dtype(bf16, "cpu") is torch.bfloat16 and amp_dtype(bf16, "cuda") is torch.bfloat16
    assert amp_dtype(off, "cuda") is None
    with pytest.raises(ValueError, match="unknown amp 'half'"):
        make_config("demo", sets=["amp=half"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_input_channels_stay_float32_under_autocast(dtype):
    """PCEN's torchaudio lfilter accepts only float32/float64: under autocast the input channels must still be
    computed in float32 from a float16 store, exactly as without autocast."""
    norm = InputNorm(-40.0, 20.0, "global+band+pcen")
    x = (torch.randn(3, 1, 32, 80) * 8 - 45).half()
    with torch.autocast("cpu", dtype=dtype):
        out = norm(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, norm(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_model_runs_under_cpu_autocast_close_to_float32(preset):
    cfg = make_config(preset)
    torch.manual_seed(0)
    model = build_model(cfg, 20, -40.0, 20.0).eval()
    x = torch.randn(2, 1, cfg.n_mels, 96) * 8 - 45  # the model, on a shorter crop
    convs = ConvDtypes(model)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert convs.seen == {torch.float32, torch.bfloat16}  # the body did run in bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


@pytest.mark.parametrize("name", LOSSES)
def test_losses_inside_the_autocast_region_equal_float32(name):
    """fastai computes the loss inside autocast (on the float32 predictions MixedPrecision hands it)."""
    torch.manual_seed(0)
    pred, y = torch.randn(8, 6) * 3, (torch.rand(8, 6) < 0.3).float()
    loss = make_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = loss(pred, y)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, loss(pred, y))


def fit_one_epoch(setup, amp, tmp_path):
    data, _, store = setup
    cfg = make_config("kaggle-1h", sets=[*SMALL, f"amp={amp}"])
    hooks = []
    res, model = fit_fresh_model(cfg, len(data.classes), store, "cpu", tmp_path / amp, epochs=1, lr=1e-3, n_valid=8,
                                 label=f"amp {amp}", watch=lambda m: hooks.append(ConvDtypes(m)))
    return res, model, hooks[0].seen


def test_a_training_epoch_under_bfloat16_autocast_matches_float32(setup, tmp_path):
    """One epoch of kaggle-1h's model through the stage learner (its stage-2 mixing and SpecAugment on the batch)
    under CPU bfloat16 autocast: the convolutions really run in bfloat16, the master weights stay float32, and
    loss, metric and weights are close to float32's."""
    amp, amp_model, amp_seen = fit_one_epoch(setup, "bf16", tmp_path)
    ref, ref_model, ref_seen = fit_one_epoch(setup, "off", tmp_path)
    assert torch.bfloat16 in amp_seen and torch.bfloat16 not in ref_seen
    assert next(amp_model.parameters()).dtype == torch.float32
    assert amp.usable and amp.history[["train_loss", "valid_loss", "lwlrap"]].notna().all().all()
    for col, tol in (("train_loss", 0.05), ("valid_loss", 0.05)):
        assert abs(amp.history[col].iloc[0] - ref.history[col].iloc[0]) < tol * ref.history[col].iloc[0], col
    moved = [(a - b).abs().max().item() for a, b in zip(amp_model.parameters(), ref_model.parameters())]
    assert max(moved) < 1e-2 and all(np.isfinite(moved))


def test_throughput_measurement_runs_under_autocast(setup, monkeypatch):
    data, _, _ = setup
    cfg = make_config("kaggle-1h", sets=[*SMALL, "amp=bf16"])
    seen = []
    real = throughput.build_model
    monkeypatch.setattr(throughput, "build_model", lambda *a, **k: seen.append(ConvDtypes(m := real(*a, **k))) or m)
    tp = throughput.measure_throughput(cfg, len(data.classes), "cpu", runs=2)
    assert torch.bfloat16 in seen[0].training and torch.bfloat16 in seen[0].eval  # training steps and inference
    assert 0 < tp.train_s_per_clip < 5 and 0 < tp.infer_s_per_window < 5


def test_whole_clip_prediction_under_bfloat16_matches_float32(setup):
    data, _, store = setup
    idx = np.flatnonzero(store.ok)[:10]
    torch.manual_seed(0)
    bf16, off = (make_config("kaggle-1h", sets=[*SMALL, f"amp={a}"]) for a in ("bf16", "off"))
    model = build_model(bf16, len(data.classes), -40.0, 20.0).eval()
    convs = ConvDtypes(model)
    amp = predict_clips(model, store, idx, bf16, "cpu")
    assert torch.bfloat16 in convs.seen
    ref = predict_clips(model, store, idx, off, "cpu")
    assert amp.dtype == np.float64 and np.isfinite(amp).all()
    np.testing.assert_allclose(amp, ref, atol=0.03)
    assert np.abs(amp - ref).max() > 0  # bfloat16 did round something: the two paths differ


# ---------------------------------------------------------------- a GPU this torch cannot run on

KAGGLE_TORCH_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


def test_unsupported_gpu_names_the_gpu_its_capability_and_the_fix():
    why = unsupported_gpu("Tesla P100-PCIE-16GB", (6, 0), KAGGLE_TORCH_ARCHS)
    assert "Tesla P100-PCIE-16GB" in why and "capability 6.0" in why and "GPU T4 x2" in why and "7.0 or newer" in why
    assert unsupported_gpu("Tesla T4", (7, 5), KAGGLE_TORCH_ARCHS) is None
    assert unsupported_gpu("future GPU", (12, 1), KAGGLE_TORCH_ARCHS) is None  # PTX of 12.0 runs on 12.x
    assert unsupported_gpu("L4", (8, 9), ["sm_80", "sm_86"]) is not None     # no sm_89 kernels and no PTX
    assert unsupported_gpu("L4", (8, 9), ["sm_80", "compute_80"]) is None
    assert unsupported_gpu("old", (6, 1), ["sm_70", "compute_70"]) is not None  # PTX only runs on newer GPUs


def fake_gpu(monkeypatch, name, capability, archs=KAGGLE_TORCH_ARCHS):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)


def test_check_device_stops_on_an_unsupported_gpu_only(monkeypatch):
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    with pytest.raises(SystemExit, match="P100.*capability 6.0.*GPU T4 x2"):
        check_device(torch.device("cuda"))
    check_device(torch.device("cpu"))
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    check_device(torch.device("cuda"))


def test_a_run_on_an_unsupported_gpu_writes_the_prior_submission_then_stops(tiny_data, tmp_path, monkeypatch):
    import run
    import pandas as pd
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    with pytest.raises(SystemExit, match="P100"):
        run.main(["--data-dir", str(tiny_data), "--work-dir", str(tmp_path), "--preset", "demo"])
    sub = pd.read_csv(tmp_path / "submission.csv")
    assert len(sub) == len(pd.read_csv(tiny_data / "sample_submission.csv"))
    assert not (tmp_path / "stage1").exists()  # stopped before any training
