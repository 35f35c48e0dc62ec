"""What a teacher says about a set of the student's positions: its signals, in one of two forms.

- `DenseSignals`: the teacher's whole output distribution, as logits (N, V), or as the states that enter its
  output layer (N, H) with that layer (`TeacherHead`), so that the output-layer engine projects them chunk by chunk
  and no (N x V) tensor is ever built;
- `MixedSignals`: several teachers' dense signals mixed in probability space, m = sum_i w_i softmax(z_i / T_i),
  as the logits T log m; computed row chunk by row chunk like any dense signal, so a mixture of live teachers
  keeps the engine's memory bound;
- `SparseSignals`: the teacher's top-k token ids and log-probabilities at the temperature, the log of the mass
  outside them (the rest), and optionally tokens drawn from the rest with their log-probabilities and importance
  weights (what a teacher-signal store keeps).

Either may carry the teacher's last hidden states. A signal holds one row per position that the soft-target
term counts (the "kd rows"), in order; whoever produces signals (a live teacher, a store) aligns them so, and the
divergences of distil.teacher_signal.divergences and the engine take either form without knowing where it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Union

import torch
from torch import Tensor

from distil.teacher_signal.output_layer import LogitTransform, project_into, transform_logits_

LOG_FLOOR = -80.0  # log of a mass that is (numerically) zero: exp(-80) ~ 1e-35, never -inf (0 * -inf is nan)


@dataclass
class TeacherHead:
    """A teacher's output layer: logits = transform(states @ weight.T + bias)."""

    weight: Tensor                          # (V, H)
    bias: Tensor | None = None              # (V,)
    transform: LogitTransform | None = None  # the model's own soft-capping / scaling, or None


@dataclass
class DenseSignals:
    """The teacher's full distribution at N rows: `logits` (N, V), or `states` (N, H) and their `head`."""

    logits: Tensor | None = None
    states: Tensor | None = None
    head: TeacherHead | None = None
    hidden: Tensor | None = None            # (N, H') the teacher's last hidden states, when given

    def __post_init__(self):
        if (self.logits is None) == (self.states is None or self.head is None):
            raise ValueError("DenseSignals holds either logits, or states with the head that projects them")

    @property
    def rows_count(self) -> int:
        return (self.logits if self.logits is not None else self.states).shape[0]

    def rows(self, index) -> "DenseSignals":
        """The signals of the rows `index` (a slice, a bool mask or indices)."""
        pick = (lambda x: x[index] if x is not None else None)
        return replace(self, logits=pick(self.logits), states=pick(self.states), hidden=pick(self.hidden))

    def logits_into(self, out: Tensor) -> Tensor:
        """The teacher's logits of these rows (float32), written into `out` (rows, V)."""
        if self.logits is not None:
            return out.copy_(self.logits)
        head = self.head
        project_into(out, self.states, head.weight, head.bias)
        return transform_logits_(out, head.transform) if head.transform is not None else out

    def teacher_logits(self) -> Tensor:
        """The logits of every row at once (the plain path's form)."""
        if self.logits is not None:
            return self.logits
        head = self.head
        logits = torch.nn.functional.linear(self.states, head.weight.to(self.states.dtype),
                                            head.bias.to(self.states.dtype) if head.bias is not None else None)
        return head.transform(logits) if head.transform is not None else logits


@dataclass
class MixedSignals(DenseSignals):
    """Dense members mixed per row in probability space: the logits T log(sum_i w_i softmax(z_i / T_i)), with
    weights w_i summing to 1 and T the run's temperature (the divergence softens teacher logits at T, and
    softmax(T log m / T) = m: the student is compared with the mixture itself). Nothing is computed until asked:
    `logits_into` mixes the members' logits of the rows asked for, chunk by chunk in the engine."""

    members: tuple = ()                     # DenseSignals, one per teacher, each with the same rows
    weights: tuple = ()
    temperatures: tuple = ()
    run_temperature: float = 1.0

    def __post_init__(self):
        if not self.members or len(self.members) != len(self.weights) or len(self.weights) != len(self.temperatures):
            raise ValueError("MixedSignals needs one weight and one temperature per member")
        if abs(sum(self.weights) - 1.0) > 1e-6 or min(self.weights) <= 0:
            raise ValueError("MixedSignals' weights are positive and sum to 1")

    @property
    def rows_count(self) -> int:
        return self.members[0].rows_count

    def rows(self, index) -> "MixedSignals":
        return replace(self, members=tuple(m.rows(index) for m in self.members),
                       hidden=self.hidden[index] if self.hidden is not None else None)

    @torch.no_grad()   # a target: nothing is differentiated through the teachers
    def _mix_(self, out: Tensor, member_logits) -> Tensor:
        """out <- T log sum_i w_i softmax(z_i / T_i), z_i = member_logits(i); member 0's may be written into out."""
        for i, (weight, temperature) in enumerate(zip(self.weights, self.temperatures)):
            term = torch.log_softmax(member_logits(i) / temperature, dim=-1).add_(math.log(weight))
            if i == 0:
                out.copy_(term)
            else:
                torch.logaddexp(out, term, out=out)
        return out.mul_(self.run_temperature)

    def logits_into(self, out: Tensor) -> Tensor:
        # One (rows, V) buffer for the members after the first, whose logits cannot go into the running sum.
        buffer = torch.empty_like(out) if len(self.members) > 1 else None
        return self._mix_(out, lambda i: self.members[i].logits_into(out if i == 0 else buffer))

    def teacher_logits(self) -> Tensor:
        logits = [m.teacher_logits() for m in self.members]
        dtype = torch.promote_types(logits[0].dtype, torch.float32)
        out = torch.empty(logits[0].shape, dtype=dtype, device=logits[0].device)
        return self._mix_(out, lambda i: logits[i].to(dtype))


@dataclass
class SparseSignals:
    """The teacher's sparse distribution at N rows."""

    top_ids: Tensor                    # (N, k) int64, by decreasing probability
    top_logp: Tensor                   # (N, k) float32, log p at temperature T
    log_rest: Tensor                   # (N,) float32, log of the mass outside the top-k (>= LOG_FLOOR)
    sample_ids: Tensor | None = None   # (N, k') int64, drawn from the proposal over the tail (with replacement)
    sample_logp: Tensor | None = None  # (N, k') float32, log p of each drawn token
    sample_logw: Tensor | None = None  # (N, k') float32, log importance weight of each draw
    hidden: Tensor | None = None       # (N, H) the teacher's last hidden state, when given

    @property
    def sampled(self) -> bool:
        return self.sample_ids is not None and self.sample_ids.shape[-1] > 0

    @property
    def rows_count(self) -> int:
        return self.top_ids.shape[0]

    def rows(self, index) -> "SparseSignals":
        """The signals of the rows `index` (a slice, a bool mask or indices)."""
        return SparseSignals(**{f.name: (getattr(self, f.name)[index] if getattr(self, f.name) is not None else None)
                                for f in fields(self)})


Signals = Union[DenseSignals, SparseSignals]   # MixedSignals is a DenseSignals
