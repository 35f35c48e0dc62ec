"""Losses on logits: soft-target KL at a temperature, masked-LM and causal-LM cross-entropy, logit MSE.

Logits are shaped (..., V); where it matters a boolean `mask` shaped (...) picks the rows (positions) that
count. These are the plain formulations; the training loop's fused head computes the same values in row chunks
and is tested against them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distil.losses.rows import check_pair, select_rows, zero_like_graph


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
    return soft_target_loss(student_logits, teacher_logits, temperature, mask, "forward_kl")


def soft_target_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None = None,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """A divergence between softened teacher and student distributions (see distil.teacher_signal.divergences), times
    T**2, averaged over selected rows. forward_kl is `soft_target_kl`."""
    from distil.teacher_signal.divergences import divergence_sum

    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    check_pair(student_logits, teacher_logits, "logits")
    student = select_rows(student_logits, mask)
    teacher = select_rows(teacher_logits, mask)
    if student.shape[0] == 0:
        return zero_like_graph(student)
    return divergence_sum(student, teacher, divergence, temperature, jsd_beta, skew_alpha) / student.shape[0]


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
        return zero_like_graph(rows)
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
    check_pair(student_logits, teacher_logits, "logits")
    student = select_rows(student_logits, mask)
    teacher = select_rows(teacher_logits, mask)
    n_rows = student.shape[0]
    if n_rows == 0:
        return zero_like_graph(student)
    return F.mse_loss(student.float(), teacher.float(), reduction="sum") / n_rows
