"""Losses: the VSE++ hinge loss of SCAN/SGRAF (`ContrastiveLoss`).

The DAA ranking loss lives in `daa.py`.
"""
import torch
import torch.nn as nn


class ContrastiveLoss(nn.Module):
    """Hinge (VSE++) loss on a square score matrix whose diagonal holds the positive pairs
    (image k, caption k). Summed, not averaged; with `max_violation` only the hardest negative of
    each row (caption retrieval) and each column (image retrieval) counts.

    Unlike the original, the diagonal mask is built on the scores' device, so it also runs on
    CPU (the original only masks when CUDA is available and crashes otherwise)."""

    def __init__(self, margin=0, max_violation=False):
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, scores, mask=None):
        """`mask` (bool, like scores): the pairs that are not negatives (default: the
        diagonal; HREM masks every pair of the same image)."""
        diagonal = scores.diag().view(scores.size(0), 1)
        d1 = diagonal.expand_as(scores)
        d2 = diagonal.t().expand_as(scores)
        cost_s = (self.margin + scores - d1).clamp(min=0)   # caption retrieval, per row
        cost_im = (self.margin + scores - d2).clamp(min=0)  # image retrieval, per column
        if mask is None:
            mask = torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
        cost_s = cost_s.masked_fill(mask, 0)
        cost_im = cost_im.masked_fill(mask, 0)
        if self.max_violation:
            cost_s = cost_s.max(1)[0]
            cost_im = cost_im.max(0)[0]
        return cost_s.sum() + cost_im.sum()
