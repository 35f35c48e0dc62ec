"""Several teachers as one source (training.sources.mixture): mixed per position in probability space, held to
one teacher where the mixture is one teacher, and to a float64 plain formulation where it is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distil.errors import DistilError
from distil.teacher_cache.signals import sparse_signals
from distil.teacher_signal.signals import DenseSignals, MixedSignals, SparseSignals
from distil.training.batches import build_step
from distil.training.fused_head import output_projection
from distil.training.objective import Objective, TermSpec
from distil.training.sources.interface import TeacherRequest
from distil.training.sources.live import LiveTeacher
from distil.training.sources.mixture import TeacherMixture, mix_signals
from distil.training.sources.store import StoreTeacher
from tiny_models import VOCAB_SIZE, tiny_gpt2

T = 2.0


def _batch(seed: int = 0, indices: bool = False):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, VOCAB_SIZE, size=n) for n in (9, 14, 6, 11)]
    return build_step(seqs, 0, "clm", None, None, 0, 1, torch.device("cpu"),
                      indices=list(range(len(seqs))) if indices else None)[0]


def _spec(weights=None, divergence="forward_kl", **kw):
    return TermSpec(weights=weights or {"ce": 5.0, "clm": 2.0}, temperature=T, objective="clm",
                    restrict_ce_to_mask=False, layer_pairs=[(2, 3)], divergence=divergence, **kw)


def _loss_and_grads(objective, student, batch):
    student.zero_grad()
    total, shares = objective(student, batch)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def _assert_same(a, b, rel=1e-5):
    assert a[0].item() == pytest.approx(b[0].item(), rel=rel)
    assert a[1].keys() == b[1].keys()
    for name, want in b[1].items():
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(a[1][name], want, rtol=1e-4, atol=1e-6 * scale, msg=name)


def _mixture(sources, weights, temperatures=None, hidden=0):
    return TeacherMixture(sources, weights, temperatures or [T] * len(sources), T, VOCAB_SIZE, hidden)


@pytest.fixture(scope="module")
def models():
    return tiny_gpt2(num_layers=3, seed=1), tiny_gpt2(num_layers=3, seed=5), tiny_gpt2(num_layers=2, seed=2)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_multi_teacher_two_identical_teachers_equal_one(models, fused, divergence):
    teacher, _, student = models
    head = output_projection(teacher) if fused else None
    projection = output_projection(student) if fused else None
    batch, spec = _batch(), _spec(divergence=divergence)
    one = _loss_and_grads(Objective(spec, LiveTeacher(teacher, head), student, projection), student, batch)
    two = _mixture([LiveTeacher(teacher, head, name="a"), LiveTeacher(teacher, head, name="b")], [0.5, 1.5])
    _assert_same(_loss_and_grads(Objective(spec, two, student, projection), student, batch), one)


def test_multi_teacher_weights_one_and_zero_equal_the_first_teacher_alone(models):
    first, second, student = models
    batch, spec = _batch(), _spec()
    alone = _loss_and_grads(Objective(spec, LiveTeacher(first), student), student, batch)
    mixed = _mixture([LiveTeacher(first, name="a"), LiveTeacher(second, name="b")], [1.0, 0.0])
    got = _loss_and_grads(Objective(spec, mixed, student), student, batch)
    assert got[0].item() == alone[0].item()  # the first teacher's signals pass through unchanged
    for name in alone[1]:
        assert torch.equal(got[1][name], alone[1][name]), name


class _FullVocabularyStore:
    """A teacher-signal store of `teacher` whose top-k is the whole vocabulary, for the batch's real positions."""

    def __init__(self, teacher, batch):
        with torch.no_grad():
            logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s = sparse_signals(logits[batch.attention_mask.bool()], VOCAB_SIZE, T, 0, torch.Generator().manual_seed(0))
        self.all = SparseSignals(s.top_ids, s.top_logp, s.log_rest)
        self.temperature, self.hidden_states, self.sampled, self.k, self.root = T, None, 0, VOCAB_SIZE, "memory"

    def targets(self, sequences, counts, want_hidden=False, device=None):
        return SparseSignals(self.all.top_ids, self.all.top_logp, self.all.log_rest)


