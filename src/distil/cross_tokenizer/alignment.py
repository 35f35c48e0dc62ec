"""Aligning two tokenizations of one text, and carrying next-token signals from the teacher's positions to the
student's.

Position i of a causal model predicts token i + 1 from the text before it. A student position can take a teacher
position's next-token distribution as its target only when both have read the same text: when the student's next
token and the teacher's next token begin at the same place in the text. Such places are the *common boundaries*;
between two of them lies an aligned span of one or more tokens on each side (a word split 1:1, 1:2, 2:1, 2:3, ...).

Where a token begins (its *boundary*) is read from the fast tokenizer's character offsets, after three rules:
  - whitespace is skipped: byte-level BPE and Metaspace attach the space to the next token ("Ġworld", "▁world"),
    WordPiece drops it, so a token's boundary is its first non-whitespace character. Tokens that hold only
    whitespace (a run of spaces, a lone "▁") begin nothing: the boundary belongs to the token after them;
  - a token that begins inside a character another token already covered (byte-level BPE splits a multi-byte
    character across tokens, and gives each piece the character's offsets) begins nothing: the text before it ends
    mid-character, which no other tokenizer can match;
  - special tokens added around the text (offsets (0, 0)) begin nothing.

The chain rule: the probability of a span's text is the product of the next-token probabilities of its tokens,
each conditioned on the text before it. For the first token of a span both models condition on the same text
(exactly the same characters, or the same up to the whitespace the first rule skips), so the student position
that predicts the first student token of a span carries the distribution of the teacher position that predicts
the first teacher token of that span. The student's other tokens of a span are predicted from a text that ends
inside a teacher token, and no teacher position has read that text: those positions carry no teacher signal
(teacher position -1) and learn from the student's own cross-entropy only. (GOLD instead merges a span's
distributions by the chain rule, multiplying the first position's distribution by the probabilities of the
span's actual later tokens; ULD, Boizard et al. 2024, pairs positions by index. Leaving them out keeps every
carried target exact as far as its context goes.)

`align_boundaries` works on boundary arrays alone (what a store keeps per position, -1 for "begins nothing"), so
prepared data aligns without its text; `token_boundaries` computes them from text with a fast tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from distil.errors import DistilError

NO_BOUNDARY = -1
_WHITESPACE = re.compile(r"\s+")


def check_has_offsets(tokenizer, role: str = "tokenizer") -> None:
    """Refuse a tokenizer that cannot give character offsets (a slow, pure-Python one)."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DistilError(
            f"The {role} {getattr(tokenizer, 'name_or_path', '')} is a slow tokenizer without character offsets, and "
            "aligning two tokenizations of one text needs each token's place in the text. Use its fast version: load "
            "it with AutoTokenizer.from_pretrained(..., use_fast=True) and save_pretrained it (writing tokenizer.json)."
        )


def boundaries_from_offsets(offsets: np.ndarray, text: str) -> np.ndarray:
    """Per token, the character where its text begins (whitespace skipped), or NO_BOUNDARY (see the module
    docstring). `offsets` (L, 2): character offsets into `text`, as fast tokenizers return them."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    runs = np.array([m.span() for m in _WHITESPACE.finditer(text)], dtype=np.int64).reshape(-1, 2)
    content = starts
    if len(runs):
        # A start inside a whitespace run moves to the run's end (searchsorted: the first run ending after it).
        run = np.minimum(np.searchsorted(runs[:, 1], starts, side="right"), len(runs) - 1)
        inside = (runs[run, 0] <= starts) & (starts < runs[run, 1])
        content = np.where(inside, runs[run, 1], starts)
    covered = np.concatenate(([0], np.maximum.accumulate(ends)[:-1])) if len(ends) else ends
    begins = (content < ends) & (starts >= covered)
    return np.where(begins, content, NO_BOUNDARY)


def token_boundaries(tokenizer, texts: list[str], add_special_tokens: bool = True) -> tuple[list[list[int]], list[np.ndarray]]:
    """(ids, boundaries) per text, from the fast tokenizer's offsets (no truncation, no padding)."""
    check_has_offsets(tokenizer)
    encoder = tokenizer.backend_tokenizer
    encoder.no_truncation()
    encoder.no_padding()
    encodings = encoder.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return ([e.ids for e in encodings],
            [boundaries_from_offsets(np.array(e.offsets, dtype=np.int64), text) for e, text in zip(encodings, texts)])


