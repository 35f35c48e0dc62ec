"""The output layer and every logit loss in one pass over chunks of rows: no (tokens x vocabulary) tensor.

With a 30K-250K vocabulary, the logits of the student, the teacher, their softmaxes and the gradient are each
tokens x vocabulary floats: with plain losses they are most of the memory and much of the time. Here the
student's last hidden states (before the vocabulary projection) go in with the teacher's signals for the rows the
soft-target term counts (dense: the teacher's states and output layer, projected chunk by chunk here; sparse: top-k,
rest mass, drawn tokens). Each chunk of rows is projected and put through the model's own logit transform
(distil.teacher_signal.output_layer); its LM cross-entropy, its soft-target divergence (Divergence.value_and_grad, for
whatever form the chunk's signals have) and, against dense signals, its logit squared error are summed; and the
gradients with respect to the hidden states, the projection weight and its bias are accumulated at once (the loss
is a scalar, so the backward pass only scales them). The live teacher's fused head (training.fused_head) and the
store's (training.store_run) both run here; tests/test_signal_parity.py holds it to a plain formulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distil.teacher_signal.output_layer import LogitTransform, chain_through_transform_, project_into, transform_logits_
from distil.teacher_signal.divergences import Divergence
from distil.teacher_signal.signals import DenseSignals, Signals

CHUNK_ROWS = 128


@dataclass
class HeadTerms:
    """Which logit terms to compute, with the coefficient each sum gets in the combined loss."""

    temperature: float
    coef_ce: float = 0.0      # soft-target divergence (times T^2), summed over kd rows
    divergence: str = "forward_kl"  # see distil.teacher_signal.divergences
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    coef_mse: float = 0.0     # logit squared error summed over the vocabulary, over kd rows (dense signals only)
    coef_lm: float = 0.0      # cross-entropy against row labels (MLM targets or next tokens)

    @property
    def soft_target(self) -> Divergence:
        return Divergence(self.divergence, self.temperature, self.jsd_beta, self.skew_alpha)


_WORKSPACE: dict[tuple, torch.Tensor] = {}


def workspace(rows: int, vocab: int, device: torch.device, count: int = 3) -> torch.Tensor:
    """`count` float32 (rows, vocab) buffers kept from step to step (a chunk's student logits, the teacher's and
    scratch; a fourth keeps tanh of soft-capped student logits for their derivative). Every logits-sized
    intermediate is written into them with out= and in-place ops: glibc serves a fresh allocation of that size
    with mmap, so each one is page-faulted in at every use, which on a CPU cost about as much as the arithmetic
    (165,000 faults and 0.2 s per step at batch 16 x 46, vocabulary 30,522)."""
    key = (rows, vocab, device, count)
    buf = _WORKSPACE.get(key)
    if buf is None:
        _WORKSPACE.clear()
        buf = _WORKSPACE[key] = torch.empty(count, rows, vocab, dtype=torch.float32, device=device)
    return buf


def lm_cross_entropy(s: torch.Tensor, labels: torch.Tensor, coef: float):
    """(cross-entropy summed over the rows with a label (not -100), those rows, coef * its gradient on them).
    Only the labelled rows are copied (about 15% under MLM)."""
    rows = (labels != -100).nonzero().squeeze(1)
    if not rows.numel():
        return s.new_zeros(()), rows, None
    log_p = F.log_softmax(s.index_select(0, rows), dim=-1)
    target = labels.index_select(0, rows).unsqueeze(1)
    value = -log_p.gather(1, target).sum()
    grad = log_p.exp_()
    grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
    return value, rows, grad.mul_(coef)


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


def _not_sharing(grad: torch.Tensor, *buffers: torch.Tensor) -> torch.Tensor:
    """The first of `buffers` whose memory `grad` does not start in."""
    return next(b for b in buffers if b.data_ptr() != grad.data_ptr())


class _OutputLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, kd_rows, labels, signals: Signals | None, terms: HeadTerms, chunk: int,
                transform: LogitTransform | None):
        n, vocab = hidden.shape[0], weight.shape[0]
        grads = HeadGradients(hidden, weight, bias)
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)  # soft target, logit mse, cross-entropy
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        dense = isinstance(signals, DenseSignals)
        uses_signals = signals is not None and (terms.coef_ce != 0 or (dense and terms.coef_mse != 0))
        divergence = terms.soft_target if terms.coef_ce != 0 else None
        capped = transform is not None and transform.softcap is not None
        work = workspace(chunk, vocab, hidden.device, 4 if capped else 3)
        # The signals hold one row per kd row, in order: a chunk's are a contiguous run of them.
        kd_positions = kd_rows.nonzero().squeeze(1)
        bounds = torch.searchsorted(kd_positions, torch.arange(0, n + chunk, chunk, device=kd_rows.device)).tolist()
        for index, start in enumerate(range(0, n, chunk)):
            rows = slice(start, min(n, start + chunk))
            c = rows.stop - start
            h = hidden[rows]
            s = project_into(work[0, :c], h, w, b)          # student logits
            if transform is not None:  # the model's own transform, switched off in the model meanwhile
                transform_logits_(s, transform, work[3, :c] if capped else None)
            lm_rows, lm_grad = None, None
            if terms.coef_lm != 0:
                value, lm_rows, lm_grad = lm_cross_entropy(s, labels[rows], terms.coef_lm)
                sums[2] += value
            first, last = bounds[index], bounds[index + 1]
            grad = None
            if uses_signals and last > first:
                every_row = last - first == c
                if every_row:   # s, the teacher's logits, scratch; s is not needed after this
                    s_kd, scratch, free = s, work[2, :c], ()
                else:           # the kd rows of s, gathered; s itself is dead (cross-entropy is done)
                    kd = kd_positions[first:last] - start
                    s_kd = torch.index_select(s, 0, kd, out=work[2, :last - first])
                    scratch, free = work[0, :last - first], (work[0, :c], work[2, :c])
                chunk_signals = signals.rows(slice(first, last))
                mse_grad = None
                if dense:
                    t = chunk_signals.logits_into(work[1, :last - first])
                    chunk_signals = DenseSignals(logits=t)
                    if terms.coef_mse != 0:  # rare term: plain temporaries are fine
                        diff = s_kd - t
                        sums[1] += (diff * diff).sum()
                        mse_grad = diff.mul_(2.0 * terms.coef_mse)
                if divergence is not None:
                    value, grad = divergence.value_and_grad(s_kd, chunk_signals, terms.coef_ce, scratch)
                    sums[0] += value
                    if mse_grad is not None:
                        grad.add_(mse_grad)
                else:
                    grad = mse_grad
                if not every_row:  # back onto the chunk's rows, in a buffer the kd gradient does not occupy
                    grad = _not_sharing(grad, *free).zero_().index_copy_(0, kd, grad)
            if grad is None:
                grad = work[2, :c].zero_()
            if lm_grad is not None:
                grad.index_add_(0, lm_rows, lm_grad)
            if transform is not None:  # back through the transform to the projected logits
                chain_through_transform_(grad, transform, work[3, :c] if capped else None)
            grads.add(rows, grad, h, w)
            del grad, lm_grad
        grads.save(ctx)
        total = terms.coef_ce * sums[0] + terms.coef_mse * sums[1] + terms.coef_lm * sums[2]
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        return HeadGradients.scaled(ctx, grad_total) + (None,) * 6


def output_layer_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        kd_rows: torch.Tensor, labels: torch.Tensor, signals: Signals | None, terms: HeadTerms,
                        chunk: int = CHUNK_ROWS, transform: LogitTransform | None = None):
    """(coef_ce * soft-target sum + coef_mse * logit squared error sum + coef_lm * cross-entropy sum,
    [soft-target sum, squared error sum, cross-entropy sum]) over the rows of `hidden` (N, H), whose logits are
    transform(hidden @ weight.T + bias). kd_rows (N,) bool: the rows of the soft-target and squared-error terms;
    `signals` holds one row per kd row, in order (None when neither term is computed). labels (N,): the target id
    of each row, -100 where none. Differentiable with respect to hidden, weight and bias."""
    return _OutputLayer.apply(hidden, weight, bias, kd_rows, labels, signals, terms, chunk, transform)
