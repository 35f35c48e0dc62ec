"""signal_parity: each divergence's one definition (distil.teacher_signal) against a plain float64 formulation
written here: every divergence x (dense, sparse) signals x (fused engine, plain path) x every logit transform x
(tied, untied head), values and gradients with respect to the hidden states' parameters and the head's weight;
and held-out evaluation reporting the divergence the run trains, by name."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from distil import losses
from distil.teacher_signal.output_layer import LogitTransform
from distil.teacher_cache.signals import sparse_signals
from distil.teacher_signal.divergences import DIVERGENCES, Divergence
from distil.teacher_signal.engine import HeadTerms, output_layer_losses
from distil.teacher_signal.signals import DenseSignals, SparseSignals, TeacherHead

N, H, H_TEACHER, V, K, DRAWN, CHUNK = 23, 8, 6, 37, 6, 4, 5
T, BETA, ALPHA = 2.0, 0.3, 0.2
COEF_CE, COEF_MSE, COEF_LM = 0.7, 0.05, 0.3
TRANSFORMS = {"none": None, "softcap": LogitTransform(softcap=2.0), "multiply": LogitTransform(multiply=2.5),
              "divide": LogitTransform(divide=4.0)}
# every divergence against dense and bucketed sparse signals; forward KL also against sampled ones
FORMS = [(d, form) for d in DIVERGENCES for form in ("dense", "sparse")] + [("forward_kl", "sparse_sampled")]


# --- the plain formulation, float64 ----------------------------------------------------------------------------

def _kl(a, b):
    return (a * (a.clamp_min(1e-300).log() - b.log())).sum()


def reference_divergence(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The divergence `name` between rows of probabilities p (teacher) and q (student), summed, no T^2."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * _kl(p, m) + (1 - BETA) * _kl(q, m)
    if name == "skew_kl":
        return _kl(p, ALPHA * p + (1 - ALPHA) * q)
    if name == "skew_reverse_kl":
        return _kl(q, ALPHA * q + (1 - ALPHA) * p)
    assert name == "tvd"
    return 0.5 * (p - q).abs().sum()


def reference_soft_target(name: str, form: str, student: torch.Tensor, teacher: torch.Tensor,
                          signals: SparseSignals | None) -> torch.Tensor:
    """T^2 times the divergence over rows: dense, on the (k+1) buckets of the top-k and the rest, or the sampled
    forward KL estimate."""
    q = torch.softmax(student / T, dim=-1)
    if form == "dense":
        return reference_divergence(name, torch.softmax(teacher / T, dim=-1), q) * T * T
    p_top, ids = signals.top_logp.double().exp(), signals.top_ids
    q_top = q.gather(1, ids)
    if form == "sparse_sampled":
        weights, p_drawn = signals.sample_logw.double().exp(), signals.sample_logp.double().exp()
        q_drawn = q.gather(1, signals.sample_ids)
        value = (p_top * (p_top.log() - q_top.log())).sum() + (weights * (p_drawn.log() - q_drawn.log())).sum()
        return value * T * T
    q_rest = q.scatter(1, ids, 0.0).sum(1, keepdim=True)   # the student's mass outside the top-k
    p_rest = signals.log_rest.double().exp().unsqueeze(1)
    return reference_divergence(name, torch.cat([p_top, p_rest], 1), torch.cat([q_top, q_rest], 1)) * T * T


def apply_transform(logits, transform):
    if transform is None:
        return logits
    if transform.multiply is not None:
        logits = logits * transform.multiply
    if transform.divide is not None:
        logits = logits / transform.divide
    if transform.softcap is not None:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    return logits


# --- a tiny model: embeddings, one layer, an output layer tied to the embeddings or not ----------------------------

def parameters(tied: bool, dtype) -> dict:
    gen = torch.Generator().manual_seed(11)
    made = {"embedding": torch.randn(V, H, generator=gen) * 2.0, "layer": torch.randn(H, H, generator=gen)}
    if not tied:
        made["head"] = torch.randn(V, H, generator=gen) * 2.0
        made["head_bias"] = torch.randn(V, generator=gen)
    return {k: v.to(dtype).requires_grad_(True) for k, v in made.items()}


def student_parts(params: dict):
    """(hidden states (N, H), head weight, head bias): the hidden states depend on the embeddings, so a tied head
    gets gradient through both uses."""
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(12))
    hidden = torch.tanh(params["embedding"][ids] @ params["layer"])
    if "head" in params:
        return hidden, params["head"], params["head_bias"]
    return hidden, params["embedding"], None


def problem(form: str, transform):
    """(kd rows, labels, dense teacher signals (one row per kd row), sparse signals or None, teacher logits)."""
    gen = torch.Generator().manual_seed(13)
    kd_rows = torch.rand(N, generator=gen) > 0.3
    kd_rows[:CHUNK] = True          # a chunk of kd rows only
    kd_rows[CHUNK:2 * CHUNK] = False  # and one without any
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) > 0.6] = -100
    n_kd = int(kd_rows.sum())
    head = TeacherHead(torch.randn(V, H_TEACHER, generator=gen) * 3, torch.randn(V, generator=gen), transform)
    states = torch.randn(n_kd, H_TEACHER, generator=gen)
    dense = DenseSignals(states=states, head=head)
    teacher_logits = apply_transform(states.double() @ head.weight.double().t() + head.bias.double(), transform)
    sparse = None
    if form != "dense":
        drawn = DRAWN if form == "sparse_sampled" else 0
        s = sparse_signals(teacher_logits.float(), K, T, drawn, torch.Generator().manual_seed(14))
        sparse = SparseSignals(s.top_ids, s.top_logp, s.log_rest, *((s.sample_ids, s.sample_logp, s.sample_logw)
                                                                    if drawn else ()))
    return kd_rows, labels, dense, sparse, teacher_logits


def reference(name, form, transform, tied):
    """(value, {parameter: gradient}) of coef_ce * soft target + coef_mse * logit mse + coef_lm * cross-entropy,
    all in float64."""
    params = parameters(tied, torch.float64)
    kd_rows, labels, dense, sparse, teacher_logits = problem(form, transform)
    hidden, weight, bias = student_parts(params)
    logits = apply_transform(hidden @ weight.t() + (bias if bias is not None else 0.0), transform)
    total = COEF_CE * reference_soft_target(name, form, logits[kd_rows], teacher_logits, sparse)
    if form == "dense":
        total = total + COEF_MSE * ((logits[kd_rows] - teacher_logits) ** 2).sum()
    lm = labels != -100
    total = total - COEF_LM * torch.log_softmax(logits[lm], dim=-1).gather(1, labels[lm].unsqueeze(1)).sum()
    total.backward()
    return total.item(), {k: v.grad for k, v in params.items()}


def run_fused(name, form, transform, tied):
    params = parameters(tied, torch.float32)
    kd_rows, labels, dense, sparse, _ = problem(form, transform)
    hidden, weight, bias = student_parts(params)
    terms = HeadTerms(T, coef_ce=COEF_CE, divergence=name, jsd_beta=BETA, skew_alpha=ALPHA,
                      coef_mse=COEF_MSE if form == "dense" else 0.0, coef_lm=COEF_LM)
    total, _ = output_layer_losses(hidden, weight, bias, kd_rows, labels, dense if form == "dense" else sparse,
                                   terms, chunk=CHUNK, transform=transform)
    total.backward()
    return total.item(), {k: v.grad for k, v in params.items()}


def run_plain(name, form, transform, tied):
    """The unfused path: whole logits, the same Divergence.value, autograd."""
    params = parameters(tied, torch.float32)
    kd_rows, labels, dense, sparse, _ = problem(form, transform)
    hidden, weight, bias = student_parts(params)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = transform(logits) if transform is not None else logits
    divergence = Divergence(name, T, BETA, ALPHA)
    total = COEF_CE * divergence.value(logits[kd_rows], dense if form == "dense" else sparse)
    if form == "dense":
        teacher = dense.teacher_logits()
        total = total + COEF_MSE * losses.logit_mse(logits[kd_rows], teacher) * int(kd_rows.sum())
    lm = labels != -100
    total = total + COEF_LM * losses.masked_lm_loss(logits, labels) * int(lm.sum())
    total.backward()
    return total.item(), {k: v.grad for k, v in params.items()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("path", ["fused", "plain"])
@pytest.mark.parametrize("name,form", FORMS, ids=[f"{d}-{f}" for d, f in FORMS])
def test_signal_parity(name, form, path, transform, tied):
    want_value, want_grads = reference(name, form, TRANSFORMS[transform], tied)
    run = run_fused if path == "fused" else run_plain
    value, grads = run(name, form, TRANSFORMS[transform], tied)
    assert value == pytest.approx(want_value, rel=1e-5)
    assert grads.keys() == want_grads.keys()
    for key, want in want_grads.items():
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(grads[key].double(), want, rtol=1e-4, atol=1e-5 * scale, msg=key)


def test_signal_parity_terms_reach_every_piece():
    """The matrix above would pass vacuously if a term were 0: each has a sizeable value and a gradient."""
    for form in ("dense", "sparse", "sparse_sampled"):
        kd_rows, labels, dense, sparse, teacher_logits = problem(form, TRANSFORMS["softcap"])
        params = parameters(False, torch.float64)
        hidden, weight, bias = student_parts(params)
        logits = hidden @ weight.t() + bias
        for name in (("forward_kl",) if form == "sparse_sampled" else DIVERGENCES):
            assert reference_soft_target(name, form, logits[kd_rows], teacher_logits, sparse).item() > 0.05


# --- held-out evaluation --------------------------------------------------------------------------------------

class _OneProcess:
    process_index, num_processes, device = 0, 1, torch.device("cpu")

    @staticmethod
    def autocast():
        return contextlib.nullcontext()

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor


@pytest.mark.parametrize("name", ["jsd", "reverse_kl", "forward_kl"])
def test_signal_parity_heldout_reports_the_run_divergence(name):
    """Held-out `kd` is the divergence the run trains (here at T=2 with beta/alpha set), over every real token, by
    the same definition: equal to the float64 formulation, and named by `divergence`."""
    from distil.training.heldout import evaluate_heldout
    from distil.training.batches import build_step
    from distil.training.model_outputs import forward
    from distil.training.objective import Objective, TermSpec
    from distil.training.sources.live import LiveTeacher
    from tiny_models import VOCAB_SIZE, tiny_llama

    teacher, student = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=2, seed=2)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(4.0)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(5, VOCAB_SIZE, size=n) for n in (9, 14, 6, 11)]
    spec = TermSpec(weights={"ce": 1.0, "clm": 1.0}, temperature=T, objective="clm", restrict_ce_to_mask=False,
                    layer_pairs=[], divergence=name, jsd_beta=BETA, skew_alpha=ALPHA)
    objective = Objective(spec, LiveTeacher(teacher), student)
    result = evaluate_heldout(_OneProcess(), objective, student, sequences, [[0, 1, 2, 3]], None, 0)
    assert result["divergence"] == name

    batch = build_step(sequences, 0, "clm", None, None, 0, 1, torch.device("cpu"))[0]
    with torch.no_grad():
        t_logits, _ = forward(teacher, batch, False)
        s_logits, _ = forward(student, batch, False)
    real = batch.attention_mask.bool()
    p = torch.softmax(t_logits[real].double() / T, -1)
    q = torch.softmax(s_logits[real].double() / T, -1)
    want = reference_divergence(name, p, q).item() * T * T / int(real.sum())
    assert result["kd"] == pytest.approx(want, rel=1e-5)
