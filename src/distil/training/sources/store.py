"""A teacher-signal store (`distil cache-teacher`) as a source: the teacher's sparse distribution (top-k + rest,
optionally sampled tail tokens) and last hidden state, read for a batch's sequences; no teacher model is loaded.

The store holds the train split only, at the temperature it was written at, and each batch must carry its
sequences' indices (build_step(..., indices=...)) for the rows to be found.
"""

from __future__ import annotations

import torch

from distil.training.model_outputs import HiddenStates
from distil.training.sources.interface import SingleTeacher, stored_sequences, TeacherOutputs, TeacherRequest


class StoreTeacher(SingleTeacher):
    """The signals a store holds for a batch's sequences, aligned to its real positions."""

    has_head = True
    covers_heldout = False
    model = None

    def __init__(self, store, config, name: str = "teacher"):
        self.store = store
        self.config = config   # the teacher's configuration, kept in the store (layer counts, widths)
        self.name = name
        self.temperature = float(store.temperature)
        self.hidden_states = "last" if store.hidden_states == "last" else None
        self.sampled = int(store.sampled)
        self.k = int(store.k)

    def outputs(self, batch, request: TeacherRequest) -> TeacherOutputs:
        sequences = stored_sequences(batch).tolist()
        real = batch.attention_mask.bool()
        targets = self.store.targets(sequences, real.sum(dim=1).tolist(), want_hidden=request.hidden,
                                     device=batch.input_ids.device)
        stored_hidden, targets.hidden = targets.hidden, None
        signals = None
        if request.kd_rows is not None:
            kd = request.kd_rows[real]
            signals = targets if bool(kd.all()) else targets.rows(kd)
        hidden = None
        if request.hidden:
            final = torch.zeros(*real.shape, stored_hidden.shape[-1], dtype=torch.float32, device=real.device)
            final[real] = stored_hidden.float()
            # The last hidden state only: the blocks before it are not stored (refused at start-up when asked for).
            hidden = HiddenStates(blocks=(None,) * int(self.config.num_hidden_layers) + (final,), final=final)
        return TeacherOutputs(signals=signals, hidden=hidden)

    def describe(self) -> str:
        sampled = f" + {self.sampled} sampled" if self.sampled else ""
        return (f"{self.name}: signals read from the store {getattr(self.store, 'root', '')} (top-{self.k}{sampled} at "
                f"temperature {self.temperature:g}; no teacher model loaded)")
