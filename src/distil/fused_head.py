"""The output layer and every logit loss in one pass over chunks of rows: no (tokens x vocabulary) tensor.

With a 30K-250K vocabulary, the logits of the student, the teacher, their softmaxes and the gradient are each
tokens x vocabulary floats: on the seed's loop they were most of the memory and much of the time. Here the
student's last hidden states (before the vocabulary projection) and the teacher's go in; each chunk of rows is
projected, its soft-target KL, MLM/causal cross-entropy and logit MSE are summed, and the gradients with respect
to the hidden states, the projection weight and its bias are accumulated at once (the loss is a scalar, so the
backward pass only scales them). The values equal the plain formulation in `distil.losses` (tested).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_ROWS = 256


@dataclass
class HeadTerms:
    """Which logit terms to compute, with the coefficient each sum gets in the combined loss."""

    temperature: float
    coef_ce: float = 0.0      # soft-target KL (times T^2), summed over kd rows
    coef_mse: float = 0.0     # logit squared error summed over the vocabulary, over kd rows
    coef_lm: float = 0.0      # cross-entropy against row labels (MLM targets or next tokens)


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, kd_rows, labels,
                terms: HeadTerms, chunk: int):
        n = hidden.shape[0]
        T = terms.temperature
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)  # ce, mse, lm
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        need_teacher = terms.coef_ce != 0 or terms.coef_mse != 0
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            h = hidden[rows]
            logits = F.linear(h, w, b).float()
            grad = torch.zeros_like(logits)
            if need_teacher:
                kd = kd_rows[rows].unsqueeze(1).to(logits.dtype)
                t_logits = F.linear(teacher_hidden[rows], teacher_weight, teacher_bias).float()
                if terms.coef_ce != 0:
                    log_p_s = F.log_softmax(logits / T, dim=-1)
                    log_p_t = F.log_softmax(t_logits / T, dim=-1)
                    p_t = log_p_t.exp()
                    kl = (p_t * (log_p_t - log_p_s)).sum(-1) * (T * T)
                    sums[0] += (kl * kd.squeeze(1)).sum()
                    # d(T^2 KL)/d logits = T (softmax(s/T) - softmax(t/T))
                    grad += terms.coef_ce * T * (log_p_s.exp() - p_t) * kd
                    del log_p_s, log_p_t, p_t
                if terms.coef_mse != 0:
                    diff = (logits - t_logits) * kd
                    sums[1] += (diff * diff).sum()
                    grad += terms.coef_mse * 2.0 * diff
                del t_logits
            if terms.coef_lm != 0:
                lab = labels[rows]
                has_label = lab != -100
                if bool(has_label.any()):
                    log_p = F.log_softmax(logits, dim=-1)
                    safe = lab.clamp(min=0)
                    picked = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
                    sums[2] -= (picked * has_label).sum()
                    g_lm = log_p.exp()
                    g_lm.scatter_add_(1, safe.unsqueeze(1), -torch.ones_like(picked).unsqueeze(1))
                    grad += terms.coef_lm * g_lm * has_label.unsqueeze(1)
                    del log_p, g_lm
            g = grad.to(hidden.dtype)
            grad_hidden[rows] = g @ w
            grad_weight += (g.t() @ h).float()
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            del logits, grad, g
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias if grad_bias is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype)
        total = terms.coef_ce * sums[0] + terms.coef_mse * sums[1] + terms.coef_lm * sums[2]
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        scale = grad_total.float()
        return ((grad_hidden * scale).to(h_dtype), (grad_weight * scale).to(w_dtype),
                (grad_bias * scale).to(w_dtype) if ctx.has_bias else None,
                None, None, None, None, None, None, None)


def fused_head_losses(hidden, projection, teacher_hidden, teacher_projection, kd_rows, labels, terms: HeadTerms,
                      chunk: int = CHUNK_ROWS):
    """(combined loss, [ce_sum, mse_sum, lm_sum]) over the rows of `hidden` (N, H).

    projection / teacher_projection: the models' output Linear layers. kd_rows (N,) bool: rows for the
    soft-target and MSE terms. labels (N,): the target id of each row, -100 where none.
    """
    t_weight = teacher_projection.weight if teacher_projection is not None else None
    t_bias = teacher_projection.bias if teacher_projection is not None else None
    return _FusedHead.apply(hidden, projection.weight, projection.bias, teacher_hidden, t_weight, t_bias,
                            kd_rows, labels, terms, chunk)


def _parent_and_name(model: torch.nn.Module, target: torch.nn.Module):
    for name, module in model.named_modules():
        if module is target and name:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr
    return None, None


def output_projection(model: torch.nn.Module):
    """The model's output Linear when the fused path can stand in for it, else None."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "final_logit_softcapping", None):
        return None  # logits are transformed after the projection
    projection = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(projection, torch.nn.Linear):
        return None
    parent, _ = _parent_and_name(model, projection)
    return projection if parent is not None else None


@contextlib.contextmanager
def projection_bypassed(model: torch.nn.Module, projection: torch.nn.Module):
    """Make `model`'s forward return the states that would enter `projection` in place of logits."""
    parent, attr = _parent_and_name(model, projection)
    setattr(parent, attr, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(parent, attr, projection)
