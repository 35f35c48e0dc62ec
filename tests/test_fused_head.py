"""The fused output layer + logit losses equal the plain formulation: values and gradients."""

import numpy as np
import pytest
import torch

from distil.data.masking import MLMMasker, mask_probabilities
from distil.training.fused_head import output_projection, projection_replaced
from distil.teacher_signal.signals import DenseSignals
from distil.training.fused_head import teacher_head
from distil.training.batches import build_step
from distil.training.model_outputs import forward
from distil.training.objective import (compute_terms, fused_logit_terms, kd_positions, step_share, TermSpec,
                                       weighted_total)
from tiny_models import VOCAB_SIZE, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta


def batch_for(objective, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, VOCAB_SIZE, size=n) for n in (9, 14, 6, 11, 14, 3)]
    masker = None
    if objective == "mlm":
        masker = MLMMasker(mask_probabilities(np.ones(VOCAB_SIZE), [0, 1, 2, 3, 4]), 4, [0, 1, 2, 3, 4], VOCAB_SIZE)
    gen = torch.Generator().manual_seed(seed)
    return build_step(seqs, 0, objective, masker, gen, rank=0, world_size=1, device=torch.device("cpu"))[0]


def plain(spec, batch, student, teacher):
    with torch.no_grad():
        t_logits, t_hidden = forward(teacher, batch, spec.needs_hidden)
    s_logits, s_hidden = forward(student, batch, spec.needs_hidden)
    kd = kd_positions(spec, batch)[0]
    t_logits = t_logits[..., :spec.vocab_limit] if spec.vocab_limit is not None else t_logits
    shares = step_share(compute_terms(spec, batch, s_logits, s_hidden, DenseSignals(logits=t_logits[kd]), t_hidden))
    return weighted_total(shares, spec.weights), shares


def fused(spec, batch, student, teacher):
    s_proj, t_proj = output_projection(student), output_projection(teacher)
    with torch.no_grad(), projection_replaced(t_proj, lambda states: states):
        t_states, _ = forward(teacher, batch, False)
    shares = {}

    def head(states):
        signals = DenseSignals(states=t_states[kd_positions(spec, batch)[0]], head=teacher_head(t_proj, spec.vocab_limit))
        total, parts = fused_logit_terms(spec, batch, states, signals, s_proj)
        shares.update(parts)
        return total

    with projection_replaced(s_proj, head):
        total, _ = forward(student, batch, False)
    return total, shares


def assert_fused_equals_plain(spec, batch, student, teacher):
    """The fused head and the plain losses agree: total, every term's share, and every gradient."""
    results = []
    for run in (plain, fused):
        student.zero_grad()
        total, shares = run(spec, batch, student, teacher)
        total.backward()
        results.append((total, shares, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    (total_plain, shares_plain, grads_plain), (total_fused, shares_fused, grads_fused) = results
    assert total_fused.item() == pytest.approx(total_plain.item(), rel=1e-5)
    for name in spec.weights:
        assert shares_fused[name].item() == pytest.approx(shares_plain[name].item(), rel=1e-5, abs=1e-7), name
    assert grads_fused.keys() == grads_plain.keys()
    for name in grads_plain:
        # float32 sums: an element where large contributions cancel keeps an error of the size of the largest
        # ones' rounding, so the absolute tolerance follows the tensor's scale (an element of 3,072 was 3.8e-6
        # apart at a largest gradient of 13.5, with Gemma-2 soft-capping on the student's side)
        scale = max(1.0, grads_plain[name].abs().max().item())
        torch.testing.assert_close(grads_fused[name], grads_plain[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("family,objective,restrict", [
    ("bert", "mlm", False), ("bert", "mlm", True), ("roberta", "mlm", False), ("gpt2", "clm", False),
    ("llama", "clm", False),
])
def test_fused_equals_plain(family, objective, restrict):
    builder = {"bert": tiny_bert, "roberta": tiny_roberta, "gpt2": tiny_gpt2, "llama": tiny_llama}[family]
    teacher = builder(num_layers=3, seed=1)
    student = builder(num_layers=2, seed=2)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(4.0)  # confident teacher: KL and MSE far from 0
    weights = {"ce": 5.0, "mse": 0.3, objective: 2.0}
    spec = TermSpec(weights=weights, temperature=2.0, objective=objective, restrict_ce_to_mask=restrict,
                    layer_pairs=[])
    batch = batch_for(objective)

    assert_fused_equals_plain(spec, batch, student, teacher)
    # The model is whole again afterwards.
    assert output_projection(student) is not None and isinstance(student.get_output_embeddings(), torch.nn.Linear)


def test_small_chunks_give_the_same_result():
    from distil.training.fused_head import HeadTerms, fused_head_losses

    torch.manual_seed(0)
    proj, t_proj = torch.nn.Linear(8, 30), torch.nn.Linear(8, 30)
    hidden, t_hidden = torch.randn(13, 8, requires_grad=True), torch.randn(13, 8)
    kd = torch.rand(13) > 0.3
    labels = torch.where(torch.rand(13) > 0.5, torch.randint(0, 30, (13,)), torch.full((13,), -100))
    terms = HeadTerms(temperature=3.0, coef_ce=0.7, coef_mse=0.1, coef_lm=1.3)
    results = []
    for chunk in (1, 4, 13, 100):
        hidden.grad = None
        proj.zero_grad()
        total, sums = fused_head_losses(hidden, proj, t_hidden, t_proj, kd, labels, terms, chunk=chunk)
        total.backward()
        results.append((total.item(), sums.clone(), hidden.grad.clone(), proj.weight.grad.clone()))
    for total, sums, g_h, g_w in results[1:]:
        assert total == pytest.approx(results[0][0], rel=1e-6)
        torch.testing.assert_close(sums, results[0][1])
        torch.testing.assert_close(g_h, results[0][2])
        torch.testing.assert_close(g_w, results[0][3])


def test_output_projection_must_map_onto_the_vocabulary():
    """DeBERTa-v2 with legacy=False reports its hidden->hidden transform as the output embeddings (it projects with
    the word embeddings afterwards): that layer must not stand in for the head, or the fused head computes
    logits over 32 "tokens"."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    shape = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)
    new_head = DebertaV2ForMaskedLM(DebertaV2Config(legacy=False, **shape))
    assert new_head.get_output_embeddings().out_features == 32
    assert output_projection(new_head) is None
    legacy = DebertaV2ForMaskedLM(DebertaV2Config(legacy=True, **shape))
    assert output_projection(legacy) is legacy.get_output_embeddings()
