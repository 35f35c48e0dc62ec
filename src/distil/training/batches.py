"""A step's batches: one step batch of sequences padded, its MLM targets or causal labels drawn once over the whole
step, split into micro-batches of which each process keeps its own rows, with the counts every loss term is
normalised by (see training.objective for the normalisation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distil.data.dataset import pad_batch
from distil.data.masking import MLMMasker, causal_lm_labels
from distil.training.on_policy import generated_targets


@dataclass
class Batch:
    input_ids: torch.Tensor          # this process's rows of one micro-batch, on the training device
    attention_mask: torch.Tensor
    labels: torch.Tensor             # MLM targets / causal labels (-100 elsewhere)
    local_tokens: int                # real tokens in these rows
    local_targets: int               # MLM targets (MLM) or predicted positions (CLM) in these rows
    step_tokens: int                 # real tokens in the whole optimizer step (every micro-batch, every process)
    step_targets: int                # MLM targets or predicted positions in the whole optimizer step
    local_rows: int = 0              # sequences in these rows (sentence-embedding terms are means over sequences)
    step_rows: int = 0               # sequences in the whole optimizer step
    sequence_ids: torch.Tensor | None = None  # each row's index in the prepared split (when build_step is told)
    kd_mask: torch.Tensor | None = None  # on-policy rows (training.on_policy): the soft-target positions, those that
                                         # produced the student's own tokens (counted as the targets); None: all real


def _targets(ids: torch.Tensor, mask: torch.Tensor, objective: str, masker: MLMMasker | None,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, labels, target mask): MLM-corrupted ids and targets, or causal next-token labels."""
    if objective == "mlm" and masker is not None:
        ids, labels = masker(ids, mask, generator=generator)
        return ids, labels, labels != -100
    if objective in ("mlm", "embedding"):
        # Hidden-state losses alone (always so for embedding): the student learns the teacher's states on clean
        # text, as it will see it.
        return ids, torch.full_like(ids, -100), torch.zeros_like(mask, dtype=torch.bool)
    labels = causal_lm_labels(ids, mask)
    target_mask = torch.zeros_like(mask, dtype=torch.bool)
    target_mask[:, 1:] = labels[:, 1:] != -100
    return ids, labels, target_mask


def build_step(sequences: list[np.ndarray], pad_id: int, objective: str, masker: MLMMasker | None,
               generator: torch.Generator | None, rank: int, world_size: int, device: torch.device,
               micro_batches: int = 1, indices: list[int] | None = None) -> list[Batch]:
    """Split one step batch into `micro_batches` consecutive micro-batches and keep this process's rows of each.

    Targets are drawn over the whole step batch (identically on every process), so how the step is split
    between processes and accumulation steps changes nothing that is computed. A process may get no rows of a
    small final held-out batch: its Batch then has zero rows. `indices`: the sequences' indices in the prepared
    split, kept per row as Batch.sequence_ids (a teacher-signal store is read by them).
    """
    if len(sequences) % micro_batches:
        raise ValueError(f"{len(sequences)} sequences do not split into {micro_batches} equal micro-batches")
    ids, mask = pad_batch(sequences, pad_id)
    ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    ids, labels, target_mask = _targets(ids, mask, objective, masker, generator)
    labels, target_mask, kd_mask = generated_targets(sequences, labels, target_mask, mask)  # on-policy rows only
    per_micro = len(sequences) // micro_batches
    rows = [torch.arange(m * per_micro + rank, (m + 1) * per_micro, world_size, device=device)
            for m in range(micro_batches)]
    tokens, targets = mask.sum(dim=1), target_mask.sum(dim=1)
    # One host transfer for every count of the step.
    counts = torch.stack([tokens.sum(), targets.sum()]
                         + [t for r in rows for t in (tokens[r].sum(), targets[r].sum(),
                                                      tokens[r].max() if len(r) else tokens.new_zeros(()))]).tolist()
    step_tokens, step_targets = int(counts[0]), int(counts[1])
    batches = []
    for m, r in enumerate(rows):
        local_tokens, local_targets, width = (int(c) for c in counts[2 + 3 * m: 5 + 3 * m])
        # Trim columns that are padding in every local row.
        batches.append(Batch(input_ids=ids[r, :width], attention_mask=mask[r, :width], labels=labels[r, :width],
                             local_tokens=local_tokens, local_targets=local_targets,
                             step_tokens=step_tokens, step_targets=step_targets,
                             local_rows=len(r), step_rows=len(sequences),
                             sequence_ids=torch.as_tensor(indices)[r.cpu()] if indices is not None else None,
                             kd_mask=kd_mask[r, :width] if kd_mask is not None else None))
    return batches
