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
from .world import SINGLE, World, default_devices, join

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
    timings: list = field(default_factory=list)   # {"stage", "planned_s", "actual_s", "ended_s"} per finished stage
    world: World = SINGLE                         # this process's rank among the run's (world.py)
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
        self.timings.append(dict(stage=stage, planned_s=self.budget.planned(stage), actual_s=round(seconds, 2),
                                 ended_s=round(self.elapsed(), 1)))

    def share_plan(self) -> None:
        """Rank 0's Budget on every rank, so that all plan alike from here (one rank: nothing to do)."""
        if self.world.size > 1:
            self.budget = self.world.broadcast(self.budget)

    def gather_timings(self) -> None:
        """Every rank's stage timings in the order they ended: rank 0's, and the stages only another rank ran
        (its folds), named with that rank."""
        ranks = self.world.gather(self.timings)
        mine = {t["stage"] for t in ranks[0]}
        others = [dict(t, stage=f"{t['stage']} (rank {r})") for r, rows in enumerate(ranks[1:], 1) for t in rows
                  if t["stage"] not in mine]
        self.timings = sorted(ranks[0] + others, key=lambda t: t["ended_s"])

    def save_config(self, cfg: Config | None = None, **extra) -> None:
        """config.json: the settings (the requested ones, or those a step ran with: `cfg`), the plan the budget
        made of them, and what ran (rank 0 writes it)."""
        if not self.world.is_main:
            return
        record = dict(preset=self.preset, data_dir=str(self.data_dir), settings=(cfg or self.cfg).to_dict(),
                      plan=self.budget.plan.to_dict(), devices=self.world.size, **extra)
        atomic_write_text(self.work_dir / "config.json", json.dumps(record, indent=2, default=str) + "\n")

    def timing_table(self) -> str:
        rows = [f"{'stage':<24}{'planned':>10}{'actual':>10}"]
        for t in self.timings:
            planned = "-" if t["planned_s"] is None else f"{t['planned_s']:.0f}s"
            rows.append(f"{t['stage']:<24}{planned:>10}{t['actual_s']:>9.0f}s")
        rows.append(f"{'total (from start)':<24}{'':>10}{self.elapsed():>9.0f}s")
        return "\n".join(rows)


def setup_logging(log_file: Path | None = None, world: World = SINGLE) -> None:
    """INFO lines with wall-clock offsets to stderr and, when given, to the run's log file; with several ranks
    each line names its rank."""
    logger = logging.getLogger("fattag")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    tag = f"[rank {world.rank}] " if world.size > 1 else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(message)s", "%H:%M:%S")
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


def resolve_data(args) -> tuple[Path, bool]:
    """The data folder (Kaggle's, `--data-dir`, or the demo data, generated on first use) and whether it is the
    demo."""
    data_dir = find_data_dir(args.data_dir)
    if data_dir is not None:
        return Path(data_dir), False
    from .demo import make_demo_dataset
    log.info("no --data-dir and no Kaggle input: using the synthetic demo dataset")
    return Path(make_demo_dataset(seed=42)), True


def requested_config(args, is_demo: bool) -> tuple[str, Config]:
    """The preset and the recipe the command line asks for; a bad --set ends the run with one line naming it."""
    preset = args.preset or default_preset(is_demo)
    overrides = {"seed": args.seed}
    for name in ("folds",):
        overrides[name] = getattr(args, name, None)
    if getattr(args, "time_budget", None) is not None:
        overrides["time_budget"] = parse_duration(args.time_budget)
    if getattr(args, "segments", None) is not None:
        overrides["tag_segments"] = args.segments
    try:
        return preset, make_config(preset, overrides, args.sets)
    except ValueError as e:   # a bad --set: one line naming the setting, not a traceback
        raise SystemExit(f"run.py: error: {e}") from None


def devices_asked(args) -> int:
    """--devices, or by default every visible CUDA device (one process on the CPU)."""
    return args.devices if getattr(args, "devices", None) else default_devices()


def check_before_spawn(args) -> None:
    """What the ranks would each find wrong, found once before they start: the data folder (the demo data is made
    here, not by N ranks at once) and the settings."""
    setup_logging()
    _, is_demo = resolve_data(args)
    requested_config(args, is_demo)


def open_work_dir(args, name: str, world: World = SINGLE) -> Path:
    """The folder for every output of the run: --work-dir, else /kaggle/working on Kaggle, else runs/<name>;
    made if missing, with the log file there from now on."""
    if args.work_dir:
        work_dir = Path(args.work_dir)
    elif Path(KAGGLE_WORK_DIR).is_dir():
        work_dir = Path(KAGGLE_WORK_DIR)
    else:
        work_dir = Path("runs") / name
    work_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(work_dir / "log.txt", world)
    return work_dir


def open_run(args) -> Run:
    """Resolve where data comes from (Kaggle, a folder, or the generated demo), the preset, the work folder and
    this process's rank and device."""
    world = join(devices_asked(args))
    setup_logging(world=world)
    data_dir, is_demo = resolve_data(args)
    preset, cfg = requested_config(args, is_demo)
    work_dir = open_work_dir(args, preset, world)
    device = world.device()
    log.info("data %s%s | preset %s | work dir %s | device %s%s%s", data_dir, " (demo)" if is_demo else "", preset,
             work_dir, device, f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
             f" | {world.describe()}" if world.size > 1 else "")
    if getattr(args, "mode", "train") == "train":   # DCASE's rules forbid training on test audio (docs/kaggle.md)
        log.info("test audio: %s", "trained on in the pseudo-label round (train_on_test=true)"
                 if cfg.test_round_epochs > 0 else "kept out of training (" + (
                     "train_on_test=false)" if not cfg.train_on_test else "no pseudo-label round)"))
    if world.size > 1 and getattr(args, "devices", None) not in (None, world.size):
        log.warning("--devices %s ignored: torchrun started %d ranks", args.devices, world.size)
    return Run(cfg, preset, data_dir, work_dir, device, is_demo, explicit=parse_sets(args.sets), world=world)


def open_tag(args) -> tuple[Config, dict, Path]:
    """The tag mode's settings (the preset a run on real data gets here, then --set), the values given with --set
    and its work folder (default runs/tag), with the log file there; no dataset is read."""
    setup_logging()
    _, cfg = requested_config(args, is_demo=False)
    return cfg, parse_sets(args.sets), open_work_dir(args, "tag")
