"""Row selection shared by every loss: pick the positions that count, as one (N, D) gather.

Rows are picked once with boolean row indexing on the (..., D) tensor, which gathers only the selected rows.
The older formulation expanded the mask over the vocabulary and used `masked_select` on (B, L, V), which builds
a (B, L, V) mask and copies the logits several times; on real vocabularies that cost as much as the forward
pass. Upcasting to float32 happens after the selection, so half-precision inputs are converted only for the
rows that are used. Empty selections give a zero that stays attached to the graph instead of the NaN a mean
over nothing would give; a batch with nothing to learn from then contributes nothing.
"""

from __future__ import annotations

from torch import Tensor


def check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
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


def select_rows(x: Tensor, mask: Tensor | None) -> Tensor:
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


def zero_like_graph(x: Tensor) -> Tensor:
    """A float32 zero that keeps `x` in the graph, for selections with no rows."""
    return x.float().sum() * 0.0
