"""Soft-target losses against a sparse teacher distribution (a teacher-signal store, `distil cache-teacher`).

The store keeps, per position, the teacher's top-k token ids with their log-probabilities at temperature T
(p = softmax(teacher / T)), the rest mass R = 1 - sum of the top-k probabilities, and optionally k' tokens drawn
from the rest of the distribution with their log-probabilities and importance weights. Two forms follow:

  bucketed (top-k only)   the divergence between the (k+1)-bucket distributions: the k stored tokens, and one
                          "rest" bucket holding the teacher's rest mass R against the student's mass outside the
                          top-k. Every divergence of `distil.losses.divergences` is defined on it (a lower bound of
                          the dense value for the KLs, JSD and TVD, by coarse-graining); it equals the dense value
                          when the top-k hold all the mass. Biased: the student's tail is only matched in total.
  sampled (top-k + k')    forward KL estimated without bias: sum_k p_k (log p_k - log q_k) + sum_j w_j (log p_j -
                          log q_j) over the drawn tokens j, with importance weights w_j = p_j / (k' r_j) for a
                          proposal r over the tail (w_j = R / k' when r is the tail itself). Its expectation over
                          the draws is the dense forward KL, and so is its gradient's (q - p). Only forward KL is an
                          expectation under p, so only it has this estimate.

All values are sums over rows times T^2, as `divergence_sum`; callers divide by their row counts. float32 (float64
logits stay float64: the reference the fused sparse head is checked against).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from distil.losses.divergences import DIVERGENCES, divergence_sum

LOG_FLOOR = -80.0  # log of a mass that is (numerically) zero: exp(-80) ~ 1e-35, never -inf (0 * -inf is nan)
BUCKETED_DIVERGENCES = DIVERGENCES
SAMPLED_DIVERGENCES = ("forward_kl",)


@dataclass
class SparseTargets:
    """The teacher's sparse distribution at N positions (rows)."""

    top_ids: Tensor                    # (N, k) int64, by decreasing probability
    top_logp: Tensor                   # (N, k) float32, log p at temperature T
    log_rest: Tensor                   # (N,) float32, log of the mass outside the top-k (>= LOG_FLOOR)
    sample_ids: Tensor | None = None   # (N, k') int64, drawn from the proposal over the tail (with replacement)
    sample_logp: Tensor | None = None  # (N, k') float32, log p of each drawn token
    sample_logw: Tensor | None = None  # (N, k') float32, log importance weight of each draw
    hidden: Tensor | None = None       # (N, H) the teacher's last hidden state, when the store holds it

    @property
    def sampled(self) -> bool:
        return self.sample_ids is not None and self.sample_ids.shape[-1] > 0

    def rows(self, index: Tensor) -> "SparseTargets":
        """The targets of the rows `index` (a bool mask or indices)."""
        return SparseTargets(**{f.name: (getattr(self, f.name)[index] if getattr(self, f.name) is not None else None)
                                for f in fields(self)})


def at_least_float32(x: Tensor) -> Tensor:
    """x in float32, or float64 when it is float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def unsupported_divergence(divergence: str, sampled: bool) -> str | None:
    """Why `divergence` cannot be computed from a store (with or without sampled tokens), or None if it can."""
    if sampled and divergence not in SAMPLED_DIVERGENCES:
        return (f"loss.divergence={divergence} has no unbiased estimate from sampled tokens (only forward KL is an "
                "expectation under the teacher's distribution, which the draws follow)")
    if divergence not in BUCKETED_DIVERGENCES:
        return f"loss.divergence={divergence} is not one distil knows"
    return None


def student_log_probs(student_logits: Tensor, ids: Tensor, temperature: float, extra_ids: Tensor | None = None,
                      with_rest: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(log q at `ids` (N, k), log of q's mass outside `ids` (N,) or None, log q at `extra_ids` or None), with
    q = softmax(student_logits / T) over the whole vocabulary."""
    z = at_least_float32(student_logits) / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    log_q = z.gather(1, ids) - lse
    log_rest = None
    if with_rest:
        outside = z.scatter(1, ids, float("-inf"))
        log_rest = (torch.logsumexp(outside, dim=-1) - lse.squeeze(1)).clamp_min(LOG_FLOOR)
    log_extra = z.gather(1, extra_ids) - lse if extra_ids is not None else None
    return log_q, log_rest, log_extra


def bucketed_divergence_sum(student_logits: Tensor, targets: SparseTargets, temperature: float,
                            divergence: str = "forward_kl", jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Tensor:
    """The divergence between the (k+1)-bucket distributions (top-k tokens + rest), summed over rows, times T^2."""
    log_q, log_q_rest, _ = student_log_probs(student_logits, targets.top_ids, temperature)
    student = torch.cat([log_q, log_q_rest.unsqueeze(1)], dim=1)
    teacher = torch.cat([targets.top_logp.to(student.dtype),
                         targets.log_rest.to(student.dtype).clamp_min(LOG_FLOOR).unsqueeze(1)], dim=1)
    # Both rows are normalised log-probabilities, so divergence_sum's log-softmax at temperature 1 leaves them as
    # they are; the T^2 of the recipe's temperature is applied here.
    return divergence_sum(student, teacher, divergence, 1.0, jsd_beta, skew_alpha) * temperature**2


def sampled_forward_kl_sum(student_logits: Tensor, targets: SparseTargets, temperature: float) -> Tensor:
    """Unbiased estimate of the dense forward KL(p || q) from the top-k and the importance-weighted draws, summed
    over rows, times T^2."""
    log_q, _, log_q_drawn = student_log_probs(student_logits, targets.top_ids, temperature, targets.sample_ids,
                                              with_rest=False)
    top_logp = targets.top_logp.to(log_q.dtype)
    sample_logp = targets.sample_logp.to(log_q.dtype)
    value = (top_logp.exp() * (top_logp - log_q)).sum()
    value = value + (targets.sample_logw.to(log_q.dtype).exp() * (sample_logp - log_q_drawn)).sum()
    return value * temperature**2


def sparse_soft_target_sum(student_logits: Tensor, targets: SparseTargets, temperature: float,
                           divergence: str = "forward_kl", jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Tensor:
    """The soft-target term from a sparse teacher, summed over rows (times T^2): the sampled estimate when the
    targets hold draws (forward KL only), else the bucketed divergence."""
    problem = unsupported_divergence(divergence, targets.sampled)
    if problem:
        raise ValueError(problem)
    if targets.sampled:
        return sampled_forward_kl_sum(student_logits, targets, temperature)
    return bucketed_divergence_sum(student_logits, targets, temperature, divergence, jsd_beta, skew_alpha)


def sparse_soft_target_loss(student_logits: Tensor, targets: SparseTargets, temperature: float,
                            divergence: str = "forward_kl", jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Tensor:
    """`sparse_soft_target_sum` averaged over rows (0 with a graph when there are none)."""
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    return sparse_soft_target_sum(student_logits, targets, temperature, divergence, jsd_beta, skew_alpha) / n
