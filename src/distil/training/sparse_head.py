"""The student's output layer with the sparse soft-target term and the LM cross-entropy, in row chunks.

Like training.fused_head for the live teacher: the student's last hidden states go in, each chunk of rows is
projected onto the vocabulary once (and put through the model's own logit transform, soft-capping or scaling,
with its derivative chained into the gradient: distil.losses.logit_transform, as the live head), the soft-target
term against the stored sparse teacher distribution and the MLM/causal cross-entropy are summed, and the
gradients with respect to the hidden states and the projection are accumulated at once, so no (tokens x
vocabulary) tensor lives beyond one chunk. Forward KL (bucketed or sampled) has its gradient in closed form; the
other divergences (bucketed) are differentiated on the chunk alone. The values equal distil.losses.sparse and the
plain cross-entropy (tested, and against float64 at a confident student's extremes).

d(T^2 KL)/dz, z the (transformed) student logits, q = softmax(z / T):
  sampled:   T ((sum_k p_k + sum_j w_j) q - p on the top-k - w on the drawn tokens)
  bucketed:  T (q - p) on the top-k,  T q (1 - R / Q) outside it,  Q the student's mass outside the top-k
The bucketed rows are written apart: as one term q (1 - R / Q) over every id plus a top-k correction q R / Q - p,
a confident student (Q ~ 1e-15, R / Q ~ 1e13) lost every top-k gradient to float32 cancellation. Q itself is the
sum of the tail's q (or its logsumexp where that underflows), never 1 - sum of the top-k q. Where log Q is below
LOG_FLOOR the plain formulation clamps it, so the rest bucket's term is constant there: top-k T ((1 - R) q - p),
tail T (-R q), as its autograd gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distil.losses.logit_transform import LogitTransform, chain_through_transform_, transform_logits_
from distil.losses.sparse import LOG_FLOOR, SparseTargets, bucketed_divergence_sum
from distil.training.fused_head import HeadGradients, _logits_into, _workspace, transform_of

CHUNK_ROWS = 128
# Below this log tail mass (Q ~ 2e-22) single tail probabilities may be float32 denormals or 0: Q is then taken
# from a logsumexp over the tail rather than the sum of its probabilities.
LOG_TAIL_SUM_FLOOR = -50.0


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


def _bucketed_forward_kl(s: torch.Tensor, q: torch.Tensor, top_ids: torch.Tensor, kd: torch.Tensor,
                         t: SparseTargets, T: float):
    """The bucketed forward KL of a chunk's kd rows, summed (before T^2), and its gradient in two pieces written
    apart: (value, the factor of q on the tail ids of each chunk row (0 off the kd rows), the gradient on the
    top-k ids of each kd row). `s`: the chunk's logits; `q`: a buffer of its shape, left holding softmax(s / T)
    with the top-k ids at 0; `top_ids`: each chunk row's top-k ids (any ids on the other rows)."""
    z = torch.div(s, T, out=q) if T != 1 else q.copy_(s)
    lse_t = torch.logsumexp(z, dim=-1, keepdim=True)
    log_q_top = (s.gather(1, top_ids) / T - lse_t)[kd]
    q = z.sub_(lse_t).exp_().scatter_(1, top_ids, 0.0)
    log_tail = q.sum(1)[kd].log()           # log Q: a sum of positive terms, no cancellation
    small = (log_tail < LOG_TAIL_SUM_FLOOR).nonzero().squeeze(1)
    if small.numel():  # single tail probabilities may underflow in float32: Q from a logsumexp instead
        z_small = s.index_select(0, kd[small]) / T
        outside = torch.logsumexp(z_small.scatter_(1, t.top_ids[small], float("-inf")), dim=-1)
        log_tail[small] = outside - lse_t[kd[small]].squeeze(1)
    floored = log_tail < LOG_FLOOR
    log_tail = log_tail.clamp_min(LOG_FLOOR)
    p_top, rest = t.top_logp.exp(), t.log_rest.exp()
    value = (p_top * (t.top_logp - log_q_top)).sum() + (rest * (t.log_rest - log_tail)).sum()
    tail_factor = torch.where(floored, -rest, 1 - (t.log_rest - log_tail).exp())    # 1 - R / Q
    top_factor = torch.where(floored, 1 - rest, torch.ones_like(rest))
    top_grad = log_q_top.exp() * top_factor.unsqueeze(1) - p_top
    return value, _full_rows(tail_factor.unsqueeze(1), kd, s.shape[0]).squeeze(1), top_grad


