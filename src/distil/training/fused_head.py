"""The output layer and every logit loss in one pass over chunks of rows: no (tokens x vocabulary) tensor.

With a 30K-250K vocabulary, the logits of the student, the teacher, their softmaxes and the gradient are each
tokens x vocabulary floats: on the seed's loop they were most of the memory and much of the time. Here the
student's last hidden states (before the vocabulary projection) and the teacher's go in; each chunk of rows is
projected, its soft-target divergence, MLM/causal cross-entropy and logit MSE are summed, and the gradients with respect
to the hidden states, the projection weight and its bias are accumulated at once (the loss is a scalar, so the
backward pass only scales them). The values equal the plain formulation in `distil.losses` (tested).

Models that transform their logits after the output layer (Gemma-2's `final_logit_softcapping`:
cap * tanh(logits / cap); Cohere's `logit_scale`: logits * scale; Granite's `logits_scaling`: logits / scaling)
get the same transform here (distil.losses.logit_transform, shared with the store's sparse head), on each chunk,
on the student's side and the teacher's, with its derivative in the gradient: `output_projection` records the model's transform with the projection it returns, the fused head
applies it after projecting, and `projection_replaced` switches the model's own transform off while the fused
head stands in for its output layer (else it would be applied to the fused loss or to the teacher's states).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distil.loading import vocab_size_of
from distil.losses.logit_transform import LogitTransform, chain_through_transform_, transform_logits_

CHUNK_ROWS = 128


@dataclass
class HeadTerms:
    """Which logit terms to compute, with the coefficient each sum gets in the combined loss."""

    temperature: float
    coef_ce: float = 0.0      # soft-target divergence (times T^2), summed over kd rows
    divergence: str = "forward_kl"  # see distil.losses.divergences
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    coef_mse: float = 0.0     # logit squared error summed over the vocabulary, over kd rows
    coef_lm: float = 0.0      # cross-entropy against row labels (MLM targets or next tokens)


# model_type -> (where the model reads its setting: "config" or "model" (an attribute of the LM module itself),
# the attribute, what it does, the value under which the model leaves its logits as they are). Read from the
# `*ForCausalLM.forward` of transformers 5; a model with one of these config keys that is not listed here keeps
# the plain (unfused) losses, which use the model's own logits.
POST_PROCESSING = {
    "gemma2": ("config", "final_logit_softcapping", "softcap", None),
    "gemma3_text": ("config", "final_logit_softcapping", "softcap", None),
    "vaultgemma": ("config", "final_logit_softcapping", "softcap", None),
    "cohere": ("model", "logit_scale", "multiply", 1.0),
    "cohere2": ("model", "logit_scale", "multiply", 1.0),
    "granite": ("config", "logits_scaling", "divide", 1.0),
    "granitemoe": ("config", "logits_scaling", "divide", 1.0),
    "granitemoeshared": ("config", "logits_scaling", "divide", 1.0),
}
TRANSFORMING_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# projection -> (its model, weakly; the LogitTransform; the POST_PROCESSING entry), filled by output_projection.
_TRANSFORMS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def logit_transform(model: torch.nn.Module) -> LogitTransform | None | bool:
    """The model's post-projection transform: a LogitTransform, None when it has none, False when it has one that
    distil does not know (the fused head then cannot stand in for its output layer)."""
    config = getattr(model, "config", None)
    entry = POST_PROCESSING.get(getattr(config, "model_type", None))
    if entry is None:
        return False if any(getattr(config, key, None) for key in TRANSFORMING_KEYS) else None
    holder, attr, kind, neutral = entry
    value = getattr(model if holder == "model" else config, attr, None)
    if value is None or value == neutral:
        return None
    return LogitTransform(**{kind: float(value)})


def transform_of(projection: torch.nn.Module | None) -> LogitTransform | None:
    """The transform recorded with `projection` by output_projection (None: logits are used as projected)."""
    found = _TRANSFORMS.get(projection) if projection is not None else None
    return found[1] if found is not None else None


@contextlib.contextmanager
def _model_transform_off(projection: torch.nn.Module):
    """The model of `projection` leaves its logits untransformed for the duration of the block (the fused head
    applies the transform itself)."""
    found = _TRANSFORMS.get(projection)
    model = found[0]() if found is not None else None
    if model is None:
        yield
        return
    holder, attr, _, neutral = found[2]
    target = model if holder == "model" else model.config
    before = getattr(target, attr)
    setattr(target, attr, neutral)
    try:
        yield
    finally:
        setattr(target, attr, before)


_WORKSPACE: dict[tuple, torch.Tensor] = {}


def _workspace(rows: int, vocab: int, device: torch.device, count: int = 3) -> torch.Tensor:
    """Three float32 (rows, vocab) buffers kept from step to step (one chunk's student logits, teacher logits and
    scratch; a fourth keeps tanh of the soft-capped student logits for their derivative). Every logits-sized intermediate is written into them with out= and in-place ops: glibc serves a
    fresh allocation of that size with mmap, so each one is page-faulted in at every use, which on a CPU cost
    about as much as the arithmetic (165,000 faults and 0.2 s per step at batch 16 x 46, vocabulary 30,522)."""
    key = (rows, vocab, device, count)
    buf = _WORKSPACE.get(key)
    if buf is None:
        _WORKSPACE.clear()
        buf = _WORKSPACE[key] = torch.empty(count, rows, vocab, dtype=torch.float32, device=device)
    return buf


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if h.dtype == torch.float32 and w.dtype == torch.float32 and (b is None or b.dtype == torch.float32):
        return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)
    return out.copy_(F.linear(h, w.to(h.dtype), b.to(h.dtype) if b is not None else None))


def _divergence_and_grad(s: torch.Tensor, t: torch.Tensor, kd: torch.Tensor, terms: HeadTerms):
    """(divergence summed over the chunk's kd rows, its gradient with respect to the chunk's student logits)."""
    from distil.losses.divergences import divergence_sum

    with torch.enable_grad():
        logits = s.detach().requires_grad_(True)
        value = divergence_sum(logits[kd], t[kd], terms.divergence, terms.temperature, terms.jsd_beta,
                               terms.skew_alpha)
        (d_logits,) = torch.autograd.grad(value, logits)
    return value.detach(), d_logits


class HeadGradients:
    """The gradients of a fused head's loss with respect to its hidden states, weight and bias, accumulated in
    float32 chunk by chunk during the forward and handed to backward, scaled by the incoming gradient."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        self.hidden = torch.zeros_like(hidden, dtype=torch.float32)
        self.weight = torch.zeros_like(weight, dtype=torch.float32)
        self.bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        self.dtypes = (hidden.dtype, weight.dtype)

    def add(self, rows: slice, grad: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        """Add one chunk: `grad` is d loss / d logits of the chunk's rows `h` (float32), `w` the weight used."""
        g = grad.to(h.dtype)
        if g.dtype == torch.float32 and w.dtype == torch.float32:
            torch.mm(g, w, out=self.hidden[rows])
            self.weight.addmm_(g.t(), h)
        else:
            self.hidden[rows] = g @ w
            self.weight += (g.t() @ h).float()
        if self.bias is not None:
            self.bias += grad.sum(0)

    def save(self, ctx) -> None:
        ctx.save_for_backward(self.hidden, self.weight, self.bias if self.bias is not None else torch.empty(0))
        ctx.has_bias = self.bias is not None
        ctx.dtypes = self.dtypes
        ctx.used = False

    @staticmethod
    def scaled(ctx, grad_total: torch.Tensor) -> tuple:
        """(d hidden, d weight, d bias or None), times the loss's incoming gradient."""
        if ctx.used:
            raise RuntimeError("the fused head's gradients are scaled in place; backward through it runs once")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        scale = grad_total.float()
        # In place: these buffers exist only for this backward, and a weight-sized copy costs a page-faulted
        # allocation per step.
        return (grad_hidden.mul_(scale).to(h_dtype), grad_weight.mul_(scale).to(w_dtype),
                grad_bias.mul_(scale).to(w_dtype) if ctx.has_bias else None)


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, kd_rows, labels,
                terms: HeadTerms, chunk: int, transforms: tuple):
        n, vocab = hidden.shape[0], weight.shape[0]
        T = terms.temperature
        grads = HeadGradients(hidden, weight, bias)
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)  # ce, mse, lm
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        need_teacher = terms.coef_ce != 0 or terms.coef_mse != 0
        s_transform, t_transform = transforms  # the models' own post-projection transforms, or None
        capped = s_transform is not None and s_transform.softcap is not None
        work = _workspace(chunk, vocab, hidden.device, 4 if capped else 3)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            c = rows.stop - start
            h = hidden[rows]
            s = _logits_into(work[0, :c], h, w, b)          # student logits
            if s_transform is not None:
                transform_logits_(s, s_transform, work[3, :c] if capped else None)
            grad = work[2, :c]                               # d loss / d logits, built in place
            have_grad = False
            lm_rows, lm_grad = None, None
            if terms.coef_lm != 0:
                lab = labels[rows]
                lm_rows = (lab != -100).nonzero().squeeze(1)
                if lm_rows.numel():
                    # cross-entropy on the labelled rows only (about 15% under MLM): a small copy
                    log_p = F.log_softmax(s.index_select(0, lm_rows), dim=-1)
                    target = lab.index_select(0, lm_rows).unsqueeze(1)
                    sums[2] -= log_p.gather(1, target).sum()
                    lm_grad = log_p.exp_()
                    lm_grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=lm_grad.dtype))
                    lm_grad.mul_(terms.coef_lm)
            if need_teacher:
                kd = kd_rows[rows]
                every_row = bool(kd.all())
                t = _logits_into(work[1, :c], teacher_hidden[rows], teacher_weight, teacher_bias)
                if t_transform is not None:
                    transform_logits_(t, t_transform)
                if terms.coef_mse != 0:
                    # rare term: plain temporaries are fine
                    diff = (s - t) * kd.unsqueeze(1).to(s.dtype)
                    sums[1] += (diff * diff).sum()
                    grad.copy_(diff).mul_(2.0 * terms.coef_mse)
                    have_grad = True
                    del diff
                if terms.coef_ce != 0 and terms.divergence != "forward_kl":
                    # Any other divergence: its plain formulation, differentiated on this chunk alone.
                    value, d_logits = _divergence_and_grad(s, t, kd, terms)
                    sums[0] += value
                    d_logits.mul_(terms.coef_ce)
                    if have_grad:
                        grad.add_(d_logits)
                    else:
                        grad = d_logits
                        have_grad = True
                elif terms.coef_ce != 0:
                    scratch = work[2, :c] if not have_grad else torch.empty_like(t)
                    log_p_t = torch.log_softmax(t.div_(T), dim=-1, out=scratch)
                    p_t = torch.exp(log_p_t, out=t)                      # teacher probabilities replace its logits
                    if not every_row:
                        p_t[~kd] = 0.0
                    # log p_s = s/T - logsumexp(s/T), and q = softmax(s/T), computed in place in s
                    s.div_(T)
                    diff = log_p_t.sub_(s)                               # log p_t - s/T
                    row_max = s.amax(dim=-1, keepdim=True)
                    q = s.sub_(row_max).exp_()
                    row_sum = q.sum(dim=-1, keepdim=True)
                    diff.add_(row_max + row_sum.log())                   # log p_t - log p_s
                    sums[0] += diff.mul_(p_t).sum() * (T * T)
                    del diff, log_p_t, scratch
                    # d(T^2 KL)/d logits = T (softmax(s/T) - softmax(t/T)) on kd rows
                    q.div_(row_sum).sub_(p_t).mul_(terms.coef_ce * T)
                    if not every_row:
                        q[~kd] = 0.0
                    if have_grad:
                        grad.add_(q)
                    else:
                        grad = q
                        have_grad = True
            if not have_grad:
                grad.zero_()
            if lm_grad is not None:
                grad.index_add_(0, lm_rows, lm_grad)
                del lm_grad
            if s_transform is not None:  # back through the transform to the projected logits
                chain_through_transform_(grad, s_transform, work[3, :c] if capped else None)
            grads.add(rows, grad, h, w)
            del grad
        grads.save(ctx)
        total = terms.coef_ce * sums[0] + terms.coef_mse * sums[1] + terms.coef_lm * sums[2]
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        return HeadGradients.scaled(ctx, grad_total) + (None,) * 8


