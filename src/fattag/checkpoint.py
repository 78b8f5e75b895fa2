"""Everything a restart trusts on disk: atomic writes, model checkpoints, and each stage's resume state.

A stage folder (`stage1/`, `fold{k}/`) holds, while it trains, `last.pth` (model + optimiser after the last
finished epoch), `best.pth` (the best epoch's weights) and `progress.json`; when it is done, `model.pth` (best
weights + the metadata prediction needs) and `history.csv`, and the resume files go. Every file is written to a
temporary name and renamed, so a kill never leaves a half-written file that a restart would read.

Both files also record the stage's recipe (`weights.stage_recipe`): a later run in the same work dir
reuses or resumes a stage only when its own recipe is the same, and trains it again (with a warning naming the
differences) when it is not, so changed settings never silently come back with old weights.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .config import upgrade_settings

log = logging.getLogger("fattag")


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_torch_save(obj, path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def cpu_state(model: torch.nn.Module) -> dict:
    """A detached CPU copy of the model's weights (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(path, model: torch.nn.Module, meta: dict) -> Path:
    return atomic_torch_save({"meta": meta, "state_dict": cpu_state(model)}, path)


def load_checkpoint(path) -> tuple[dict, dict]:
    """(meta, state_dict) of a model.pth."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["meta"], ckpt["state_dict"]


@dataclass
class Resume:
    """Where an interrupted stage stopped: continue after `epochs_done` of `epochs`, with its best so far."""
    epochs_done: int = 0
    epochs: int = 0
    best_score: float = float("-inf")
    best_epoch: int = -1            # 0-based; -1 when no epoch was usable yet
    best_state: dict | None = None
    history: list = field(default_factory=list)
    last: dict | None = None        # {"model": state_dict, "opt": optimiser state, ...} after epochs_done


class StageDir:
    """One stage's folder: finished-stage reuse, per-epoch resume files, and the final model, all guarded by the
    stage's `recipe` (a dict of the settings its weights depend on)."""

    def __init__(self, path, recipe: dict | None = None):
        self.path = Path(path)
        self.recipe = json.loads(json.dumps(recipe or {}, default=str))  # as it reads back from disk
        self.model_file = self.path / "model.pth"
        self.last_file, self.best_file = self.path / "last.pth", self.path / "best.pth"
        self.progress_file = self.path / "progress.json"

    def same_recipe(self, saved: dict | None, what: str) -> bool:
        """True when `saved` (the recipe stored with `what`, under today's setting names) is this run's; else a
        warning that names the changes."""
        saved = upgrade_settings(saved or {})
        if saved == self.recipe:
            return True
        changed = sorted(k for k in set(saved) | set(self.recipe) if saved.get(k) != self.recipe.get(k))
        shown = ", ".join(f"{k} {saved.get(k, '?')!r} -> {self.recipe.get(k, '?')!r}" for k in changed[:6])
        log.warning("%s: the saved %s was trained with other settings (%s%s); training it again", self.path.name,
                    what, shown or "no recipe recorded", ", ..." if len(changed) > 6 else "")
        return False

    def finished(self) -> tuple[dict, dict] | None:
        """(meta, state_dict) of a stage that an earlier run with the same recipe finished (same --work-dir)."""
        if not self.model_file.exists():
            return None
        meta, state = load_checkpoint(self.model_file)
        if not self.same_recipe(meta.get("recipe"), "model"):
            return None
        log.info("%s: already finished, reusing its weights", self.path.name)
        return meta, state

    def resume(self) -> Resume:
        """The state of an interrupted stage with the same recipe, or a fresh Resume when there is none (or it is
        incomplete, or from other settings)."""
        try:
            p = json.loads(self.progress_file.read_text())
            if not self.last_file.exists() or (p["best_epoch"] >= 0 and not self.best_file.exists()):
                return Resume()
            if not self.same_recipe(p.get("recipe"), "progress"):
                return Resume()
            best = torch.load(self.best_file, map_location="cpu", weights_only=True) if p["best_epoch"] >= 0 else None
            last = torch.load(self.last_file, map_location="cpu", weights_only=False)
            return Resume(p["epochs_done"], p["epochs"], p["best_score"], p["best_epoch"], best, p["history"], last)
        except (OSError, ValueError, KeyError):
            return Resume()

    def save_epoch(self, state: Resume, model: torch.nn.Module, opt_state: dict, new_best: bool, **extra) -> None:
        """After a finished epoch: best weights (when they changed), model + optimiser (+ `extra` states), then the
        progress."""
        if new_best:
            atomic_torch_save(state.best_state, self.best_file)
        atomic_torch_save({"model": model.state_dict(), "opt": opt_state, **extra}, self.last_file)
        atomic_write_text(self.progress_file, json.dumps(dict(
            epochs_done=state.epochs_done, epochs=state.epochs, best_score=state.best_score,
            best_epoch=state.best_epoch, history=state.history, recipe=self.recipe)))

    def finish(self, model: torch.nn.Module, meta: dict, history: pd.DataFrame) -> None:
        """The best weights become model.pth (which marks the stage done); the resume files go."""
        atomic_write(self.path / "history.csv", lambda tmp: history.to_csv(tmp, index=False))
        save_checkpoint(self.model_file, model, {**meta, "recipe": self.recipe})
        for f in (self.last_file, self.best_file, self.progress_file):
            f.unlink(missing_ok=True)
