"""Attention-map distillation: maps rebuilt from Q/K before attention dropout (equal to the eager
probabilities in eval mode, unchanged by dropout in train mode, under any attention implementation), the three
loss forms against hand-computed values, and MiniLMv2's default relation layer."""

import copy
import math

import numpy as np
import pytest
import torch

from distil.errors import DistilError
from distil.losses import attention_map_loss
from distil.losses.relations import ATTENTION_LOSSES
from distil.training.attention_capture import captured_attention, default_relation_layers
from distil.training.batches import build_step
from distil.training.model_outputs import forward
from distil.training.objective import Objective, TermSpec
from distil.training.sources.live import LiveTeacher
from tiny_models import VOCAB_SIZE, tiny_bert, tiny_gpt2, tiny_llama


def tiny_distilbert(seed: int, **overrides):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=VOCAB_SIZE, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64, **overrides)
    return DistilBertForMaskedLM(config).eval()


# Each family with attention dropout 0.1 and every other dropout off: the only randomness in train mode is the
# dropout applied to the attention probabilities.
FAMILIES = {
    "bert": (lambda seed: tiny_bert(num_layers=2, seed=seed, attention_probs_dropout_prob=0.1,
                                    hidden_dropout_prob=0.0), "mlm"),
    "distilbert": (lambda seed: tiny_distilbert(seed, attention_dropout=0.1, dropout=0.0), "mlm"),
    "llama": (lambda seed: tiny_llama(num_layers=2, seed=seed, attention_dropout=0.1), "clm"),  # grouped, rotary
    "gpt2": (lambda seed: tiny_gpt2(num_layers=2, seed=seed, attn_pdrop=0.1, resid_pdrop=0.0, embd_pdrop=0.0),
             "clm"),
}


def batch_of(objective, lengths=(9, 14, 6), seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, VOCAB_SIZE, size=n) for n in lengths]
    return build_step(seqs, 0, objective, None, None, 0, 1, torch.device("cpu"))[0]


def spec_for(weights, objective="mlm", **kwargs):
    return TermSpec(weights=weights, temperature=1.0, objective=objective, restrict_ce_to_mask=False,
                    layer_pairs=kwargs.pop("layer_pairs", []), **kwargs)


def attention_share(spec, teacher, student, batch):
    objective = Objective(spec, LiveTeacher(teacher), student)
    torch.manual_seed(3)
    return objective(student, batch)[1]["attention"].item()


# --- maps are built before attention dropout -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kl", "mse_probs", "mse_scores"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_dropout_does_not_reach_the_maps_of_a_copy_of_the_teacher(family, kind):
    """A student identical to its teacher, training with attention dropout 0.1: the attention term of the first
    layer (whose input dropout does not touch) is exactly 0, with eager attention, whose returned probabilities
    are the dropped-out ones, and with sdpa. (Deeper layers read the dropped-out attention of the layers below,
    a difference the student's training really has.)"""
    build, objective = FAMILIES[family]
    teacher = build(1)
    teacher.set_attn_implementation("eager")
    student = copy.deepcopy(teacher).train()
    batch = batch_of(objective)
    # Dropout is on: the eager probabilities the student returns differ from the teacher's.
    with torch.no_grad():
        dropped = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
        clean = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
    assert (dropped.attentions[0] - clean.attentions[0]).abs().max() > 0.1
    spec = spec_for({"attention": 1.0}, objective, attention_pairs=[(1, 1)], attention_loss=kind)
    assert attention_share(spec, teacher, student, batch) == 0.0
    sdpa = copy.deepcopy(student)
    sdpa.set_attn_implementation("sdpa")
    assert attention_share(spec, teacher, sdpa, batch) == 0.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_dropout_free_maps_equal_the_eager_probabilities_in_eval_mode(family):
    """softmax of the rebuilt scores (padding and, on decoders, future keys masked) is what eager attention
    computes: rotary embedding and grouped key/value heads included."""
    build, objective = FAMILIES[family]
    model = build(1)
    model.set_attn_implementation("eager")
    batch = batch_of(objective)
    with captured_attention(model, set(), {1, 2}) as captured, torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
    real = batch.attention_mask.bool()
    allowed = real[:, None, None, :]
    if objective == "clm":
        allowed = allowed & torch.ones(real.shape[1], real.shape[1], dtype=torch.bool).tril()
    rows = real[:, None, :, None]
    for layer in (1, 2):
        probs = torch.softmax(captured.scores(layer).masked_fill(~allowed, -torch.inf), dim=-1)
        eager = out.attentions[layer - 1]
        assert probs.shape == eager.shape
        assert torch.allclose(torch.where(rows, probs, 0.0), torch.where(rows, eager, 0.0), atol=1e-6)


