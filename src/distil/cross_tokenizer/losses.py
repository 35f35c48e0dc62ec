"""Divergences between next-token distributions over two different vocabularies.

Inputs are the rows that count, already aligned (distil.cross_tokenizer.alignment): student logits (N, Vs) and
teacher logits (N, Vt), row n of both predicting the same text boundary. As for the same-vocabulary divergences
(distil.teacher_signal.divergences): both sides are softened at temperature T (q = softmax(student / T),
p = softmax(teacher / T)), the value is summed over the vocabulary, multiplied by T^2, and `*_sum` sums over rows
while `*_loss` averages over (masked) rows.

  uld     Universal Logit Distillation (Boizard et al. 2024): the Wasserstein-1 distance between the two
          distributions under a cost that ignores which token is which, which is the L1 distance between the
          probability vectors sorted in decreasing order, the shorter one padded with zeros:
              sum_i | p_sorted(i) - q_sorted(i) |
          It is zero when one distribution is a permutation of the other, whatever the ids.
  hybrid  For the tokens whose text both vocabularies hold (distil.cross_tokenizer.vocabulary, id mapped to id) an
          exact forward KL; for the rest ULD. The exact part is the forward KL between the two distributions
          coarsened to the shared tokens plus one bucket holding all other tokens' mass:
              sum_{k shared} p_k log(p_k / q_k)  +  p_rest log(p_rest / q_rest)
          a proper divergence (zero only when the shared tokens' probabilities and the rest's total agree), with
          no renormalisation that could hide a mass difference; when both vocabularies are the same it is the
          forward KL itself (no bucket, no ULD term). When every student token is a shared one, the student has
          no mass to put in a bucket: the exact part is then the KL to the teacher's distribution renormalised over
          the shared tokens (the teacher's mass elsewhere is left to the ULD term). The rest's distributions are compared by ULD on their
          unnormalised probabilities (their masses differ exactly when the bucket term is non-zero):
              hybrid = T^2 [ exact + uld_weight * sum_i | p_rest_sorted(i) - q_rest_sorted(i) | ]
          GOLD (TRL's GOLDTrainer) compares the matched tokens' probabilities with a generalised JSD and the rest
          with the sorted L1, weighting the two by the shared fraction of the teacher's vocabulary; here the
          matched part is forward KL, so that it reduces to the same-tokenizer loss, and the weight is explicit.

Gradients come from autograd (torch.sort's values are differentiable). Computed in float32 (float64 inputs stay
float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.cross_tokenizer.vocabulary import VocabularyMapping
from distil.teacher_signal.divergences import divergence_sum
from distil.losses.rows import select_rows, zero_like_graph


def _dtype(a: Tensor, b: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def _check_rows(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"expected aligned rows (N, Vs) and (N, Vt); got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """sum over rows of sum_i |sort(p)_i - sort(q)_i| (decreasing order, the narrower side padded with zeros)."""
    p_sorted = p.sort(dim=-1, descending=True).values
    q_sorted = q.sort(dim=-1, descending=True).values
    width = max(p_sorted.shape[-1], q_sorted.shape[-1])
    p_sorted = F.pad(p_sorted, (0, width - p_sorted.shape[-1]))
    q_sorted = F.pad(q_sorted, (0, width - q_sorted.shape[-1]))
    return (p_sorted - q_sorted).abs().sum()


def uld_sum(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """ULD summed over the rows of (N, Vs) and (N, Vt) logits, times T^2."""
    _check_rows(student_logits, teacher_logits, temperature)
    dtype = _dtype(student_logits, teacher_logits)
    q = F.softmax(student_logits.to(dtype) / temperature, dim=-1)
    p = F.softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return sorted_l1(p, q) * temperature**2


def _shared_masks(mapping: VocabularyMapping, teacher_width: int, student_width: int, device) -> tuple[Tensor, ...]:
    """Index tensors of the shared ids on each side, and boolean masks of the others (over the logits' widths,
    which may exceed the tokenizers' sizes by padding rows)."""
    teacher_ids = torch.as_tensor(mapping.teacher_ids, dtype=torch.long, device=device)
    student_ids = torch.as_tensor(mapping.student_ids, dtype=torch.long, device=device)
    if len(teacher_ids) and (int(teacher_ids.max()) >= teacher_width or int(student_ids.max()) >= student_width):
        raise ValueError(f"the vocabulary mapping names ids beyond the logits' widths ({teacher_width}, {student_width})")
    teacher_rest = torch.ones(teacher_width, dtype=torch.bool, device=device)
    teacher_rest[teacher_ids] = False
    student_rest = torch.ones(student_width, dtype=torch.bool, device=device)
    student_rest[student_ids] = False
    return teacher_ids, student_ids, teacher_rest, student_rest


def _coarsened(log_probs: Tensor, shared: Tensor, rest: Tensor, with_bucket: bool) -> Tensor:
    """Log-probabilities of the shared tokens, then (with_bucket) the log of the rest's total mass."""
    parts = [log_probs[:, shared]]
    if with_bucket:
        bucket = torch.logsumexp(log_probs[:, rest], dim=-1, keepdim=True) if bool(rest.any()) else \
            torch.full_like(log_probs[:, :1], float("-inf"))
        parts.append(bucket)
    return torch.cat(parts, dim=-1)


def hybrid_parts_sum(student_logits: Tensor, teacher_logits: Tensor, mapping: VocabularyMapping,
                     temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(exact forward KL on the coarsened distributions, ULD on the rest), each summed over rows, times T^2."""
    _check_rows(student_logits, teacher_logits, temperature)
    dtype = _dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    teacher_ids, student_ids, teacher_rest, student_rest = _shared_masks(
        mapping, log_p.shape[-1], log_q.shape[-1], log_p.device)
    # A student whose every token the teacher also holds cannot put mass on the teacher's other tokens: a rest
    # bucket would make the KL infinite. Its exact part is then the KL to the teacher's distribution given that the
    # next token is a shared one (renormalised over the shared tokens).
    with_bucket = bool(student_rest.any())
    coarse_p = _coarsened(log_p, teacher_ids, teacher_rest, with_bucket)
    if not with_bucket:
        coarse_p = coarse_p - torch.logsumexp(coarse_p, dim=-1, keepdim=True)
    coarse_q = _coarsened(log_q, student_ids, student_rest, with_bucket)
    if with_bucket and not bool(teacher_rest.any()):
        # The teacher puts no mass outside the shared tokens: its bucket is log 0, which contributes 0 to the KL
        # (and would give 0 * inf = nan through the log-space formula).
        coarse_p[:, -1] = torch.finfo(dtype).min / 4
    # The coarsened log-probabilities are already normalised: the plain forward KL at T = 1 is the KL of them.
    exact = divergence_sum(coarse_q, coarse_p, "forward_kl", 1.0) * temperature**2
    rest = sorted_l1(log_p[:, teacher_rest].exp(), log_q[:, student_rest].exp()) * temperature**2
    return exact, rest


def hybrid_sum(student_logits: Tensor, teacher_logits: Tensor, mapping: VocabularyMapping,
               temperature: float = 1.0, uld_weight: float = 1.0) -> Tensor:
    """The hybrid divergence summed over rows, times T^2 (see the module docstring)."""
    exact, rest = hybrid_parts_sum(student_logits, teacher_logits, mapping, temperature)
    return exact + uld_weight * rest


def _mean_over_rows(total_fn, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None) -> Tensor:
    student = select_rows(student_logits, mask)
    teacher = select_rows(teacher_logits, mask)
    if student.shape[0] == 0:
        return zero_like_graph(student)
    return total_fn(student, teacher) / student.shape[0]


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
             mask: Tensor | None = None) -> Tensor:
    """ULD averaged over rows; logits (..., Vs) and (..., Vt) aligned row by row, `mask` (...) picks rows."""
    return _mean_over_rows(lambda s, t: uld_sum(s, t, temperature), student_logits, teacher_logits, mask)


def hybrid_loss(student_logits: Tensor, teacher_logits: Tensor, mapping: VocabularyMapping,
                temperature: float = 1.0, uld_weight: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """The hybrid divergence averaged over rows; shapes as for uld_loss."""
    return _mean_over_rows(lambda s, t: hybrid_sum(s, t, mapping, temperature, uld_weight),
                           student_logits, teacher_logits, mask)
