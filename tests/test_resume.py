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
    assert "is damaged" in caplog.text and f"{ckpt.WEIGHTS} holds" in caplog.text


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


# In-process runs of a few steps, dropout off where a resume changes how steps are split (the dropout draws then
# follow the new split, as they would in a run started with it).
SHORT = 6


def short_run(workspace, name, batch_size=8, checkpoint_every=2, optim=None, **run):
    """A finished run of SHORT steps whose student is then removed: what a run killed after its last checkpoint
    leaves. Returns (recipe, run directory, per-step rows of the uninterrupted run)."""
    import shutil

    from distil.config import load_config
    from distil.training.loop import train

    root, teacher, data = workspace
    path = write_recipe(root / f"{name}.yaml", teacher, data, root / name, data={"batch_size": batch_size},
                        optim={"max_steps": SHORT, "warmup_fraction": 0.3, **(optim or {})},
                        run={"checkpoint_every": checkpoint_every, "keep_checkpoints": 5, **run})
    train(load_config(path))
    rows = per_step(root / name)
    shutil.rmtree(root / name / "student")
    return path, root / name, rows


def assert_rows_equal(expected, got, steps, rel=0.0):
    for step in steps:
        assert got[step]["lr"] == expected[step]["lr"], step  # the schedule is the uninterrupted run's
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=rel, abs=1e-6 if not rel else 0), (step, key)


def test_resume_changed_split_with_the_same_step_size_gives_the_same_losses(workspace, caplog):
    """1 process x batch 4 x accumulation 1 resumed as 1 x 2 x 2: the step batch, its masks and the schedule are
    the same, so the curve is the uninterrupted one (to float rounding: micro-batches sum in another order)."""
    from distil.config import load_config
    from distil.training.loop import train

    path, run_dir, straight = short_run(workspace, "split", batch_size=4, checkpoint_every=3, dropout=0.0)
    with caplog.at_level("INFO"):
        summary = train(load_config(path, ["data.batch_size=2", "optim.gradient_accumulation=2"]))
    assert summary["steps"] == SHORT
    assert any("Resuming from" in r.message and "step-00000003" in r.message for r in caplog.records)
    assert "Resuming with data.batch_size changed: 4 -> 2" in caplog.text
    resumed = per_step(run_dir)
    assert sorted(resumed) == list(range(1, SHORT + 1))
    assert_rows_equal(straight, resumed, range(4, SHORT + 1), rel=1e-5)


def test_resume_changed_step_size_is_refused_naming_what_changed_and_how_to_keep_it(workspace):
    from distil.config import load_config
    from distil.errors import DistilError
    from distil.training.loop import train

    path, run_dir, _ = short_run(workspace, "step-size", batch_size=4)
    for overrides, changed, advice in [
        (["data.batch_size=2"], "data.batch_size: 4 -> 2", "optim.gradient_accumulation=2"),
        (["optim.gradient_accumulation=3"], "optim.gradient_accumulation: 1 -> 3", "optim.gradient_accumulation=1"),
        (["data.batch_size=3"], "data.batch_size: 4 -> 3", "data.batch_size=2 and optim.gradient_accumulation=2"),
    ]:
        with pytest.raises(DistilError, match="another recipe") as caught:
            train(load_config(path, overrides))
        message = str(caught.value)
        assert changed in message and advice in message and "instead of the 4" in message, message
    assert not (run_dir / "student").exists()


@pytest.mark.parametrize("optim,override,named", [
    ({}, "optim.max_steps=9", "optim.max_steps=9"),
    ({"max_steps": None, "epochs": 0.12}, "optim.epochs=0.2", "optim.epochs=0.2"),
], ids=["max_steps", "epochs"])
def test_resume_changed_total_steps_is_refused_naming_old_and_new_totals(workspace, optim, override, named):
    """The schedule falls to 0 at the run's last step; a new total would move the learning rate mid-run."""
    import json

    from distil.config import load_config
    from distil.errors import DistilError
    from distil.training.loop import train

    name = "total-" + override.split("=")[0].split(".")[1]
    path, run_dir, _ = short_run(workspace, name, optim=optim)
    with pytest.raises(DistilError, match=f"a run of {SHORT} optimizer steps") as caught:
        train(load_config(path, [override]))
    message = str(caught.value)
    state = json.loads((ckpt.find_resumable(run_dir) / ckpt.STATE).read_text())
    # 358 training sequences in steps of 8: 44 steps an epoch; 0.12 epochs is ceil(5.28) = 6 steps.
    assert state["schedule"] == {"kind": "linear_warmup_decay", "total_steps": SHORT, "warmup_steps": 1}
    assert named in message and "makes it 9 steps" in message and f"Resume with optim.max_steps={SHORT}" in message
    assert f"student.path={run_dir / 'student'}" in message
    restated = train(load_config(path, [f"optim.max_steps={SHORT}"]))  # the same total, said another way: allowed
    assert restated["steps"] == SHORT