def test_attention_dropout_free_maps_are_the_same_under_sdpa_and_eager():
    teacher, student = tiny_bert(num_layers=4, seed=1), tiny_bert(num_layers=2, seed=2)
    batch = batch_of("mlm")
    spec = spec_for({"attention": 1.0}, attention_pairs=[(1, 2), (2, 4)])
    values = []
    for implementation in ("sdpa", "eager"):
        teacher.set_attn_implementation(implementation), student.set_attn_implementation(implementation)
        values.append(attention_share(spec, teacher, student, batch))
    assert values[0] > 1e-3 and values[0] == pytest.approx(values[1], rel=1e-6)


def test_attention_dropout_free_maps_refuse_scores_they_cannot_rebuild():
    """Per-head q/k norms change the scores after the projections: refused at start, pointing to relations."""
    teacher, student = tiny_llama(num_layers=2, seed=1), tiny_llama(num_layers=2, seed=2)
    student.model.layers[0].self_attn.q_norm = torch.nn.Identity()
    with pytest.raises(DistilError, match="q_norm.*loss.alpha_relation"):
        Objective(spec_for({"attention": 1.0}, "clm", layer_pairs=[(1, 1)]), LiveTeacher(teacher), student)


def test_attention_dropout_free_maps_refuse_batches_longer_than_a_sliding_window():
    teacher = tiny_llama(num_layers=2, seed=1, sliding_window=8)
    student = tiny_llama(num_layers=2, seed=2, sliding_window=8)
    spec = spec_for({"attention": 1.0}, "clm", attention_pairs=[(2, 2)])
    assert attention_share(spec, teacher, student, batch_of("clm", lengths=(8, 5))) > 0
    with pytest.raises(DistilError, match="longer than the model's sliding attention window"):
        attention_share(spec, teacher, student, batch_of("clm", lengths=(9, 5)))


# --- the three loss forms, against hand-computed values ------------------------------------------------------

LN3 = math.log(3.0)
MASK = torch.tensor([[1, 1, 0]], dtype=torch.bool)
# One head, two real positions and a pad key (column 2) whose scores must not count; row 2 is padding.
TEACHER = torch.tensor([[[[0.0, 0.0, 5.0], [LN3, 0.0, 9.0], [1.0, 2.0, 3.0]]]])  # p: (1/2, 1/2), (3/4, 1/4)
STUDENT = torch.tensor([[[[LN3, 0.0, 7.0], [0.0, 0.0, -2.0], [0.0, 0.0, 0.0]]]])  # q: (3/4, 1/4), (1/2, 1/2)


