"""The store's path through the output-layer engine (teacher_signal.engine): the model's own logit transform applied as in the live
fused head, and a closed-form gradient equal to the float64 plain formulation at confident-student extremes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distil.teacher_cache.signals import sparse_signals
from distil.teacher_signal.divergences import DIVERGENCES, Divergence
from distil.teacher_signal.signals import LOG_FLOOR, SparseSignals as SparseTargets
from distil.training.fused_head import HeadTerms, LogitTransform, output_projection, student_head_losses
from distil.training.batches import build_step
from distil.training.objective import TermSpec
from test_fused_head_softcap import tiny_causal
from tiny_models import VOCAB_SIZE


def _targets(logits, k, T, sampled=0, seed=0) -> SparseTargets:
    s = sparse_signals(logits, k, T, sampled, torch.Generator().manual_seed(seed))
    if not sampled:
        return SparseTargets(s.top_ids, s.top_logp, s.log_rest)
    return SparseTargets(s.top_ids, s.top_logp, s.log_rest, s.sample_ids, s.sample_logp, s.sample_logw)


# --- the model's logit transform on the store path ---------------------------------------------------------------

class _RowsStore:
    """Stands for a teacher-signal store: the targets of a batch's real positions, in row-major order."""

    def __init__(self, targets: SparseTargets, temperature: float = 2.0):
        self.all = targets
        self.temperature, self.hidden_states, self.k = temperature, None, targets.top_ids.shape[1]
        self.sampled = targets.sample_ids.shape[1] if targets.sampled else 0

    def targets(self, sequences, counts, want_hidden=False, device=None) -> SparseTargets:
        assert sum(counts) == self.all.top_ids.shape[0]
        return self.all


STUDENTS = {  # the three kinds of transform distil knows, at settings that change the logits a lot
    "gemma2_softcap": dict(model_type="gemma2", final_logit_softcapping=2.0),
    "cohere_logit_scale": dict(model_type="cohere", logit_scale=3.0),
    "granite_logits_scaling": dict(model_type="granite", logits_scaling=8.0),
}


def _objective_terms(student, objective, batch):
    total, shares = objective(student, batch)
    student.zero_grad()
    total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return total.detach(), {k: v.item() for k, v in shares.items()}, grads


@pytest.mark.parametrize("divergence", list(DIVERGENCES) + ["forward_kl_sampled"])
@pytest.mark.parametrize("student_kind", sorted(STUDENTS))
def test_sparse_transform_store_head_equals_plain_for_every_divergence(student_kind, divergence):
    """Training from a store: the sparse fused head gives the values and gradients of the plain path, which uses
    the model's own (transformed) logits, for every divergence and every kind of transform."""
    from distil.training.objective import Objective
    from distil.training.sources.store import StoreTeacher

    settings = dict(STUDENTS[student_kind])
    student = tiny_causal(settings.pop("model_type"), 2, 3, **settings)
    with torch.no_grad():  # confident logits, which the cap bends and the scales move far
        student.get_output_embeddings().weight.mul_(4.0)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, VOCAB_SIZE, size=n) for n in (9, 14, 6, 11)]
    batch = build_step(seqs, 0, "clm", None, None, 0, 1, torch.device("cpu"), indices=list(range(len(seqs))))[0]
    n_real = int(batch.attention_mask.sum())
    sampled = 6 if divergence.endswith("_sampled") else 0
    teacher_logits = torch.randn(n_real, VOCAB_SIZE, generator=torch.Generator().manual_seed(1)) * 4
    store = _RowsStore(_targets(teacher_logits, 8, 2.0, sampled))
    spec = TermSpec(weights={"ce": 5.0, "clm": 2.0}, temperature=2.0, objective="clm", restrict_ce_to_mask=False,
                    layer_pairs=[], divergence=divergence.removesuffix("_sampled"))
    teacher = StoreTeacher(store, student.config)
    projection = output_projection(student)
    assert projection is not None

    plain = _objective_terms(student, Objective(spec, teacher, student), batch)
    fused = _objective_terms(student, Objective(spec, teacher, student, projection), batch)
    assert fused[0].item() == pytest.approx(plain[0].item(), rel=1e-5)
    assert fused[1].keys() == plain[1].keys() == {"ce", "clm"}
    for name in plain[1]:
        assert fused[1][name] == pytest.approx(plain[1][name], rel=1e-5), name
    assert fused[2].keys() == plain[2].keys()
    for name, want in plain[2].items():
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(fused[2][name], want, rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("transform", [LogitTransform(softcap=1.5), LogitTransform(multiply=2.5),
                                       LogitTransform(divide=8.0)])
def test_sparse_transform_given_explicitly_equals_plain_on_transformed_logits(transform):
    """student_head_losses(..., transform=) computes the losses of transform(projection(hidden)), values and
    gradients, with the sampled and the bucketed targets."""
    gen = torch.Generator().manual_seed(2)
    n, d, vocab, T = 70, 10, 30, 2.0
    projection = torch.nn.Linear(d, vocab)
    with torch.no_grad():
        projection.weight.mul_(6.0)
    hidden = torch.randn(n, d, generator=gen)
    kd_rows = torch.rand(n, generator=gen) > 0.25
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) > 0.5] = -100
    for sampled in (0, 4):
        targets = _targets(torch.randn(int(kd_rows.sum()), vocab, generator=gen) * 3, 5, T, sampled)
        terms = HeadTerms(T, coef_ce=0.7, coef_lm=0.3)
        h1 = hidden.clone().requires_grad_(True)
        projection.zero_grad()
        total, sums = student_head_losses(h1, projection, kd_rows, labels, targets, terms, chunk=16,
                                         transform=transform)
        total.backward()
        got = (h1.grad, projection.weight.grad.clone())
        h2 = hidden.clone().requires_grad_(True)
        projection.zero_grad()
        logits = transform(projection(h2))
        plain_ce = Divergence("forward_kl", T).value(logits[kd_rows], targets)
        lm = labels != -100
        plain_lm = torch.nn.functional.cross_entropy(logits[lm], labels[lm], reduction="sum")
        (0.7 * plain_ce + 0.3 * plain_lm).backward()
        assert sums[0].item() == pytest.approx(plain_ce.item(), rel=1e-5)
        assert sums[2].item() == pytest.approx(plain_lm.item(), rel=1e-5)
        for g, want in zip(got, (h2.grad, projection.weight.grad)):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6 * max(1.0, want.abs().max().item()))


