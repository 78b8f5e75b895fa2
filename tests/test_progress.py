import io
import logging
import sys

import numpy as np
import pytest

from fattag.audio import write_wav
from fattag.data import ClipTable, iter_decoded
from fattag.progress import Progress, fmt_seconds, progress


@pytest.fixture
def fattag_logger():
    """The `fattag` logger with no handlers of its own, restored afterwards (other tests may configure it)."""
    logger = logging.getLogger("fattag")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    for h in saved[0]:
        logger.removeHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = True
    yield logger
    for h in list(logger.handlers):
        logger.removeHandler(h)
    for h in saved[0]:
        logger.addHandler(h)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.mark.parametrize("seconds, text", [
    (0, "0.0s"), (12.34, "12.3s"), (59.9, "59.9s"), (59.97, "1m00s"), (185, "3m05s"), (3599.4, "59m59s"),
    (3720, "1h02m"), (26 * 3600 + 60, "26h01m"), (None, "?"), (float("nan"), "?"), (-1, "?"),
])
def test_fmt_seconds(seconds, text):
    assert fmt_seconds(seconds) == text


def test_plain_lines_go_to_stderr_without_carriage_returns(capsys, fattag_logger):
    bar = progress(range(5), desc="decode train_noisy", unit="clip", interval=0)
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(**{"MB/s": "1.5", "skipped": i})
    assert seen == list(range(5))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().split("\n")
    # a line per item (interval 0), and at 5/5 only the final line, not a periodic one too
    assert [line.split(" ", 3)[2] for line in lines] == [f"{k}/5" for k in range(1, 6)]
    assert lines[0].startswith("decode train_noisy: 1/5 clips (20%) ") and " clips/s, eta " in lines[0]
    final = lines[-1]
    assert final.startswith("decode train_noisy: 5/5 clips (100%) in ")
    assert final.endswith("MB/s=1.5, skipped=4")
    assert "eta" not in final


def test_lines_are_throttled_to_the_interval(capsys, fattag_logger):
    for _ in progress(range(2000), desc="fast", unit="clip"):  # default interval: 30 s
        pass
    lines = capsys.readouterr().err.strip().split("\n")
    assert lines == [lines[-1]] and lines[0].startswith("fast: 2000/2000 clips (100%) in ")


def test_lines_go_through_the_configured_logger(capsys, fattag_logger):
    stream = io.StringIO()  # not a TTY
    fattag_logger.addHandler(logging.StreamHandler(stream))
    bar = progress(iter(["a", "b", "c"]), total=3, desc="predict", unit="batch", interval=0)
    assert list(bar) == ["a", "b", "c"]
    text = stream.getvalue()
    assert "\r" not in text
    assert "predict: 2/3 batches (67%) " in text
    assert text.strip().split("\n")[-1].startswith("predict: 3/3 ")
    assert capsys.readouterr().err == ""  # logged once, not also printed


def test_unknown_total_and_early_stop(capsys, fattag_logger):
    for i in progress((x for x in range(10)), desc="gen", interval=0):
        if i == 2:
            break
    err = capsys.readouterr().err
    assert "gen: 1 it " in err and " it/s" in err and "eta" not in err
    assert err.strip().split("\n")[-1].startswith("gen: 2 it in ")  # final line written on abandon

    bar = progress(range(10), desc="part", unit="clip", interval=1000)
    for i in bar:
        if i == 3:
            break
    bar.close()
    bar.close()  # idempotent
    lines = capsys.readouterr().err.strip().split("\n")
    assert lines == [lines[0]] and lines[0].startswith("part: stopped at 3/10 clips (30%) in ")


def test_manual_updates_and_disable(capsys, fattag_logger):
    with Progress(total=4, desc="epochs", unit="epoch", interval=1000) as p:
        p.update(3)
        p.update()
    assert capsys.readouterr().err.startswith("epochs: 4/4 epochs (100%) in ")
    for _ in progress(range(3), desc="quiet", interval=0, disable=True):
        pass
    assert capsys.readouterr().err == ""


def test_tty_mode_uses_tqdm(monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True
    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    bar = progress(range(3), desc="bar", unit="clip")
    for _ in bar:
        bar.set_postfix(skipped=0)
    assert "bar" in fake.getvalue() and "3/3" in fake.getvalue()


def test_iter_decoded_reports_throughput_and_skips_in_plain_lines(tmp_path, capsys, fattag_logger):
    good = tmp_path / "good.wav"
    write_wav(good, 0.1 * np.sin(np.arange(800) / 5.0), 8000)
    (tmp_path / "empty.wav").write_bytes(b"")
    table = ClipTable("curated", ["good.wav", "empty.wav", "good2.wav"],
                      [good, tmp_path / "empty.wav", good], None)
    assert len(list(iter_decoded(table, 8000, workers=1, desc="decode curated"))) == 3
    err = capsys.readouterr().err
    assert "\r" not in err
    final = [line for line in err.split("\n") if line.startswith("decode curated: 3/3 clips (100%) in ")]
    assert len(final) == 1 and "clips/s" in final[0] and "MB/s=" in final[0] and "skipped=1" in final[0]
