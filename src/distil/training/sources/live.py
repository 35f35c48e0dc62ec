"""The teacher model run in this process, frozen: replicated on every process, or sharded under FSDP (the loop's
parallel wrapper shards the module in place; its output layer's weight is gathered where the engine projects).

With its output layer `head` (a plain Linear that the engine can stand in for, training.fused_head), the teacher's
forward stops before that layer and its signals are the states that enter it with the layer itself
(DenseSignals(states, head)): the engine projects them chunk by chunk, and no (positions x vocabulary) tensor of
the teacher's is built. Without it, its signals are its logits at the asked positions.
"""

from __future__ import annotations

import contextlib

import torch

from distil.teacher_signal.signals import DenseSignals
from distil.training.attention_capture import captured_attention
from distil.training.fused_head import projection_replaced, teacher_head
from distil.training.model_outputs import final_norm_of, forward
from distil.training.sources.interface import SingleTeacher, TeacherOutputs, TeacherRequest


class LiveTeacher(SingleTeacher):
    """A frozen teacher model, run without gradients on each micro-batch."""

    temperature = None          # logits: softened at the run's temperature by the divergence
    hidden_states = "all"
    covers_heldout = True

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module | None = None, autocast=contextlib.nullcontext,
                 vocab_limit: int | None = None, has_head: bool = True, name: str = "teacher"):
        self.model = model
        self.head = head
        self.autocast = autocast
        self.vocab_limit = vocab_limit
        self.has_head = has_head
        self.name = name
        self.config = model.config
        self.norm = final_norm_of(model)

    @torch.no_grad()  # no_grad, not inference_mode: the signals feed the loss, whose backward saves them
    def outputs(self, batch, request: TeacherRequest) -> TeacherOutputs:
        want_signals = request.kd_rows is not None
        use_head = want_signals and self.head is not None
        with self.autocast():
            replaced = projection_replaced(self.head, lambda states: states) if use_head else contextlib.nullcontext()
            with replaced, captured_attention(self.model, *request.attention) as captured:
                logits, hidden = forward(self.model, batch, request.hidden, self.norm)
        signals = None
        if use_head:
            signals = DenseSignals(states=logits[request.kd_rows], head=teacher_head(self.head, self.vocab_limit))
        elif want_signals:
            rows = logits[request.kd_rows]
            signals = DenseSignals(logits=rows[:, :self.vocab_limit] if self.vocab_limit is not None else rows)
        return TeacherOutputs(signals=signals, hidden=hidden, attention=captured)

    def describe(self) -> str:
        count = sum(p.numel() for p in self.model.parameters())
        return (f"{self.name}: {count / 1e6:.1f}M parameters, run in process"
                + ("" if self.has_head else " (no LM head: hidden-state losses only)"))
