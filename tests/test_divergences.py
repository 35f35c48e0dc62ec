"""Divergences: hand-computed values on a two-token vocabulary, the temperature's T^2, and the fused output
layer equal to the plain formulation (values and gradients) for every divergence."""

import math

import pytest
import torch

from distil.losses import DIVERGENCES, divergence_sum, soft_target_kl, soft_target_loss
from distil.training.objective import TermSpec
from test_fused_head import assert_fused_equals_plain, batch_for
from tiny_models import tiny_bert, tiny_llama

# Teacher p = (1/2, 1/2), student q = (3/4, 1/4) (logits (0, 0) and (ln 3, 0)), temperature 1.
P, Q = (0.5, 0.5), (0.75, 0.25)


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def mix(w, a, b):
    return tuple(w * x + (1 - w) * y for x, y in zip(a, b))


HAND = {
    "forward_kl": kl(P, Q),
    "reverse_kl": kl(Q, P),
    "jsd": 0.5 * kl(P, mix(0.5, P, Q)) + 0.5 * kl(Q, mix(0.5, P, Q)),
    "skew_kl": kl(P, mix(0.1, P, Q)),
    "skew_reverse_kl": kl(Q, mix(0.1, Q, P)),
    "tvd": 0.5 * (abs(P[0] - Q[0]) + abs(P[1] - Q[1])),
}


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_hand_computed_on_two_tokens(kind):
    student, teacher = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
    assert divergence_sum(student, teacher, kind, 1.0).item() == pytest.approx(HAND[kind], rel=1e-6)
    # Rows add up; the mean over rows is what the loss term reports.
    assert divergence_sum(student.repeat(3, 1), teacher.repeat(3, 1), kind, 1.0).item() == \
        pytest.approx(3 * HAND[kind], rel=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_temperature_softens_both_sides_and_scales_by_t_squared(kind):
    torch.manual_seed(0)
    s, t = torch.randn(4, 7), torch.randn(4, 7) * 3
    at_two = divergence_sum(s, t, kind, 2.0)
    assert at_two.item() == pytest.approx(4.0 * divergence_sum(s / 2, t / 2, kind, 1.0).item(), rel=1e-5)
    assert divergence_sum(t, t, kind, 2.0).item() == pytest.approx(0.0, abs=1e-5)


def test_divergence_forward_kl_is_the_seeds_soft_target_kl():
    torch.manual_seed(1)
    s, t, mask = torch.randn(2, 5, 9), torch.randn(2, 5, 9), torch.rand(2, 5) > 0.3
    assert soft_target_loss(s, t, 2.0, mask, "forward_kl").item() == \
        pytest.approx(soft_target_kl(s, t, 2.0, mask).item(), rel=1e-6)


def test_divergence_jsd_beta_and_skew_alpha_limits():
    torch.manual_seed(2)
    s, t = torch.randn(3, 6), torch.randn(3, 6)
    # skew with alpha 0 is the plain divergence; JSD is symmetric at beta 0.5
    assert divergence_sum(s, t, "skew_kl", 1.0, skew_alpha=0.0).item() == \
        pytest.approx(divergence_sum(s, t, "forward_kl", 1.0).item(), rel=1e-6)
    assert divergence_sum(s, t, "skew_reverse_kl", 1.0, skew_alpha=0.0).item() == \
        pytest.approx(divergence_sum(s, t, "reverse_kl", 1.0).item(), rel=1e-6)
    assert divergence_sum(s, t, "jsd", 1.0).item() == pytest.approx(divergence_sum(t, s, "jsd", 1.0).item(), rel=1e-6)
    assert divergence_sum(s, t, "jsd", 1.0, jsd_beta=0.9).item() != \
        pytest.approx(divergence_sum(t, s, "jsd", 1.0, jsd_beta=0.9).item(), rel=1e-3)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("family,objective,restrict", [("bert", "mlm", True), ("llama", "clm", False)],
                         ids=["bert-tied-masked-rows", "llama-untied"])
def test_divergence_fused_head_equals_plain(kind, family, objective, restrict):
    builder = tiny_bert if family == "bert" else tiny_llama
    teacher, student = builder(num_layers=3, seed=1), builder(num_layers=2, seed=2)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(4.0)
    spec = TermSpec(weights={"ce": 5.0, "mse": 0.3, objective: 2.0}, temperature=2.0, objective=objective,
                    restrict_ce_to_mask=restrict, layer_pairs=[], divergence=kind, jsd_beta=0.3, skew_alpha=0.2)
    assert_fused_equals_plain(spec, batch_for(objective), student, teacher)


def test_divergence_recipe_key_is_validated_and_trains(tmp_path):
    from distil.config import load_config
    from distil.errors import DistilError
    from distil.metrics_log import read_metrics
    from distil.training.loop import train
    from train_fixtures import prepared_data, teacher_dir, write_recipe

    teacher = teacher_dir(tmp_path, "gpt2")
    data = prepared_data(tmp_path, teacher)
    recipe = write_recipe(tmp_path / "r.yaml", teacher, data, tmp_path / "run",
                          loss={"alpha_ce": 1.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, "divergence": "jsd"},
                          optim={"max_steps": 15, "lr": 1e-2})
    with pytest.raises(DistilError, match="loss.divergence must be one of .* Did you mean 'reverse_kl'"):
        load_config(recipe, ["loss.divergence=reverse_k"])
    train(load_config(recipe))
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert rows[-1]["loss_ce"] < 0.8 * rows[0]["loss_ce"]


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_padded_vocab_fused_head_equals_plain_on_the_shared_ids(kind):
    """Teacher and student output layers padded to 128 and 112 rows beyond a 96-token tokenizer."""
    teacher, student = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=2, seed=2)
    teacher.resize_token_embeddings(128)
    student.resize_token_embeddings(112)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(4.0)
    spec = TermSpec(weights={"ce": 5.0, "mse": 0.3, "clm": 2.0}, temperature=2.0, objective="clm",
                    restrict_ce_to_mask=False, layer_pairs=[], divergence=kind, vocab_limit=96)
    assert_fused_equals_plain(spec, batch_for("clm"), student, teacher)
    # The padding rows of the student's output layer get no gradient (the fused run's): they are never predicted.
    assert student.get_output_embeddings().weight.grad[96:].abs().max() == 0
