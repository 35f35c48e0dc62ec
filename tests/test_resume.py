"""Runs that survive: SIGKILL then resume, SIGTERM saves and stops, damaged checkpoints are skipped."""

import signal
import subprocess
import sys
import time

import pytest

from distil.training import checkpoint as ckpt
from distil.metrics_log import read_metrics
from train_fixtures import bert_workspace, subprocess_env, write_recipe

STEPS = 150


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return bert_workspace(tmp_path_factory.mktemp("resume"))


def recipe(workspace, name, **run):
    root, teacher, data = workspace
    # Dropout stays on: an exact resume must restore the random generators too.
    return write_recipe(root / f"{name}.yaml", teacher, data, root / name, optim={"max_steps": STEPS, "lr": 1e-3},
                        run={"log_every": 1, "checkpoint_every": 10, "keep_checkpoints": 2, **run})


def start(path):
    env = subprocess_env()
    return subprocess.Popen([sys.executable, "-m", "distil", "train", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir, step, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step for r in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def per_step(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir) if r["split"] == "train"}


def assert_same_steps(a, b):
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6), (step, key)


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    proc = start(recipe(workspace, "straight"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return per_step(workspace[0] / "straight")


def test_sigkill_then_resume_gives_the_same_losses(workspace, uninterrupted):
    path = recipe(workspace, "killed")
    run_dir = workspace[0] / "killed"
    proc = start(path)
    wait_for_step(run_dir, 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "student").exists()
    killed_at = max(per_step(run_dir))
    assert 25 <= killed_at < STEPS
    resumed = start(path)  # run.resume=auto continues from the newest complete checkpoint
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "Resuming from" in err
    assert_same_steps(uninterrupted, per_step(run_dir))
    assert len(list((run_dir / "checkpoints").glob("step-*"))) <= 2  # keep_checkpoints


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupt_saves_a_checkpoint_exits_non_zero_and_resumes(workspace, uninterrupted, sig):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM: a checkpoint at the step boundary, exit 128 + signal (130, 143)
    so that `distil train ... && distil evaluate ...` stops, and the same command resumes exactly."""
    name = f"preempted-{sig.name}"
    path = recipe(workspace, name)
    run_dir = workspace[0] / name
    proc = start(path)
    wait_for_step(run_dir, 15, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, err[-3000:]
    assert "saving a checkpoint" in err and f"stopped by {sig.name}" in err
    stopped_at = max(per_step(run_dir))
    assert (run_dir / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:08d}"
    resumed = start(path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_steps(uninterrupted, per_step(run_dir))


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    import torch

    run_dir = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (10, 20):
        ckpt.save_checkpoint(run_dir, step, model, optimizer, {"sampler": {}}, rank=0, is_main=True,
                             barrier=lambda: None, keep=3)
    assert ckpt.find_resumable(run_dir).name == "step-00000020"
    weights = run_dir / "checkpoints" / "step-00000020" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-7])  # a copy cut short
    with caplog.at_level("WARNING"):
        assert ckpt.find_resumable(run_dir).name == "step-00000010"
    assert "incomplete or damaged" in caplog.text


def test_checkpoint_restores_weights_optimizer_and_generators(tmp_path):
    import random

    import numpy as np
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, {"sampler": {"epoch": 2}}, 0, True, lambda: None, 3)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    weights = model.weight.detach().clone()
    exp_avg = optimizer.state[model.weight]["exp_avg"].clone()

    other = torch.nn.Linear(4, 4)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    state = ckpt.load_checkpoint(ckpt.find_resumable(tmp_path), other, other, other_opt, rank=0, sharded=False)
    assert state["sampler"] == {"epoch": 2} and state["step"] == 1
    assert torch.equal(other.weight, weights)
    assert torch.equal(other_opt.state[other.weight]["exp_avg"], exp_avg)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
