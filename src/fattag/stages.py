"""What the steps and the cost model agree on: the stages' names, the sizes both count, which rank trains a fold.

The steps (train.py, select.py, pseudo.py) record their timings under these names and the plan (cost.py) prices
its rows under the same ones, so that the timing table sets plan against actual; a holdout or a top-up is as large
in the plan as in training. Nothing here imports the rest of the project.
"""
from __future__ import annotations

STAGE1 = "stage 1 (noisy)"            # stage 1 on the noisy set
SELECT_STAGE = "select noisy clips"   # noisy-clip selection, before stage 1
ROUND_STAGE = "pseudo-label round"    # the test pseudo-label round, after stage 2
SELECT_HOLDOUT = 0.1                  # share of the curated clips that watch the selection's scorer


def fold_stage(k: int) -> str:
    """Stage 2 on fold k."""
    return f"fold {k}"


def holdout_size(n: int, share: float) -> int:
    """Clips of n that a holdout of `share` takes: at least one (none of none)."""
    return max(1, int(round(n * share))) if n else 0


def top_up_size(n_base: int, share: float, available: int) -> int:
    """How many clips of the other set make them `share` of a training set of `n_base` clips, at most `available`
    (both stages top up: stage 1 with curated clips, stage 2 with noisy ones)."""
    return min(available, int(round(n_base * share / (1 - share))))


# ---------------------------------------------------------------- folds over the ranks


def fold_rank(k: int, devices: int) -> int:
    """The rank that trains fold k: the folds are dealt out round-robin."""
    return k % devices


def fold_round(k: int, devices: int) -> int:
    """The round fold k trains in: the ranks train `devices` folds side by side, round after round."""
    return k // devices


def round_start(k: int, devices: int) -> int:
    """The first fold of fold k's round: the folds before it trained in earlier rounds."""
    return fold_round(k, devices) * devices


def rounds(n: int, devices: int) -> int:
    """Rounds it takes `devices` ranks to do `n` folds (or models) side by side."""
    return -(-n // devices)
