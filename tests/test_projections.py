"""Learned width projections (TinyBERT's W_h) for hidden-state losses of width-reduced students."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distil.config import load_config
from distil.metrics_log import read_metrics
from distil.training.loop import train
from distil.training.projections import ATTRIBUTE, PROJECTIONS_FILE, Projections, pair_key
from tiny_models import VOCAB_SIZE
from train_fixtures import prepared_data, teacher_dir, write_recipe


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("projections")


def test_projection_from_kept_channels_puts_each_channel_back_where_it_was_cut_from():
    kept = [4, 0, 7]
    maps = Projections(["a"], student_width=3, teacher_width=8, kept_channels=kept)
    states = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    expected = torch.zeros(2, 8)
    expected[:, kept] = states
    assert torch.equal(maps("a", states), expected)


def test_projection_without_kept_channels_starts_orthonormal():
    maps = Projections(["a", "b"], student_width=4, teacher_width=10)
    for linear in maps.maps.values():
        gram = linear.weight.T @ linear.weight  # (d_s, d_s): orthonormal columns
        assert torch.allclose(gram, torch.eye(4), atol=1e-5)
        assert torch.count_nonzero(linear.bias) == 0
    assert not torch.equal(maps.maps["a"].weight, maps.maps["b"].weight)


def _narrow_run(workspace, family, student_config, loss, name, steps=30, **sections):
    teacher = teacher_dir(workspace, family)
    data = prepared_data(workspace, teacher, name=f"data-{family}")
    config_dir = workspace / f"student-config-{name}"
    student_config.save_pretrained(config_dir)
    recipe = write_recipe(workspace / f"{name}.yaml", teacher, data, workspace / name,
                          student={"num_layers": None, "config": str(config_dir)},
                          loss={"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, **loss},
                          optim={"max_steps": steps, "lr": 1e-2}, **sections)
    summary = train(load_config(recipe))
    rows = [r for r in read_metrics(workspace / name) if r["split"] == "train"]
    return summary, rows


def _mean(rows, key, part):
    return sum(r[key] for r in part(rows)) / 5


def test_hidden_size_mismatched_bert_student_trains_through_projections_dropped_at_the_end(workspace):
    """Teacher hidden 32, student 16: cosine and MSE of mapped layers through learned 16 -> 32 maps go down; the
    maps are checkpointed with the student, saved beside the final student, and not inside it."""
    from transformers import AutoModelForMaskedLM, BertConfig

    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, type_vocab_size=2)
    summary, rows = _narrow_run(workspace, "bert", config, {"alpha_cos": 1.0, "alpha_hidden_mse": 1.0,
                                                            "hidden_layers": [[1, 2], [2, 4]]}, "run-narrow-bert",
                                run={"checkpoint_every": 10})
    for key in ("loss_cos", "loss_hidden_mse"):
        first, last = _mean(rows, key, lambda r: r[:5]), _mean(rows, key, lambda r: r[-5:])
        assert last < 0.7 * first, (key, first, last)
    run = workspace / "run-narrow-bert"
    checkpoint = load_file(str(run / "checkpoints" / "step-00000010" / "student.safetensors"))
    assert any(ATTRIBUTE in k for k in checkpoint), sorted(checkpoint)[:5]
    saved = load_file(str(run / PROJECTIONS_FILE))
    assert {k.split(".")[1] for k in saved} == {pair_key(1, 2), pair_key(2, 4)}
    assert saved[f"maps.{pair_key(1, 2)}.weight"].shape == (32, 16)
    final = load_file(str(run / "student" / "model.safetensors"))
    assert not any(ATTRIBUTE in k for k in final)
    student = AutoModelForMaskedLM.from_pretrained(run / "student")  # loads as a plain model of its own width
    assert student.config.hidden_size == 16 and not hasattr(student.base_model, ATTRIBUTE)
    assert 0 < summary["heldout"]["hidden_mse"] < rows[0]["loss_hidden_mse"]


def test_hidden_size_mismatched_llama_student_trains_through_projections(workspace):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    _, rows = _narrow_run(workspace, "llama", config, {"alpha_hidden_mse": 1.0, "hidden_layers": "last"},
                          "run-narrow-llama")
    first, last = _mean(rows, "loss_hidden_mse", lambda r: r[:5]), _mean(rows, "loss_hidden_mse", lambda r: r[-5:])
    assert last < 0.7 * first, (first, last)


def test_pruned_student_keeping_every_channel_starts_with_the_identity_projection(workspace):
    """A width-pruned student that keeps all teacher channels, trained with loss.hidden_projection=linear: the
    map starts as the scatter of the kept channels (here the identity), so the first step's hidden terms equal
    those of the same student compared with no projection at all."""
    from distil.student import init_student

    teacher = teacher_dir(workspace, "bert")
    data = prepared_data(workspace, teacher, name="data-bert")
    pruned = workspace / "pruned-full"
    init_student(str(teacher), str(pruned), layers=[0, 3], num_layers=None, calibration_data=str(data), hidden_size=32,
                 intermediate_size=64, num_heads=4)
    assert json.loads((pruned / "distil_init.json").read_text())["width_pruning"]["kept_channels"] == list(range(32))
    first = {}
    for mode in ("linear", "none"):
        recipe = write_recipe(workspace / f"pruned-{mode}.yaml", teacher, data, workspace / f"run-pruned-{mode}",
                              student={"num_layers": None, "path": str(pruned)},
                              loss={"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 1.0, "alpha_hidden_mse": 1.0,
                                    "hidden_projection": mode},
                              optim={"max_steps": 1}, run={"dropout": 0.0})
        train(load_config(recipe))
        first[mode] = [r for r in read_metrics(workspace / f"run-pruned-{mode}") if r["split"] == "train"][0]
    assert (workspace / "run-pruned-linear" / PROJECTIONS_FILE).exists()
    assert not (workspace / "run-pruned-none" / PROJECTIONS_FILE).exists()
    for key in ("loss_cos", "loss_hidden_mse"):
        assert first["linear"][key] == pytest.approx(first["none"][key], rel=1e-5)
