"""A teacher with another tokenizer than the student's, live or from a store, as a source.

The prepared data holds the student's ids. For each micro-batch the live source decodes each row's real ids to
text, tokenizes the text with the teacher's tokenizer, runs the teacher, aligns the two tokenizations by text
(distil.cross_tokenizer.retokenize, .alignment) and hands the objective, at the requested kd positions,
AlignedSignals: which kd positions carry a teacher position (the first student position of each aligned span) and
the teacher's logits there, over the teacher's vocabulary. Only `loss.divergence=uld | hybrid` reads them
(distil.cross_tokenizer.divergence).

A store written for such a pair (`distil cache-teacher --student-tokenizer`) did the same once, over the student's
prepared data, and keeps one row per student position with a flag for the carried ones: reading it gives the
same AlignedSignals, sparse (top-k + rest), which equal the live ones when k is the teacher's vocabulary.

The teacher's hidden states and self-attention sit at its own positions, which the student's do not share: such
terms are refused at start-up (training.sources.setup). Held-out evaluation reports the live teacher's divergence
(kd, by the run's divergence) beside the student's own loss, and no teacher LM loss: the teacher's predictions are
over its own tokens (`distil evaluate` compares the two by bits per byte).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from distil.cross_tokenizer.divergence import AlignedSignals
from distil.cross_tokenizer.retokenize import Retokenizer
from distil.cross_tokenizer.vocabulary import shared_vocabulary
from distil.errors import DistilError
from distil.teacher_signal.signals import DenseSignals
from distil.training.sources.interface import SingleTeacher, stored_sequences, TeacherOutputs, TeacherRequest


def _student_rows(batch) -> list[list[int]]:
    real = batch.attention_mask.bool().cpu()
    return [ids[mask].tolist() for ids, mask in zip(batch.input_ids.cpu(), real)]


def _carried_rows(kd_rows: torch.Tensor, teacher_position: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, L) teacher position of each student position, -1 where none, on kd_rows' device; (N,) carried flag
    of each kd row)."""
    rows, width = kd_rows.shape
    position = torch.full((rows, width), -1, dtype=torch.long)
    aligned = torch.as_tensor(teacher_position, dtype=torch.long)
    position[:, : aligned.shape[1]] = aligned[:, :width]
    position = position.to(kd_rows.device)
    return position, (position >= 0)[kd_rows]


class CrossTokenizerTeacher(SingleTeacher):
    """A frozen teacher model of another tokenizer, run on each micro-batch's text."""

    temperature = None          # logits: softened at the run's temperature by the divergence
    hidden_states = None        # at the teacher's own positions: not offered
    covers_heldout = True       # held-out kd: the run's divergence against the teacher on the held-out text
    own_vocabulary = False      # no teacher LM loss on the student's labels
    has_head = True

    def __init__(self, model: torch.nn.Module, teacher_tokenizer, student_tokenizer, vocab_size: int,
                 autocast=contextlib.nullcontext, name: str = "teacher"):
        self.model = model
        self.name = name
        self.config = model.config
        self.autocast = autocast
        self.vocab_size = int(vocab_size)  # the teacher tokenizer's ids: padding rows of its output layer are no tokens
        self.retokenizer = Retokenizer(student_tokenizer, teacher_tokenizer)
        self.mapping = shared_vocabulary(teacher_tokenizer, student_tokenizer)

    def outputs(self, batch, request: TeacherRequest) -> TeacherOutputs:
        if request.hidden or any(request.attention):
            raise DistilError("A teacher of another tokenizer has no hidden states or self-attention at the student's "
                              "positions. Set the hidden-state and self-attention loss weights to 0.")
        if request.kd_rows is None:
            return TeacherOutputs()
        logits, teacher_position = self.retokenizer.teacher_logits(self.model, _student_rows(batch), self.vocab_size,
                                                                   batch.input_ids.device, self.autocast)
        position, carried = _carried_rows(request.kd_rows, teacher_position)
        rows, cols = torch.nonzero(request.kd_rows & (position >= 0), as_tuple=True)
        teacher = DenseSignals(logits=logits[rows, position[rows, cols]])
        return TeacherOutputs(signals=AlignedSignals(carried, teacher, self.mapping))

    def describe(self) -> str:
        count = sum(p.numel() for p in self.model.parameters())
        return (f"{self.name}: {count / 1e6:.1f}M parameters, run in process on its own tokenization of the text "
                f"({self.mapping.shared} of the student's {self.mapping.student_size} tokens shared)")


class CrossTokenizerStore(SingleTeacher):
    """A store written for a student of another tokenizer: its rows at the student's positions, with the flags of
    the carried ones."""

    hidden_states = None
    covers_heldout = False
    own_vocabulary = False
    has_head = True
    model = None

    def __init__(self, store, config, teacher_tokenizer, student_tokenizer, name: str = "teacher"):
        self.store = store
        self.config = config
        self.name = name
        self.temperature = float(store.temperature)
        self.mapping = shared_vocabulary(teacher_tokenizer, student_tokenizer)

    def outputs(self, batch, request: TeacherRequest) -> TeacherOutputs:
        if request.kd_rows is None:
            return TeacherOutputs()
        sequences = stored_sequences(batch).tolist()
        real = batch.attention_mask.bool()
        counts = real.sum(dim=1).tolist()
        flags = torch.as_tensor(self.store.carried(sequences, counts), device=real.device)   # per real position
        kd = request.kd_rows[real]
        targets = self.store.targets(sequences, counts, device=batch.input_ids.device, keep=(kd & flags).cpu().numpy())
        return TeacherOutputs(signals=AlignedSignals(flags[kd], targets, self.mapping))

    def describe(self) -> str:
        return (f"{self.name}: signals read from the store {getattr(self.store, 'root', '')} written for a student "
                f"of another tokenizer (top-{self.store.k} at temperature {self.temperature:g}; no teacher model "
                "loaded)")
