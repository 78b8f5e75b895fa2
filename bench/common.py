"""Shared helpers of the bench scripts: machine info, timing, tables, the JSON result line, synthetic WAVs.

The bench scripts are benchmarks, not tests: each prints the machine first, then its figures as an aligned
plain-text table, then exactly one JSON line (the last line of its output) that can be pasted into README.

Synthetic clips are written with the standard library's `wave` module (16-bit mono PCM, the FAT2019 format) so
that generating them needs numpy only: `memory.py` generates in a child process whose memory does not count.
Run `python bench/common.py gen DIR --clips N --seconds S` to generate a folder by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import wave
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO / "src") not in sys.path:  # `python bench/x.py` from a checkout, without installing the package
    sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

GB = 1e9
MB = 1e6

# FAT2019 sizes (from /work/shared/FAT2019.md; mean clip length = hours / clips).
FAT2019 = {
    "curated": dict(clips=4970, hours=10.5),
    "noisy": dict(clips=19815, hours=80.0),
    "test": dict(clips=4481, hours=12.9),   # public 1120 + private 3361: the stage-2 test set
}


def cache_root() -> Path:
    """Where generated WAVs are kept between runs (FATTAG_BENCH_DIR, else <tmp>/fattag-bench)."""
    return Path(os.environ.get("FATTAG_BENCH_DIR") or Path(tempfile.gettempdir()) / "fattag-bench")


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pick_device(threads: int | None = None):
    """CUDA when present (the scripts must run on a GPU machine too), else CPU. torch's CPU thread count is left
    at its default, as a run leaves it, unless `threads` says otherwise."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine_info(device=None) -> dict:
    info = {"cpu": cpu_model(), "cores": usable_cores(), "python": platform.python_version()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # > cores: other jobs share the CPU, timings suffer
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["ram_gb"] = round(int(f.readline().split()[1]) * 1024 / GB, 1)
    except (OSError, ValueError, IndexError):
        pass
    if "torch" in sys.modules or device is not None:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if device is not None:
        info["device"] = str(device)
    return info


def print_machine(title: str, device=None, notes: str = "") -> dict:
    info = machine_info(device)
    gpu = info.get("gpu") or "none"
    print(f"== {title}")
    print(f"machine: {info['cpu']} | {info['cores']} cores | RAM {info.get('ram_gb', '?')} GB | GPU {gpu}"
          f" | torch {info.get('torch', '-')} ({info.get('torch_threads', '-')} threads)"
          f"{' | device ' + info['device'] if 'device' in info else ''}"
          f" | load avg {info.get('load_avg_1m', '?')}")
    if notes:
        print(notes)
    sys.stdout.flush()
    return info


# ---------------------------------------------------------------- timing


def sync(device=None) -> None:
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch
        torch.cuda.synchronize()


def best_of(fn, repeat: int = 3, warmup: int = 1, device=None) -> tuple[float, list[float]]:
    """Run `fn` `warmup` times untimed, then `repeat` times timed; return (best seconds, all timings).

    The best of several runs is the figure to quote on a machine shared with other jobs: interference only ever
    makes a run slower, so the minimum is the closest to the machine's own speed.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), times


def best_of_cpu(fn, repeat: int = 3, warmup: int = 1, device=None) -> tuple[float, float, list[float]]:
    """(best wall s, best process CPU s, all wall timings) over `repeat` timed runs after `warmup` untimed ones.

    CPU seconds (all threads of this process) are much less disturbed by other jobs than wall time: with one
    torch thread, work per CPU-second estimates what an idle core would do.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    walls, cpus = [], []
    for _ in range(max(1, repeat)):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), walls


# ---------------------------------------------------------------- output


def _cell(v) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01 or v == 0:
            return f"{v:.2f}"
        return f"{v:.2e}"
    return "-" if v is None else str(v)


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain-text table: text columns left-aligned, numeric columns right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
               for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def print_table(headers, rows, title: str | None = None) -> None:
    if title:
        print(f"\n{title}")
    print(format_table(headers, rows))
    sys.stdout.flush()


def _round(obj, digits: int = 4):
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, digits) for v in obj]
    return obj


def print_json(bench: str, machine: dict, results: dict, **extra) -> dict:
    """The single JSON line that ends every bench script's output (floats to 4 significant digits)."""
    record = _round({"bench": bench, "machine": machine, **extra, "results": results})
    print(json.dumps(record, separators=(",", ":"), default=str))
    sys.stdout.flush()
    return record


