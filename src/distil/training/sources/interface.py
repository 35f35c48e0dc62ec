"""What every teacher source offers the objective, and what the objective asks of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from distil.errors import DistilError

from distil.teacher_signal.signals import Signals
from distil.training.attention_capture import Captured
from distil.training.model_outputs import HiddenStates


@dataclass(frozen=True)
class TeacherRequest:
    """What the objective needs from the teacher for one micro-batch."""

    kd_rows: torch.Tensor | None = None       # (B, L) bool: positions whose output distribution is wanted; None: none
    hidden: bool = False                       # the teacher's HiddenStates (hidden-state and sentence terms)
    attention: tuple = field(default_factory=lambda: (set(), set()))  # teacher layers whose Q/K/V, attention maps
                                                                     # are captured (training.attention_capture)


@dataclass
class TeacherOutputs:
    """The teacher's answer for one micro-batch."""

    signals: Signals | None = None        # one row per kd position, in the row-major order of request.kd_rows
    hidden: HiddenStates | None = None
    attention: Captured | None = None


class TeacherSource(Protocol):
    """A teacher, wherever its signals come from.

    `config`: the teacher model's configuration (layer count, widths, vocabulary) that layer maps and checks read.
    `temperature`: the temperature its signals were written at, or None when they are logits that the divergence
    softens at the run's temperature. `hidden_states`: "all" (every block), "last" (the last hidden state only) or
    None. `has_head`: whether it gives an output distribution at all. `covers_heldout`: whether it can speak about
    the held-out split (a store holds the train split only). `own_vocabulary`: whether its logits are over the
    student's vocabulary, so that its own LM loss on the student's labels means something (not so for a teacher of
    another tokenizer). `model`: the model run in this process for self-attention terms and position limits, or
    None. `modules`: every model it runs (for sharding and memory
    accounting). `members`: (name, source) of a mixture's teachers; a single source lists itself."""

    name: str
    config: object
    temperature: float | None
    hidden_states: str | None
    has_head: bool
    covers_heldout: bool
    own_vocabulary: bool
    model: torch.nn.Module | None

    @property
    def modules(self) -> list[torch.nn.Module]: ...

    @property
    def members(self) -> list[tuple[str, "TeacherSource"]]: ...

    def outputs(self, batch, request: TeacherRequest) -> TeacherOutputs: ...

    def describe(self) -> str: ...


class SingleTeacher:
    """What a source of one teacher (not a mixture) says of itself: it is its own only member, and the models it runs
    are its `model`, if any."""

    name: str
    model: torch.nn.Module | None = None
    own_vocabulary = True

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [self.model] if self.model is not None else []

    @property
    def members(self) -> list[tuple[str, "TeacherSource"]]:
        return [(self.name, self)]


def stored_sequences(batch) -> torch.Tensor:
    """The prepared-data indices of a batch's rows, by which a teacher-signal store is read."""
    if batch.sequence_ids is None:
        raise DistilError("A teacher-signal store is read by each batch's sequence indices, and this batch has "
                          "none (held-out batches have no stored signals). Build training batches with "
                          "build_step(..., indices=...).")
    return batch.sequence_ids
