"""Self-attention relation (MiniLMv2) and attention-map (TinyBERT) distillation: values against plain
formulations, invariances, padding, refusals, and students of another width that learn from them."""

import copy
import math

import numpy as np
import pytest
import torch

from distil.errors import DistilError
from distil.losses import attention_map_loss, relation_kl, relation_loss
from distil.training.attention_capture import captured_attention, default_relation_layers
from distil.training.batches import build_step
from distil.training.model_outputs import forward
from distil.training.objective import Objective, TermSpec
from distil.training.sources.live import LiveTeacher
from tiny_models import VOCAB_SIZE, tiny_bert, tiny_gpt2, tiny_llama


def plain_relation_kl(student, teacher, mask, heads, causal):
    """KL(teacher || student) of X X^T / sqrt(d) relations, written out row by row."""
    total, rows = 0.0, 0
    batch, length, _ = student.shape
    for b in range(batch):
        keys = [j for j in range(length) if mask[b, j]]
        for i in range(length):
            if not mask[b, i]:
                continue
            row_keys = [j for j in keys if j <= i] if causal else keys
            for h in range(heads):
                def relation(x):
                    d = x.shape[-1] // heads
                    part = x[b, :, h * d:(h + 1) * d].double()
                    scores = torch.stack([part[i] @ part[j] for j in row_keys]) / math.sqrt(d)
                    return torch.softmax(scores, dim=0)
                p, q = relation(teacher), relation(student)
                total += float((p * (p.log() - q.log())).sum())
                rows += 1
    return total / rows


def plain_attention_kl(student, teacher, mask):
    """KL(teacher || student) of attention probabilities (B, H, L, L), written out row by row."""
    total, rows = 0.0, 0
    for b in range(student.shape[0]):
        keys = mask[b].bool()
        for h in range(student.shape[1]):
            for i in range(student.shape[2]):
                if mask[b, i]:
                    p, q = teacher[b, h, i, keys].double(), student[b, h, i, keys].double()
                    total += float((p * (p.log() - q.log())).sum())
                    rows += 1
    return total / rows


def batch_of(objective, lengths=(9, 14, 6), seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, VOCAB_SIZE, size=n) for n in lengths]
    return build_step(seqs, 0, objective, None, None, 0, 1, torch.device("cpu"))[0]


def padded(batch, extra):
    """The same rows with `extra` more pad columns."""
    ids = torch.cat([batch.input_ids, torch.zeros(batch.input_ids.shape[0], extra, dtype=torch.long)], dim=1)
    mask = torch.cat([batch.attention_mask, torch.zeros_like(ids[:, :extra])], dim=1)
    labels = torch.cat([batch.labels, torch.full_like(ids[:, :extra], -100)], dim=1)
    return type(batch)(input_ids=ids, attention_mask=mask, labels=labels, local_tokens=batch.local_tokens,
                       local_targets=batch.local_targets, step_tokens=batch.step_tokens,
                       step_targets=batch.step_targets)


def objective_terms(spec, teacher, student, batch):
    objective = Objective(spec, LiveTeacher(teacher), student)
    _, shares = objective(student, batch)
    return objective, shares


def spec_for(weights, objective="mlm", **kwargs):
    return TermSpec(weights=weights, temperature=1.0, objective=objective, restrict_ce_to_mask=False,
                    layer_pairs=kwargs.pop("layer_pairs", []), **kwargs)


# --- the loss functions --------------------------------------------------------------------------------------