# ---------------------------------------------------------------- memory


def proc_status_kb(field: str) -> int | None:
    """A /proc/self/status value in kB (VmRSS: now, VmHWM: peak); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM, else ru_maxrss (kB on Linux)."""
    hwm = proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def rss_bytes() -> int | None:
    kb = proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


# ---------------------------------------------------------------- synthetic audio


def synth_clip(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """Noise plus a few tones with slow envelopes and a short silent lead-in (so trimming has work): float32."""
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * sample_rate)))
    t = np.arange(n, dtype=np.float32) / sample_rate
    x = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
    for _ in range(3):
        freq = rng.uniform(80.0, min(8000.0, sample_rate / 2.5))
        env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 2.0) * t + rng.uniform(0, 2 * np.pi))
        x += np.float32(rng.uniform(0.05, 0.25)) * env.astype(np.float32) * np.sin(
            2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    lead = min(n // 10, int(0.2 * sample_rate))
    x[:lead] = 0.0
    return x


def write_pcm16(path: Path, x: np.ndarray, sample_rate: int) -> None:
    ints = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(ints.tobytes())
    tmp.replace(path)


def make_wavs(n: int, seconds: float = 15.0, sample_rate: int = 44100, folder: Path | None = None,
              seed: int = 0) -> list[Path]:
    """`n` synthetic 16-bit mono clips of `seconds` each, cached: existing files of the right size are reused."""
    folder = Path(folder) if folder else cache_root() / f"wav_{sample_rate}hz_{seconds:g}s"
    folder.mkdir(parents=True, exist_ok=True)
    expected = 44 + 2 * max(1, int(round(seconds * sample_rate)))
    paths = []
    for i in range(n):
        path = folder / f"clip_{i:05d}.wav"
        if not (path.is_file() and path.stat().st_size == expected):
            write_pcm16(path, synth_clip(seconds, sample_rate, seed * 1_000_003 + i), sample_rate)
        paths.append(path)
    return paths


def make_wavs_in_child(n: int, seconds: float, sample_rate: int, folder: Path | None = None) -> list[Path]:
    """make_wavs in a separate process, so the caller's peak RSS does not include the generation."""
    import subprocess
    cmd = [sys.executable, str(Path(__file__).resolve()), "gen", "--clips", str(n), "--seconds", str(seconds),
           "--sample-rate", str(sample_rate)]
    if folder:
        cmd += ["--folder", str(folder)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    root = Path(out[-1])
    return [root / f"clip_{i:05d}.wav" for i in range(n)]


def generated_clips(make, n: int, seconds: float, sample_rate: int) -> tuple[list[Path], object, int, float]:
    """`make(n, seconds, sample_rate)` (make_wavs or make_wavs_in_child), timed: (paths, their ClipTable, total WAV
    bytes, seconds it took)."""
    t0 = time.perf_counter()
    paths = make(n, seconds, sample_rate)
    return paths, clip_table(paths), sum(p.stat().st_size for p in paths), time.perf_counter() - t0


def clip_table(paths: list[Path], name: str = "bench", n_classes: int = 80, seed: int = 0):
    """A fattag ClipTable over generated WAVs with random multi-hot targets (no CSV needed)."""
    from fattag.data import ClipTable
    rng = np.random.default_rng(seed)
    targets = np.zeros((len(paths), n_classes), dtype=np.float32)
    targets[np.arange(len(paths)), rng.integers(0, n_classes, len(paths))] = 1.0
    return ClipTable(name, [p.name for p in paths], list(paths), targets)


def base_parser(description: str, default_preset: str = "kaggle-1h") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default=default_preset, help=f"fattag preset (default {default_preset})")
    p.add_argument("--quick", action="store_true", help="small sizes and fewer repetitions (CPU, smoke tests)")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions; the best is reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own, as a run uses)")
    return p


def _gen_main(argv=None) -> int:
    p = argparse.ArgumentParser(description="generate cached synthetic 16-bit WAV clips")
    p.add_argument("cmd", choices=["gen"])
    p.add_argument("--clips", type=int, required=True)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--sample-rate", type=int, default=44100)
    p.add_argument("--folder", default=None)
    a = p.parse_args(argv)
    paths = make_wavs(a.clips, a.seconds, a.sample_rate, Path(a.folder) if a.folder else None)
    print(paths[0].parent if paths else (a.folder or ""))
    return 0


if __name__ == "__main__":
    sys.exit(_gen_main())
