"""Several devices: one process per device in one torch.distributed group, and the few collectives the run needs.

`--devices N` spawns N ranks (torch.multiprocessing with spawn: CUDA cannot fork), each running the whole pipeline
on its own device (cuda:r, or its share of the CPU cores), in a process group (NCCL on CUDA, gloo on the CPU).
Under torchrun (RANK, WORLD_SIZE set) the ranks join torchrun's group instead, so the same code runs on several
nodes (with a work dir every node sees). Stage 1 trains data-parallel over the ranks (dataparallel.py); stage 2
and the pseudo-label round train whole folds per rank (`World.mine`), and their predictions are gathered
(`World.gather`); only rank 0 writes the shared files. fastai reads WORLD_SIZE/RANK from the environment and, with
a world above 1, all-gathers every batch's predictions, which would hang ranks training different folds: it
never sees the group.

Faults: a rank that raises or dies makes the parent end every other rank (torch's ProcessContext.join: SIGTERM,
then SIGKILL after a grace period) and exit with one line naming the rank and what it was doing; a rank dies with
its parent. A collective that waits past GROUP_TIMEOUT_S fails, as a last guard under torchrun.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .stages import fold_rank

log = logging.getLogger("fattag")
GROUP_TIMEOUT_S = 3600   # longer than any step one rank does alone (rank 0 decoding FAT2019's stores)
GRACE_S = 5              # a failed run's other ranks get this long to stop on their own before they are ended
_spawned: tuple | None = None   # (rank, size, init_method, status_dir) of a rank this process was spawned as


@dataclass(frozen=True)
class World:
    """This process's place among the run's ranks. With one rank every collective returns its input."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run's shared files (submission, oof.csv, scores, config, report)."""
        return self.rank == 0

    def mine(self, items) -> list:
        """This rank's share of `items`: the k-th item where fold k trains (stages.fold_rank)."""
        return [item for k, item in enumerate(items) if fold_rank(k, self.size) == self.rank]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank: decisions taken from one clock (deadlines, re-plans) must agree."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def device(self) -> torch.device:
        """This rank's device: cuda:local_rank (ranks share GPUs round-robin when there are fewer), else the CPU."""
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if self.size == 1:
            return torch.device("cuda")   # one process: torch's current CUDA device, as without ranks
        index = self.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


SINGLE = World()


def default_devices() -> int:
    """Every visible CUDA device; one process on the CPU (bench/devices.py measured 2 ranks on 2 cores)."""
    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def torchrun_size() -> int:
    """The world size torchrun (or any launcher setting RANK/WORLD_SIZE) started this process in; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def should_spawn(devices: int) -> bool:
    """Whether this process must start the ranks: several asked for, and it is neither a rank nor under torchrun."""
    return devices > 1 and _spawned is None and torchrun_size() == 1


def join(devices: int) -> World:
    """This process's World: a spawned rank joins its parent's group, a torchrun rank torchrun's; else one rank."""
    if _spawned is not None:
        rank, size, init, _ = _spawned
        local = rank
    elif torchrun_size() > 1:
        rank, size, init = int(os.environ["RANK"]), torchrun_size(), "env://"
        local = int(os.environ.get("LOCAL_RANK", rank))
        os.environ["WORLD_SIZE"], os.environ["RANK"] = "1", "0"   # fastai must see one process (module docstring)
    else:
        return SINGLE
    world = World(rank, size, local)
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= size else "gloo"
    world.device()   # NCCL's collectives need the rank's device selected first
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    atexit.register(leave)
    return world


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- what a rank is doing (for the error line)


def doing(step: str) -> None:
    """Note what this rank is doing now; if it dies, the parent's error line names it."""
    if _spawned is not None:
        try:
            (Path(_spawned[3]) / f"rank{_spawned[0]}.step").write_text(step)
        except OSError:
            pass


def _step_of(status_dir: str, rank: int) -> str:
    try:
        return (Path(status_dir) / f"rank{rank}.step").read_text() or "start-up"
    except OSError:
        return "start-up"


# ---------------------------------------------------------------- starting the ranks


def spawn(entry, argv, defaults, devices: int) -> int:
    """Run `entry(argv, defaults)` (run.main) in `devices` spawned ranks; wait for all, or end all when one fails.
    Returns 0, or raises SystemExit with one line naming the failed rank and its step."""
    status_dir = tempfile.mkdtemp(prefix="fattag-ranks-")
    init = f"file://{status_dir}/group"
    threads = max(1, torch.get_num_threads() // devices)   # the CPU cores split between the ranks
    log.info("starting %d ranks (%s, %d thread(s) each)", devices,
             "one CUDA device each" if torch.cuda.is_available() else "CPU processes", threads)
    ctx = torch.multiprocessing.start_processes(_rank_main, args=(entry, argv, defaults, devices, init, status_dir,
                                                                  threads), nprocs=devices, join=False,
                                                start_method="spawn")
    try:
        while not ctx.join(grace_period=GRACE_S):
            pass
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException) as e:
        raise SystemExit(f"run.py: {first_failure(ctx.processes, status_dir, e)}") from None
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)
    return 0


def first_failure(processes, status_dir: str, error: Exception) -> str:
    """The line that names what went wrong first. A rank's failure makes the others fail in their next collective,
    and torch reports whichever exit it noticed first: a rank killed by a signal other than the SIGTERM that ended
    the others, with no failure of its own recorded, died first; else the earliest recorded failure."""
    for rank, proc in enumerate(processes):
        code = proc.exitcode
        if (code is not None and code < 0 and -code != signal.SIGTERM
                and not (Path(status_dir) / f"rank{rank}.failed").exists()):
            return (f"rank {rank} died (signal {signal.Signals(-code).name}) during {_step_of(status_dir, rank)}; "
                    f"the other ranks were stopped")
    records = []
    for path in Path(status_dir).glob("rank*.failed"):
        at, _, line = path.read_text().partition("\t")
        records.append((float(at), line))
    if records:
        return min(records)[1]
    return [line for line in str(error).splitlines() if line.strip()][-1]


def _rank_main(rank, entry, argv, defaults, size, init, status_dir, threads) -> None:
    """A spawned rank: die with the parent, take a share of the cores, run the pipeline, report what failed."""
    global _spawned
    _die_with_parent()
    torch.set_num_threads(threads)
    _spawned = (rank, size, init, status_dir)
    try:
        rc = entry(argv, defaults)
    except SystemExit as e:
        if e.code in (None, 0):
            return
        _failed(status_dir, rank, f"rank {rank} stopped during {_step_of(status_dir, rank)}: {e.code}")
        raise
    except Exception as e:
        log.exception("rank %d failed during %s", rank, _step_of(status_dir, rank))
        _failed(status_dir, rank, f"rank {rank} failed during {_step_of(status_dir, rank)}: {type(e).__name__}: {e}")
        raise
    finally:
        leave()
    if rc:
        _failed(status_dir, rank, f"rank {rank} ended with exit code {rc}")
        raise SystemExit(rc)


def _failed(status_dir: str, rank: int, line: str) -> None:
    """Record when and how this rank failed (first_failure picks the earliest), before the group is left."""
    (Path(status_dir) / f"rank{rank}.failed").write_text(f"{time.time()}\t{line.splitlines()[0] if line else ''}")


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed run leaves no rank behind."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