def test_relation_kl_of_a_hand_computed_case():
    """One head of width 1, two positions. Teacher vectors 0: both rows uniform. Student [1], [0]: row 0 has
    scores (1, 0), q = (e, 1) / (1 + e); row 1 has scores (0, 0), q uniform, KL 0. Row 0:
    KL = 0.5 log(0.5 (1 + e) / e) + 0.5 log(0.5 (1 + e)) = log(1 + e) - log 2 - 1/2; the mean halves it."""
    student = torch.tensor([[[1.0], [0.0]]])
    teacher = torch.zeros(1, 2, 1)
    mask = torch.ones(1, 2, dtype=torch.bool)
    expected = (math.log(1 + math.e) - math.log(2) - 0.5) / 2
    assert relation_kl(student, teacher, mask, heads=1).item() == pytest.approx(expected, rel=1e-6)
    # Causal: row 0 relates to itself only (KL 0), row 1 is uniform in both: nothing to learn.
    assert relation_kl(student, teacher, mask, heads=1, causal=True).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("causal", [False, True])
def test_relation_kl_equals_the_plain_formulation_across_widths(causal):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 8)  # different widths, same positions
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    got = relation_kl(student, teacher, mask, heads=2, causal=causal).item()
    assert got == pytest.approx(plain_relation_kl(student, teacher, mask, 2, causal), rel=1e-5)
    three = relation_loss((student, student * 2, -student), (teacher, teacher, teacher), mask, 2, causal)
    parts = [plain_relation_kl(s, teacher, mask, 2, causal) for s in (student, student * 2, -student)]
    assert three.item() == pytest.approx(sum(parts), rel=1e-5)


def test_relation_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="does not split into 3 relation heads"):
        relation_kl(torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool), heads=3)


def test_attention_map_mse_probs_is_squared_error_summed_over_keys():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    # Scores given as log-probabilities (softmax gives them back); the pad column's scores must not count.
    teacher = torch.tensor([[[[0.5, 0.5, 0.1], [0.25, 0.75, 0.3], [0.3, 0.7, 0.2]]]]).log()
    student = torch.tensor([[[[1.0, 1e-30, 0.9], [0.25, 0.75, 0.2], [0.9, 0.1, 0.5]]]]).log()
    # Row 0: 0.25 + 0.25; row 1: 0; row 2 is padding. Mean over 2 real rows.
    assert attention_map_loss(student, teacher, mask, "mse_probs").item() == pytest.approx(0.25)


# --- captured from models ------------------------------------------------------------------------------------

def test_relation_term_is_zero_for_a_full_layer_copy_of_the_teacher():
    teacher = tiny_bert(num_layers=4, seed=1)
    student = copy.deepcopy(teacher)
    batch = batch_of("mlm")
    spec = spec_for({"relation": 1.0, "attention": 1.0}, layer_pairs=[(1, 1), (2, 2), (4, 4)])
    objective, shares = objective_terms(spec, teacher, student, batch)
    assert objective.spec.relation_pairs == [(4, 4)] and objective.spec.relation_heads == 4
    assert objective.spec.attention_pairs == [(1, 1), (2, 2), (4, 4)]
    assert shares["relation"].item() == pytest.approx(0.0, abs=1e-6)
    assert shares["attention"].item() == pytest.approx(0.0, abs=1e-6)
    # Another teacher gives a clearly positive value.
    other_teacher = tiny_bert(num_layers=4, seed=5)
    _, other = objective_terms(spec, other_teacher, student, batch)
    assert other["relation"].item() > 1e-2


def test_relation_of_re_split_heads_does_not_depend_on_the_model_head_count():
    """Relations re-split the concatenated heads: a 4-head BERT and a 2-head BERT with the same weights have the
    same Q/K/V, so their relation with relation_heads=2 is one number, the plain formulation on the
    concatenation split into 2."""
    teacher = tiny_bert(num_layers=2, seed=1)
    four = tiny_bert(num_layers=2, seed=2)
    from transformers import BertForMaskedLM

    config = copy.deepcopy(four.config)
    config.num_attention_heads = 2
    two = BertForMaskedLM(config).eval()
    two.load_state_dict(four.state_dict())
    batch = batch_of("mlm")
    # Layer 1: its projections see the embeddings only, which the head count does not change.
    spec = spec_for({"relation": 1.0}, relation_pairs=[(1, 2)], relation_heads=2)
    values = [objective_terms(spec, teacher, student, batch)[1]["relation"].item() for student in (four, two)]
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    with captured_attention(four, {1}, set()) as s, captured_attention(teacher, {2}, set()) as t, torch.no_grad():
        forward(four, batch, False), forward(teacher, batch, False)
    mask = batch.attention_mask.bool()
    plain = sum(plain_relation_kl(s.qkv[1][i], t.qkv[2][i], mask, 2, False) for i in range(3))
    assert values[0] == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("builder,objective", [(tiny_bert, "mlm"), (tiny_llama, "clm"), (tiny_gpt2, "clm")])
