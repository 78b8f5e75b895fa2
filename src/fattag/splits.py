"""The splits training draws from: the curated folds, holdouts, and the clips each stage tops its set up with.

`TrainingData` holds the decoded sets, the fold id of every curated clip and the noisy clips training may use; the
steps (train.py, select.py, pseudo.py) take their training and validation clips from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import Config
from .features import Clips, MelStore, store_stats
from .stages import holdout_size, top_up_size


def make_folds(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id per clip, stratified by each clip's rarest label so that every class is spread over all folds."""
    n = len(targets)
    if k < 2 or k > n:
        raise ValueError(f"folds must be between 2 and the number of clips ({n}), got {k}")
    counts = targets.sum(0)
    rarity = np.where(targets > 0, counts[None, :], np.inf)
    key = rarity.argmin(1)  # rarest label of each clip
    rng = np.random.default_rng(seed)
    folds = np.empty(n, dtype=np.int64)
    offset = 0
    for label in np.unique(key):
        members = rng.permutation(np.flatnonzero(key == label))
        folds[members] = (offset + np.arange(len(members))) % k
        offset += len(members)  # continue the round-robin so small groups do not all start at fold 0
    return folds



def holdout_split(indices: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, holdout) split of the given clip indices; the holdout has at least one clip."""
    perm = np.random.default_rng(seed).permutation(indices)
    n_hold = holdout_size(len(perm), share)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])



@dataclass
class TrainingData:
    """What both stages train from: the decoded sets, the class vocabulary, the curated folds."""
    classes: list[str]
    curated: MelStore
    noisy: MelStore | None
    folds: np.ndarray            # fold id per curated clip (-1: could not be decoded)
    stats: tuple[float, float]   # mean and std of the curated log-mels: the model's input normalisation
    noisy_pool: np.ndarray       # the noisy clips training may use: every decodable one, or those selection kept

    @classmethod
    def make(cls, classes: list[str], curated: MelStore, noisy: MelStore | None, cfg: Config) -> TrainingData:
        ok = np.flatnonzero(curated.ok)
        folds = np.full(len(curated.table), -1, dtype=np.int64)
        folds[ok] = make_folds(curated.table.targets[ok], cfg.folds, cfg.seed)
        pool = np.flatnonzero(noisy.ok) if noisy is not None else np.zeros(0, dtype=np.int64)
        return cls(list(classes), curated, noisy, folds, store_stats(curated, seed=cfg.seed), pool)

    def fold(self, k: int) -> tuple[Clips, Clips]:
        """(training clips, validation clips) of fold k: every decodable curated clip is in exactly one of them."""
        return (Clips(self.curated, np.flatnonzero((self.folds >= 0) & (self.folds != k))),
                Clips(self.curated, np.flatnonzero(self.folds == k)))

    def fold_training(self, k: int, share: float, seed: int) -> tuple[list[Clips], Clips]:
        """Stage 2's (training sets, validation clips) of fold k: the other folds' clips, topped up with noisy clips
        so that they are `share` of the training items."""
        train, valid = self.fold(k)
        return [train, *self.noisy_top_up(len(train), share, seed)], valid

    def noisy_top_up(self, n_curated: int, share: float, seed: int) -> list[Clips]:
        """Noisy clips to add to a stage-2 training set of `n_curated` clips so that they are `share` of it."""
        return top_up(self.noisy, self.noisy_pool, n_curated, share, seed)

    def curated_top_up(self, n_noisy: int, share: float, seed: int) -> list[Clips]:
        """Curated clips to add to stage 1's `n_noisy` training clips so that they are `share` of the items (at
        most every decodable curated clip). Stage 1 then hears every fold's clean clips, so stage 2's fold scores
        and the OOF predictions over-promise (realdev everyday: OOF 1.000)."""
        return top_up(self.curated, np.flatnonzero(self.curated.ok), n_noisy, share, seed)


def top_up(store: MelStore | None, pool: np.ndarray, n_base: int, share: float, seed: int) -> list[Clips]:
    """Clips of `pool` (indices into `store`) to add to a training set of `n_base` clips so that they are `share` of
    the items, capped at the whole pool; drawn without replacement, seeded. [] when there is nothing to add."""
    if share <= 0 or store is None or not len(pool):
        return []
    n = top_up_size(n_base, share, len(pool))
    return [Clips(store, np.sort(np.random.default_rng(seed).choice(pool, n, replace=False)))]