def test_attention_loss_kl_of_a_hand_computed_case():
    """KL(p || q): row 0 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3); row 1 0.75 ln 1.5 + 0.25 ln 0.5."""
    expected = (0.5 * math.log(4 / 3) + 0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    assert attention_map_loss(STUDENT, TEACHER, MASK, "kl").item() == pytest.approx(expected, rel=1e-6)


def test_attention_loss_mse_probs_of_a_hand_computed_case():
    """Squared error of the distributions summed over keys: 0.25^2 + 0.25^2 in each row."""
    assert attention_map_loss(STUDENT, TEACHER, MASK, "mse_probs").item() == pytest.approx(0.125, rel=1e-6)


def test_attention_loss_mse_scores_of_a_hand_computed_case():
    """TinyBERT: MSE of the scores over each row's allowed keys (the pad key's 5 vs 7 and 9 vs -2 excluded):
    rows (ln 3)^2 / 2 each. Causal: row 0 has one key, (ln 3)^2; row 1 (ln 3)^2 / 2."""
    assert attention_map_loss(STUDENT, TEACHER, MASK, "mse_scores").item() == pytest.approx(LN3 ** 2 / 2, rel=1e-6)
    causal = attention_map_loss(STUDENT, TEACHER, MASK, "mse_scores", causal=True).item()
    assert causal == pytest.approx(0.75 * LN3 ** 2, rel=1e-6)


def test_attention_loss_forms_of_a_confident_student_stay_finite():
    """Scores of +-1e4 (probabilities that underflow to 0): KL of the teacher's own scores is exactly 0, the
    others finite, and the gradient finite."""
    teacher = torch.tensor([[[[1e4, -1e4], [0.0, 0.0]]]])
    student = torch.tensor([[[[-1e4, 1e4], [0.0, 0.0]]]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert attention_map_loss(teacher, teacher, mask, "kl").item() == 0.0
    for kind in ATTENTION_LOSSES:
        value = attention_map_loss(student, teacher, mask, kind)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(student.grad).all()
        student.grad = None
    assert attention_map_loss(student, teacher, mask, "mse_probs").item() == pytest.approx(1.0)  # (1 + 1) / 2


@pytest.mark.parametrize("value,accepted", [("kl", True), ("mse_probs", True), ("mse_scores", True),
                                            ("mse", False), ("tinybert", False)])
def test_attention_loss_recipe_values(tmp_path, value, accepted):
    from distil.config import load_config

    base = ["teacher.path=t", f"data.path={tmp_path}", f"run.output_dir={tmp_path / 'run'}",
            f"loss.attention_loss={value}"]
    if accepted:
        assert value in ATTENTION_LOSSES and load_config(None, base).loss.attention_loss == value
    else:
        with pytest.raises(DistilError, match="mse_probs.*mse_scores"):
            load_config(None, base)


# --- MiniLMv2's default relation layer -----------------------------------------------------------------------

@pytest.mark.parametrize("teacher_layers,student_layers,expected", [
    (12, 6, 12), (12, 4, 12), (12, 12, 12), (6, 3, 6), (24, 6, 21), (24, 12, 21), (32, 8, 28)])
def test_relation_layer_default_follows_minilmv2(teacher_layers, student_layers, expected):
    """Base-size (12-layer) teachers: the last layer; large (24-layer) ones: layer 21 (MiniLMv2)."""
    assert default_relation_layers(student_layers, teacher_layers) == [(student_layers, expected)]


@pytest.mark.parametrize("teacher_layers,expected", [(12, 12), (24, 21)])
def test_relation_layer_default_of_12_and_24_layer_configs(teacher_layers, expected):
    from transformers import BertConfig, BertForMaskedLM

    def bert(layers):
        return BertForMaskedLM(BertConfig(vocab_size=VOCAB_SIZE, hidden_size=8, num_hidden_layers=layers,
                                          num_attention_heads=2, intermediate_size=16,
                                          max_position_embeddings=32)).eval()

    torch.manual_seed(0)
    teacher, student = bert(teacher_layers), bert(6)
    objective = Objective(spec_for({"relation": 1.0}), LiveTeacher(teacher), student)
    assert objective.spec.relation_pairs == [(6, expected)]
    with captured_attention(teacher, {expected}, set()) as captured, torch.no_grad():
        forward(teacher, batch_of("mlm"), False)
    assert len(captured.qkv[expected]) == 3 and captured.qkv[expected][0].shape[-1] == 8
