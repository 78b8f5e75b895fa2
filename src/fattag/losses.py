"""Multi-label losses on logits (B, C) against targets in [0, 1] (B, C); chosen per stage by name in the config.

- bce:   binary cross-entropy, the default.
- focal: BCE weighted by (1 - p_t)^gamma, so confident easy labels count less (6th place FAT2019: about even).
- lsep:  a pairwise ranking loss, log(1 + sum over (positive i, negative j) of exp(s_j - s_i)); it optimises the
         order of the scores, which is what lwlrap measures (3rd place FAT2019: +0.015 CV, faster convergence).
- lsoft: soft bootstrapping for noisy labels: BCE against beta * label + (1 - beta) * the model's own (detached)
         prediction, so a confidently contradicted noisy label is trusted less (1st place FAT2019, beta 0.7).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.losses import BCEWithLogitsLossFlat
from torch import nn

LOSSES = ("bce", "focal", "lsep", "lsoft")


class FocalBCE(nn.Module):
    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, target):
        logits, target = logits.float(), target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        return ((1 - p_t) ** self.gamma * bce).mean()


class LSEP(nn.Module):
    """Log-sum-exp pairwise ranking loss; a target >= 0.5 is a positive, below it a negative."""

    def forward(self, logits, target):
        s = logits.float()
        pos, neg = target >= 0.5, target < 0.5
        diff = s[:, None, :] - s[:, :, None]                    # [b, i, j] = s_j - s_i
        pair = pos[:, :, None] & neg[:, None, :]                # i positive, j negative
        diff = diff.masked_fill(~pair, float("-inf"))
        flat = torch.cat([torch.zeros(len(s), 1, device=s.device), diff.flatten(1)], 1)  # the "1 +" term
        return torch.logsumexp(flat, 1).mean()


class SoftBootstrap(nn.Module):
    def __init__(self, beta: float = 0.7):
        super().__init__()
        self.beta = beta

    def forward(self, logits, target):
        logits = logits.float()
        soft = self.beta * target.float() + (1 - self.beta) * torch.sigmoid(logits).detach()
        return F.binary_cross_entropy_with_logits(logits, soft)


def make_loss(name: str) -> nn.Module:
    if name == "bce":
        return BCEWithLogitsLossFlat()
    if name == "focal":
        return FocalBCE()
    if name == "lsep":
        return LSEP()
    if name == "lsoft":
        return SoftBootstrap()
    raise ValueError(f"unknown loss {name!r}: {', '.join(LOSSES)}")
