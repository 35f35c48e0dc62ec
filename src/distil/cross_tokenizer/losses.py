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

Against a sparse teacher (a store's top-k log-probabilities at the temperature and the log of the rest mass R
outside them, distil.teacher_signal.signals.SparseSignals) the teacher's distribution is known at its top-k only:
  uld     the sorted L1 with the teacher's tail as one bucket: the k stored probabilities are compared one by one
          with the student's k largest, and R with the student's remaining mass,
              sum_{i < k} | p_sorted(i) - q_sorted(i) |  +  | R - sum_{i >= k} q_sorted(i) |
          a lower bound of the dense value (triangle inequality), equal to it when the top-k holds the whole
          vocabulary (R = 0): the student's tokens beyond the teacher's vocabulary are then compared with 0, as
          the zero padding does.
  hybrid  the exact part is the forward KL over the shared tokens among the top-k plus one bucket holding every
          other token's mass (the teacher's: R plus its top-k tokens that are not shared), the ULD part compares
          the top-k tokens that are not shared with the student's tokens that are not shared, R as the teacher's
          bucket (R holds shared and other tokens alike, which a top-k does not tell apart: it is compared whole).
          With the whole vocabulary stored (k = Vt) both parts equal the dense ones, so a store of k = Vt trains
          exactly as the live teacher does (tests/test_cross_tokenizer_training.py).

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


def sorted_l1_with_bucket(p_known: Tensor, known: Tensor, p_bucket: Tensor, q: Tensor) -> Tensor:
    """Summed over rows: the sorted L1 of a teacher known at some tokens only. p_known (N, k) probabilities, of
    which `known` (N, k) says which count (c per row); p_bucket (N,) the teacher's remaining mass as one bucket;
    q (N, V) the student's probabilities. Per row: sum_{i < c} |p_sorted(i) - q_sorted(i)| +
    |p_bucket - sum_{i >= c} q_sorted(i)|; with every teacher token known and p_bucket = 0 it is sorted_l1."""
    p_sorted = p_known.masked_fill(~known, -1.0).sort(dim=-1, descending=True).values
    q_sorted = q.sort(dim=-1, descending=True).values
    width = max(p_sorted.shape[-1], q_sorted.shape[-1])
    p_sorted = F.pad(p_sorted, (0, width - p_sorted.shape[-1]), value=-1.0)
    q_sorted = F.pad(q_sorted, (0, width - q_sorted.shape[-1]))
    compared = torch.arange(width, device=q.device) < known.sum(dim=-1, keepdim=True)
    head = torch.where(compared, (p_sorted - q_sorted).abs(), torch.zeros_like(q_sorted)).sum()
    student_rest = torch.where(compared, torch.zeros_like(q_sorted), q_sorted).sum(dim=-1)
    return head + (p_bucket - student_rest).abs().sum()


def _check_sparse(student_logits: Tensor, top_logp: Tensor, log_rest: Tensor, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if student_logits.dim() != 2 or top_logp.dim() != 2 or log_rest.dim() != 1 or \
            not student_logits.shape[0] == top_logp.shape[0] == log_rest.shape[0]:
        raise ValueError(f"expected aligned rows (N, Vs), (N, k) and (N,); got {tuple(student_logits.shape)}, "
                         f"{tuple(top_logp.shape)} and {tuple(log_rest.shape)}")


def uld_sparse_sum(student_logits: Tensor, top_logp: Tensor, log_rest: Tensor, temperature: float = 1.0) -> Tensor:
    """ULD against a sparse teacher (top-k log-probabilities at T and the log rest mass, see the module
    docstring), summed over rows, times T^2."""
    _check_sparse(student_logits, top_logp, log_rest, temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    q = F.softmax(student_logits.to(dtype) / temperature, dim=-1)
    p = top_logp.to(dtype).exp()
    return sorted_l1_with_bucket(p, torch.ones_like(p, dtype=torch.bool), log_rest.to(dtype).exp(), q) * temperature**2


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


def teacher_to_student(mapping: VocabularyMapping, teacher_width: int, device) -> Tensor:
    """(teacher_width,) the student id of each teacher id, -1 where the token is not shared."""
    lookup = torch.full((teacher_width,), -1, dtype=torch.long, device=device)
    lookup[torch.as_tensor(mapping.teacher_ids, dtype=torch.long, device=device)] = \
        torch.as_tensor(mapping.student_ids, dtype=torch.long, device=device)
    return lookup


def hybrid_sparse_parts_sum(student_logits: Tensor, top_ids: Tensor, top_logp: Tensor, log_rest: Tensor,
                            mapping: VocabularyMapping, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(exact part, ULD part) of the hybrid against a sparse teacher (see the module docstring), each summed over
    rows, times T^2."""
    _check_sparse(student_logits, top_logp, log_rest, temperature)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    top_logp, log_rest = top_logp.to(dtype), log_rest.to(dtype)
    mapped = teacher_to_student(mapping, mapping.teacher_size, log_q.device)[top_ids]     # (N, k), -1: not shared
    shared = mapped >= 0
    _, _, _, student_rest = _shared_masks(mapping, mapping.teacher_size, log_q.shape[-1], log_q.device)
    log_q_shared = log_q.gather(1, mapped.clamp_min(0))
    log_p_shared = top_logp.masked_fill(~shared, float("-inf"))
    if bool(student_rest.any()):
        # Every other token's mass as one bucket on each side: the teacher's rest and top-k tokens not shared, the
        # student's tokens other than the shared top-k ones.
        p_bucket = torch.logsumexp(torch.cat([top_logp.masked_fill(shared, float("-inf")), log_rest.unsqueeze(1)], 1), 1)
        q_bucket = _student_bucket(log_q, mapped, shared)
        exact = (log_p_shared.exp() * (log_p_shared - log_q_shared)).masked_fill(~shared, 0.0).sum() \
            + (p_bucket.exp() * (p_bucket - q_bucket)).sum()
    else:
        # As the dense form: a student holding only shared tokens is compared with the teacher given that the next
        # token is a shared one (its shared top-k probabilities renormalised).
        log_p_shared = log_p_shared - torch.logsumexp(log_p_shared, dim=1, keepdim=True)
        exact = (log_p_shared.exp() * (log_p_shared - log_q_shared)).masked_fill(~shared, 0.0).sum()
    rest = sorted_l1_with_bucket(top_logp.exp(), ~shared, log_rest.exp(), log_q[:, student_rest].exp())
    return exact * temperature**2, rest * temperature**2


def _student_bucket(log_q: Tensor, mapped: Tensor, shared: Tensor) -> Tensor:
    """log of the student's mass outside the student ids of the teacher's shared top-k tokens."""
    rows = torch.arange(log_q.shape[0], device=log_q.device).unsqueeze(1).expand_as(mapped)
    outside = log_q.index_put((rows[shared], mapped[shared]), log_q.new_full((), float("-inf")))
    return torch.logsumexp(outside, dim=1)


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
