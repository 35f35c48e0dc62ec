"""Losses on self-attention: MiniLMv2 relation distillation and attention-map distillation.

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

Attention maps (same head counts): the pre-softmax scores S = Q K^T * scale (B, heads, L, L) of a student and a
teacher layer, built from what the model computes before attention dropout (training.attention_capture), are
compared per head and real query row over the allowed keys, in one of three forms (`ATTENTION_LOSSES`):
  kl          KL(softmax S_t || softmax S_s): the attention distributions (MiniLMv1, MobileBERT)
  mse_probs   squared error of the two distributions summed over keys (like `logit_mse`, a sum over the support)
  mse_scores  squared error of the scores themselves, a mean over the row's allowed keys; masked keys are left
              out (TinyBERT fits the unnormalised scores by MSE and zeroes the masked ones)
each averaged over heads and real query positions.
All computed in float32. Boolean `mask` (B, L) marks real (non-pad) positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distil.losses.rows import zero_like_graph

RELATIONS = ("query", "key", "value")
ATTENTION_LOSSES = ("kl", "mse_probs", "mse_scores")


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


def masked_log_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """log softmax over the allowed keys of (..., L, L) scores; disallowed keys get a very negative log
    probability (their probability is exactly 0)."""
    scores = scores.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
    return torch.log_softmax(scores, dim=-1)


def relation_log_probs(x: Tensor, heads: int, allowed: Tensor) -> Tensor:
    """log softmax(X_r X_r^T / sqrt(d_r)) over allowed keys, (B, heads, L, L)."""
    split = split_relation_heads(x.float(), heads)
    return masked_log_softmax(split @ split.transpose(-1, -2) / math.sqrt(split.shape[-1]), allowed)


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


def attention_map_loss(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor, kind: str = "kl",
                       causal: bool = False) -> Tensor:
    """Attention maps of one layer pair from their pre-softmax scores (B, heads, L, L), unmasked (padding and,
    with `causal`, future keys are left out here), compared by `kind` (see the module doc); averaged over heads
    and real query positions."""
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"attention scores of different shapes: student {tuple(student_scores.shape)}, teacher "
                         f"{tuple(teacher_scores.shape)} (the head counts must match)")
    allowed = allowed_keys(mask, causal)
    if kind == "mse_scores":
        diff = torch.where(allowed, student_scores.float() - teacher_scores.float(), 0.0)
        per_row = (diff * diff).sum(dim=-1) / allowed.sum(dim=-1).clamp_min(1)
    elif kind in ("kl", "mse_probs"):
        log_q, log_p = masked_log_softmax(student_scores, allowed), masked_log_softmax(teacher_scores, allowed)
        if kind == "kl":
            per_row = _row_kl(log_p, log_q, allowed)
        else:
            diff = torch.where(allowed, log_q.exp() - log_p.exp(), 0.0)
            per_row = (diff * diff).sum(dim=-1)
    else:
        raise ValueError(f"unknown attention loss {kind!r}; choose one of {', '.join(ATTENTION_LOSSES)}")
    return _mean_over_real_queries(per_row, mask)
