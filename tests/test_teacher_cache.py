"""The teacher-signal store (`distil cache-teacher`, `teacher.cache`): sparse losses checked by hand and against the
dense formulation, sampled KD unbiased (and top-k alone biased), the store round-trips, resumes byte-identically,
trains without a teacher, and refuses what it cannot do with clear messages."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distil.config import load_config
from distil.errors import DistilError
from distil.teacher_signal.divergences import (DIVERGENCES, Divergence, bucketed_divergence_sum, divergence_sum,
                                               sampled_forward_kl_sum)
from distil.teacher_signal.signals import SparseSignals as SparseTargets
from distil.teacher_cache import format as fmt
from distil.teacher_cache.reader import TeacherStore
from distil.teacher_cache.signals import sparse_signals
from distil.teacher_cache.writer import cache_teacher
from train_fixtures import corpus_lines, prepared_data, teacher_dir, train_rows, write_recipe


def _targets(logits, k, T, sampled=0, generator=None, proposal_temperature=1.0) -> SparseTargets:
    s = sparse_signals(logits, k, T, sampled, generator, proposal_temperature)
    return SparseTargets(s.top_ids, s.top_logp, s.log_rest, s.sample_ids if sampled else None,
                         s.sample_logp if sampled else None, s.sample_logw if sampled else None)


# --- the sparse losses ------------------------------------------------------------------------------------------

def test_teacher_cache_bucketed_forward_kl_by_hand():
    """Top-k + rest bucket: sum over the k tokens of p log(p/q) plus R log(R / Q_rest), times T^2."""
    T = 2.0
    teacher = torch.tensor([[4.0, 2.0, 1.0, 0.0, -1.0, -3.0]])
    student = torch.tensor([[1.0, 3.0, 0.5, 0.0, 2.0, -1.0]])
    p = [math.exp(v / T) for v in teacher[0].tolist()]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / T) for v in student[0].tolist()]
    q = [v / sum(q) for v in q]
    top = [0, 1, 2]  # the teacher's three most probable tokens
    rest_p, rest_q = 1 - sum(p[i] for i in top), 1 - sum(q[i] for i in top)
    by_hand = T * T * (sum(p[i] * math.log(p[i] / q[i]) for i in top) + rest_p * math.log(rest_p / rest_q))
    targets = _targets(teacher, 3, T)
    assert targets.top_ids[0].tolist() == top
    assert bucketed_divergence_sum(student, targets, T).item() == pytest.approx(by_hand, rel=1e-5)
    # The rest bucket makes it a lower bound of the dense KL (coarse-graining), not equal to it.
    dense = divergence_sum(student, teacher, "forward_kl", T).item()
    assert by_hand < dense


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_cache_bucketed_equals_dense_when_top_k_holds_everything(divergence):
    """With k = V the bucketed form is the dense divergence, value and gradient, for every divergence."""
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 7, generator=gen) * 2, torch.randn(5, 7, generator=gen)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    sparse = bucketed_divergence_sum(a, _targets(teacher, 7, 1.5), 1.5, divergence, 0.3, 0.2)
    dense = divergence_sum(b, teacher, divergence, 1.5, 0.3, 0.2)
    sparse.backward()
    dense.backward()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def _mean_estimate(teacher_row, student_row, k, sampled, T, draws, seed, proposal_temperature=1.0):
    """(value, gradient) of the sampled estimate averaged over `draws` independent draws of one position."""
    gen = torch.Generator().manual_seed(seed)
    targets = _targets(teacher_row.expand(draws, -1), k, T, sampled, gen, proposal_temperature)
    param = student_row.clone().requires_grad_(True)
    value = sampled_forward_kl_sum(param.expand(draws, -1), targets, T) / draws
    value.backward()
    return value.item(), param.grad


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.0])
def test_teacher_cache_sampled_kd_is_unbiased(proposal_temperature):
    """Mean of the top-k + importance-sampled estimate over many seeded draws = the dense KL and its gradient;
    the top-k + rest form is biased on the same case."""
    T = 1.0
    teacher = torch.tensor([3.0, 2.5, 1.0, 0.8, 0.5, 0.0, -0.5, -1.0])
    student = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 1.5, -2.0, 0.3])
    dense_param = student.clone().requires_grad_(True)
    dense = divergence_sum(dense_param.unsqueeze(0), teacher.unsqueeze(0), "forward_kl", T)
    dense.backward()
    value, grad = _mean_estimate(teacher, student, 2, 4, T, 20000, 0, proposal_temperature)
    assert value == pytest.approx(dense.item(), abs=0.02)
    torch.testing.assert_close(grad, dense_param.grad, atol=0.01, rtol=0)

    biased_param = student.clone().requires_grad_(True)
    bucketed_divergence_sum(biased_param.unsqueeze(0), _targets(teacher.unsqueeze(0), 2, T), T).backward()
    bias = (biased_param.grad - dense_param.grad).abs().max()
    assert bias > 0.03 and bias > 3 * (grad - dense_param.grad).abs().max()  # far outside the sampled one's error


def test_teacher_cache_sampled_draws_stay_in_the_tail_with_weights_summing_to_the_rest():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 20, generator=gen) * 3
    s = sparse_signals(logits, 5, 2.0, 8, torch.Generator().manual_seed(1))
    for row in range(6):
        assert not set(s.sample_ids[row].tolist()) & set(s.top_ids[row].tolist())
    # proposal = the tail itself: every weight is R / k'
    torch.testing.assert_close(s.sample_logw.exp().sum(1), s.log_rest.exp(), rtol=1e-5, atol=1e-6)


def test_teacher_cache_refused_divergence_with_samples():
    targets = _targets(torch.randn(3, 10), 2, 1.0, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unbiased"):
        Divergence("reverse_kl", 1.0).value(torch.randn(3, 10), targets)


def test_teacher_cache_compact_logprobs_fit_and_size():
    """compact: 8 exact log-probabilities and a cubic through the rest; ~290 bytes per token at k=128."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 2000, generator=gen) * 2.5
    top = torch.log_softmax(logits, -1).topk(128, dim=-1).values.numpy()
    arrays = fmt.encode_logprobs(top, "compact")
    decoded = fmt.decode_logprobs(arrays, "compact", 128).numpy()
    assert np.abs(decoded[:, :8] - top[:, :8]).max() < 5e-3
    assert np.abs(decoded - top).mean() < 0.05
    per_token = 128 * 2 + sum(a.dtype.itemsize * a.shape[1] for a in arrays.values()) + 2  # ids + logp + rest
    assert per_token <= 300


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("case", ["forward_kl", "forward_kl_sampled", "forward_kl_sharp", "jsd", "reverse_kl"])
def test_teacher_cache_sparse_head_equals_plain_formulation(case, T):
    """The chunked sparse head (output layer + sparse soft targets + cross-entropy) = the plain losses, values and
    gradients, with rows left out of the soft-target term and rows without a label."""
    from distil.losses import masked_lm_loss
    from distil.training.fused_head import HeadTerms, student_head_losses

    gen = torch.Generator().manual_seed(5)
    n, d, vocab = 300, 12, 40
    divergence = case.removesuffix("_sampled").removesuffix("_sharp")
    hidden = torch.randn(n, d, generator=gen)
    projection = torch.nn.Linear(d, vocab)
    teacher = torch.randn(n, vocab, generator=gen) * 3
    if case.endswith("sharp"):  # the student puts almost all its mass on the teacher's top-k (Q ~ 0)
        with torch.no_grad():
            projection.weight.mul_(25)
            teacher = projection(hidden) + torch.randn(n, vocab, generator=gen)
    kd_rows = torch.rand(n, generator=gen) > 0.2
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) > 0.6] = -100
    sampled = 5 if case.endswith("sampled") else 0
    targets = _targets(teacher[kd_rows], 6, T, sampled, torch.Generator().manual_seed(0))
    terms = HeadTerms(T, divergence=divergence, coef_ce=0.7, coef_lm=0.3)

    h1 = hidden.clone().requires_grad_(True)
    total, sums = student_head_losses(h1, projection, kd_rows, labels, targets, terms, chunk=64)
    total.backward()
    head_grads = (h1.grad, projection.weight.grad.clone(), projection.bias.grad.clone())
    projection.zero_grad()

    h2 = hidden.clone().requires_grad_(True)
    logits = projection(h2)
    labelled = int((labels != -100).sum())
    plain_ce = Divergence(divergence, T).value(logits[kd_rows], targets)
    plain_lm = masked_lm_loss(logits, labels) * labelled
    (0.7 * plain_ce + 0.3 * plain_lm).backward()
    assert sums[0].item() == pytest.approx(plain_ce.item(), rel=1e-4)
    assert sums[2].item() == pytest.approx(plain_lm.item(), rel=1e-4)
    for got, want in zip(head_grads, (h2.grad, projection.weight.grad, projection.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


# --- the store ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache")
    teacher = teacher_dir(root, "gpt2", num_layers=2)
    data = prepared_data(root, teacher, name="data", n_lines=120, heldout=0.1)
    return root, teacher, data


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_teacher_cache_store_round_trips_to_the_dense_loss(workspace):
    """dense teacher logits -> store -> loss equals the top-k + rest loss on the dense logits (fp16 storage)."""
    from transformers import AutoModelForCausalLM

    from distil.data.dataset import TokenSequences

    root, teacher, data = workspace
    store_dir = root / "store-roundtrip"
    result = cache_teacher(str(teacher), str(data), str(store_dir), top_k=8, temperature=2.0, shard_size=16,
                           batch_size=4, store_format="float16", progress=False)
    assert result["finished"] and result["k"] == 8
    # ids, log-probabilities, rest mass; plus .npy headers and offsets (128 bytes a file, 8 a sequence)
    assert 8 * 2 + 8 * 2 + 2 <= result["signal_bytes_per_token"] <= 8 * 2 + 8 * 2 + 2 + 3
    store = TeacherStore(store_dir)
    seqs = TokenSequences(data, "train")
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    for index in (0, 17, len(seqs) - 1):
        ids = torch.as_tensor(seqs[index]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        stored = store.targets([index], [ids.shape[1]])
        dense = _targets(logits, 8, 2.0)
        assert torch.equal(stored.top_ids, dense.top_ids)
        student = torch.randn(logits.shape, generator=torch.Generator().manual_seed(index))
        assert bucketed_divergence_sum(student, stored, 2.0).item() == pytest.approx(
            bucketed_divergence_sum(student, dense, 2.0).item(), rel=2e-3)
    assert (store_dir / fmt.TEACHER_DIR / "config.json").exists()
    with pytest.raises(DistilError, match="already holds a finished teacher-signal store"):
        cache_teacher(str(teacher), str(data), str(store_dir), top_k=8, shard_size=16, progress=False)


def test_teacher_cache_resume_keeps_finished_shards_and_gives_identical_bytes(workspace):
    root, teacher, data = workspace
    kwargs = dict(top_k=6, sampled=3, temperature=1.0, shard_size=10, batch_size=3, progress=False)
    whole = root / "store-whole"
    cache_teacher(str(teacher), str(data), str(whole), **kwargs)
    expected = _files(whole)

    partial = root / "store-partial"
    first = cache_teacher(str(teacher), str(data), str(partial), rank=0, world=2, **kwargs)  # process 0 of 2
    assert first["finished"] is False and not (partial / fmt.MANIFEST).exists()
    with pytest.raises(DistilError, match="unfinished"):
        TeacherStore(partial)
    with pytest.raises(DistilError, match="other settings"):
        cache_teacher(str(teacher), str(data), str(partial), **{**kwargs, "top_k": 5})
    kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("shard-*")}
    assert sorted(kept) == [fmt.shard_name(i) for i in range(0, 11, 2)]
    stale = partial / ".shard-00001.tmp-999999999"  # a shard half-written by a process that was killed
    stale.mkdir()
    (stale / "top_ids.npy").write_bytes(b"half")
    result = cache_teacher(str(teacher), str(data), str(partial), **kwargs)  # resumes: writes the odd shards
    assert result["finished"]
    assert {p.name: p.stat().st_mtime_ns for p in partial.glob("shard-*") if p.name in kept} == kept
    assert not stale.exists()
    assert _files(partial) == expected


def test_teacher_cache_two_processes_write_the_same_store(workspace):
    """Under torchrun each process writes its slice of shards; the manifest appears once all are there, and the
    store is the one a single process writes."""
    import subprocess

    from train_fixtures import subprocess_env, torchrun_command

    root, teacher, data = workspace
    args = ["--teacher", str(teacher), "--data", str(data), "--top-k", "6", "--sampled", "3", "--shard-size", "10"]
    single, multi = root / "store-single", root / "store-multi"
    cache_teacher(str(teacher), str(data), str(single), top_k=6, sampled=3, shard_size=10, progress=False)
    done = subprocess.run(torchrun_command(2, *args, "--output", multi, command="cache-teacher"),
                          env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    skip = {"teacher/tokenizer_config.json"}  # records whether the hub was reachable (offline in the subprocess)
    a = {k: v for k, v in _files(single).items() if k not in skip}
    b = {k: v for k, v in _files(multi).items() if k not in skip}
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != fmt.MANIFEST)
    assert TeacherStore(multi).manifest["shards"] == TeacherStore(single).manifest["shards"]


# --- training from the store --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_setup(workspace):
    """A store (top-k + samples + last hidden states), a 1-layer student, and the teacher's weights removed."""
    from distil.student import init_student

    root, teacher, data = workspace
    copy = root / "teacher-gone"
    shutil.copytree(teacher, copy)
    student = root / "student-init"
    init_student(str(copy), str(student), layers=None, num_layers=1)
    store = root / "store-train"
    cache_teacher(str(copy), str(data), str(store), top_k=16, sampled=4, temperature=2.0, hidden_states="last",
                  shard_size=32, progress=False)
    for weights in copy.glob("*.safetensors"):
        weights.unlink()  # a run that loaded the teacher would fail now
    return root, data, store, student


def _recipe(root, data, store, student, name, **loss):
    path = write_recipe(root / f"{name}.yaml", "", data, root / name,
                        loss={"alpha_ce": 1.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, "alpha_clm": 0.5,
                              "temperature": 2.0, **loss},
                        optim={"max_steps": 30, "lr": 3e-3, "warmup_fraction": 0.0})
    recipe = yaml.safe_load(path.read_text())
    recipe["teacher"] = {"cache": str(store)}
    recipe["student"] = {"path": str(student)}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_teacher_cache_training_runs_without_a_teacher_and_loss_goes_down(trained_setup, caplog):
    import logging

    from distil.training.loop import train

    root, data, store, student = trained_setup
    # No CLM here: the tiny teacher is random, so the data's next tokens pull the student away from it.
    recipe = _recipe(root, data, store, student, "run-cached", alpha_clm=0.0, alpha_cos=0.5, hidden_layers="last")
    config = load_config(recipe)
    assert config.teacher.path == "" and config.teacher.cache == str(store)
    with caplog.at_level(logging.INFO, logger="distil"):
        summary = train(config)
    said = [r.getMessage() for r in caplog.records]
    # the start-up log says where the teacher's signals come from, not "teacher: 0.0M parameters"
    assert f"teacher: signals read from the store {store} (top-16 + 4 sampled at temperature 2; no teacher model " \
           "loaded)" in said
    assert not [m for m in said if m.startswith("teacher ") or "% of the teacher" in m]
    assert summary["steps"] == 30
    rows = train_rows(root / "run-cached")
    first = np.mean([rows[s]["loss_ce"] for s in range(1, 6)])
    last = np.mean([rows[s]["loss_ce"] for s in range(26, 31)])
    assert last < 0.8 * first
    assert "loss_cos" in rows[30] and rows[30]["loss_cos"] < rows[1]["loss_cos"]
    assert "student_clm" in summary["heldout"] and "kd" not in summary["heldout"]
    assert (root / "run-cached" / "student" / "config.json").exists()

    # the fused sparse head and the plain logits compute the same step
    plain = load_config(_recipe(root, data, store, student, "run-cached-plain", alpha_clm=0.5, alpha_cos=0.5,
                                hidden_layers="last"), ["optim.max_steps=2", "run.fused_head=false"])
    fused = load_config(_recipe(root, data, store, student, "run-cached-fused", alpha_clm=0.5, alpha_cos=0.5,
                                hidden_layers="last"), ["optim.max_steps=2"])
    train(plain)
    train(fused)
    a, b = train_rows(root / "run-cached-plain"), train_rows(root / "run-cached-fused")
    for step in (1, 2):
        for name in ("loss_ce", "loss_clm", "loss_cos"):
            assert a[step][name] == pytest.approx(b[step][name], rel=1e-4)

    # CLM alone needs no teacher signal and keeps working with a store
    config = load_config(_recipe(root, data, store, student, "run-cached-clm", alpha_ce=0.0, alpha_clm=1.0))
    train(config)
    rows = train_rows(root / "run-cached-clm")
    assert set(k for k in rows[30] if k.startswith("loss_")) == {"loss_clm"}
    assert rows[30]["loss_clm"] < rows[1]["loss_clm"]


def test_teacher_cache_batches_know_their_sequences():
    from distil.training.batches import build_step

    seqs = [np.arange(3 + i) for i in range(8)]
    indices = [40, 41, 7, 3, 99, 5, 6, 12]
    batches = build_step(seqs, 0, "clm", None, None, 1, 2, torch.device("cpu"), micro_batches=2, indices=indices)
    assert [b.sequence_ids.tolist() for b in batches] == [[41, 3], [5, 12]]
    for b in batches:
        assert b.attention_mask.sum(1).tolist() == [len(seqs[indices.index(i)]) for i in b.sequence_ids.tolist()]


@pytest.mark.parametrize("overrides, message", [
    ({"divergence": "reverse_kl"}, "no unbiased estimate from sampled tokens"),
    ({"temperature": 1.0}, "temperature 2"),
    ({"alpha_mse": 1.0}, "dense logits"),
    ({"alpha_cos": 1.0, "hidden_layers": "mapped"}, "last hidden state only"),
    ({"alpha_relation": 1.0}, "self-attention"),
])
def test_teacher_cache_refuses_what_the_store_cannot_give(trained_setup, overrides, message):
    from distil.training.loop import train

    root, data, store, student = trained_setup
    config = load_config(_recipe(root, data, store, student, "run-refused", **overrides))
    with pytest.raises(DistilError, match=message):
        train(config)
    assert not (root / "run-refused" / "metrics.jsonl").exists()


def test_teacher_cache_refuses_other_data_and_hidden_terms_without_hidden_states(trained_setup, workspace):
    from distil.data.prepare import prepare
    from distil.training.loop import train

    root, data, store, student = trained_setup
    _, teacher, _ = workspace
    other = root / "other-data"
    if not other.exists():
        text = root / "other.txt"
        text.write_text("\n".join(corpus_lines(120, seed=9)) + "\n", encoding="utf-8")
        prepare([str(text)], str(teacher), str(other), heldout_fraction=0.1, max_length=32, progress=False)
    config = load_config(_recipe(root, other, store, student, "run-other"))
    with pytest.raises(DistilError, match="written for other data"):
        train(config)
    no_hidden = root / "store-roundtrip"  # written without --hidden-states by the round-trip test, or here
    if not (no_hidden / fmt.MANIFEST).exists():
        cache_teacher(str(teacher), str(data), str(no_hidden), top_k=8, temperature=2.0, shard_size=16,
                      progress=False)
    config = load_config(_recipe(root, data, no_hidden, student, "run-nohidden", alpha_cos=1.0, hidden_layers="last"))
    with pytest.raises(DistilError, match="--hidden-states last"):
        train(config)


def test_teacher_cache_with_teacher_path_checks_it_is_the_same_teacher(trained_setup, workspace):
    from distil.training.loop import train

    root, data, store, student = trained_setup
    _, teacher, _ = workspace  # the teacher the store was written from (a copy of it, since without weights)
    recipe = _recipe(root, data, store, student, "run-with-path")
    config = load_config(recipe, [f"teacher.path={teacher}", "optim.max_steps=2"])
    assert train(config)["steps"] == 2
    other = teacher_dir(root, "llama", num_layers=2)
    config = load_config(recipe, [f"teacher.path={other}", "optim.max_steps=2", "run.overwrite=true"])
    with pytest.raises(DistilError, match="is not the teacher the store"):
        train(config)


def test_teacher_cache_cli_errors_are_one_paragraph(workspace, tmp_path, capsys):
    from distil.cli import main

    root, teacher, data = workspace
    code = main(["cache-teacher", "--teacher", str(tmp_path / "missing"), "--data", str(data),
                 "--output", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("distil cache-teacher: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code = main(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--output", str(tmp_path / "s"),
                 "--top-k", "500"])
    err = capsys.readouterr().err
    assert code == 2 and "too large" in err and not (tmp_path / "s").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code = main(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--output", str(tmp_path / "mine"),
                 "--top-k", "4", "--overwrite"])
    assert code == 2 and "did not write" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_teacher_cache_masked_lm_teacher_trains_from_its_store(tmp_path):
    """An MLM teacher (BERT): its distribution on each masked sequence is cached; a DistilBERT student trains from it."""
    from distil.student import init_student
    from distil.training.loop import train

    teacher = teacher_dir(tmp_path, "bert", num_layers=2)
    data = prepared_data(tmp_path, teacher, name="data", n_lines=60)
    student = tmp_path / "student"
    init_student(str(teacher), str(student), layers=None, num_layers=1)
    store = tmp_path / "store"
    manifest = cache_teacher(str(teacher), str(data), str(store), top_k=8, temperature=2.0, progress=False)
    assert manifest["objective"] == "mlm"
    recipe = _recipe(tmp_path, data, store, student, "run-mlm", alpha_clm=0.0, alpha_mlm=1.0, restrict_ce_to_mask=True)
    summary = train(load_config(recipe, ["optim.max_steps=4"]))
    rows = train_rows(tmp_path / "run-mlm")
    assert summary["steps"] == 4 and {"loss_ce", "loss_mlm"} <= set(rows[4])
    assert all(math.isfinite(rows[s]["loss_ce"]) for s in rows)
