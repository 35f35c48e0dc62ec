"""Distillation losses as small pure functions on tensors.

Every function here takes logits or hidden states shaped (..., D) and, where it matters, a boolean
`mask` shaped (...) that picks the rows (positions) that count. The training loop decides which
terms to compute and mixes them with `combine`.

Speed: rows are picked once with boolean row indexing on the (..., D) tensor, which gathers only
the selected rows, (N, D). The older formulation expanded the mask over the vocabulary and used
`masked_select` on (B, L, V), which builds a (B, L, V) mask and copies the logits several times;
on real vocabularies that cost as much as the forward pass. Upcasting to float32 happens after the
selection, so half-precision logits are converted only for the rows that are used.

Empty selections (no selected row, no labelled token) give a zero that stays attached to the
graph instead of the NaN a mean over nothing would give; a batch with nothing to learn from then
contributes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "soft_target_kl",
    "masked_lm_loss",
    "causal_lm_loss",
    "logit_mse",
    "hidden_cosine",
    "hidden_mse",
    "combine",
    "check_finite",
]


def _check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student and teacher {what} differ in their last dimension "
            f"({student.shape[-1]} vs {teacher.shape[-1]}); the two models must share it "
            f"(same vocabulary for logits, same hidden size for hidden states)."
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} have different shapes "
            f"({tuple(student.shape)} vs {tuple(teacher.shape)})."
        )


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of `x` (..., D) that `mask` (...) selects, as (N, D); all rows when mask is None."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if mask.shape != x.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the leading dimensions "
            f"{tuple(x.shape[:-1])} of a tensor shaped {tuple(x.shape)}."
        )
    # Boolean indexing over the leading dims gathers whole rows: one (N, D) copy, no (..., D) mask.
    return x[mask.bool()]


def _zero_like_graph(x: Tensor) -> Tensor:
    """A float32 zero that keeps `x` in the graph, for selections with no rows."""
    return x.float().sum() * 0.0


def soft_target_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """KL(teacher_T || student_T) * T**2, summed over the vocabulary and averaged over selected rows.

    `*_T = softmax(logits / T)`. Logits (..., V); `mask` (...) picks rows (e.g. non-pad positions).
    The T**2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    Computed in float32 whatever the input dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    _check_pair(student_logits, teacher_logits, "logits")
    student = _rows(student_logits, mask)
    teacher = _rows(teacher_logits, mask)
    n_rows = student.shape[0]
    if n_rows == 0:
        return _zero_like_graph(student)
    student_log_probs = F.log_softmax(student.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher.float() / temperature, dim=-1)
    # log_target=True: exp(t) * (t - s) is exact where the teacher probability underflows to 0.
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="sum", log_target=True)
    return kl / n_rows * (temperature**2)


def masked_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over positions whose label is not `ignore_index`.

    Logits (..., V), labels (...). Only the labelled rows (about 15% under MLM) are gathered and
    upcast to float32.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)} "
            f"without its last (vocabulary) dimension."
        )
    labelled = labels != ignore_index
    rows = logits[labelled]
    if rows.shape[0] == 0:
        return _zero_like_graph(rows)
    return F.cross_entropy(rows.float(), labels[labelled])


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy: logits[:, :-1] predict labels[:, 1:]; `ignore_index` labels skipped.

    Logits (B, L, V), labels (B, L) (typically the input ids with padding set to `ignore_index`).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"causal_lm_loss expects logits (B, L, V) and labels (B, L); "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    # The shifted slice is a view; masked_lm_loss's boolean indexing gathers from it directly.
    return masked_lm_loss(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index)


def logit_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Squared error summed over the vocabulary, averaged over selected rows.

    This is the original DistilBERT code's definition (`MSELoss(reduction="sum") / n_rows`), not
    a per-element mean: its scale grows with the vocabulary size, so its weight in the mix must be
    chosen with that in mind. Computed in float32.
    """
    _check_pair(student_logits, teacher_logits, "logits")
    student = _rows(student_logits, mask)
    teacher = _rows(teacher_logits, mask)
    n_rows = student.shape[0]
    if n_rows == 0:
        return _zero_like_graph(student)
    return F.mse_loss(student.float(), teacher.float(), reduction="sum") / n_rows


def hidden_cosine(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean over selected positions of 1 - cos(student, teacher) along the hidden dimension.

    Equals `CosineEmbeddingLoss` with target +1 (the DistilBERT alignment term). Hidden states
    (..., H); `mask` (...) picks positions. Raises ValueError when the hidden sizes differ.
    """
    _check_pair(student_hidden, teacher_hidden, "hidden states")
    student = _rows(student_hidden, mask)
    teacher = _rows(teacher_hidden, mask)
    if student.shape[0] == 0:
        return _zero_like_graph(student)
    cosine = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return (1.0 - cosine).mean()


def hidden_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean squared error over selected positions and hidden dimensions (float32)."""
    _check_pair(student_hidden, teacher_hidden, "hidden states")
    student = _rows(student_hidden, mask)
    teacher = _rows(teacher_hidden, mask)
    if student.shape[0] == 0:
        return _zero_like_graph(student)
    return F.mse_loss(student.float(), teacher.float())


def combine(
    terms: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of loss terms, and their detached values for logging.

    Terms whose weight is zero are left out (they need not be computed at all). Every term must
    have a weight, and every non-zero weight a term. The returned dict holds the value of each
    used term and `"total"`; it is read from the device in one transfer.
    """
    missing_weight = [name for name in terms if name not in weights]
    if missing_weight:
        raise ValueError(f"no weight given for loss term(s) {missing_weight}.")
    missing_term = [name for name, w in weights.items() if w != 0 and name not in terms]
    if missing_term:
        raise ValueError(f"loss term(s) {missing_term} have a non-zero weight but were not computed.")
    if "total" in terms:
        raise ValueError("'total' is reserved for the weighted sum; rename that loss term.")
    used = [name for name in terms if weights[name] != 0]
    if not used:
        raise ValueError("every loss weight is zero; at least one term must have a non-zero weight.")
    total = sum(weights[name] * terms[name] for name in used)
    values = [terms[name].detach().float().reshape(()) for name in used]
    numbers = torch.stack(values + [total.detach().float().reshape(())]).tolist()
    return total, dict(zip(used + ["total"], numbers))


def check_finite(terms: Mapping[str, Tensor | float], step: int) -> None:
    """Raise FloatingPointError naming the step and the first non-finite term, e.g.
    "step 12: loss term 'kd' is nan". Tensors are checked with a single device transfer."""
    names = list(terms)
    tensor_names = [n for n in names if isinstance(terms[n], Tensor)]
    tensor_values: dict[str, float] = {}
    if tensor_names:
        stacked = torch.stack([terms[n].detach().float().reshape(()) for n in tensor_names])
        if bool(torch.isfinite(stacked).all()):
            tensor_values = {n: 0.0 for n in tensor_names}
        else:
            tensor_values = dict(zip(tensor_names, stacked.tolist()))
    for name in names:
        value = tensor_values[name] if name in tensor_values else float(terms[name])
        if not math.isfinite(value):
            raise FloatingPointError(f"step {step}: loss term '{name}' is {value}")
