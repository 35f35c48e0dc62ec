"""Distillation losses: hand-computed values on tiny tensors, numpy references, and agreement with
the plain (unoptimised) formulation of the original DistilBERT code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distil.losses import (
    causal_lm_loss,
    hidden_cosine,
    hidden_mse,
    logit_mse,
    masked_lm_loss,
    soft_target_kl,
)

LN2 = math.log(2.0)


# --- numpy references --------------------------------------------------------------------------


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl_batchmean(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    p = np_softmax(teacher / t)
    q = np_softmax(student / t)
    return float((p * (np.log(p) - np.log(q))).sum(axis=-1).mean() * t * t)


# --- soft_target_kl ------------------------------------------------------------------------------


def test_kl_by_hand_two_rows():
    # Row 0: student uniform q = [1/3, 1/3, 1/3]; teacher logits [0, ln2, 0] -> p = [1/4, 1/2, 1/4].
    #   KL = 1/4 ln(3/4) + 1/2 ln(3/2) + 1/4 ln(3/4) = 1/2 ln(3/4 * 3/2) = 1/2 ln(9/8).
    # Row 1: identical logits -> KL = 0.  batchmean over 2 rows: 1/4 ln(9/8).
    student = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    teacher = torch.tensor([[0.0, LN2, 0.0], [1.0, 2.0, 3.0]])
    expected = 0.25 * math.log(9 / 8)
    got = soft_target_kl(student, teacher, temperature=1.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, abs=1e-7)
    assert got.item() == pytest.approx(np_kl_batchmean(student.numpy(), teacher.numpy(), 1.0), abs=1e-7)


def test_kl_temperature_squared_scaling():
    # With T = 2, logits [0, 2 ln2, 0] / 2 = [0, ln2, 0] -> the same p = [1/4, 1/2, 1/4] as above,
    # so the per-row KL is 1/2 ln(9/8) and the T**2 = 4 factor gives 2 ln(9/8) for one row.
    student = torch.zeros(1, 3)
    teacher = torch.tensor([[0.0, 2 * LN2, 0.0]])
    got = soft_target_kl(student, teacher, temperature=2.0)
    assert got.item() == pytest.approx(4 * 0.5 * math.log(9 / 8), abs=1e-6)
    assert got.item() == pytest.approx(np_kl_batchmean(student.numpy(), teacher.numpy(), 2.0), abs=1e-6)


def test_kl_of_identical_logits_is_zero():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    for t in (0.5, 1.0, 2.0, 8.0):
        assert soft_target_kl(logits, logits.clone(), temperature=t).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_mask_selects_rows_and_averages_over_them():
    # Rows 0 and 2 selected: row 0 as in the hand example (1/2 ln(9/8)), row 2 identical (0);
    # the unselected row 1 holds wildly different logits that must not leak in.  Mean = 1/4 ln(9/8).
    student = torch.tensor([[[0.0, 0.0, 0.0], [50.0, -50.0, 0.0], [1.0, 1.0, 2.0]]])
    teacher = torch.tensor([[[0.0, LN2, 0.0], [-50.0, 50.0, 0.0], [1.0, 1.0, 2.0]]])
    mask = torch.tensor([[True, False, True]])
    got = soft_target_kl(student, teacher, temperature=1.0, mask=mask)
    assert got.item() == pytest.approx(0.25 * math.log(9 / 8), abs=1e-7)


def test_kl_bf16_inputs_are_upcast():
    torch.manual_seed(1)
    student = (torch.randn(2, 6, 30) * 3).to(torch.bfloat16)
    teacher = (torch.randn(2, 6, 30) * 3).to(torch.bfloat16)
    mask = torch.rand(2, 6) > 0.3
    got = soft_target_kl(student, teacher, 2.0, mask)
    ref = soft_target_kl(student.float(), teacher.float(), 2.0, mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    s_np = student.float()[mask].numpy().astype(np.float64)
    t_np = teacher.float()[mask].numpy().astype(np.float64)
    assert got.item() == pytest.approx(np_kl_batchmean(s_np, t_np, 2.0), abs=1e-5)


def test_kl_gradient_only_reaches_selected_rows():
    torch.manual_seed(2)
    student = torch.randn(2, 4, 9, requires_grad=True)
    teacher = torch.randn(2, 4, 9)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    soft_target_kl(student, teacher, 2.0, mask).backward()
    row_has_grad = student.grad.abs().sum(-1) > 0
    assert torch.equal(row_has_grad, mask)


def test_kl_empty_selection_is_zero_not_nan():
    student = torch.randn(2, 3, 5, requires_grad=True)
    got = soft_target_kl(student, torch.randn(2, 3, 5), 2.0, torch.zeros(2, 3, dtype=torch.bool))
    assert got.item() == 0.0
    got.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_kl_rejects_bad_inputs():
    with pytest.raises(ValueError, match="last dimension"):
        soft_target_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="mask shape"):
        soft_target_kl(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        soft_target_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


# --- masked_lm_loss / causal_lm_loss -------------------------------------------------------------


def test_masked_lm_loss_by_hand():
    # Row 0: logits [0, 0, 0], label 1 -> -ln(1/3) = ln 3.
    # Row 1: logits [0, ln2, 0] -> p = [1/4, 1/2, 1/4], label 1 -> -ln(1/2) = ln 2.
    # Row 2: label -100, ignored (its logits would give a huge loss).  Mean = (ln 3 + ln 2) / 2.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [100.0, -100.0, 0.0]]])
    labels = torch.tensor([[1, 1, -100]])
    got = masked_lm_loss(logits, labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(math.log(6) / 2, abs=1e-7)


def test_masked_lm_loss_custom_ignore_index_and_bf16():
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, LN2, 0.0]]).to(torch.bfloat16)
    labels = torch.tensor([-1, 0])
    # Row 1 only: p = [1/4, 1/2, 1/4], label 0 -> ln 4.  (ln2 is rounded by bf16: compare loosely.)
    got = masked_lm_loss(logits, labels, ignore_index=-1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(math.log(4), abs=5e-3)


def test_masked_lm_loss_without_labels_is_zero():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    got = masked_lm_loss(logits, torch.full((2, 3), -100))
    assert got.item() == 0.0
    got.backward()


def test_causal_lm_loss_by_hand():
    # Position 0 predicts label[1] = 1 from logits [0, ln2, 0]: -ln(1/2) = ln 2.
    # Position 1 predicts label[2] = 2 from logits [0, 0, 0]: -ln(1/3) = ln 3.
    # Position 2 has nothing to predict (its logits are garbage); label[0] is never a target.
    logits = torch.tensor([[[0.0, LN2, 0.0], [0.0, 0.0, 0.0], [99.0, -99.0, 5.0]]])
    labels = torch.tensor([[0, 1, 2]])
    assert causal_lm_loss(logits, labels).item() == pytest.approx(math.log(6) / 2, abs=1e-7)
    # Padding the last position removes the second term: only ln 2 remains.
    labels_padded = torch.tensor([[0, 1, -100]])
    assert causal_lm_loss(logits, labels_padded).item() == pytest.approx(LN2, abs=1e-7)


# --- logit_mse / hidden_cosine / hidden_mse -----------------------------------------------------


def test_logit_mse_by_hand_sum_over_vocab_mean_over_rows():
    # Row 0: (1-1)^2 + (2-0)^2 + (3-3)^2 = 4.  Row 1: 3 * (0-1)^2 = 3.  Row 2 masked out.
    # Sum 7 over 2 rows = 3.5 (not 7/6: the vocabulary is summed, not averaged).
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    teacher = torch.tensor([[1.0, 0.0, 3.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([True, True, False])
    assert logit_mse(student, teacher, mask).item() == pytest.approx(3.5)
    # Without a mask all three rows count: (4 + 3 + 243) / 3.
    assert logit_mse(student, teacher).item() == pytest.approx(250 / 3, rel=1e-6)


def test_hidden_cosine_by_hand():
    # Row 0: [1,0] vs [0,1] are orthogonal -> 1 - 0 = 1.  Row 1: [1,1] vs [2,2] parallel -> 0.
    # Row 2: opposite vectors would give 2, but it is masked out.  Mean = 0.5.
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]]).bool()
    assert hidden_cosine(student, teacher, mask).item() == pytest.approx(0.5, abs=1e-7)
    assert hidden_cosine(student, teacher).item() == pytest.approx(1.0, abs=1e-7)


def test_hidden_cosine_rejects_different_hidden_sizes():
    with pytest.raises(ValueError, match="hidden states differ in their last dimension .*768 vs 384"):
        hidden_cosine(torch.zeros(2, 3, 768), torch.zeros(2, 3, 384), torch.ones(2, 3, dtype=torch.bool))


def test_hidden_mse_by_hand():
    # Squared errors 1, 4 | 0, 4 over the two selected positions: 9 / 4 elements = 2.25.
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]])
    teacher = torch.tensor([[0.0, 0.0], [3.0, 6.0], [0.0, 0.0]])
    mask = torch.tensor([True, True, False])
    assert hidden_mse(student, teacher, mask).item() == pytest.approx(2.25)


# --- agreement with the plain formulation --------------------------------------------------------
# The original code's way, kept here as the reference: expand the (B, L) mask over the last dim,
# masked_select the whole (B, L, V) tensor, view back to rows, and use the nn loss modules.


def plain_kl(s_logits, t_logits, mask, temperature):
    full_mask = mask.unsqueeze(-1).expand_as(s_logits)
    v = s_logits.size(-1)
    s_slct = torch.masked_select(s_logits, full_mask).view(-1, v)
    t_slct = torch.masked_select(t_logits, full_mask).view(-1, v)
    loss = nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s_slct / temperature, dim=-1), F.softmax(t_slct / temperature, dim=-1)
    )
    return loss * temperature**2


def plain_mse(s_logits, t_logits, mask):
    full_mask = mask.unsqueeze(-1).expand_as(s_logits)
    v = s_logits.size(-1)
    s_slct = torch.masked_select(s_logits, full_mask).view(-1, v)
    t_slct = torch.masked_select(t_logits, full_mask).view(-1, v)
    return nn.MSELoss(reduction="sum")(s_slct, t_slct) / s_slct.size(0)


def plain_cosine(s_hidden, t_hidden, mask):
    full_mask = mask.unsqueeze(-1).expand_as(s_hidden)
    dim = s_hidden.size(-1)
    s_slct = torch.masked_select(s_hidden, full_mask).view(-1, dim)
    t_slct = torch.masked_select(t_hidden, full_mask).view(-1, dim)
    target = s_slct.new_ones(s_slct.size(0))
    return nn.CosineEmbeddingLoss(reduction="mean")(s_slct, t_slct, target)


def plain_hidden_mse(s_hidden, t_hidden, mask):
    full_mask = mask.unsqueeze(-1).expand_as(s_hidden)
    return nn.MSELoss()(torch.masked_select(s_hidden, full_mask), torch.masked_select(t_hidden, full_mask))


def plain_mlm(logits, labels):
    return nn.CrossEntropyLoss(ignore_index=-100)(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def plain_clm(logits, labels):
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return plain_mlm(shift_logits, shift_labels)


@pytest.fixture()
def random_batch():
    torch.manual_seed(1234)
    b, l, v, h = 4, 7, 50, 16
    lengths = torch.tensor([7, 5, 3, 6])
    attention = torch.arange(l).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L) with right padding
    s_logits = torch.randn(b, l, v) * 3
    t_logits = torch.randn(b, l, v) * 3
    s_hidden = torch.randn(b, l, h)
    t_hidden = torch.randn(b, l, h)
    labels = torch.randint(0, v, (b, l)).masked_fill(~attention, -100)
    mlm_labels = labels.masked_fill(torch.rand(b, l) > 0.4, -100)
    return attention, s_logits, t_logits, s_hidden, t_hidden, labels, mlm_labels


def _value_and_grad(fn, leaf, *args):
    x = leaf.clone().requires_grad_(True)
    out = fn(x, *args)
    out.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_fast_kl_matches_plain(random_batch, temperature):
    attention, s_logits, t_logits, *_ = random_batch
    fast, fast_grad = _value_and_grad(lambda s: soft_target_kl(s, t_logits, temperature, attention), s_logits)
    plain, plain_grad = _value_and_grad(lambda s: plain_kl(s, t_logits, attention, temperature), s_logits)
    assert torch.allclose(fast, plain, atol=1e-5)
    assert torch.allclose(fast_grad, plain_grad, atol=1e-6)


def test_fast_logit_mse_matches_plain(random_batch):
    attention, s_logits, t_logits, *_ = random_batch
    fast, fast_grad = _value_and_grad(lambda s: logit_mse(s, t_logits, attention), s_logits)
    plain, plain_grad = _value_and_grad(lambda s: plain_mse(s, t_logits, attention), s_logits)
    assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fast_grad, plain_grad, atol=1e-5)


def test_fast_hidden_losses_match_plain(random_batch):
    attention, _, _, s_hidden, t_hidden, *_ = random_batch
    fast, fast_grad = _value_and_grad(lambda s: hidden_cosine(s, t_hidden, attention), s_hidden)
    plain, plain_grad = _value_and_grad(lambda s: plain_cosine(s, t_hidden, attention), s_hidden)
    assert torch.allclose(fast, plain, atol=1e-5)
    assert torch.allclose(fast_grad, plain_grad, atol=1e-5)
    fast, fast_grad = _value_and_grad(lambda s: hidden_mse(s, t_hidden, attention), s_hidden)
    plain, plain_grad = _value_and_grad(lambda s: plain_hidden_mse(s, t_hidden, attention), s_hidden)
    assert torch.allclose(fast, plain, atol=1e-5)
    assert torch.allclose(fast_grad, plain_grad, atol=1e-6)


def test_fast_lm_losses_match_plain(random_batch):
    _, s_logits, _, _, _, labels, mlm_labels = random_batch
    assert torch.allclose(masked_lm_loss(s_logits, mlm_labels), plain_mlm(s_logits, mlm_labels), atol=1e-5)
    assert torch.allclose(causal_lm_loss(s_logits, labels), plain_clm(s_logits, labels), atol=1e-5)
