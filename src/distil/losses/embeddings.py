"""Losses on pooled sentence embeddings (the sentence-transformers distillation recipe behind all-MiniLM-L6-v2).

A sentence embedding is a pooling of a model's last hidden states over the real (non-pad) positions of a row,
optionally L2-normalised, as the teacher's sentence-transformers config says. Student and teacher are pooled
alike; the losses compare one embedding per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.losses.rows import check_pair, zero_like_graph

POOLINGS = ("mean", "cls", "last", "max")


def pool(hidden: Tensor, mask: Tensor, mode: str, normalize: bool = False) -> Tensor:
    """(B, T, H) states and a (B, T) mask of real positions -> (B, H) float32 embeddings.

    mean: average over real positions; cls: the first position; last: the last real position (right-padded
    rows); max: the largest value per channel over real positions. Computed in float32, as sentence-transformers
    does on CPU."""
    if mode not in POOLINGS:
        raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLINGS}")
    states = hidden.float()
    real = mask.bool()
    if mode == "mean":
        weights = real.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
    elif mode == "cls":
        pooled = states[:, 0]
    elif mode == "last":
        last = (real.sum(dim=1) - 1).clamp_min(0)
        pooled = states[torch.arange(states.shape[0], device=states.device), last]
    else:
        pooled = states.masked_fill(~real.unsqueeze(-1), torch.finfo(states.dtype).min).max(dim=1).values
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def sentence_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over rows of the squared error summed over embedding dimensions / dimensions (MSELoss, as
    sentence-transformers' MSELoss computes it), on (B, H) embeddings."""
    check_pair(student, teacher, "sentence embeddings")
    if student.shape[0] == 0:
        return zero_like_graph(student)
    return F.mse_loss(student.float(), teacher.float())


def sentence_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over rows of 1 - cos(student, teacher) on (B, H) embeddings."""
    check_pair(student, teacher, "sentence embeddings")
    if student.shape[0] == 0:
        return zero_like_graph(student)
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
