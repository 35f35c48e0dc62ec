"""Tests for width pruning at init (distil.pruning via `init_student(hidden_size=..., ...)`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distil.data.dataset import TokenSequences, pad_batch
from distil.errors import DistilError
from distil.pruning import (WidthPlan, WidthSizes, layout_for, load_calibration, measure_importance, plan_from_importance,
                            prune_width, resolve_sizes, teacher_sizes, top_indices)
from distil.layer_copy import bert_to_distilbert
from distil.student import init_student
from train_fixtures import prepared_data, teacher_dir

FAMILIES = ("bert", "roberta", "llama")
STUDENT_TYPE = {"bert": "distilbert", "roberta": "roberta", "llama": "llama"}
# A student of half the teacher's width: hidden 16 of 32, 2 of 4 heads (Llama: 1 of 2 key/value heads), FFN 32 of 64.
HALF = {"hidden_size": 16, "intermediate_size": 32, "num_heads": 2}
FULL = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pruning")
    out = {}
    for family in FAMILIES:
        teacher = teacher_dir(root / family, family)
        out[family] = (teacher, prepared_data(root / family, teacher))
    return out


def _auto_class(family: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if family == "llama" else AutoModelForMaskedLM


def _load(path, family: str):
    model, info = _auto_class(family).from_pretrained(path, output_loading_info=True)
    return model.eval(), info


def _batch(data: Path, split: str, n: int):
    seqs = TokenSequences(data, split)
    return pad_batch([seqs[i] for i in range(min(n, len(seqs)))], 0)


def _forward(model, ids, mask):
    kwargs = {"use_cache": False} if model.config.model_type == "llama" else {}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)


# ---- keeping everything is the identity ------------------------------------------------------------------------


@pytest.mark.parametrize("family, architecture", [(f, "auto") for f in FAMILIES] + [("bert", "same")])
def test_prune_keeping_everything_reproduces_teacher(family, architecture, workspace, tmp_path):
    teacher_path, data = workspace[family]
    out = tmp_path / "student"
    summary = init_student(str(teacher_path), str(out), None, 4, architecture=architecture,
                           calibration_data=str(data), calibration_sequences=32, **FULL)
    assert summary["width"]["hidden_size"] == 32
    teacher, _ = _load(teacher_path, family)
    student, info = _load(out, family)
    assert student.config.model_type == ("bert" if architecture == "same" else STUDENT_TYPE[family])
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = _batch(data, "heldout", 6)
    expected, got = _forward(teacher, ids, mask), _forward(student, ids, mask)
    assert expected.logits.abs().max() > 0.5
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    record = json.loads((out / "distil_init.json").read_text())["width_pruning"]
    assert record["kept_channels"] == list(range(32))
    assert record["kept_heads_per_layer"] == [[0, 1, 2, 3]] * 4
    assert record["calibration"]["sequences"] == 32


def _silence(model, heads_dropped: dict, neurons_dropped: dict):
    """Make some heads' attention outputs and some FFN neurons' activations exactly zero.

    A head whose value projection (weight rows and bias) is zero outputs zero; so does a neuron whose input
    projections (up and gate) are zero, since GELU(0) = SiLU(0) * 0 = 0. With grouped-query attention the value
    head is shared, so a group's query heads are silenced together."""
    layout = layout_for(model)
    sizes = teacher_sizes(model.config)
    d, group = sizes.head_dim, sizes.num_heads // sizes.num_key_value_heads
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, heads in heads_dropped.items():
            value = modules[f"{layout.blocks}.{layer}.{layout.key_value[1]}"]
            for kv in sorted({h // group for h in heads}):
                value.weight[kv * d:(kv + 1) * d] = 0
                if value.bias is not None:
                    value.bias[kv * d:(kv + 1) * d] = 0
        for layer, neurons in neurons_dropped.items():
            for name in layout.ffn_in:
                up = modules[f"{layout.blocks}.{layer}.{name}"]
                up.weight[neurons] = 0
                if up.bias is not None:
                    up.bias[neurons] = 0


def _tiny_qwen2():
    """Qwen2ForCausalLM like tiny_llama but with q/k/v biases and a tied head (the Llama layout's other cases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(7)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.1))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # biases around 0, norm scales around 1
                param.copy_((0.0 if name.endswith("bias") else 1.0) + 0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES + ("qwen2",))
def test_prune_silent_heads_and_neurons_is_exact_and_ranks_them_last(family, workspace):
    """Heads and neurons whose outputs are zeroed contribute nothing: pruning finds them and removes them exactly."""
    teacher_path, data = workspace["llama" if family == "qwen2" else family]
    model = _tiny_qwen2() if family == "qwen2" else _load(teacher_path, family)[0]
    if family == "bert":
        model = bert_to_distilbert(model, [0, 1, 2, 3])
    decoder = family in ("llama", "qwen2")
    # Llama groups heads in pairs sharing a key/value head: silence a whole group (heads 2k, 2k+1).
    heads = {0: [0, 1], 1: [2, 3], 2: [0, 1], 3: [2, 3]} if decoder else {0: [1, 3], 1: [0, 2], 2: [2, 3], 3: [0, 1]}
    neurons = {i: list(range(i % 2, 64, 2)) for i in range(4)}  # layer i drops neurons of parity i % 2
    _silence(model, heads, neurons)
    sequences, pad = load_calibration(str(data), 40, model.config.vocab_size)
    importance = measure_importance(model, sequences, pad)
    for i in range(4):
        assert np.all(importance.heads[i][heads[i]] == 0) and np.all(importance.neurons[i][neurons[i]] == 0)
    # Two heads with all 32 channels: Llama allows it (head_dim is recorded); encoders do not, so only the ranking
    # is checked for them.
    sizes = WidthSizes(32, 32, 2, 1 if decoder else 2, 8)
    plan = plan_from_importance(importance, sizes, teacher_sizes(model.config))
    assert plan.channels == list(range(32))
    for i in range(4):
        assert plan.neurons[i] == [n for n in range(64) if n not in neurons[i]]
        assert plan.heads(i, 2 if decoder else 1) == [h for h in range(4) if h not in heads[i]]
    if decoder:
        pruned = prune_width(model, plan)
        ids, mask = _batch(data, "heldout", 6)
        torch.testing.assert_close(_forward(pruned, ids, mask).logits, _forward(model, ids, mask).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ("bert", "roberta"))
def test_prune_silent_neurons_exact_for_encoders(family, workspace):
    """Encoders' attention width is tied to the hidden size, so only FFN neurons are dropped here, exactly."""
    teacher_path, data = workspace[family]
    model, _ = _load(teacher_path, family)
    if family == "bert":
        model = bert_to_distilbert(model, [0, 1, 2, 3])
    neurons = {i: list(range(i % 2, 64, 2)) for i in range(4)}
    _silence(model, {}, neurons)
    sequences, pad = load_calibration(str(data), 40, model.config.vocab_size)
    plan = plan_from_importance(measure_importance(model, sequences, pad),
                                resolve_sizes(model.config, None, 32, None), teacher_sizes(model.config))
    pruned = prune_width(model, plan)
    assert teacher_sizes(pruned.config).intermediate_size == 32
    ids, mask = _batch(data, "heldout", 6)
    torch.testing.assert_close(_forward(pruned, ids, mask).logits, _forward(model, ids, mask).logits,
                               atol=1e-5, rtol=0)


# ---- determinism, reload, record -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_is_deterministic_and_reloads_with_requested_sizes(family, workspace, tmp_path):
    teacher_path, data = workspace[family]
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        init_student(str(teacher_path), str(out), [0, 3], None, calibration_data=str(data),
                     calibration_sequences=64, **HALF)
    weights = [(out / "model.safetensors").read_bytes() for out in outs]
    assert weights[0] == weights[1]

    from transformers import AutoModel

    base = AutoModel.from_pretrained(outs[0]).eval()
    student, info = _load(outs[0], family)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sizes = teacher_sizes(student.config)
    kv = 1 if family == "llama" else 2
    assert (sizes.hidden_size, sizes.intermediate_size, sizes.num_heads, sizes.num_key_value_heads, sizes.head_dim) \
        == (16, 32, 2, kv, 8)
    assert student.config.num_hidden_layers == 2
    assert student.get_input_embeddings().weight.shape == (96, 16)
    assert student.get_output_embeddings().weight.shape == (96, 16)
    ids, mask = _batch(data, "heldout", 4)
    assert base(input_ids=ids, attention_mask=mask).last_hidden_state.shape[-1] == 16

    meta = json.loads((outs[0] / "distil_init.json").read_text())
    record = meta["width_pruning"]
    assert meta["teacher_layers"] == [0, 3]
    assert len(record["kept_channels"]) == 16 and record["kept_channels"] == sorted(set(record["kept_channels"]))
    assert [len(h) for h in record["kept_heads_per_layer"]] == [2, 2]
    if family == "llama":  # whole groups: heads (0, 1) or (2, 3)
        assert all(h in ([0, 1], [2, 3]) for h in record["kept_heads_per_layer"])
    assert record["kept_neurons_per_layer"] == [32, 32]
    assert record["calibration"]["sequences"] == 64
    assert record["num_key_value_heads"] == {"teacher": 2 if family == "llama" else 4, "student": kv}


# ---- importance beats a random slice ---------------------------------------------------------------------------


def _random_plan(plan: WidthPlan, teacher, seed: int) -> WidthPlan:
    rng = np.random.default_rng(seed)
    groups = teacher.num_key_value_heads

    def pick(n, k):
        return sorted(int(i) for i in rng.choice(n, size=k, replace=False))

    return WidthPlan(plan.sizes, pick(teacher.hidden_size, plan.sizes.hidden_size),
                     [pick(groups, plan.sizes.num_key_value_heads) for _ in plan.kv_groups],
                     [pick(teacher.intermediate_size, plan.sizes.intermediate_size) for _ in plan.neurons])


def _explained_variance(student, teacher, fit_batch, test_batch) -> float:
    """R^2 of the teacher's last hidden states predicted from the student's by least squares (with a bias),
    fitted on one sample's real tokens and measured on another's: how much of the teacher's representation the
    student keeps, whatever basis the student's narrower hidden state uses."""

    def states(model, batch):
        ids, mask = batch
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden[mask.bool()].double()

    xs, ys = states(student, fit_batch), states(teacher, fit_batch)
    coef = torch.linalg.lstsq(torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1), ys).solution
    xt, yt = states(student, test_batch), states(teacher, test_batch)
    pred = torch.cat([xt, torch.ones(len(xt), 1, dtype=xt.dtype)], 1) @ coef
    return float(1 - ((pred - yt) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_by_importance_beats_random_slices(family, workspace):
    teacher_path, data = workspace[family]
    teacher, _ = _load(teacher_path, family)
    model = bert_to_distilbert(teacher, [0, 1, 2, 3]) if family == "bert" else teacher
    sequences, pad = load_calibration(str(data), 128, model.config.vocab_size)
    sizes = resolve_sizes(teacher.config, **HALF)
    t_sizes = teacher_sizes(model.config)
    plan = plan_from_importance(measure_importance(model, sequences, pad), sizes, t_sizes)
    fit, test = pad_batch(sequences, pad), _batch(data, "heldout", 64)
    pruned = _explained_variance(prune_width(model, plan), model, fit, test)
    randoms = [_explained_variance(prune_width(model, _random_plan(plan, t_sizes, seed)), model, fit, test)
               for seed in range(10)]
    assert pruned > max(randoms)


# ---- tie-breaking and bad requests -----------------------------------------------------------------------------


def test_prune_top_indices_prefer_high_scores_then_low_index():
    assert top_indices(np.array([1.0, 3.0, 3.0, 2.0]), 2) == [1, 2]
    assert top_indices(np.array([1.0, 3.0, 3.0, 2.0]), 1) == [1]
    assert top_indices(np.array([5.0, 5.0, 5.0]), 2) == [0, 1]
    assert top_indices(np.array([0.5, 0.1, 0.9, 0.7]), 3) == [0, 2, 3]


@pytest.mark.parametrize(
    "family, request_, words",
    [
        ("bert", {"hidden_size": 30, "num_heads": 4}, ["not divisible by 4 attention heads", "--num-heads 3"]),
        ("bert", {"hidden_size": 16, "num_heads": 4}, ["heads of size 8", "--hidden-size 16 --num-heads 2"]),
        ("bert", {"hidden_size": 64}, ["--hidden-size 64", "between 1 and 32"]),
        ("roberta", {"intermediate_size": 65}, ["--intermediate-size 65", "between 1 and 64"]),
        ("roberta", {"num_heads": 0}, ["--num-heads 0"]),
        ("llama", {"num_heads": 3}, ["multiple of 2"]),
        ("llama", {"num_heads": 5}, ["between 1 and 4"]),
        # transformers' Llama config refuses hidden % heads != 0 on save: refused before calibration, sizes given
        ("llama", {"hidden_size": 18}, ["--hidden-size 18 is not a multiple of the student's 4 attention heads",
                                        "--hidden-size 16 or 20", "--num-heads 2 with --hidden-size 18"]),
    ],
)
def test_prune_bad_sizes_say_what_and_how(family, request_, words, workspace, tmp_path):
    teacher_path, data = workspace[family]
    out = tmp_path / "student"
    with pytest.raises(DistilError) as err:
        init_student(str(teacher_path), str(out), None, 2, calibration_data=str(data), **request_)
    for word in words:
        assert word in str(err.value)
    assert not out.exists()


def test_prune_needs_calibration_data_and_calibration_needs_a_width(workspace, tmp_path):
    teacher_path, data = workspace["llama"]
    with pytest.raises(DistilError, match="needs calibration text.*--calibration-data"):
        init_student(str(teacher_path), str(tmp_path / "s"), None, 2, hidden_size=16)
    with pytest.raises(DistilError, match="only used for width pruning"):
        init_student(str(teacher_path), str(tmp_path / "s"), None, 2, calibration_data=str(data))
    with pytest.raises(DistilError, match="not a prepared data directory"):
        init_student(str(teacher_path), str(tmp_path / "s"), None, 2, hidden_size=16,
                     calibration_data=str(tmp_path))
    with pytest.raises(DistilError, match="at least one sequence"):
        init_student(str(teacher_path), str(tmp_path / "s"), None, 2, hidden_size=16, calibration_data=str(data),
                     calibration_sequences=0)
    assert not (tmp_path / "s").exists()


def test_prune_from_the_command_line(workspace, tmp_path):
    from distil.cli import main

    family = "llama"
    teacher, data = workspace[family]
    out = tmp_path / "student"
    assert main(["init-student", str(teacher), "-o", str(out), "--num-layers", "2", "--hidden-size", "16",
                 "--intermediate-size", "32", "--num-heads", "2", "--calibration-data", str(data)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"],
            config["num_hidden_layers"]) == (16, 32, 2, 2)
    assert main(["init-student", str(teacher), "-o", str(tmp_path / "x"), "--hidden-size", "16"]) == 2


# ---- norms over the kept channels: first-order correction from calibration ------------------------------------


def test_norm_correction_statistics_of_a_hand_computed_token():
    """x = (1, 2, 3, 6), channels 2 and 3 kept, eps 0. LayerNorm: mu 3, sigma sqrt(3.5); kept mu' 4.5, sigma' 1.5,
    so a = b = 1.5 / sqrt(3.5), and a (x_c - mu') / sigma' + b is the teacher's (x_c - mu) / sigma: 3 / sqrt(3.5)
    for x_c = 6. RMSNorm: rms sqrt(12.5), kept rms sqrt(22.5): a = sqrt(22.5 / 12.5), b = 0."""
    from distil.pruning import norm_statistics

    x, kept = torch.tensor([[1.0, 2.0, 3.0, 6.0]]), torch.tensor([2, 3])
    a, b = norm_statistics(x, kept, "layer", 0.0)
    assert a.item() == pytest.approx(1.5 / 3.5 ** 0.5) and b.item() == pytest.approx(1.5 / 3.5 ** 0.5)
    assert (a * (6 - 4.5) / 1.5 + b).item() == pytest.approx(3 / 3.5 ** 0.5)
    a, b = norm_statistics(x, kept, "rms", 0.0)
    assert a.item() == pytest.approx((22.5 / 12.5) ** 0.5) and b.item() == 0.0


def _embedding_norm_outputs(model, ids, mask):
    """What the norm that reads the embeddings outputs, on real tokens."""
    seen = {}
    norm = dict(model.named_modules())[layout_for(model).embedding_norm]
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.update(out=out))
    try:
        _forward(model, ids, mask)
    finally:
        handle.remove()
    return seen["out"][mask.bool()]


@pytest.mark.parametrize("family,spread,before,after", [
    ("bert", 3.0, 0.27, 0.15), ("llama", 3.0, 0.23, 0.05), ("bert", 1.0, 0.21, 0.218)])
def test_norm_correction_of_the_embedding_norm_from_calibration(family, spread, before, after, workspace):
    """Half the channels kept; the even channels of the embeddings scaled by `spread` (the channels of trained
    models differ in size; importance keeps the larger ones). The embedding norm's output against the teacher's
    on the kept channels, on held-out text, relative error measured before / after the correction: BERT->DistilBERT
    0.278 / 0.146, Llama 0.242 / 0.047; channels all alike (spread 1): 0.218 / 0.217, the per-token spread of the
    statistics that no constant removes."""
    from distil.pruning import measure_norm_corrections

    teacher_path, data = workspace[family]
    teacher, _ = _load(teacher_path, family)
    model = bert_to_distilbert(teacher, [0, 1, 2, 3]) if family == "bert" else teacher
    with torch.no_grad():
        model.get_input_embeddings().weight[:, ::2] *= spread
        if family == "bert":
            model.distilbert.embeddings.position_embeddings.weight[:, ::2] *= spread
    sequences, pad = load_calibration(str(data), 64, model.config.vocab_size)
    plan = plan_from_importance(measure_importance(model, sequences, pad), resolve_sizes(teacher.config, **HALF),
                                teacher_sizes(model.config))
    corrections = measure_norm_corrections(model, sequences, pad, plan.channels)
    assert list(corrections) == [layout_for(model).embedding_norm]
    ids, mask = _batch(data, "heldout", 32)
    target = _embedding_norm_outputs(model, ids, mask)[:, plan.channels]

    def relative_error(student):
        return float((_embedding_norm_outputs(student, ids, mask) - target).norm() / target.norm())

    plain, corrected = relative_error(prune_width(model, plan)), relative_error(prune_width(model, plan, corrections))
    assert plain > before and corrected < after and corrected < plain, (plain, corrected)
    assert measure_norm_corrections(model, sequences, pad, list(range(32))) == {}  # keeping all: nothing to correct
