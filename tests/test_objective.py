import numpy as np
import pytest
import torch

from distil.data.masking import MLMMasker, mask_probabilities
from distil.training.batches import build_step
from distil.training.objective import TermSpec

SEQS = [np.arange(5, 5 + n) for n in (7, 12, 4, 9)]


def test_global_batch_counts_and_strided_local_rows():
    masker = MLMMasker(mask_probabilities(np.ones(40), [0, 1, 2, 3, 4]), 4, [0, 1, 2, 3, 4], 40)
    full = build_step(SEQS, 0, "mlm", masker, torch.Generator().manual_seed(3), 0, 1, torch.device("cpu"))[0]
    half = build_step(SEQS, 0, "mlm", masker, torch.Generator().manual_seed(3), 1, 2, torch.device("cpu"))[0]
    assert full.step_tokens == half.step_tokens == 32
    assert full.step_targets == half.step_targets == 5  # ceil(0.15 * 32)
    # Process 1 of 2 keeps rows 1 and 3, trimmed to their longest (12), with the same masks as the full batch.
    assert half.local_tokens == 12 + 9 and half.input_ids.shape == (2, 12)
    assert torch.equal(half.input_ids, full.input_ids[1::2, :12])
    assert torch.equal(half.labels, full.labels[1::2, :12])


def test_hidden_state_only_batches_stay_clean():
    spec = TermSpec(weights={"cos": 1.0}, temperature=2.0, objective="mlm", restrict_ce_to_mask=False, layer_pairs=[])
    assert not spec.needs_masking and spec.needs_teacher
    batch = build_step(SEQS, 0, "mlm", None, None, 0, 1, torch.device("cpu"))[0]
    assert batch.step_targets == 0 and (batch.labels == -100).all()
    assert batch.input_ids[1].tolist() == SEQS[1].tolist()
    baseline = TermSpec(weights={"mlm": 1.0}, temperature=2.0, objective="mlm", restrict_ce_to_mask=False, layer_pairs=[])
    assert baseline.needs_masking and not baseline.needs_teacher


def test_causal_targets_are_next_tokens_of_real_positions():
    batch = build_step(SEQS[:2], 0, "clm", None, None, 0, 1, torch.device("cpu"))[0]
    assert batch.step_targets == (7 - 1) + (12 - 1)
    assert (batch.labels[0, 7:] == -100).all() and batch.labels[0, :7].tolist() == list(range(5, 12))


def test_accumulation_micro_batches_share_the_step_counts_and_masks():
    """A step of 4 sequences split into 2 micro-batches x 2 processes: each process keeps strided rows of each
    consecutive micro-batch, with the masks drawn for the whole step and the step's counts as denominators."""
    masker = MLMMasker(mask_probabilities(np.ones(40), [0, 1, 2, 3, 4]), 4, [0, 1, 2, 3, 4], 40)
    whole = build_step(SEQS, 0, "mlm", masker, torch.Generator().manual_seed(3), 0, 1, torch.device("cpu"))[0]
    parts = [build_step(SEQS, 0, "mlm", masker, torch.Generator().manual_seed(3), rank, 2, torch.device("cpu"),
                        micro_batches=2) for rank in (0, 1)]
    assert [[b.input_ids.shape[0] for b in p] for p in parts] == [[1, 1], [1, 1]]
    for rank in (0, 1):
        for micro in (0, 1):
            batch, row = parts[rank][micro], 2 * micro + rank
            assert (batch.step_tokens, batch.step_targets) == (32, 5)
            assert batch.local_tokens == len(SEQS[row])
            assert torch.equal(batch.input_ids[0], whole.input_ids[row, :len(SEQS[row])])
            assert torch.equal(batch.labels[0], whole.labels[row, :len(SEQS[row])])
    assert sum(b.local_targets for p in parts for b in p) == 5


def test_a_process_without_rows_of_a_small_batch_gets_an_empty_batch():
    batches = [build_step(SEQS[:1], 0, "clm", None, None, rank, 2, torch.device("cpu"))[0] for rank in (0, 1)]
    assert batches[0].input_ids.shape == (1, 7) and batches[1].input_ids.shape[0] == 0
    assert batches[1].local_tokens == 0 and batches[1].step_tokens == 7


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_pairs_compare_like_with_like_on_pre_norm_decoders(tmp_path, family):
    """A decoder's last hidden state has the final norm applied, the others do not. A student made of teacher
    layers 0 and 1 reproduces the teacher's block outputs 1 and 2 exactly, so pairs (1, 1) and (2, 2) must cost
    nothing at initialisation: the student's last block output is taken before its final norm. Last against last
    compares the final (normed) states, the seed's DistilGPT2 term."""
    from transformers import AutoModelForCausalLM

    from distil.student import init_student
    from distil.training.model_outputs import final_norm_of, forward
    from distil.training.objective import compute_terms
    from train_fixtures import teacher_dir

    teacher_path = teacher_dir(tmp_path, family)
    init_student(str(teacher_path), str(tmp_path / "student"), layers=[0, 1], num_layers=None)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    batch = build_step(SEQS, 0, "clm", None, None, 0, 1, torch.device("cpu"))[0]
    with torch.no_grad():
        _, t_hidden = forward(teacher, batch, True, final_norm_of(teacher))
        _, s_hidden = forward(student, batch, True, final_norm_of(student))
    spec = TermSpec(weights={"cos": 1.0, "hidden_mse": 1.0}, temperature=1.0, objective="clm",
                    restrict_ce_to_mask=False, layer_pairs=[(1, 1), (2, 2)])
    terms = compute_terms(spec, batch, None, s_hidden, None, t_hidden)
    assert terms["cos"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["hidden_mse"][0].item() == pytest.approx(0.0, abs=1e-10)
    # The final states are what each head sees: normed, and not equal to the raw block output.
    assert not torch.allclose(s_hidden.final, s_hidden.blocks[-1])
    last = TermSpec(weights={"cos": 1.0}, temperature=1.0, objective="clm", restrict_ce_to_mask=False,
                    layer_pairs=[(2, 4)])
    s_final, t_final = s_hidden.pair_with(t_hidden, 2, 4)
    assert s_final is s_hidden.final and t_final is t_hidden.final
    assert compute_terms(last, batch, None, s_hidden, None, t_hidden)["cos"][0].item() > 1e-3