def _full(tensor):
    """A teacher parameter whole: a sharded one (FSDP) is gathered; it is frozen, so no gradient flows back."""
    return tensor.full_tensor() if tensor is not None and hasattr(tensor, "full_tensor") else tensor


def fused_head_losses(hidden, projection, teacher_hidden, teacher_projection, kd_rows, labels, terms: HeadTerms,
                      chunk: int = CHUNK_ROWS, vocab_limit: int | None = None, transforms: tuple | None = None):
    """(combined loss, [ce_sum, mse_sum, lm_sum]) over the rows of `hidden` (N, H).

    projection / teacher_projection: the models' output Linear layers. kd_rows (N,) bool: rows for the
    soft-target and MSE terms. labels (N,): the target id of each row, -100 where none. vocab_limit: use only the
    first ids of both output layers (layers padded to different sizes beyond a shared tokenizer). transforms:
    (student's, teacher's) LogitTransform applied after projecting; by default those that output_projection
    recorded with the two projections (the models' own soft-capping / scaling).
    """
    if transforms is None:
        transforms = (transform_of(projection), transform_of(teacher_projection))
    keep = slice(None) if vocab_limit is None else slice(0, vocab_limit)
    weight, bias = projection.weight[keep], projection.bias[keep] if projection.bias is not None else None
    t_weight = _full(teacher_projection.weight)[keep] if teacher_projection is not None else None
    t_bias = _full(teacher_projection.bias) if teacher_projection is not None else None
    t_bias = t_bias[keep] if t_bias is not None else None
    return _FusedHead.apply(hidden, weight, bias, teacher_hidden, t_weight, t_bias, kd_rows, labels, terms, chunk,
                            tuple(transforms))


