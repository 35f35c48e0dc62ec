"""Logit soft-capping (Gemma-2 `final_logit_softcapping`) and logit scaling (Cohere `logit_scale`, Granite
`logits_scaling`) in the fused head: the same post-processing as the model, on the student's side and the
teacher's, applied exactly once in both paths; values and gradients equal to the plain formulation on the
model's own logits, for every divergence."""

import pytest
import torch

from distil.teacher_signal.divergences import DIVERGENCES
from distil.training.fused_head import (POST_PROCESSING, LogitTransform, logit_transform, output_projection,
                                        projection_replaced, transform_of)
from distil.training.model_outputs import forward
from distil.training.objective import TermSpec
from test_fused_head import assert_fused_equals_plain, batch_for
from tiny_models import VOCAB_SIZE, _perturb, tiny_llama

SHAPE = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def tiny_causal(model_type, num_layers=2, seed=0, **overrides):
    """A tiny random causal LM of `model_type` from its config (perturbed norms and biases, as tiny_models)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {"head_dim": 8} if model_type.startswith(("gemma", "vaultgemma")) else {}
    config = AutoConfig.for_model(model_type, num_hidden_layers=num_layers, **SHAPE, **extra, **overrides)
    return _perturb(AutoModelForCausalLM.from_config(config), seed)


def gemma2(num_layers, seed, tied=True):
    return tiny_causal("gemma2", num_layers, seed, final_logit_softcapping=3.0, tie_word_embeddings=tied)


def cohere(num_layers, seed):
    return tiny_causal("cohere", num_layers, seed, logit_scale=0.5)


def granite(num_layers, seed):
    return tiny_causal("granite", num_layers, seed, logits_scaling=0.5)  # divides: logits x 2


def llama(num_layers, seed):
    return tiny_llama(num_layers=num_layers, seed=seed)


PAIRS = {  # name -> (teacher builder, student builder)
    "gemma2_softcap_tied": (gemma2, gemma2),
    "gemma2_softcap_untied": (lambda n, s: gemma2(n, s, tied=False), lambda n, s: gemma2(n, s, tied=False)),
    "cohere_logit_scale": (cohere, cohere),
    "granite_logit_scale": (granite, granite),
    "softcap_teacher_only": (gemma2, llama),       # each side's own transform, not the other's
    "softcap_student_only": (llama, gemma2),
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_softcap_and_logit_scale_fused_equals_plain_for_every_divergence(pair, divergence):
    make_teacher, make_student = PAIRS[pair]
    teacher, student = make_teacher(3, 1), make_student(2, 2)
    with torch.no_grad():  # a confident teacher, whose logits the cap actually bends
        teacher.get_output_embeddings().weight.mul_(4.0)
    assert output_projection(teacher) is not None and output_projection(student) is not None
    spec = TermSpec(weights={"ce": 5.0, "mse": 0.3, "clm": 2.0}, temperature=2.0, objective="clm",
                    restrict_ce_to_mask=False, layer_pairs=[], divergence=divergence)
    assert_fused_equals_plain(spec, batch_for("clm"), student, teacher)


@pytest.mark.parametrize("build,expected", [
    (gemma2, LogitTransform(softcap=3.0)), (cohere, LogitTransform(multiply=0.5)),
    (granite, LogitTransform(divide=0.5)),
])
def test_softcap_logit_scale_applied_once_in_either_path(build, expected):
    """Plain path: the model's own logits are transform(projection(final states)), used as they are. Fused path:
    while the fused head stands in for the output layer the model applies no transform of its own (it would
    otherwise cap the fused loss, or the teacher's states), and its setting is back afterwards."""
    model = build(2, 3)
    batch = batch_for("clm")
    projection = output_projection(model)
    assert logit_transform(model) == expected and transform_of(projection) == expected
    with torch.no_grad():
        logits, states = forward(model, batch, True)
        torch.testing.assert_close(logits, expected(projection(states.final)), rtol=0, atol=0)
        assert not torch.allclose(logits, projection(states.final))  # the transform does something here
        before = (dict(model.config.to_dict()), getattr(model, "logit_scale", None))
        with projection_replaced(projection, lambda s: s):
            passed, _ = forward(model, batch, False)
        torch.testing.assert_close(passed, states.final, rtol=0, atol=0)  # exactly what the head returned
        assert (dict(model.config.to_dict()), getattr(model, "logit_scale", None)) == before


@pytest.mark.parametrize("model_type", sorted(POST_PROCESSING))
def test_softcap_logit_scale_table_matches_each_model(model_type):
    """Every model type in the table transforms its logits the way the table says (read from transformers)."""
    kind = POST_PROCESSING[model_type][2]
    setting = {"softcap": {"final_logit_softcapping": 3.0}, "multiply": {"logit_scale": 0.5},
               "divide": {"logits_scaling": 0.5}}[kind]
    model = tiny_causal(model_type, 2, 4, **setting)
    transform = logit_transform(model)
    assert transform == LogitTransform(**{kind: next(iter(setting.values()))})
    batch = batch_for("clm")
    with torch.no_grad():
        logits, states = forward(model, batch, True)
        projected = model.get_output_embeddings()(states.final)
        torch.testing.assert_close(logits, transform(projected), rtol=1e-6, atol=1e-6)
        with projection_replaced(output_projection(model), lambda s: s):
            passed, _ = forward(model, batch, False)
        torch.testing.assert_close(passed, states.final, rtol=0, atol=0)


def test_softcap_unknown_logit_transform_keeps_the_plain_losses():
    """A model with one of these config keys that distil has not read (e.g. one that multiplies by
    logits_scaling) gets no fused head: the plain losses use the model's own logits."""
    model = tiny_llama(num_layers=1)
    model.config.logits_scaling = 2.0
    assert logit_transform(model) is False and output_projection(model) is None
    model.config.logits_scaling = None
    assert logit_transform(model) is None and output_projection(model) is not None


def test_softcap_neutral_settings_are_no_transform():
    assert logit_transform(tiny_causal("gemma2", 1, 0, final_logit_softcapping=None)) is None
    assert logit_transform(tiny_causal("granite", 1, 0, logits_scaling=1.0)) is None
