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


class HeadRouter(nn.Module):
    """The loss of a model with a noisy head (model.TwoHeads): training logits are (B, 2C) and targets (B, C + 1),
    the last column saying which items carry noisy labels (features.CropDataset); a noisy item is scored on the
    noisy head's logits, any other on the main head's, so the main head receives no gradient from noisy labels.
    Validation logits and targets are (B, C) and pass straight through."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits, target):
        if logits.shape[1] == target.shape[1]:
            return self.loss(logits, target)
        c = target.shape[1] - 1
        noisy = target[:, c:] >= 0.5                            # mixed items: noisy where the noisy part dominates
        return self.loss(torch.where(noisy, logits[:, c:], logits[:, :c]), target[:, :c])


def make_loss(name: str, noisy_head: bool = False) -> nn.Module:
    """The loss `name`, routed between two heads when the model has a noisy head."""
    loss = _base_loss(name)
    return HeadRouter(loss) if noisy_head else loss


def _base_loss(name: str) -> nn.Module:
    if name == "bce":
        return BCEWithLogitsLossFlat()
    if name == "focal":
        return FocalBCE()
    if name == "lsep":
        return LSEP()
    if name == "lsoft":
        return SoftBootstrap()
    raise ValueError(f"unknown loss {name!r}: {', '.join(LOSSES)}")