def test_relation_and_attention_terms_ignore_added_padding(builder, objective):
    teacher, student = builder(num_layers=4, seed=1), builder(num_layers=2, seed=2)
    spec = spec_for({"relation": 1.0, "attention": 1.0}, objective, layer_pairs=[(1, 2), (2, 4)])
    batch = batch_of(objective)
    _, plain = objective_terms(spec, teacher, student, batch)
    _, more = objective_terms(spec, teacher, student, padded(batch, 5))
    for name in ("relation", "attention"):
        assert plain[name].item() > 1e-3
        assert more[name].item() == pytest.approx(plain[name].item(), rel=1e-5)


def test_relation_uses_the_causal_mask_on_decoders():
    """On a decoder the relations are over earlier positions only: the value equals the plain causal formulation
    of the captured projections (Llama: before rotary embedding, K/V narrower than Q with grouped queries)."""
    teacher, student = tiny_llama(num_layers=2, seed=1), tiny_llama(num_layers=2, seed=2)
    batch = batch_of("clm", lengths=(7, 4))
    spec = spec_for({"relation": 1.0}, "clm", relation_pairs=[(2, 2)])
    _, shares = objective_terms(spec, teacher, student, batch)
    with captured_attention(student, {2}, set()) as s, captured_attention(teacher, {2}, set()) as t, torch.no_grad():
        forward(student, batch, False), forward(teacher, batch, False)
    assert [x.shape[-1] for x in s.qkv[2]] == [32, 16, 16]  # 4 query heads, 2 key/value heads of 8
    mask = batch.attention_mask.bool()
    plain = sum(plain_relation_kl(s.qkv[2][i], t.qkv[2][i], mask, 4, True) for i in range(3))
    assert shares["relation"].item() == pytest.approx(plain, rel=1e-5)


def test_attention_kl_equals_the_plain_formulation_of_eager_maps():
    teacher, student = tiny_bert(num_layers=4, seed=1), tiny_bert(num_layers=2, seed=2)
    teacher.set_attn_implementation("eager"), student.set_attn_implementation("eager")
    batch = batch_of("mlm")
    spec = spec_for({"attention": 1.0}, attention_pairs=[(1, 2), (2, 4)])
    _, shares = objective_terms(spec, teacher, student, batch)
    with torch.no_grad():
        s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
        t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True)
    mask = batch.attention_mask.bool()
    plain = (plain_attention_kl(s.attentions[0], t.attentions[1], mask)
             + plain_attention_kl(s.attentions[1], t.attentions[3], mask)) / 2
    assert shares["attention"].item() == pytest.approx(plain, rel=1e-5)


