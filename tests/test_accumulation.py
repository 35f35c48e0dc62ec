"""Gradient accumulation computes what one big batch computes: every loss term is a mean over the whole
optimizer step, so accumulation A x batch B equals batch A*B (dropout off), in gradients and in training."""


import numpy as np
import pytest
import torch

from distil.config import load_config
from distil.data.masking import MLMMasker, mask_probabilities
from distil.metrics_log import read_metrics
from distil.training.fused_head import output_projection
from distil.training.loop import train
from distil.training.batches import build_step
from distil.training.objective import Objective, TermSpec
from distil.training.sources.live import LiveTeacher
from tiny_models import VOCAB_SIZE, tiny_bert, tiny_gpt2
from train_fixtures import bert_workspace, write_recipe

# Very different lengths, as length-grouped batching makes them: a per-micro-batch mean would weigh a token of
# the short micro-batch several times more than one of the long micro-batch.
LENGTHS = (30, 28, 27, 25, 6, 5, 5, 4)


def step_gradients(student, teacher, objective_name, weights, micro_batches, fused, layer_pairs=()):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, VOCAB_SIZE, size=n) for n in LENGTHS]
    masker = None
    if objective_name == "mlm":
        masker = MLMMasker(mask_probabilities(np.ones(VOCAB_SIZE), [0, 1, 2, 3, 4]), 4, [0, 1, 2, 3, 4], VOCAB_SIZE)
    spec = TermSpec(weights=weights, temperature=2.0, objective=objective_name, restrict_ce_to_mask=False,
                    layer_pairs=list(layer_pairs))
    source = LiveTeacher(teacher, output_projection(teacher) if fused else None)
    objective = Objective(spec, source, student, output_projection(student) if fused else None)
    batches = build_step(seqs, 0, objective_name, masker, torch.Generator().manual_seed(7), 0, 1,
                         torch.device("cpu"), micro_batches=micro_batches)
    student.zero_grad()
    values = {name: 0.0 for name in weights}
    for batch in batches:
        loss, shares = objective(student, batch)
        loss.backward()
        for name, share in shares.items():
            values[name] += float(share)
    return values, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_accumulation_2x4_equals_batch_8_in_gradients(family, fused):
    builder, objective_name = (tiny_bert, "mlm") if family == "bert" else (tiny_gpt2, "clm")
    teacher, student = builder(num_layers=3, seed=1), builder(num_layers=2, seed=2)
    student.train()  # dropout is 0 only where we say so
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(4.0)
    weights = {"ce": 5.0, objective_name: 2.0, "cos": 1.0}
    pairs = [(2, 3), (1, 1)]
    one_values, one = step_gradients(student, teacher, objective_name, weights, 1, fused, pairs)
    acc_values, acc = step_gradients(student, teacher, objective_name, weights, 2, fused, pairs)
    for name in weights:
        assert acc_values[name] == pytest.approx(one_values[name], rel=1e-5), name
    assert one.keys() == acc.keys()
    for name in one:
        torch.testing.assert_close(acc[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return bert_workspace(tmp_path_factory.mktemp("accumulation"))


def test_accumulation_in_training_equals_the_whole_batch(workspace):
    """One process: accumulation 2 x batch 4 trains exactly like batch 8 (same sequences, masks and losses)."""
    root, teacher, data = workspace
    common = dict(optim={"max_steps": 4, "lr": 3e-3}, run={"dropout": 0.0, "log_every": 1})
    runs = {}
    for name, batch, accum in (("whole", 8, 1), ("accumulated", 4, 2)):
        recipe = write_recipe(root / f"{name}.yaml", teacher, data, root / name, data={"batch_size": batch},
                              **common)
        train(load_config(recipe, [f"optim.gradient_accumulation={accum}"]))
        runs[name] = {r["step"]: r for r in read_metrics(root / name) if r["split"] == "train"}
    assert sorted(runs["whole"]) == sorted(runs["accumulated"]) == [1, 2, 3, 4]
    for step, row in runs["whole"].items():
        other = runs["accumulated"][step]
        assert other["tokens_seen"] == row["tokens_seen"]
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm"):
            assert other[key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), (step, key)
    from safetensors.torch import load_file

    a = load_file(str(root / "whole" / "student" / "model.safetensors"))
    b = load_file(str(root / "accumulated" / "student" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
