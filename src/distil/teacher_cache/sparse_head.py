"""The student's output layer with the sparse soft-target term and the LM cross-entropy, in row chunks.

Like training.fused_head for the live teacher: the student's last hidden states go in, each chunk of rows is
projected onto the vocabulary once, the soft-target term against the stored sparse teacher distribution and the
MLM/causal cross-entropy are summed, and the gradients with respect to the hidden states and the projection are
accumulated at once, so no (tokens x vocabulary) tensor lives beyond one chunk. Forward KL (bucketed or sampled)
has its gradient in closed form; the other divergences (bucketed) are differentiated on the chunk alone. The values
equal distil.losses.sparse and the plain cross-entropy (tested).

d(T^2 KL)/dz, z the student's logits, q = softmax(z / T):
  sampled:   T ((sum_k p_k + sum_j w_j) q - p on the top-k - w on the drawn tokens)
  bucketed:  T (q - p on the top-k - R q / Q outside it),  Q the student's mass outside the top-k
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distil.losses.sparse import LOG_FLOOR, SparseTargets, bucketed_divergence_sum
from distil.training.fused_head import HeadGradients, _logits_into, _workspace

CHUNK_ROWS = 128


@dataclass
class SparseHeadTerms:
    temperature: float
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    coef_ce: float = 0.0   # soft-target sum's coefficient (its rows: kd_rows)
    coef_lm: float = 0.0   # cross-entropy sum's coefficient (rows with a label)


def _autograd_soft_target(s: torch.Tensor, t: SparseTargets, terms: SparseHeadTerms):
    """(T^2 bucketed divergence summed over the rows of s, its gradient): any divergence, by autograd."""
    with torch.enable_grad():
        x = s.detach().requires_grad_(True)
        value = bucketed_divergence_sum(x, t, terms.temperature, terms.divergence, terms.jsd_beta, terms.skew_alpha)
        (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def _full_rows(values: torch.Tensor, kd: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, m) with `values` (len(kd), m) on rows kd and zeros elsewhere (a scatter of zeros changes nothing)."""
    out = values.new_zeros(rows, values.shape[1])
    out[kd] = values
    return out


class _SparseHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, kd_rows, labels, targets: SparseTargets, terms: SparseHeadTerms,
                chunk: int):
        n, vocab = hidden.shape[0], weight.shape[0]
        T = terms.temperature
        grads = HeadGradients(hidden, weight, bias)
        sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)  # soft targets, cross-entropy
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        closed_form = terms.divergence == "forward_kl" or targets.sampled
        # The targets of the kd rows, in row order: row i's are at kd_index[i] when kd_rows[i].
        kd_index = torch.cumsum(kd_rows.long(), 0) - 1
        work = _workspace(chunk, vocab, hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            c = rows.stop - start
            h = hidden[rows]
            s = _logits_into(work[0, :c], h, w, b)
            lse = torch.logsumexp(s, dim=-1, keepdim=True)
            lm = labels[rows] != -100
            factor = lm.float() * terms.coef_lm          # softmax(s) coefficient of each row
            corrections = []                              # (ids, values) scattered into the gradient
            if terms.coef_lm != 0 and bool(lm.any()):
                target = labels[rows].clamp_min(0).unsqueeze(1)
                sums[1] -= ((s.gather(1, target) - lse).squeeze(1) * lm).sum()
                corrections.append((target, -factor.unsqueeze(1)))
            kd = kd_rows[rows].nonzero().squeeze(1) if terms.coef_ce != 0 else kd_rows.new_zeros(0, dtype=torch.long)
            t = targets.rows(kd_index[rows][kd]) if kd.numel() else None
            kd_factor, lse_t = None, lse
            if t is not None and closed_form:
                coef = terms.coef_ce * T
                if T != 1:
                    lse_t = torch.logsumexp(torch.div(s, T, out=work[1, :c]), dim=-1, keepdim=True)
                top_ids = _full_rows(t.top_ids, kd, c)
                log_q_top = (s.gather(1, top_ids) / T - lse_t)[kd]
                p_top = t.top_logp.exp()
                value = (p_top * (t.top_logp - log_q_top)).sum()
                if t.sampled:
                    drawn = _full_rows(t.sample_ids, kd, c)
                    weights = t.sample_logw.exp()
                    value = value + (weights * (t.sample_logp - (s.gather(1, drawn) / T - lse_t)[kd])).sum()
                    row = p_top.sum(1) + weights.sum(1)
                    corrections += [(top_ids, _full_rows(-coef * p_top, kd, c)),
                                    (drawn, _full_rows(-coef * weights, kd, c))]
                else:
                    q_top = log_q_top.exp()
                    q_rest = (1 - q_top.double().sum(1)).float()
                    small = (q_rest < 1e-3).nonzero().squeeze(1)
                    if small.numel():  # little mass left outside the top-k: its exact value, not a difference
                        z = s.index_select(0, kd[small]) / T
                        outside = torch.logsumexp(z.scatter_(1, t.top_ids[small], float("-inf")), dim=-1)
                        q_rest[small] = (outside - lse_t[kd[small]].squeeze(1)).exp()
                    log_q_rest = q_rest.clamp_min(1e-35).log().clamp_min(LOG_FLOOR)
                    rest = t.log_rest.exp()
                    value = value + (rest * (t.log_rest - log_q_rest)).sum()
                    ratio = rest / log_q_rest.exp()
                    row = 1 - ratio                       # outside the top-k: q (1 - R / Q); on it: q - p
                    corrections.append((top_ids, _full_rows(coef * (q_top * ratio.unsqueeze(1) - p_top), kd, c)))
                sums[0] += value * T * T
                kd_factor = torch.zeros(c, dtype=torch.float32, device=s.device)
                kd_factor[kd] = coef * row
            grad = work[2, :c]
            if kd_factor is not None and T == 1:
                factor = factor + kd_factor
                kd_factor = None
            torch.sub(s, lse, out=grad).exp_().mul_(factor.unsqueeze(1))
            if kd_factor is not None:  # softmax(s / T) times its coefficients, added in place
                q = torch.div(s, T, out=work[1, :c]).sub_(lse_t).exp_()
                grad.add_(q.mul_(kd_factor.unsqueeze(1)))
            for ids, values in corrections:
                grad.scatter_add_(1, ids, values)
            if t is not None and not closed_form:
                value, d = _autograd_soft_target(s.index_select(0, kd), t, terms)
                sums[0] += value
                grad.index_add_(0, kd, d.mul_(terms.coef_ce))
            grads.add(rows, grad, h, w)
        grads.save(ctx)
        total = terms.coef_ce * sums[0] + terms.coef_lm * sums[1]
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        return HeadGradients.scaled(ctx, grad_total) + (None,) * 5


def sparse_head_losses(hidden, projection, kd_rows, labels, targets: SparseTargets, terms: SparseHeadTerms,
                       chunk: int = CHUNK_ROWS, vocab_limit: int | None = None):
    """(coef_ce * soft-target sum + coef_lm * cross-entropy sum, [soft-target sum, cross-entropy sum]) over the rows
    of `hidden` (N, H). `targets` holds one row per kd row (kd_rows (N,) bool), in order; labels (N,), -100: none."""
    keep = slice(None) if vocab_limit is None else slice(0, vocab_limit)
    weight = projection.weight[keep]
    bias = projection.bias[keep] if projection.bias is not None else None
    return _SparseHead.apply(hidden, weight, bias, kd_rows, labels, targets, terms, chunk)