def test_attention_maps_refuse_mismatched_head_counts():
    from transformers import BertConfig, BertForMaskedLM

    teacher = tiny_bert(num_layers=2, seed=1)
    narrow = BertForMaskedLM(BertConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    with pytest.raises(DistilError, match="student has 2 heads and the teacher 4.*loss.alpha_relation"):
        Objective(spec_for({"attention": 1.0}, layer_pairs=[(2, 2)]), LiveTeacher(teacher), narrow)


def test_relation_checks_layers_and_heads_against_the_models():
    teacher, student = tiny_llama(num_layers=4, seed=1), tiny_llama(num_layers=2, seed=2)
    with pytest.raises(DistilError, match=r"loss.relation_layers pair \[3, 4\] is out of range"):
        Objective(spec_for({"relation": 1.0}, "clm", relation_pairs=[(3, 4)]), LiveTeacher(teacher), student)
    with pytest.raises(DistilError, match="relation_heads=3 does not divide.*key/value width 16"):
        Objective(spec_for({"relation": 1.0}, "clm", relation_heads=3), LiveTeacher(teacher), student)
    with pytest.raises(DistilError, match="no layer pairs"):
        Objective(spec_for({"attention": 1.0}, "clm", layer_pairs=[(0, 0)]), LiveTeacher(teacher), student)
    # Default layer (MiniLMv2): the last against the last, or against layer 21 of a 24-layer teacher.
    assert default_relation_layers(4, 6) == [(4, 6)]
    assert default_relation_layers(6, 12) == [(6, 12)] and default_relation_layers(3, 24) == [(3, 21)]


def test_relation_term_in_the_fused_head_path_equals_the_plain_path():
    from distil.training.fused_head import output_projection

    teacher, student = tiny_bert(num_layers=4, seed=1), tiny_bert(num_layers=2, seed=2)
    batch = batch_of("mlm")
    spec = spec_for({"ce": 1.0, "relation": 0.5}, relation_pairs=[(1, 2), (2, 4)])
    plain = Objective(spec, LiveTeacher(teacher), student)
    fused = Objective(spec, LiveTeacher(teacher, output_projection(teacher)), student, output_projection(student))
    grads, results = [], []
    for objective in (plain, fused):
        student.zero_grad()
        total, shares = objective(student, batch)
        total.backward()
        results.append((total.item(), shares["relation"].item()))
        grads.append(student.bert.encoder.layer[0].attention.self.query.weight.grad.clone())
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_relation_term_share_follows_the_step_normalisation():
    """local mean x local tokens / step tokens, like the hidden-state terms."""
    teacher, student = tiny_bert(num_layers=2, seed=1), tiny_bert(num_layers=2, seed=2)
    whole = batch_of("mlm")
    halves = build_step([whole.input_ids[i, :int(whole.attention_mask[i].sum())].numpy() for i in range(3)], 0,
                        "mlm", None, None, 0, 1, torch.device("cpu"), micro_batches=3)
    spec = spec_for({"relation": 1.0}, relation_pairs=[(2, 2)])
    _, full = objective_terms(spec, teacher, student, whole)
    parts = sum(objective_terms(spec, teacher, student, b)[1]["relation"].item() for b in halves)
    assert parts == pytest.approx(full["relation"].item(), rel=1e-5)


# --- recipes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    (["loss.alpha_relation=-1"], "Loss weights must be >= 0"),
    (["loss.alpha_relation=1", "loss.relation_layers=[0,2]"], "loss.relation_layers must be one"),
    (["loss.alpha_attention=1", "loss.attention_layers=[[1]]"], "loss.attention_layers must be a list"),
    (["loss.attention_loss=l1"], "loss.attention_loss must be kl, mse_probs or mse_scores"),
    (["loss.relation_heads=0"], "loss.relation_heads must be at least 1"),
])
def test_relation_and_attention_recipe_keys_are_validated(tmp_path, overrides, match):
    from distil.config import load_config

    base = ["teacher.path=t", f"data.path={tmp_path}", f"run.output_dir={tmp_path / 'run'}"]
    with pytest.raises(DistilError, match=match):
        load_config(None, base + overrides)
    spec_config = load_config(None, base + ["loss.alpha_relation=1", "loss.relation_layers=[2,3]"])
    from distil.training.objective import term_spec_from

    spec = term_spec_from(spec_config, "mlm", [(2, 4)])
    assert spec.relation_pairs == [(2, 3)] and spec.weights["relation"] == 1.0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("relations")


