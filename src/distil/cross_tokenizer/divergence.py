"""The soft-target term across two vocabularies: the signals a cross-tokenizer teacher hands the objective
(`AlignedSignals`) and the divergences `loss.divergence=uld | hybrid` computed on them (`CrossVocabularyDivergence`),
each the one definition of distil.cross_tokenizer.losses.

A teacher of another tokenizer speaks about the student's positions only where both have read the same text
(distil.cross_tokenizer.alignment): AlignedSignals holds one flag per kd row (the positions the soft-target term
counts, in their row-major order) saying whether it carries a teacher row, and the teacher's rows of the carried
ones, in order: dense logits over the teacher's vocabulary (a live teacher) or sparse top-k + rest (a store).

Normalisation: the term is summed over the carried rows and divided, as every soft-target term, by the step's kd
positions (training.objective): a kd position without a teacher position adds 0. So the term is the mean over
the aligned positions times the step's aligned fraction, and N processes x accumulation A x batch B still compute
what one batch of N*A*B computes (a mean over the aligned positions alone would need the step's aligned count
before its first micro-batch, which only the teacher's tokenization of every micro-batch gives).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from distil.cross_tokenizer import CROSS_VOCABULARY_DIVERGENCES
from distil.cross_tokenizer.losses import hybrid_sparse_parts_sum, hybrid_sum, uld_sparse_sum, uld_sum
from distil.cross_tokenizer.vocabulary import VocabularyMapping
from distil.teacher_signal.divergences import Divergence
from distil.teacher_signal.signals import DenseSignals, Signals, SparseSignals


@dataclass
class AlignedSignals:
    """A teacher of another vocabulary at N kd rows: `carried` (N,) bool, and `teacher` (one row per carried kd
    row) with the `mapping` of the tokens both vocabularies hold (the hybrid's exact part)."""

    carried: Tensor
    teacher: Signals
    mapping: VocabularyMapping

    @property
    def rows_count(self) -> int:
        return int(self.carried.shape[0])

    def rows(self, index) -> "AlignedSignals":
        """The signals of the kd rows `index` (a slice or a bool mask)."""
        if isinstance(index, slice):
            before = int(self.carried[: index.start or 0].sum()) if index.start else 0
            picked = self.carried[index]
            return AlignedSignals(picked, self.teacher.rows(slice(before, before + int(picked.sum()))), self.mapping)
        return AlignedSignals(self.carried[index], self.teacher.rows(index[self.carried]), self.mapping)


@dataclass(frozen=True)
class CrossVocabularyDivergence:
    """uld or hybrid at a temperature: the soft-target term against AlignedSignals."""

    name: str = "uld"
    temperature: float = 1.0
    uld_weight: float = 1.0

    def __post_init__(self):
        if self.name not in CROSS_VOCABULARY_DIVERGENCES:
            raise ValueError(f"{self.name!r} is not a cross-vocabulary divergence ({', '.join(CROSS_VOCABULARY_DIVERGENCES)})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")

    def value(self, student_logits: Tensor, signals: AlignedSignals) -> Tensor:
        """Summed over the carried rows of `student_logits` (N kd rows, Vs), times T^2; differentiable."""
        if not isinstance(signals, AlignedSignals):
            raise ValueError(f"loss.divergence={self.name} compares distributions over two vocabularies and needs a "
                             "teacher of another tokenizer (training.sources.cross_tokenizer)")
        rows = student_logits[signals.carried]
        if rows.shape[0] == 0:
            return student_logits.sum() * 0.0
        teacher, T = signals.teacher, self.temperature
        if isinstance(teacher, DenseSignals):
            logits = teacher.teacher_logits()
            if self.name == "uld":
                return uld_sum(rows, logits, T)
            return hybrid_sum(rows, logits, signals.mapping, T, self.uld_weight)
        if not isinstance(teacher, SparseSignals) or teacher.sampled:
            raise ValueError("a cross-vocabulary divergence takes dense teacher rows or a top-k + rest store "
                             "(sampled tail tokens follow one vocabulary's tail and are not compared)")
        if self.name == "uld":
            return uld_sparse_sum(rows, teacher.top_logp, teacher.log_rest, T)
        exact, rest = hybrid_sparse_parts_sum(rows, teacher.top_ids, teacher.top_logp, teacher.log_rest,
                                              signals.mapping, T)
        return exact + self.uld_weight * rest


def soft_target_divergence(spec) -> Divergence | CrossVocabularyDivergence:
    """What a run's soft-target term computes (spec: training.objective.TermSpec): a divergence over one
    vocabulary (distil.teacher_signal.divergences) or across two."""
    if spec.divergence in CROSS_VOCABULARY_DIVERGENCES:
        return CrossVocabularyDivergence(spec.divergence, spec.temperature, getattr(spec, "uld_weight", 1.0))
    return Divergence(spec.divergence, spec.temperature, spec.jsd_beta, spec.skew_alpha)