@dataclass(frozen=True)
class Alignment:
    """How a batch of student sequences lines up with the teacher's tokenization of the same texts.

    teacher_position (B, Ls): for student position i, the teacher position whose next-token distribution it
    carries, or -1 (no teacher position has read the same text). span_student / span_teacher (B, S): the token
    index at which each aligned span begins on each side (-1 after a row's last span)."""

    teacher_position: np.ndarray
    span_student: np.ndarray
    span_teacher: np.ndarray

    @property
    def carried(self) -> np.ndarray:
        """(B, Ls) bool: which student positions carry a teacher signal."""
        return self.teacher_position >= 0


def _padded(rows: list[np.ndarray]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), NO_BOUNDARY, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def align_boundaries(teacher_boundaries, student_boundaries) -> Alignment:
    """Align per-token boundaries (B, Lt) and (B, Ls) (arrays padded with NO_BOUNDARY, or lists of 1-D arrays).

    Within a row the boundaries that are not NO_BOUNDARY increase strictly (boundaries_from_offsets guarantees it),
    so shifting each row by its index times a stride makes the whole batch one increasing sequence, and one
    intersection finds every common boundary of every row at once."""
    teacher = _padded(teacher_boundaries) if isinstance(teacher_boundaries, list) else np.asarray(teacher_boundaries, np.int64)
    student = _padded(student_boundaries) if isinstance(student_boundaries, list) else np.asarray(student_boundaries, np.int64)
    if teacher.ndim != 2 or student.ndim != 2 or teacher.shape[0] != student.shape[0]:
        raise ValueError(f"boundaries must be (B, L) for the same B; got {teacher.shape} and {student.shape}")
    rows = teacher.shape[0]
    stride = int(max(teacher.max(initial=0), student.max(initial=0))) + 1
    t_row, t_tok = np.nonzero(teacher >= 0)
    s_row, s_tok = np.nonzero(student >= 0)
    t_key = teacher[t_row, t_tok] + t_row * stride
    s_key = student[s_row, s_tok] + s_row * stride
    _, t_at, s_at = np.intersect1d(t_key, s_key, assume_unique=True, return_indices=True)
    row, student_token, teacher_token = s_row[s_at], s_tok[s_at], t_tok[t_at]

    teacher_position = np.full(student.shape, -1, dtype=np.int64)
    # The position before a token predicts it; a span starting at token 0 has no predicting position on that side.
    both = (student_token > 0) & (teacher_token > 0)
    teacher_position[row[both], student_token[both] - 1] = teacher_token[both] - 1

    counts = np.bincount(row, minlength=rows)
    width = int(counts.max(initial=0))
    rank = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    span_student = np.full((rows, width), -1, dtype=np.int64)
    span_teacher = np.full((rows, width), -1, dtype=np.int64)
    span_student[row, rank] = student_token
    span_teacher[row, rank] = teacher_token
    return Alignment(teacher_position, span_student, span_teacher)


def align_texts(texts: list[str], teacher_tokenizer, student_tokenizer,
                add_special_tokens: bool = True) -> tuple[list[list[int]], list[list[int]], Alignment]:
    """Tokenize `texts` with both tokenizers and align them: (teacher ids, student ids, alignment)."""
    check_has_offsets(teacher_tokenizer, "teacher tokenizer")
    check_has_offsets(student_tokenizer, "student tokenizer")
    teacher_ids, teacher_bounds = token_boundaries(teacher_tokenizer, texts, add_special_tokens)
    student_ids, student_bounds = token_boundaries(student_tokenizer, texts, add_special_tokens)
    return teacher_ids, student_ids, align_boundaries(teacher_bounds, student_bounds)


def gather_teacher_rows(teacher_logits, alignment: Alignment):
    """The teacher's logits (B, Lt, Vt) moved to the student's positions: (rows (N, Vt), student_mask (B, Ls)),
    rows in the order of the student positions that carry a signal (the rows the engine pairs with
    student_logits[student_mask])."""
    import torch

    carried = torch.as_tensor(alignment.carried, device=teacher_logits.device)
    rows, cols = torch.nonzero(carried, as_tuple=True)
    source = torch.as_tensor(alignment.teacher_position, device=teacher_logits.device)[rows, cols]
    return teacher_logits[rows, source], carried