def train_narrow_student(workspace, family, student_config, loss):
    from distil.config import load_config
    from distil.metrics_log import read_metrics
    from distil.training.loop import train
    from train_fixtures import prepared_data, teacher_dir, write_recipe

    teacher = teacher_dir(workspace, family)
    data = prepared_data(workspace, teacher, name=f"data-{family}")
    config_dir = workspace / f"student-{family}"
    student_config.save_pretrained(config_dir)
    name = f"run-{family}-{'-'.join(sorted(loss))}"
    recipe = write_recipe(workspace / f"{name}.yaml", teacher, data, workspace / name,
                          student={"num_layers": None, "config": str(config_dir)},
                          loss={"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, **loss},
                          optim={"max_steps": 30, "lr": 1e-2})
    summary = train(load_config(recipe))
    rows = [r for r in read_metrics(workspace / name) if r["split"] == "train"]
    return summary, rows


def test_relation_alone_trains_a_narrower_bert_student(workspace):
    """Teacher hidden 32 / 4 heads, student hidden 16 / 2 heads: relations are positions x positions, so the
    widths need not match (check_hidden_sizes does not apply), and the relation loss goes down."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, type_vocab_size=2)
    summary, rows = train_narrow_student(workspace, "bert", config, {"alpha_relation": 1.0})
    first = sum(r["loss_relation"] for r in rows[:5]) / 5
    last = sum(r["loss_relation"] for r in rows[-5:]) / 5
    assert len(rows) == 30 and last < 0.7 * first, (first, last)
    # Held-out evaluation reports the term too, measured as in training: the trained student is well below the
    # first step's value on unseen text.
    assert 0 < summary["heldout"]["relation"] < 0.8 * rows[0]["loss_relation"], summary["heldout"]


def test_relation_alone_trains_a_narrower_grouped_query_llama_student(workspace):
    """Teacher 4 query / 2 key-value heads of 8; student hidden 16, 2 query heads / 1 key-value head: the
    default 4 relation heads split Q (16) and K/V (8) of the student and Q (32) and K/V (16) of the teacher."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    summary, rows = train_narrow_student(workspace, "llama", config, {"alpha_relation": 1.0, "relation_layers": [2, 3]})
    first = sum(r["loss_relation"] for r in rows[:5]) / 5
    last = sum(r["loss_relation"] for r in rows[-5:]) / 5
    assert len(rows) == 30 and last < 0.85 * first, (first, last)  # 0.104 -> 0.079 measured


def test_attention_maps_with_mismatched_heads_are_refused_at_start(workspace):
    from transformers import BertConfig

    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, type_vocab_size=2)
    with pytest.raises(DistilError, match="student has 2 heads and the teacher 4"):
        train_narrow_student(workspace, "bert", config, {"alpha_attention": 1.0})


def test_attention_maps_train_a_student_of_teacher_layers(workspace):
    """alpha_attention alone through `distil train` (any attention implementation: the maps are rebuilt from Q
    and K): the attention-map loss of the mapped layers goes down."""
    from distil.config import load_config
    from distil.metrics_log import read_metrics
    from distil.training.loop import train
    from train_fixtures import prepared_data, teacher_dir, write_recipe

    teacher = teacher_dir(workspace, "bert")
    data = prepared_data(workspace, teacher, name="data-bert")
    recipe = write_recipe(workspace / "attention.yaml", teacher, data, workspace / "run-attention",
                          loss={"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, "alpha_attention": 1.0,
                                "attention_loss": "mse_probs", "attention_layers": [[1, 2], [2, 4]]},
                          optim={"max_steps": 30, "lr": 1e-2})
    train(load_config(recipe))
    rows = [r for r in read_metrics(workspace / "run-attention") if r["split"] == "train"]
    first = sum(r["loss_attention"] for r in rows[:5]) / 5
    last = sum(r["loss_attention"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
