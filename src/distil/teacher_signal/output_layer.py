"""The output layer as the engine computes it in chunks: the projection (`project_into`), then what some models do
to their logits after it, and that transform's derivative.

Gemma-2's `final_logit_softcapping`: cap * tanh(logits / cap); Cohere's `logit_scale`: logits * scale; Granite's
`logits_scaling`: logits / scaling. The output-layer engine (distil.teacher_signal.engine, for a live
teacher and for a store) stands in for the output layer and switches the model's own transform off, so it applies
the transform to each chunk of projected logits itself and chains its gradient back through it: these two in-place
functions are that one definition, and `LogitTransform.__call__` the plain form both are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its logits after the output layer, in this order: multiply by `multiply` (Cohere's
    logit_scale), divide by `divide` (Granite's logits_scaling), then cap * tanh(logits / cap) with cap =
    `softcap` (Gemma-2's final_logit_softcapping). The operations are the model's own, in its order."""

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The plain, differentiable form (what the model computes)."""
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def transform_logits_(logits: torch.Tensor, transform: LogitTransform, tanh_out: torch.Tensor | None = None):
    """Apply `transform` to a chunk's logits in place; with `tanh_out`, keep tanh(logits / cap) there (for the
    derivative)."""
    if transform.multiply is not None:
        logits.mul_(transform.multiply)
    if transform.divide is not None:
        logits.div_(transform.divide)
    if transform.softcap is not None:
        logits.div_(transform.softcap)
        if tanh_out is None:
            logits.tanh_()
        else:
            logits.copy_(torch.tanh(logits, out=tanh_out))
        logits.mul_(transform.softcap)
    return logits


def chain_through_transform_(grad: torch.Tensor, transform: LogitTransform, tanh: torch.Tensor | None) -> torch.Tensor:
    """d loss / d projected logits from d loss / d transformed logits, in place (`tanh`, kept by
    transform_logits_, is consumed)."""
    if transform.softcap is not None:
        grad.mul_(tanh.square_().neg_().add_(1.0))   # d cap tanh(u / cap) / du = 1 - tanh^2
    if transform.divide is not None:
        grad.div_(transform.divide)
    if transform.multiply is not None:
        grad.mul_(transform.multiply)
    return grad


def project_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """h @ w.T + b written into the float32 buffer `out`."""
    if h.dtype == torch.float32 and w.dtype == torch.float32 and (b is None or b.dtype == torch.float32):
        return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)
    return out.copy_(F.linear(h, w.to(h.dtype), b.to(h.dtype) if b is not None else None))
