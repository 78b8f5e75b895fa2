import numpy as np
import pytest
import torch
import torchaudio

from fattag.config import make_config
from fattag.data import ClipTable
from fattag.audio import write_wav
from fattag.features import (Clips, CropDataset, LogMel, WindowDataset, aggregate_windows, build_store, crop,
                             tile_to_length, window_starts)


@pytest.fixture
def cfg():
    return make_config("demo")


def test_logmel_matches_direct_torchaudio(cfg):
    wave = torch.randn(2, cfg.sample_rate) * 0.1
    ours = LogMel(cfg)(wave)
    for i in range(2):  # each clip alone, straight from torchaudio, top_db relative to that clip's own peak
        spec = torchaudio.transforms.MelSpectrogram(cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length,
                                                    hop_length=cfg.hop_length, n_mels=cfg.n_mels, f_min=cfg.f_min,
                                                    f_max=cfg.f_max)(wave[i])
        db = torchaudio.functional.amplitude_to_DB(spec, 10.0, 1e-10, 0.0, top_db=None)
        db = torch.maximum(db, db.max() - cfg.top_db)
        torch.testing.assert_close(ours[i], db, rtol=1e-4, atol=1e-3)
    assert ours.shape == (2, cfg.n_mels, cfg.sample_rate // cfg.hop_length + 1)


def test_top_db_is_per_clip_not_per_batch(cfg):
    loud, quiet = torch.randn(cfg.sample_rate), torch.randn(cfg.sample_rate) * 1e-4
    both = LogMel(cfg)(torch.stack([loud, quiet]))
    alone = LogMel(cfg)(quiet[None])[0]
    torch.testing.assert_close(both[1], alone, rtol=1e-4, atol=1e-3)


def test_tile_to_length_repeats_short_clips():
    w = np.arange(3, dtype=np.float32)
    assert tile_to_length(w, 8).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    long = np.ones(10, np.float32)
    assert tile_to_length(long, 4) is long


def test_crop_pads_short_and_cuts_long():
    short = np.arange(3 * 2, dtype=np.float16).reshape(2, 3)
    out = crop(short, 7, 0)
    assert out.shape == (2, 7) and out[:, 3:6].tolist() == short.tolist()
    long = np.arange(2 * 100, dtype=np.float16).reshape(2, 100)
    assert crop(long, 10, 90).tolist() == long[:, 90:100].tolist()


@pytest.mark.parametrize("n,length,step", [(100, 30, 15), (31, 30, 15), (30, 30, 15), (5, 30, 15), (1000, 64, 7)])
def test_windows_cover_every_frame(n, length, step):
    starts = window_starts(n, length, step)
    covered = np.zeros(max(n, length), bool)
    for s in starts:
        assert 0 <= s and (s + length <= n or n <= length)
        covered[s:s + length] = True
    assert covered[:n].all()
    assert starts == sorted(set(starts))


def _store(cfg, tmp_path, seconds):
    paths = []
    for i, sec in enumerate(seconds):
        p = tmp_path / f"c{i}.wav"
        t = np.arange(int(sec * cfg.sample_rate)) / cfg.sample_rate
        write_wav(p, 0.3 * np.sin(2 * np.pi * 440 * (i + 1) * t), cfg.sample_rate)
        paths.append(p)
    targets = np.eye(len(seconds), dtype=np.float32)
    table = ClipTable("t", [p.name for p in paths], paths, targets)
    return build_store(table, cfg, "cpu", progress=False)


def test_store_short_and_long_clips(cfg, tmp_path):
    store = _store(cfg, tmp_path, [0.003, 0.3, 7.0])
    assert store.ok.all()
    for m in store.mels:
        assert m.dtype == np.float16 and m.shape[0] == cfg.n_mels and m.shape[1] >= cfg.crop_frames
    assert store.mels[2].shape[1] > 3 * cfg.crop_frames
    ds = CropDataset(Clips(store, [0, 1, 2]), cfg.crop_frames, seed=0)
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (1, cfg.n_mels, cfg.crop_frames) and y.sum() == 1
    win = WindowDataset(store, [0, 1, 2], cfg.crop_frames, 0.5)
    assert win.clip_of.tolist().count(2) == len(window_starts(store.mels[2].shape[1], cfg.crop_frames,
                                                                round(cfg.crop_frames * 0.5)))
    assert len(WindowDataset(store, [0, 1, 2], cfg.crop_frames, 0.5, center_only=True)) == 3


def test_aggregate_windows():
    p = torch.tensor([[0.2, 0.9], [0.4, 0.1], [0.6, 0.5]])
    clip_of = torch.tensor([0, 0, 1])
    assert torch.allclose(aggregate_windows(p, clip_of, 2, "mean"), torch.tensor([[0.3, 0.5], [0.6, 0.5]]))
    assert torch.allclose(aggregate_windows(p, clip_of, 2, "max"), torch.tensor([[0.4, 0.9], [0.6, 0.5]]))
    assert torch.allclose(aggregate_windows(p, clip_of, 2, "meanmax"), torch.tensor([[0.35, 0.7], [0.6, 0.5]]))


def test_store_builds_each_set_of_windows_once(cfg, tmp_path):
    store = _store(cfg, tmp_path, [0.3, 7.0, 3.0])
    win = store.windows([0, 1, 2], cfg.crop_frames, 0.5)
    assert store.windows(np.array([0, 1, 2]), cfg.crop_frames, 0.5) is win    # same clips and settings: cached
    direct = WindowDataset(store, [0, 1, 2], cfg.crop_frames, 0.5)
    assert win.clip_of.tolist() == direct.clip_of.tolist() and len(win) == len(direct)
    assert torch.equal(win[len(win) - 1][0], direct[len(direct) - 1][0])
    others = [store.windows([0, 1, 2], cfg.crop_frames, 0.25),          # another step
              store.windows([0, 1], cfg.crop_frames, 0.5),              # other clips
              store.windows([0, 1, 2], cfg.crop_frames // 2, 0.5),      # another window
              store.windows([0, 1, 2], cfg.crop_frames, 0.5, center_only=True)]
    assert all(o is not win for o in others) and len({id(o) for o in others}) == 4
    assert len(others[0]) > len(win) and len(others[1]) < len(win) and len(others[3]) == 3
    assert others[1].clip_of.max() == 1 and others[0] is store.windows([0, 1, 2], cfg.crop_frames, 0.25)