def _parent_and_name(model: torch.nn.Module, target: torch.nn.Module):
    for name, module in model.named_modules():
        if module is target and name:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr
    return None, None


def output_projection(model: torch.nn.Module):
    """The model's output Linear when the fused path can stand in for it, else None. A model that transforms its
    logits after the projection in a way distil knows (POST_PROCESSING) has the transform recorded with the
    projection, for fused_head_losses and projection_replaced; one it does not know gets None."""
    config = getattr(model, "config", None)
    transform = logit_transform(model)
    if transform is False:
        return None  # logits transformed after the projection in a way distil does not know: plain losses
    projection = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(projection, torch.nn.Linear):
        return None
    # Some heads report an inner hidden->hidden layer as their output embeddings (DeBERTa-v2 with legacy=False
    # projects with the word embeddings afterwards): only a layer onto the vocabulary can stand for the head.
    if config is None or projection.out_features != vocab_size_of(config):
        return None
    parent, _ = _parent_and_name(model, projection)
    if parent is None:
        return None
    if transform is None:
        _TRANSFORMS.pop(projection, None)
    else:
        _TRANSFORMS[projection] = (weakref.ref(model), transform, POST_PROCESSING[config.model_type])
    return projection


@contextlib.contextmanager
def projection_replaced(projection: torch.nn.Module, forward):
    """Run `forward(states)` where the model calls its output layer, for the duration of the block.

    The module stays where it is (only its forward is swapped on the instance), so wrappers that manage its
    parameters see nothing change: under FSDP the output layer's weight is gathered for the model's forward as
    usual, and the fused head, running inside that forward, reads the full weight and returns its gradient
    through autograd like any layer. The model's `logits` output is then whatever `forward` returns: the
    states themselves for the teacher, the fused loss for the student. A model that transforms its logits
    (soft-capping, scaling) has that switched off meanwhile: the fused head applies it to each chunk itself."""
    projection.forward = forward
    try:
        with _model_transform_off(projection):
            yield
    finally:
        del projection.forward
