"""Each divergence between the teacher's and the student's distributions, defined once: its value on a set of rows
(student logits against dense or sparse teacher signals) and its gradient with respect to the student's logits.

Both sides are softened at temperature T (p = softmax(teacher / T), q = softmax(student / T)); values are sums over
the vocabulary and over rows, times T^2, so that gradient magnitudes stay comparable across temperatures (Hinton et
al. 2015; applied to every divergence, so that changing the divergence does not silently rescale the loss):

  forward_kl         KL(p || q)                                 mode-covering; DistilBERT / DistilGPT2
  reverse_kl         KL(q || p)                                 mode-seeking (MiniLLM)
  jsd                beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q  (generalised JSD, GKD);
                     beta = 0.5 is the symmetric Jensen-Shannon divergence
  skew_kl            KL(p || alpha p + (1 - alpha) q)           (DistiLLM)
  skew_reverse_kl    KL(q || alpha q + (1 - alpha) p)           (DistiLLM)
  tvd                1/2 sum |p - q|                            total variation distance

Against sparse signals (top-k + rest mass, optionally importance-sampled tail tokens; see signals.SparseSignals):

  bucketed (top-k only)   the divergence between the (k+1)-bucket distributions: the k stored tokens, and one
                          "rest" bucket holding the teacher's rest mass R against the student's mass outside the
                          top-k. Every divergence above is defined on it (a lower bound of the dense value for the
                          KLs, JSD and TVD, by coarse-graining); it equals the dense value when the top-k hold all
                          the mass. Biased: the student's tail is only matched in total.
  sampled (top-k + k')    forward KL estimated without bias: sum_k p_k (log p_k - log q_k) + sum_j w_j (log p_j -
                          log q_j) over the drawn tokens j, with importance weights w_j = p_j / (k' r_j) for a
                          proposal r over the tail. Its expectation over the draws is the dense forward KL, and so
                          is its gradient's (q - p). Only forward KL is an expectation under p, so only it has this
                          estimate.

`Divergence.value` is the differentiable form (the plain path differentiates it; float32, float64 for float64
logits). `Divergence.value_and_grad` is what the output-layer engine calls on each chunk: the closed-form
gradient of forward KL (dense and sparse), written in place in the engine's buffers, and the autograd gradient of
`value` on the chunk for the others. tests/test_signal_parity.py binds the two to a float64 formulation.

Closed-form gradients, d(T^2 KL)/dz with z the student's (transformed) logits and q = softmax(z / T):
  dense:     T (q - p)
  sampled:   T ((sum_k p_k + sum_j w_j) q - p on the top-k - w on the drawn tokens)
  bucketed:  T (q - p) on the top-k,  T q (1 - R / Q) outside it,  Q the student's mass outside the top-k
The bucketed rows are written apart: as one term q (1 - R / Q) over every id plus a top-k correction q R / Q - p,
a confident student (Q ~ 1e-15, R / Q ~ 1e13) lost every top-k gradient to float32 cancellation. Q itself is the
sum of the tail's q (or its logsumexp where that underflows), never 1 - sum of the top-k q. Where log Q is below
LOG_FLOOR the plain formulation clamps it, so the rest bucket's term is constant there: top-k T ((1 - R) q - p),
tail T (-R q), as its autograd gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.teacher_signal.signals import LOG_FLOOR, DenseSignals, Signals, SparseSignals

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
BUCKETED_DIVERGENCES = DIVERGENCES
SAMPLED_DIVERGENCES = ("forward_kl",)
# Below this log tail mass (Q ~ 2e-22) single tail probabilities may be float32 denormals or 0: Q is then taken
# from a logsumexp over the tail rather than the sum of its probabilities.
LOG_TAIL_SUM_FLOOR = -50.0


# --- values (the differentiable definitions) ------------------------------------------------------------------

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


def _divergence_of_log_probs(log_q: Tensor, log_p: Tensor, kind: str, jsd_beta: float, skew_alpha: float) -> Tensor:
    """The divergence `kind` between rows of normalised log-probabilities, summed (no temperature factor)."""
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = _log_mixture(log_p, log_q, jsd_beta)
        return jsd_beta * _kl(log_p, log_m) + (1 - jsd_beta) * _kl(log_q, log_m)
    if kind == "skew_kl":
        return _kl(log_p, _log_mixture(log_p, log_q, skew_alpha))
    if kind == "skew_reverse_kl":
        return _kl(log_q, _log_mixture(log_q, log_p, skew_alpha))
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum()


def _check_kind(kind: str) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def divergence_sum(student_logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float,
                   jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Tensor:
    """The divergence `kind` summed over the rows of (N, V) logits, times T^2 (float32, or float64)."""
    _check_kind(kind)
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return _divergence_of_log_probs(log_q, log_p, kind, jsd_beta, skew_alpha) * temperature**2


def at_least_float32(x: Tensor) -> Tensor:
    """x in float32, or float64 when it is float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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


