"""From the student's token ids (what prepared data holds) to the teacher's tokenization of the same text, aligned.

Each row's text is the student tokenizer's decoding of its ids (special tokens kept as their text, no clean-up of
spaces). The student's boundaries come from re-encoding that text with its own fast tokenizer, when the ids come
back unchanged; when they do not (a row cut inside a word by max_length, a non-canonical split), from the decoded
prefixes: token i spans [len(decode(ids[:i])), len(decode(ids[:i+1]))), the boundary rules of
distil.cross_tokenizer.alignment then apply as to any offsets. The student's special tokens begin nothing (no
teacher token spells them). The teacher reads the text with its own special tokens added, as it was trained.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from distil.cross_tokenizer.alignment import (NO_BOUNDARY, Alignment, align_boundaries, boundaries_from_offsets,
                                              check_has_offsets, token_boundaries)
from distil.errors import DistilError
from distil.model_kinds import learned_position_limit


def _prefix_offsets(tokenizer, ids: list[int]) -> tuple[str, np.ndarray]:
    """(text, per-token character offsets) from decoding every prefix of `ids`."""
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ends = [len(decode(ids[: i + 1])) for i in range(len(ids))]
    starts = [0] + ends[:-1]
    return decode(ids), np.stack([starts, ends], axis=1).astype(np.int64) if ids else np.zeros((0, 2), np.int64)


class Retokenizer:
    """The teacher's view of the student's rows: texts, the teacher's ids, and the alignment of the two."""

    def __init__(self, student_tokenizer, teacher_tokenizer):
        check_has_offsets(student_tokenizer, "student tokenizer")
        check_has_offsets(teacher_tokenizer, "teacher tokenizer")
        self.student = student_tokenizer
        self.teacher = teacher_tokenizer
        self.student_specials = set(int(i) for i in student_tokenizer.all_special_ids)

    def student_side(self, rows: list[list[int]]) -> tuple[list[str], list[np.ndarray]]:
        """(text, boundaries) of each row of student ids."""
        texts = [self.student.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in rows]
        encoder = self.student.backend_tokenizer
        encoder.no_truncation()
        encoder.no_padding()
        encodings = encoder.encode_batch(texts, add_special_tokens=False)
        boundaries = []
        for index, (ids, text, encoding) in enumerate(zip(rows, texts, encodings)):
            if list(encoding.ids) == list(ids):
                offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            else:
                text, offsets = _prefix_offsets(self.student, list(ids))
                texts[index] = text
            bounds = boundaries_from_offsets(offsets, text)
            special = np.fromiter((i in self.student_specials for i in ids), dtype=bool, count=len(ids))
            boundaries.append(np.where(special, NO_BOUNDARY, bounds))
        return texts, boundaries

    def __call__(self, rows: list[list[int]]) -> tuple[list[list[int]], Alignment]:
        """(the teacher's ids of each row's text, the alignment of the student's rows with them)."""
        texts, student_bounds = self.student_side(rows)
        teacher_ids, teacher_bounds = token_boundaries(self.teacher, texts, add_special_tokens=True)
        return teacher_ids, align_boundaries(teacher_bounds, student_bounds)

    @torch.no_grad()
    def teacher_logits(self, model, rows: list[list[int]], vocab_size: int, device,
                       autocast=contextlib.nullcontext) -> tuple[torch.Tensor, np.ndarray]:
        """(the teacher's logits (B, Lt, vocab_size) on its tokenization of the rows' text, the alignment's teacher
        position of each student position (B, Ls), -1 where none): what the live source hands on and the store
        keeps, computed here once for both."""
        teacher_ids, alignment = self(rows)
        longest = max((len(r) for r in teacher_ids), default=0)
        limit = learned_position_limit(model)
        if limit is not None and longest > limit:
            # The start-up check sees the student's lengths only; the teacher's tokenization of the same text can be
            # longer, and a learned position table has no row past its end.
            student = max((len(r) for r in rows), default=0)
            raise DistilError(
                f"The teacher's tokenizer turns a row of {student} student tokens into {longest} tokens, but the "
                f"teacher has positions for {limit}. Shorten the student's rows so that the teacher's tokenization "
                f"fits: set data.max_length (or prepare the data again with --max-length) to about "
                f"{max(1, student * limit // longest)}.")
        pad = self.teacher.pad_token_id if self.teacher.pad_token_id is not None else self.teacher.eos_token_id
        ids = torch.full((len(teacher_ids), max(longest, 1)), int(pad or 0), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, part in enumerate(teacher_ids):
            ids[row, : len(part)] = torch.as_tensor(part, dtype=torch.long)
            mask[row, : len(part)] = 1
        with autocast():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), return_dict=True)
        return out.logits[..., :vocab_size], alignment.teacher_position
