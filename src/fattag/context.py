"""One run's context: resolved data folder, config, work folder, device, log file, the clock and its Budget.

The config is the recipe as requested and never changes during a run; what the budget allows of it is the
Budget's plan (budget.py), which the steps read. Each step returns its results; none are kept here.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budget import Budget
from .checkpoint import atomic_write_text
from .config import KAGGLE_WORK_DIR, Config, make_config, parse_duration, parse_sets
from .data import find_data_dir

log = logging.getLogger("fattag")


def process_start_time() -> float:
    """When this process started (Linux: from /proc), so that slow imports count against the budget too."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= time.time() - started < 7 * 24 * 3600:
            return started
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return time.time()  # elsewhere: this module's import, the nearest point we know


PROCESS_START = process_start_time()  # the time budget counts from here


@dataclass
class Run:
    cfg: Config                                   # the recipe as requested (preset, then --set)
    preset: str
    data_dir: Path
    work_dir: Path
    device: torch.device
    is_demo: bool = False
    started: float = PROCESS_START
    explicit: dict = field(default_factory=dict)  # the values given with --set (predict mode needs to know them)
    timings: list = field(default_factory=list)   # {"stage", "planned_s", "actual_s"} per finished stage
    budget: Budget = field(init=False)            # the time plan: without a deadline, the requested recipe

    def __post_init__(self):
        self.budget = Budget(self.cfg, self.deadline)

    @property
    def deadline(self) -> float | None:
        """Wall-clock time by which a submission must be on disk (budget minus safety margin), or None."""
        if not self.cfg.time_budget:
            return None
        return self.started + self.cfg.time_budget * (1 - self.cfg.safety_margin)

    def elapsed(self) -> float:
        return time.time() - self.started

    def record(self, stage: str, seconds: float) -> None:
        self.timings.append(dict(stage=stage, planned_s=self.budget.planned(stage), actual_s=round(seconds, 2)))

    def save_config(self, cfg: Config | None = None, **extra) -> None:
        """config.json: the settings (the requested ones, or those a step ran with: `cfg`), the plan the budget
        made of them, and what ran."""
        record = dict(preset=self.preset, data_dir=str(self.data_dir), settings=(cfg or self.cfg).to_dict(),
                      plan=self.budget.plan.to_dict(), **extra)
        atomic_write_text(self.work_dir / "config.json", json.dumps(record, indent=2, default=str) + "\n")

    def timing_table(self) -> str:
        rows = [f"{'stage':<24}{'planned':>10}{'actual':>10}"]
        for t in self.timings:
            planned = "-" if t["planned_s"] is None else f"{t['planned_s']:.0f}s"
            rows.append(f"{t['stage']:<24}{planned:>10}{t['actual_s']:>9.0f}s")
        rows.append(f"{'total (from start)':<24}{'':>10}{self.elapsed():>9.0f}s")
        return "\n".join(rows)


def setup_logging(log_file: Path | None = None) -> None:
    """INFO lines with wall-clock offsets to stderr and, when given, to the run's log file."""
    logger = logging.getLogger("fattag")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.propagate = False


def default_preset(is_demo: bool) -> str:
    """demo for the demo data; on real data kaggle-1h with a GPU, cpu without one."""
    if is_demo:
        return "demo"
    return "kaggle-1h" if torch.cuda.is_available() else "cpu"


def open_run(args) -> Run:
    """Resolve where data comes from (Kaggle, a folder, or the generated demo), the preset and the work folder."""
    data_dir = find_data_dir(args.data_dir)
    is_demo = data_dir is None
    if is_demo:
        from .demo import make_demo_dataset
        setup_logging()
        log.info("no --data-dir and no Kaggle input: using the synthetic demo dataset")
        data_dir = make_demo_dataset(seed=42)
    preset = args.preset or default_preset(is_demo)
    overrides = {"seed": args.seed}
    for name in ("folds",):
        overrides[name] = getattr(args, name, None)
    if getattr(args, "time_budget", None) is not None:
        overrides["time_budget"] = parse_duration(args.time_budget)
    try:
        cfg = make_config(preset, overrides, args.sets)
    except ValueError as e:   # a bad --set: one line naming the setting, not a traceback
        raise SystemExit(f"run.py: error: {e}") from None
    if args.work_dir:
        work_dir = Path(args.work_dir)
    elif Path(KAGGLE_WORK_DIR).is_dir():
        work_dir = Path(KAGGLE_WORK_DIR)
    else:
        work_dir = Path("runs") / preset
    work_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(work_dir / "log.txt")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log.info("data %s%s | preset %s | work dir %s | device %s%s", data_dir, " (demo)" if is_demo else "", preset,
             work_dir, device, f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else "")
    return Run(cfg, preset, Path(data_dir), work_dir, device, is_demo, explicit=parse_sets(args.sets))