def bucketed_divergence_sum(student_logits: Tensor, signals: SparseSignals, temperature: float,
                            divergence: str = "forward_kl", jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Tensor:
    """The divergence between the (k+1)-bucket distributions (top-k tokens + rest), summed over rows, times T^2."""
    _check_kind(divergence)
    log_q, log_q_rest, _ = student_log_probs(student_logits, signals.top_ids, temperature)
    student = torch.cat([log_q, log_q_rest.unsqueeze(1)], dim=1)
    teacher = torch.cat([signals.top_logp.to(student.dtype),
                         signals.log_rest.to(student.dtype).clamp_min(LOG_FLOOR).unsqueeze(1)], dim=1)
    return _divergence_of_log_probs(student, teacher, divergence, jsd_beta, skew_alpha) * temperature**2


def sampled_forward_kl_sum(student_logits: Tensor, signals: SparseSignals, temperature: float) -> Tensor:
    """Unbiased estimate of the dense forward KL(p || q) from the top-k and the importance-weighted draws, summed
    over rows, times T^2."""
    log_q, _, log_q_drawn = student_log_probs(student_logits, signals.top_ids, temperature, signals.sample_ids,
                                              with_rest=False)
    top_logp = signals.top_logp.to(log_q.dtype)
    sample_logp = signals.sample_logp.to(log_q.dtype)
    value = (top_logp.exp() * (top_logp - log_q)).sum()
    value = value + (signals.sample_logw.to(log_q.dtype).exp() * (sample_logp - log_q_drawn)).sum()
    return value * temperature**2


def unsupported_divergence(divergence: str, sampled: bool) -> str | None:
    """Why `divergence` cannot be computed from sparse signals (with or without sampled tokens), or None if it can."""
    if sampled and divergence not in SAMPLED_DIVERGENCES:
        return (f"loss.divergence={divergence} has no unbiased estimate from sampled tokens (only forward KL is an "
                "expectation under the teacher's distribution, which the draws follow)")
    if divergence not in BUCKETED_DIVERGENCES:
        return f"loss.divergence={divergence} is not one distil knows"
    return None


# --- closed-form gradients (forward KL), in place in the engine's buffers ------------------------------------------

def _dense_forward_kl_(s: Tensor, t: Tensor, T: float, coef: float, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """(T^2 KL(p || q) summed over the rows, coef * its gradient); s and t are overwritten, the gradient is left
    in s's buffer."""
    log_p_t = torch.log_softmax(t.div_(T), dim=-1, out=scratch)
    p_t = torch.exp(log_p_t, out=t)                      # teacher probabilities replace its logits
    s.div_(T)                                            # log q = s/T - logsumexp(s/T), q = softmax(s/T), in s
    diff = log_p_t.sub_(s)                               # log p - s/T
    row_max = s.amax(dim=-1, keepdim=True)
    q = s.sub_(row_max).exp_()
    row_sum = q.sum(dim=-1, keepdim=True)
    diff.add_(row_max + row_sum.log())                   # log p - log q
    value = diff.mul_(p_t).sum() * (T * T)
    q.div_(row_sum).sub_(p_t).mul_(coef * T)             # d(T^2 KL)/d s = T (q - p)
    return value, q


def _sampled_forward_kl(s: Tensor, signals: SparseSignals, T: float, coef: float, scratch: Tensor):
    """(T^2 sampled forward KL summed over the rows, coef * its gradient, left in `scratch`)."""
    z = torch.div(s, T, out=scratch) if T != 1 else scratch.copy_(s)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    top_logp, logw = signals.top_logp.to(s.dtype), signals.sample_logw.to(s.dtype)
    log_q_top = s.gather(1, signals.top_ids) / T - lse
    log_q_drawn = s.gather(1, signals.sample_ids) / T - lse
    p_top, weights = top_logp.exp(), logw.exp()
    value = (p_top * (top_logp - log_q_top)).sum() + (weights * (signals.sample_logp.to(s.dtype) - log_q_drawn)).sum()
    grad = z.sub_(lse).exp_().mul_((coef * T) * (p_top.sum(1) + weights.sum(1)).unsqueeze(1))
    grad.scatter_add_(1, signals.top_ids, (-coef * T) * p_top)
    grad.scatter_add_(1, signals.sample_ids, (-coef * T) * weights)   # drawn ids may repeat: add, not set
    return value * (T * T), grad


def _bucketed_forward_kl(s: Tensor, signals: SparseSignals, T: float, coef: float, scratch: Tensor):
    """(T^2 bucketed forward KL summed over the rows, coef * its gradient, left in `scratch`)."""
    top_ids = signals.top_ids
    z = torch.div(s, T, out=scratch) if T != 1 else scratch.copy_(s)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    log_q_top = s.gather(1, top_ids) / T - lse
    q = z.sub_(lse).exp_().scatter_(1, top_ids, 0.0)
    log_tail = q.sum(1).log()           # log Q: a sum of positive terms, no cancellation
    small = (log_tail < LOG_TAIL_SUM_FLOOR).nonzero().squeeze(1)
    if small.numel():  # single tail probabilities may underflow in float32: Q from a logsumexp instead
        z_small = s.index_select(0, small) / T
        outside = torch.logsumexp(z_small.scatter_(1, top_ids[small], float("-inf")), dim=-1)
        log_tail[small] = outside - lse[small].squeeze(1)
    floored = log_tail < LOG_FLOOR
    log_tail = log_tail.clamp_min(LOG_FLOOR)
    top_logp, log_rest = signals.top_logp.to(s.dtype), signals.log_rest.to(s.dtype)
    p_top, rest = top_logp.exp(), log_rest.exp()
    value = (p_top * (top_logp - log_q_top)).sum() + (rest * (log_rest - log_tail)).sum()
    tail_factor = torch.where(floored, -rest, 1 - (log_rest - log_tail).exp())    # 1 - R / Q
    top_factor = torch.where(floored, 1 - rest, torch.ones_like(rest))
    top_grad = log_q_top.exp() * top_factor.unsqueeze(1) - p_top
    grad = q.mul_((coef * T) * tail_factor.unsqueeze(1)).scatter_(1, top_ids, (coef * T) * top_grad)
    return value * (T * T), grad


@dataclass(frozen=True)
class Divergence:
    """One divergence at a temperature, with its settings: what a run's soft-target term computes."""

    name: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1

    def __post_init__(self):
        _check_kind(self.name)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")

    def value(self, student_logits: Tensor, signals: Signals) -> Tensor:
        """The divergence summed over the rows of `student_logits` (N, V) against `signals` (N rows), times T^2;
        differentiable with respect to the logits."""
        T = self.temperature
        if isinstance(signals, DenseSignals):
            return divergence_sum(student_logits, signals.teacher_logits(), self.name, T, self.jsd_beta,
                                  self.skew_alpha)
        problem = unsupported_divergence(self.name, signals.sampled)
        if problem:
            raise ValueError(problem)
        if signals.sampled:
            return sampled_forward_kl_sum(student_logits, signals, T)
        return bucketed_divergence_sum(student_logits, signals, T, self.name, self.jsd_beta, self.skew_alpha)

    def value_and_grad(self, s: Tensor, signals: Signals, coef: float, scratch: Tensor) -> tuple[Tensor, Tensor]:
        """(value, coef * d value / d s) on one chunk: s (rows, V) float32 logits, `signals` its rows (dense ones
        as logits). s, dense signals' logits and `scratch` (a buffer of s's shape) may be overwritten; the gradient
        is left in s's buffer, in scratch, or in a new tensor."""
        if self.name == "forward_kl":
            if isinstance(signals, DenseSignals):
                return _dense_forward_kl_(s, signals.logits, self.temperature, coef, scratch)
            if signals.sampled:
                return _sampled_forward_kl(s, signals, self.temperature, coef, scratch)
            return _bucketed_forward_kl(s, signals, self.temperature, coef, scratch)
        with torch.enable_grad():  # any other divergence: its value, differentiated on this chunk alone
            logits = s.detach().requires_grad_(True)
            value = self.value(logits, signals)
            (grad,) = torch.autograd.grad(value, logits)
        return value.detach(), grad.mul_(coef)
