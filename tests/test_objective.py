import numpy as np
import torch

from distil.data.masking import MLMMasker, mask_probabilities
from distil.objective import TermSpec, build_batch

SEQS = [np.arange(5, 5 + n) for n in (7, 12, 4, 9)]


def test_global_batch_counts_and_strided_local_rows():
    masker = MLMMasker(mask_probabilities(np.ones(40), [0, 1, 2, 3, 4]), 4, [0, 1, 2, 3, 4], 40)
    full = build_batch(SEQS, 0, "mlm", masker, torch.Generator().manual_seed(3), 0, 1, torch.device("cpu"))
    half = build_batch(SEQS, 0, "mlm", masker, torch.Generator().manual_seed(3), 1, 2, torch.device("cpu"))
    assert full.global_tokens == half.global_tokens == 32
    assert full.global_targets == half.global_targets == 5  # ceil(0.15 * 32)
    # Process 1 of 2 keeps rows 1 and 3, trimmed to their longest (12), with the same masks as the full batch.
    assert half.local_tokens == 12 + 9 and half.input_ids.shape == (2, 12)
    assert torch.equal(half.input_ids, full.input_ids[1::2, :12])
    assert torch.equal(half.labels, full.labels[1::2, :12])


def test_hidden_state_only_batches_stay_clean():
    spec = TermSpec(weights={"cos": 1.0}, temperature=2.0, objective="mlm", restrict_ce_to_mask=False, layer_pairs=[])
    assert not spec.needs_masking and spec.needs_teacher
    batch = build_batch(SEQS, 0, "mlm", None, None, 0, 1, torch.device("cpu"))
    assert batch.global_targets == 0 and (batch.labels == -100).all()
    assert batch.input_ids[1].tolist() == SEQS[1].tolist()
    baseline = TermSpec(weights={"mlm": 1.0}, temperature=2.0, objective="mlm", restrict_ce_to_mask=False, layer_pairs=[])
    assert baseline.needs_masking and not baseline.needs_teacher


def test_causal_targets_are_next_tokens_of_real_positions():
    batch = build_batch(SEQS[:2], 0, "clm", None, None, 0, 1, torch.device("cpu"))
    assert batch.global_targets == (7 - 1) + (12 - 1)
    assert (batch.labels[0, 7:] == -100).all() and batch.labels[0, :7].tolist() == list(range(5, 12))
