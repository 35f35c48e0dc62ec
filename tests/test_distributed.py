"""Many processes on CPU with the gloo backend, launched the way users launch them (torchrun)."""

import pytest

from distil.metrics_log import read_metrics
from train_fixtures import bert_workspace, launch, train_rows, write_recipe

STEPS = 5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return bert_workspace(tmp_path_factory.mktemp("ddp"))


COMPARED = ("loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm")


@pytest.fixture(scope="module")
def single_process(workspace):
    """1 process x batch 8: the reference every split of the same 8-sequence step must reproduce."""
    root, teacher, data = workspace
    one = write_recipe(root / "one.yaml", teacher, data, root / "run-1x8", data={"batch_size": 8}, **COMMON)
    single = launch([str(one)], processes=1)
    assert single.returncode == 0, single.stderr[-3000:]
    return train_rows(root / "run-1x8")


COMMON = dict(optim={"max_steps": STEPS, "lr": 3e-3}, run={"dropout": 0.0, "log_every": 1})


@pytest.mark.parametrize("batch,accumulation", [(4, 1), (2, 2)], ids=["2x4", "2x2-accumulation2"])
def test_two_processes_with_accumulation_match_one_process_with_the_whole_batch(workspace, single_process, batch,
                                                                                 accumulation):
    """N processes x accumulation A x batch B compute what one process with batch N*A*B computes."""
    root, teacher, data = workspace
    name = f"run-2x{batch}x{accumulation}"
    recipe = write_recipe(root / f"{name}.yaml", teacher, data, root / name, data={"batch_size": batch},
                          **{**COMMON, "optim": {**COMMON["optim"], "gradient_accumulation": accumulation}})
    double = launch([str(recipe)], processes=2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert f"2 processes x batch {batch} x accumulation {accumulation}" in double.stderr

    a, b = single_process, train_rows(root / name)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in COMPARED:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-5), (step, key)
        assert b[step]["tokens_seen"] == a[step]["tokens_seen"]
    # Written once, by the main process.
    assert len([r for r in read_metrics(root / name) if r["split"] == "train"]) == STEPS
    assert (root / name / "student" / "model.safetensors").exists()


def test_nan_on_all_ranks_stops_every_process_with_one_message(workspace):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    root, teacher, data = workspace
    broken = root / "teacher-nan"
    model = AutoModelForMaskedLM.from_pretrained(teacher)
    with torch.no_grad():
        model.cls.predictions.bias.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(broken)
    recipe = write_recipe(root / "nan.yaml", broken, data, root / "run-nan", data={"batch_size": 4})
    result = launch([str(recipe)], processes=2, timeout=180)
    assert result.returncode != 0
    assert "step 1: loss term 'ce' is nan" in result.stderr
    # Both ranks saw the same reduced values and stopped at the same step: neither waits for the other.
    assert result.stderr.count("step 1: loss term 'ce' is nan") == 2
