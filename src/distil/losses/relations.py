"""Losses on self-attention: MiniLMv2 relation distillation and TinyBERT attention-map distillation.

Relations (MiniLMv2, Wang et al. 2021). For one layer, the query, key and value projections (B, L, W) are
taken before the attention softmax (and before rotary embedding on decoders), their heads concatenated and the
width W re-split into R *relation heads* of d_r = W / R. For each of Q-Q, K-K and V-V the relation of a head is
softmax(X_r X_r^T / sqrt(d_r)) over the keys: a (L x L) distribution per query position, whatever the model's
width or head count, so a narrow student can learn from a wide teacher. The loss is KL(teacher || student) per
query row, averaged over relation heads and real query positions, summed over the three relations (as in
the paper).

Masking: padded keys never count. With `causal=True` (decoders) future keys are masked too, so a position
relates only to itself and earlier ones: the relations a causal student can actually form, and the only ones
its attention ever uses (the teacher's relations to future tokens are information neither model sees at
inference time).

Attention maps (TinyBERT, Jiao et al. 2020): the attention probabilities (B, heads, L, L) of a student and a
teacher layer with the same head count, compared per head and query row by KL(teacher || student) or by the
squared error summed over keys (like `logit_mse`, a sum over the distribution's support), averaged over heads
and real query positions.

All computed in float32. Boolean `mask` (B, L) marks real (non-pad) positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distil.losses.rows import zero_like_graph

RELATIONS = ("query", "key", "value")


def split_relation_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, W) concatenated heads -> (B, heads, L, W / heads)."""
    batch, length, width = x.shape
    if width % heads:
        raise ValueError(f"a width of {width} does not split into {heads} relation heads")
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


def allowed_keys(mask: Tensor, causal: bool) -> Tensor:
    """(B, 1, L, L) boolean: which keys each query row may relate to (real keys; and not future ones if causal)."""
    allowed = mask.bool()[:, None, None, :]
    if causal:
        length = mask.shape[1]
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return allowed


def relation_log_probs(x: Tensor, heads: int, allowed: Tensor) -> Tensor:
    """log softmax(X_r X_r^T / sqrt(d_r)) over allowed keys, (B, heads, L, L); disallowed keys get a very
    negative log probability (their probability is exactly 0)."""
    split = split_relation_heads(x.float(), heads)
    scores = split @ split.transpose(-1, -2) / math.sqrt(split.shape[-1])
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def _row_kl(log_p: Tensor, log_q: Tensor, allowed: Tensor) -> Tensor:
    """KL(p || q) of each (batch, head, query) row over its allowed keys."""
    per_key = log_p.exp() * (log_p - log_q)
    return torch.where(allowed, per_key, torch.zeros_like(per_key)).sum(dim=-1)


def _mean_over_real_queries(per_row: Tensor, mask: Tensor) -> Tensor:
    """(B, H, L) per-row values -> their mean over heads and real query positions."""
    real = mask.bool()
    count = int(real.sum()) * per_row.shape[1]
    if count == 0:
        return zero_like_graph(per_row)
    return (per_row * real[:, None, :]).sum() / count


def relation_kl(student: Tensor, teacher: Tensor, mask: Tensor, heads: int, causal: bool = False) -> Tensor:
    """KL(teacher relation || student relation) of one projection (B, L, W_s) vs (B, L, W_t), averaged over
    `heads` relation heads and real query positions. The widths may differ; `heads` must divide both."""
    if student.shape[:2] != teacher.shape[:2] or mask.shape != student.shape[:2]:
        raise ValueError(f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)} and mask "
                         f"{tuple(mask.shape)} must share their (batch, length) dimensions")
    allowed = allowed_keys(mask, causal)
    log_q = relation_log_probs(student, heads, allowed)
    log_p = relation_log_probs(teacher, heads, allowed)
    return _mean_over_real_queries(_row_kl(log_p, log_q, allowed), mask)


def relation_loss(student_qkv: tuple[Tensor, Tensor, Tensor], teacher_qkv: tuple[Tensor, Tensor, Tensor],
                  mask: Tensor, heads: int, causal: bool = False) -> Tensor:
    """MiniLMv2: the Q-Q, K-K and V-V relation KLs of one layer pair, summed."""
    return sum(relation_kl(s, t, mask, heads, causal) for s, t in zip(student_qkv, teacher_qkv))


def attention_map_loss(student_probs: Tensor, teacher_probs: Tensor, mask: Tensor, kind: str = "kl",
                       causal: bool = False) -> Tensor:
    """TinyBERT: attention probabilities (B, heads, L, L) compared per head and real query row over the allowed
    keys, by KL(teacher || student) (`kl`) or squared error summed over keys (`mse`); averaged over heads and
    real query positions."""
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(f"attention maps of different shapes: student {tuple(student_probs.shape)}, teacher "
                         f"{tuple(teacher_probs.shape)} (the head counts must match)")
    allowed = allowed_keys(mask, causal)
    p, q = teacher_probs.float(), student_probs.float()
    if kind == "kl":
        # Probabilities that underflowed to 0 inside an allowed row: clamped so that log stays finite.
        log_p = torch.where(allowed, p, torch.ones_like(p)).clamp_min(1e-30).log()
        log_q = torch.where(allowed, q, torch.ones_like(q)).clamp_min(1e-30).log()
        per_row = _row_kl(log_p, log_q, allowed)
    elif kind == "mse":
        diff = torch.where(allowed, q - p, torch.zeros_like(q))
        per_row = (diff * diff).sum(dim=-1)
    else:
        raise ValueError(f"unknown attention loss {kind!r}; choose kl or mse")
    return _mean_over_real_queries(per_row, mask)
