"""Divergences between the teacher's and the student's next-token (or masked-token) distributions.

All take logits shaped (N, V) (the rows that count, already selected), soften both sides at temperature T
(p = softmax(teacher / T), q = softmax(student / T)), sum over the vocabulary and over rows, and multiply by
T^2 so that gradient magnitudes stay comparable across temperatures (Hinton et al. 2015; applied to every
divergence here, so that changing the divergence does not silently rescale the loss):

  forward_kl         KL(p || q)                                 mode-covering; DistilBERT / DistilGPT2
  reverse_kl         KL(q || p)                                 mode-seeking (MiniLLM)
  jsd                beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q  (generalised JSD, GKD);
                     beta = 0.5 is the symmetric Jensen-Shannon divergence
  skew_kl            KL(p || alpha p + (1 - alpha) q)           (DistiLLM)
  skew_reverse_kl    KL(q || alpha q + (1 - alpha) p)           (DistiLLM)
  tvd                1/2 sum |p - q|                            total variation distance

These are the plain formulations: the fused output layer computes the same values chunk by chunk and is tested
against them. Computed in float32 (in float64 for float64 logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum over rows and vocabulary of a (log a - log b), exact where a underflows to 0."""
    return F.kl_div(log_b, log_a, reduction="sum", log_target=True)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a a + (1 - weight_a) b), computed in log space."""
    if weight_a <= 0:
        return log_b
    if weight_a >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def divergence_sum(student_logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float,
                   jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Tensor:
    """The divergence `kind` summed over the rows of (N, V) logits, times T^2 (float32, or float64)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if kind == "forward_kl":
        value = _kl(log_p, log_q)
    elif kind == "reverse_kl":
        value = _kl(log_q, log_p)
    elif kind == "jsd":
        log_m = _log_mixture(log_p, log_q, jsd_beta)
        value = jsd_beta * _kl(log_p, log_m) + (1 - jsd_beta) * _kl(log_q, log_m)
    elif kind == "skew_kl":
        value = _kl(log_p, _log_mixture(log_p, log_q, skew_alpha))
    elif kind == "skew_reverse_kl":
        value = _kl(log_q, _log_mixture(log_q, log_p, skew_alpha))
    else:
        value = 0.5 * (log_p.exp() - log_q.exp()).abs().sum()
    return value * temperature**2