# --- the closed-form gradient at extremes, against float64 ---------------------------------------------------------

VOCAB, K = 40, 6


def _extreme(case: str):
    """(student logits (rows, VOCAB) float64, SparseTargets) for one extreme; the top-k are the ids 0..k-1."""
    gen = torch.Generator().manual_seed(7)
    rows = 3
    k = VOCAB if case == "every_id_in_top_k" else K
    p_top = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)  # sums to 1
    rest = {"confident_student": 0.05, "tiny_rest": 1e-6, "zero_rest": 0.0, "confident_student_tiny_rest": 1e-6,
            "every_id_in_top_k": 0.0, "student_tail_below_floor": 0.05}[case]
    q_top = torch.tensor([0.1, 0.1, 0.3, 0.25, 0.15, 0.1], dtype=torch.float64)  # far from p_top
    student = torch.empty(rows, VOCAB, dtype=torch.float64)
    student[:, :K] = q_top.log()
    # the student's tail: ~2e-15 of its mass when confident, ~1e-42 (log below LOG_FLOOR, where the plain
    # formulation clamps it) beyond that, else a third of it
    tail_level = {"confident_student": -36.0, "confident_student_tiny_rest": -36.0,
                  "student_tail_below_floor": -100.0}.get(case, math.log(0.5 / (VOCAB - K)))
    student[:, K:] = tail_level + torch.rand(rows, VOCAB - K, generator=gen, dtype=torch.float64)
    student += 3.0 * torch.randn(rows, 1, generator=gen, dtype=torch.float64)  # logits are shift-free
    if k == VOCAB:
        teacher = torch.randn(rows, VOCAB, generator=gen, dtype=torch.float64) * 2
        logp = torch.log_softmax(teacher, -1)
        top_logp, top_ids = logp.topk(k, dim=-1)
        log_rest = torch.full((rows,), LOG_FLOOR, dtype=torch.float64)
    else:
        top_ids = torch.arange(K).expand(rows, K).clone()
        top_logp = ((1 - rest) * p_top).log().expand(rows, K).clone()
        log_rest = torch.full((rows,), math.log(rest) if rest > 0 else LOG_FLOOR, dtype=torch.float64)
    targets = SparseTargets(top_ids, top_logp.float(), log_rest.float())
    return student, targets


def _float64_reference(student64, targets, T, coef_ce, labels, coef_lm):
    """(soft-target sum, cross-entropy sum, d(coef_ce * soft + coef_lm * ce) / d logits), all in float64, by
    autograd through the plain formulation."""
    x = student64.clone().requires_grad_(True)
    targets64 = SparseTargets(targets.top_ids, targets.top_logp.double(), targets.log_rest.double())
    soft = Divergence("forward_kl", T).value(x, targets64)
    lm = labels != -100
    ce = torch.nn.functional.cross_entropy(x[lm], labels[lm], reduction="sum")
    (coef_ce * soft + coef_lm * ce).backward()
    return soft.item(), ce.item(), x.grad


