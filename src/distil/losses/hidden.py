"""Losses on hidden states: cosine distance (the DistilBERT alignment term) and mean squared error.

States are shaped (..., H); a boolean `mask` shaped (...) picks the positions that count.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distil.losses.rows import check_pair, select_rows, zero_like_graph


def hidden_cosine(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean over selected positions of 1 - cos(student, teacher) along the hidden dimension.

    Equals `CosineEmbeddingLoss` with target +1 (the DistilBERT alignment term). Hidden states
    (..., H); `mask` (...) picks positions. Raises ValueError when the hidden sizes differ.
    """
    check_pair(student_hidden, teacher_hidden, "hidden states")
    student = select_rows(student_hidden, mask)
    teacher = select_rows(teacher_hidden, mask)
    if student.shape[0] == 0:
        return zero_like_graph(student)
    cosine = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return (1.0 - cosine).mean()


def hidden_mse(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean squared error over selected positions and hidden dimensions (float32)."""
    check_pair(student_hidden, teacher_hidden, "hidden states")
    student = select_rows(student_hidden, mask)
    teacher = select_rows(teacher_hidden, mask)
    if student.shape[0] == 0:
        return zero_like_graph(student)
    return F.mse_loss(student.float(), teacher.float())