def test_resume_changed_process_count_is_refused_or_resumes_exactly_with_the_same_step(workspace):
    """A 1-process checkpoint (batch 4) resumed on 2 processes: with batch 4 each the step would double and is
    refused; with batch 2 each the step stays 4 sequences and the curve is the uninterrupted one."""
    from train_fixtures import launch

    path, run_dir, straight = short_run(workspace, "processes", batch_size=4, dropout=0.0)
    for later in ("step-00000004",):  # resume from step 2: four steps on 2 processes
        import shutil

        shutil.rmtree(run_dir / "checkpoints" / later)
    refused = launch([path], processes=2)
    assert refused.returncode != 0
    assert "processes: 1 -> 2" in refused.stderr and "data.batch_size=2" in refused.stderr, refused.stderr[-3000:]
    resumed = launch([path, "data.batch_size=2"], processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr and "instead of 1; each optimizer step still holds 4" in resumed.stderr
    rows = per_step(run_dir)
    assert sorted(rows) == list(range(1, SHORT + 1))
    assert_rows_equal(straight, rows, range(3, SHORT + 1), rel=1e-5)


def test_disk_full_leftover_beside_a_complete_checkpoint_is_ignored_and_removed(workspace, caplog):
    """A write that never finished (disk full, killed) leaves checkpoints/.tmp-step-N: the rerun resumes from the
    last complete checkpoint, says what it ignores, and removes the leftover."""
    from distil.config import load_config
    from distil.training.loop import train

    path, run_dir, straight = short_run(workspace, "leftover")
    leftover = run_dir / "checkpoints" / ".tmp-step-00000006"
    leftover.mkdir()
    (leftover / ckpt.WEIGHTS).write_bytes(b"\0" * 100)  # cut short
    with caplog.at_level("INFO"):
        summary = train(load_config(path))
    assert summary["steps"] == SHORT
    assert any("Resuming from" in r.message and "step-00000004" in r.message for r in caplog.records)
    assert "Ignoring" in caplog.text and ".tmp-step-00000006" in caplog.text
    assert not leftover.exists()
    assert_rows_equal(straight, per_step(run_dir), range(1, SHORT + 1))


def test_disk_full_before_the_first_checkpoint_completed_starts_again(workspace, caplog):
    """Only a leftover (the first checkpoint never completed): still distil's own run, which starts over. Dropout
    off: a start that reuses the student-init draws its dropout from another point of the seeded stream than the
    start that built it."""
    import shutil

    from distil.config import load_config
    from distil.training.loop import train

    path, run_dir, straight = short_run(workspace, "first-leftover", dropout=0.0)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step-00000002").rename(checkpoints / ".tmp-step-00000002")
    (checkpoints / ".tmp-step-00000002" / ckpt.STATE).unlink()  # the write stopped before its state
    shutil.rmtree(checkpoints / "step-00000004")
    (checkpoints / "latest").unlink()
    with caplog.at_level("INFO"):
        summary = train(load_config(path))
    assert summary["steps"] == SHORT and "Resuming from" not in caplog.text
    assert ".tmp-step-00000002" in caplog.text and not (checkpoints / ".tmp-step-00000002").exists()
    assert_rows_equal(straight, per_step(run_dir), range(1, SHORT + 1))


def test_resume_changed_process_count_of_a_checkpoint_without_its_step_size(tmp_path):
    """Checkpoints of older versions do not record their step's size: only an unchanged split is accepted."""
    from distil.config import TrainConfig
    from distil.errors import DistilError
    from distil.training.recipe_changes import check_resume_recipe

    config = TrainConfig()
    config.data.batch_size, config.optim.gradient_accumulation = 3, 1
    older = {"sampler": {"epoch": 0, "batch_in_epoch": 5}, "world_size": 1}
    check_resume_recipe(tmp_path, config, older, world=1)
    with pytest.raises(DistilError, match="older distil") as caught:
        check_resume_recipe(tmp_path, config, older, world=2)
    assert "processes: 1 -> 2" in str(caught.value)
    # Recorded: a step of 3 sequences cannot be shared by 2 processes.
    with pytest.raises(DistilError, match="cannot be shared by 2 processes"):
        check_resume_recipe(tmp_path, config, {**older, "sampler": {"global_batch_size": 3}}, world=2)