@pytest.mark.parametrize("fused", [False, True])
def test_multi_teacher_live_teacher_mixed_with_its_own_store_equals_either(models, fused):
    teacher, _, student = models
    batch, spec = _batch(indices=True), _spec()
    projection = output_projection(student) if fused else None
    live = LiveTeacher(teacher, output_projection(teacher) if fused else None, name="live")
    store = StoreTeacher(_FullVocabularyStore(teacher, batch), teacher.config, "store")
    from_live = _loss_and_grads(Objective(spec, live, student, projection), student, batch)
    from_store = _loss_and_grads(Objective(spec, store, student, projection), student, batch)
    mixed = _loss_and_grads(Objective(spec, _mixture([live, store], [0.4, 0.6]), student, projection), student, batch)
    _assert_same(from_store, from_live, rel=1e-4)
    _assert_same(mixed, from_live, rel=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_multi_teacher_two_different_teachers_equal_the_float64_mixture_loss(models, fused):
    """m = 0.25 softmax(z1 / 1.5) + 0.75 softmax(z2 / T): the soft-target term is T^2 KL(m || softmax(s / T)) per
    position; loss and gradients against that, written plainly in float64."""
    first, second, student = models
    batch, spec = _batch(), _spec({"ce": 1.0})
    heads = (output_projection(first), output_projection(second)) if fused else (None, None)
    mixed = _mixture([LiveTeacher(first, heads[0]), LiveTeacher(second, heads[1])], [1.0, 3.0], [1.5, T])
    got = _loss_and_grads(Objective(spec, mixed, student, output_projection(student) if fused else None),
                          student, batch)
    real = batch.attention_mask.bool()
    with torch.no_grad():
        z1, z2 = (m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[real].double()
                  for m in (first, second))
    m = 0.25 * F.softmax(z1 / 1.5, dim=-1) + 0.75 * F.softmax(z2 / T, dim=-1)
    student.zero_grad()
    s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[real].double()
    want = (m * (m.log() - F.log_softmax(s / T, dim=-1))).sum() * T * T / s.shape[0]
    want.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert got[0].item() == pytest.approx(want.item(), rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(got[1][name].double(), g.double(), rtol=1e-4, atol=1e-6 * max(1.0, g.abs().max().item()))


def test_multi_teacher_live_mixture_is_mixed_chunk_by_chunk(models, monkeypatch):
    """Live teachers on the fused path hand on their output layer's input: the mixture of them stays so, and the
    engine mixes each chunk of rows as it projects it. No member's logits of all rows are ever built (the plain
    `teacher_logits` is made to fail), and the loss equals the float64 mixture's (the test above)."""
    first, second, student = models
    batch, spec = _batch(), _spec({"ce": 1.0})
    mixed = _mixture([LiveTeacher(first, output_projection(first)), LiveTeacher(second, output_projection(second))],
                     [1.0, 3.0], [1.5, T])
    signals = mixed.outputs(batch, TeacherRequest(kd_rows=batch.attention_mask.bool())).signals
    assert isinstance(signals, MixedSignals) and all(m.logits is None for m in signals.members)
    whole = signals.teacher_logits()
    for start in range(0, signals.rows_count, 7):   # any chunk of rows mixes to the same rows of the whole
        rows = slice(start, min(signals.rows_count, start + 7))
        chunk = signals.rows(rows).logits_into(torch.empty(rows.stop - start, VOCAB_SIZE))
        torch.testing.assert_close(chunk, whole[rows].float(), rtol=1e-5, atol=1e-5)
    plain = _loss_and_grads(Objective(spec, mixed, student), student, batch)

    def refuse(self):
        raise AssertionError("a member's logits of every row were built")

    monkeypatch.setattr(DenseSignals, "teacher_logits", refuse)
    fused = _loss_and_grads(Objective(spec, mixed, student, output_projection(student)), student, batch)
    _assert_same(fused, plain, rel=1e-5)


def test_multi_teacher_sparse_mixture_is_exact_on_full_stores_and_sums_to_one():
    gen = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(7, VOCAB_SIZE, generator=gen) * 3, torch.randn(7, VOCAB_SIZE, generator=gen) * 3

    def stored(z, k):
        s = sparse_signals(z, k, T, 0, torch.Generator().manual_seed(0))
        return SparseSignals(s.top_ids, s.top_logp, s.log_rest)

    full = mix_signals([stored(z1, VOCAB_SIZE), stored(z2, VOCAB_SIZE)], [1.0, 3.0], [T, T], T, VOCAB_SIZE)
    m = 0.25 * F.softmax(z1.double() / T, dim=-1) + 0.75 * F.softmax(z2.double() / T, dim=-1)
    dense_m = torch.zeros_like(m).scatter_(1, full.top_ids, full.top_logp.double().exp())
    torch.testing.assert_close(dense_m, m, rtol=1e-5, atol=1e-7)
    # Partial stores: the union of the top ids (some rows share ids), mass and rest add up to 1 on every row.
    partial = mix_signals([stored(z1, 8), stored(z2, 8), DenseSignals(logits=z1)], [1.0, 1.0, 2.0], [T] * 3, T,
                          VOCAB_SIZE)
    assert partial.top_ids.shape[1] == 24
    assert all(len(set(row)) == 24 for row in partial.top_ids.tolist())
    total = partial.top_logp.double().exp().sum(1) + partial.log_rest.double().exp()
    torch.testing.assert_close(total, torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-5)
    # The dense member's probabilities are exact at every union id.
    union_m = F.softmax(z1.double() / T, dim=-1).gather(1, partial.top_ids)
    assert (partial.top_logp.double().exp() >= 0.5 * union_m - 1e-7).all()


def test_multi_teacher_hidden_terms_compare_with_the_named_teacher(models):
    first, second, student = models
    batch = _batch()
    spec = _spec({"ce": 1.0, "hidden_mse": 1.0})
    named = lambda hidden: _mixture([LiveTeacher(first), LiveTeacher(second)], [1.0, 1.0], hidden=hidden)
    alone = Objective(_spec({"hidden_mse": 1.0}), LiveTeacher(second), student)(student, batch)[1]["hidden_mse"]
    mixed = Objective(spec, named(1), student)(student, batch)[1]["hidden_mse"]
    other = Objective(spec, named(0), student)(student, batch)[1]["hidden_mse"]
    assert mixed.item() == pytest.approx(alone.item(), rel=1e-6)
    assert other.item() != pytest.approx(alone.item(), rel=1e-3)


def test_multi_teacher_recipe_refusals(tmp_path):
    from distil.config import load_config
    from distil.training.sources.setup import hidden_teacher_index, teacher_entries

    def recipe(**extra):
        return load_config(None, [f"data.path={tmp_path}", "teachers=[{path: a, weight: 2}, {path: b, name: big}]",
                                  *[f"{k}={v}" for k, v in extra.items()]])

    config = recipe()
    assert [(e.name, e.weight) for e in teacher_entries(config)] == [("0", 2.0), ("big", 1.0)]
    with pytest.raises(DistilError, match="loss.hidden_teacher"):
        hidden_teacher_index(recipe(**{"loss.alpha_cos": 1.0}), teacher_entries(config))
    assert hidden_teacher_index(recipe(**{"loss.alpha_cos": 1.0, "loss.hidden_teacher": "big"}),
                                teacher_entries(config)) == 1
    with pytest.raises(DistilError, match="names no teacher"):
        hidden_teacher_index(recipe(**{"loss.hidden_teacher": "small"}), teacher_entries(config))
    for bad, match in (("teachers=[{path: a, weight: -1}]", "weight"), ("teachers=[{weight: 1}]", "path"),
                       ("teachers=[{path: a, temperature: 0}]", "temperature"),
                       ("teachers=[{path: a, colour: red}]", "Unknown key"),
                       ("teachers=[{path: a, name: x}, {path: b, name: x}]", "share a name")):
        with pytest.raises(DistilError, match=match):
            load_config(None, [f"data.path={tmp_path}", bad])
    with pytest.raises(DistilError, match="both"):
        load_config(None, [f"data.path={tmp_path}", "teacher.path=a", "teachers=[{path: b}]"])


def test_multi_teacher_vocabularies_must_match(tmp_path):
    from types import SimpleNamespace

    from distil.training.sources.setup import LoadedTeacher, TeacherEntry, _check_same_vocabulary

    def loaded(name, vocab):
        tokenizer = SimpleNamespace(get_vocab=lambda: {f"w{i}": i for i in range(vocab)})
        return LoadedTeacher(TeacherEntry(name), SimpleNamespace(vocab_size=vocab), tokenizer)

    _check_same_vocabulary([loaded("a", 10), loaded("b", 10)])
    with pytest.raises(DistilError, match="cross_tokenizer"):
        _check_same_vocabulary([loaded("a", 10), loaded("b", 12)])


def test_multi_teacher_three_step_run_with_two_teachers(tmp_path):
    import yaml

    from distil.config import load_config
    from distil.training.loop import train
    from train_fixtures import prepared_data, teacher_dir, train_rows

    first = teacher_dir(tmp_path / "one", "gpt2", num_layers=3, seed=1)
    second = teacher_dir(tmp_path / "two", "gpt2", num_layers=2, seed=9)
    data = prepared_data(tmp_path, first, n_lines=80)
    student_config = tmp_path / "student-config"
    tiny_gpt2(num_layers=2, seed=3).config.save_pretrained(student_config)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "teachers": [{"path": str(first), "weight": 1.0, "name": "deep"},
                     {"path": str(second), "weight": 3.0, "temperature": 2.0, "name": "shallow"}],
        "student": {"config": str(student_config)},
        "data": {"path": str(data), "batch_size": 4},
        "loss": {"alpha_ce": 1.0, "alpha_clm": 1.0, "alpha_hidden_mse": 0.1, "hidden_layers": "last",
                 "hidden_teacher": "shallow"},
        "optim": {"max_steps": 3, "lr": 1e-3, "warmup_fraction": 0.0},
        "run": {"output_dir": str(tmp_path / "run"), "log_every": 1, "eval_every": 0, "checkpoint_every": 0,
                "progress": False, "report_to": []}}), encoding="utf-8")
    summary = train(load_config(recipe))
    assert summary["steps"] == 3
    heldout = summary["heldout"]
    assert {"kd", "kd_deep", "kd_shallow", "teacher_clm_deep", "teacher_clm_shallow"} <= set(heldout)
    # KL is convex in the teacher's distribution: the student is no farther from the mixture than the weighted
    # distances from its members (every teacher at the run's temperature here).
    assert heldout["kd"] <= 0.25 * heldout["kd_deep"] + 0.75 * heldout["kd_shallow"] + 1e-6
    assert len(train_rows(tmp_path / "run")) == 3