def _head_on_logits(logits, targets, T, coef_ce, labels, coef_lm, dtype=torch.float32):
    """The head with the identity as output layer (its logits are its hidden states): (sums, d loss / d logits)."""
    vocab = logits.shape[1]
    projection = torch.nn.Linear(vocab, vocab, bias=False).to(dtype)
    with torch.no_grad():
        projection.weight.copy_(torch.eye(vocab))
    hidden = logits.to(dtype).requires_grad_(True)
    terms = HeadTerms(T, coef_ce=coef_ce, coef_lm=coef_lm)
    total, sums = student_head_losses(hidden, projection, torch.ones(len(logits), dtype=torch.bool), labels,
                                     targets, terms)
    total.backward()
    return sums, hidden.grad.double()


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("case", ["confident_student", "tiny_rest", "zero_rest", "confident_student_tiny_rest",
                                  "every_id_in_top_k", "student_tail_below_floor"])
def test_sparse_gradient_equals_float64_reference_at_extremes(case, T):
    """The bucketed forward KL's closed-form gradient (with a cross-entropy term on some rows) = the float64
    autograd gradient of the plain formulation, on the top-k ids and the tail, where the student's tail mass is
    ~2e-15 or below the log floor, the teacher's rest mass tiny or zero, or the top-k hold every id."""
    student64, targets = _extreme(case)
    if T != 1.0:
        student64 = student64 * T  # the same distributions at temperature T
    labels = torch.tensor([2, -100, 30])
    soft, ce, want = _float64_reference(student64, targets, T, 0.7, labels, 0.3)
    sums, got = _head_on_logits(student64.float(), targets, T, 0.7, labels, 0.3)
    assert sums[0].item() == pytest.approx(soft, rel=1e-5, abs=1e-6)
    assert sums[2].item() == pytest.approx(ce, rel=1e-5)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * scale)
    if case.startswith("confident"):  # the top-k ids carry the gradient: T (q - p), far from 0
        assert got[1, :K].abs().min() > 0.03 * T


def test_sparse_gradient_confident_student_by_hand():
    """R = 0.05, student tail mass ~2e-15: each top-k id's gradient is T (q - p); the tail ids share -T R by the
    student's tail distribution."""
    student64, targets = _extreme("confident_student")
    labels = torch.full((3,), -100)
    _, got = _head_on_logits(student64.float(), targets, 1.0, 1.0, labels, 0.0)
    q = torch.softmax(student64, -1)
    p_top = targets.top_logp.double().exp()
    torch.testing.assert_close(got[:, :K], q[:, :K] - p_top, rtol=1e-5, atol=1e-7)
    tail = q[:, K:] / q[:, K:].sum(1, keepdim=True)
    torch.testing.assert_close(got[:, K:], q[:, K:] - 0.05 * tail, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("case", ["confident_student", "tiny_rest"])
def test_sparse_gradient_sampled_equals_float64_reference_at_extremes(case):
    """The sampled estimate's closed-form gradient at the same extremes, against float64 autograd."""
    student64, bucketed = _extreme(case)
    gen = torch.Generator().manual_seed(3)
    rows, drawn = student64.shape[0], 5
    ids = torch.randint(K, VOCAB, (rows, drawn), generator=gen)
    rest = bucketed.log_rest.exp()
    logw = (rest / drawn).log().unsqueeze(1).expand(rows, drawn).contiguous()
    logp = logw + math.log(drawn) - math.log(VOCAB - K)
    targets = SparseTargets(bucketed.top_ids, bucketed.top_logp, bucketed.log_rest, ids, logp, logw)
    labels = torch.tensor([-100, 7, -100])
    x = student64.clone().requires_grad_(True)
    targets64 = SparseTargets(targets.top_ids, targets.top_logp.double(), targets.log_rest.double(), ids,
                              logp.double(), logw.double())
    soft = Divergence("forward_kl", 2.0).value(x, targets64)
    lm = labels != -100
    (0.7 * soft + 0.3 * torch.nn.functional.cross_entropy(x[lm], labels[lm], reduction="sum")).backward()
    sums, got = _head_on_logits(student64.float(), targets, 2.0, 0.7, labels, 0.3)
    assert sums[0].item() == pytest.approx(soft.item(), rel=1e-5)
    torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-6 * x.grad.abs().max().item())


def test_sparse_gradient_bf16_hidden_under_autocast():
    """bfloat16 hidden states under CPU autocast: the confident student's top-k gradients stay T (q - p) (to
    bfloat16 precision), not 0."""
    student64, targets = _extreme("confident_student")
    logits = student64.to(torch.bfloat16)
    labels = torch.full((3,), -100)
    _, _, want = _float64_reference(logits.double(), targets, 1.0, 1.0, labels, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got = _head_on_logits(logits, targets, 1.0, 1.0, labels, 0.0, dtype=torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    assert got[:, :K].abs().min() > 0.03