class _SparseHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, kd_rows, labels, targets: SparseTargets, terms: SparseHeadTerms,
                chunk: int, transform: LogitTransform | None):
        n, vocab = hidden.shape[0], weight.shape[0]
        T = terms.temperature
        grads = HeadGradients(hidden, weight, bias)
        sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)  # soft targets, cross-entropy
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        closed_form = terms.divergence == "forward_kl" or targets.sampled
        capped = transform is not None and transform.softcap is not None
        # The targets of the kd rows, in row order: row i's are at kd_index[i] when kd_rows[i].
        kd_index = torch.cumsum(kd_rows.long(), 0) - 1
        work = _workspace(chunk, vocab, hidden.device, 4 if capped else 3)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            c = rows.stop - start
            h = hidden[rows]
            s = _logits_into(work[0, :c], h, w, b)
            if transform is not None:  # the model's own transform, switched off in the model meanwhile
                transform_logits_(s, transform, work[3, :c] if capped else None)
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
            kd_factor, lse_t, q = None, lse, None
            if t is not None and closed_form:
                coef = terms.coef_ce * T
                top_ids = _full_rows(t.top_ids, kd, c)
                if t.sampled:
                    if T != 1:
                        lse_t = torch.logsumexp(torch.div(s, T, out=work[1, :c]), dim=-1, keepdim=True)
                    log_q_top = (s.gather(1, top_ids) / T - lse_t)[kd]
                    p_top = t.top_logp.exp()
                    value = (p_top * (t.top_logp - log_q_top)).sum()
                    drawn = _full_rows(t.sample_ids, kd, c)
                    weights = t.sample_logw.exp()
                    value = value + (weights * (t.sample_logp - (s.gather(1, drawn) / T - lse_t)[kd])).sum()
                    kd_factor = _full_rows((coef * (p_top.sum(1) + weights.sum(1))).unsqueeze(1), kd, c).squeeze(1)
                    corrections += [(top_ids, _full_rows(-coef * p_top, kd, c)),
                                    (drawn, _full_rows(-coef * weights, kd, c))]
                else:
                    value, tail_factor, top_grad = _bucketed_forward_kl(s, work[1, :c], top_ids, kd, t, T)
                    q = work[1, :c]                       # softmax(s / T), 0 on the top-k ids
                    kd_factor = coef * tail_factor
                    corrections.append((top_ids, _full_rows(coef * top_grad, kd, c)))
                sums[0] += value * T * T
            grad = work[2, :c]
            if kd_factor is not None and q is None and T == 1:
                factor = factor + kd_factor
                kd_factor = None
            torch.sub(s, lse, out=grad).exp_().mul_(factor.unsqueeze(1))
            if kd_factor is not None:  # softmax(s / T) times its coefficients, added in place
                if q is None:
                    q = torch.div(s, T, out=work[1, :c]).sub_(lse_t).exp_()
                grad.add_(q.mul_(kd_factor.unsqueeze(1)))
            for ids, values in corrections:
                grad.scatter_add_(1, ids, values)
            if t is not None and not closed_form:
                value, d = _autograd_soft_target(s.index_select(0, kd), t, terms)
                sums[0] += value
                grad.index_add_(0, kd, d.mul_(terms.coef_ce))
            if transform is not None:  # back through the transform to the projected logits
                chain_through_transform_(grad, transform, work[3, :c] if capped else None)
            grads.add(rows, grad, h, w)
        grads.save(ctx)
        total = terms.coef_ce * sums[0] + terms.coef_lm * sums[1]
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        return HeadGradients.scaled(ctx, grad_total) + (None,) * 6


def sparse_head_losses(hidden, projection, kd_rows, labels, targets: SparseTargets, terms: SparseHeadTerms,
                       chunk: int = CHUNK_ROWS, vocab_limit: int | None = None,
                       transform: LogitTransform | None = None):
    """(coef_ce * soft-target sum + coef_lm * cross-entropy sum, [soft-target sum, cross-entropy sum]) over the rows
    of `hidden` (N, H). `targets` holds one row per kd row (kd_rows (N,) bool), in order; labels (N,), -100: none.
    transform: the student's LogitTransform applied after projecting; by default the one output_projection
    recorded with `projection` (the model's own soft-capping / scaling, which projection_replaced switches off)."""
    if transform is None:
        transform = transform_of(projection)
    keep = slice(None) if vocab_limit is None else slice(0, vocab_limit)
    weight = projection.weight[keep]
    bias = projection.bias[keep] if projection.bias is not None else None
    return _SparseHead.apply(hidden, weight, bias, kd_rows, labels, targets, terms, chunk, transform)
