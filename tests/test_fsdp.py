"""FSDP2 on CPU (gloo), launched as users launch it: sharded training computes what one process computes,
checkpoints are sharded and resume exactly (on another process count too), and two local "nodes" rehearse a
multi-node run."""

import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from train_fixtures import (bert_workspace, free_port, launch, prepared_data, subprocess_env, teacher_dir,
                            torchrun_command, train_rows, write_recipe)

STEPS = 5
COMMON = dict(optim={"max_steps": STEPS, "lr": 3e-3}, run={"dropout": 0.0, "log_every": 1})
KEYS = {"bert": ("loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm"),
        "llama": ("loss", "loss_ce", "loss_clm", "loss_cos", "grad_norm")}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


def workspace(root, family):
    if family == "bert":
        return bert_workspace(root)
    teacher = teacher_dir(root, "llama")
    return root, teacher, prepared_data(root, teacher, name="data-llama")


def recipe(root, family, name, batch, **run):
    _, teacher, data = workspace(root, family)
    loss = {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0} if family == "bert" else \
        {"alpha_ce": 5.0, "alpha_mlm": 0.0, "alpha_clm": 2.0, "alpha_cos": 1.0}
    return write_recipe(root / f"{name}.yaml", teacher, data, root / name, data={"batch_size": batch}, loss=loss,
                        optim=COMMON["optim"], run={**COMMON["run"], **run})


def kill_all_running(argument: str) -> None:
    """SIGKILL every process whose command line names `argument` (torchrun starts its workers in sessions of
    their own, so a process group does not reach them)."""
    import os
    from pathlib import Path

    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and argument in (entry / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def run_ok(args, processes):
    result = launch(args, processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same(a_dir, b_dir, keys, weights=True):
    a, b = train_rows(a_dir), train_rows(b_dir)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-5), (step, key)
    if weights:
        x = load_file(str(a_dir / "student" / "model.safetensors"))
        y = load_file(str(b_dir / "student" / "model.safetensors"))
        assert x.keys() == y.keys()
        for name in x:
            torch.testing.assert_close(y[name], x[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family,teacher_mode", [("bert", "shard"), ("llama", "replicate")])
def test_fsdp_two_processes_equal_one_process_and_ddp(root, family, teacher_mode):
    """2 FSDP processes x batch 4 = 1 process x batch 8 = 2 DDP processes x batch 4: per-step losses and gradient
    norms to 1e-5, and the gathered student equals the unsharded one. BERT runs the fused head on a tied output
    layer under a sharded teacher; Llama an untied head with a replicated teacher."""
    one = recipe(root, family, f"{family}-1x8", 8)
    ddp = recipe(root, family, f"{family}-ddp-2x4", 4)
    fsdp = recipe(root, family, f"{family}-fsdp-2x4", 4, fsdp=True)
    run_ok([one], 1)
    run_ok([ddp], 2)
    result = run_ok([fsdp, f"teacher.fsdp={teacher_mode}"], 2)
    assert "FSDP: student" + (" and teacher" if teacher_mode == "shard" else "") + " sharded over 2" in result.stderr
    assert_same(root / f"{family}-1x8", root / f"{family}-fsdp-2x4", KEYS[family])
    assert_same(root / f"{family}-ddp-2x4", root / f"{family}-fsdp-2x4", KEYS[family])


@pytest.mark.parametrize("teacher_mode", ["shard", "replicate"])
def test_fsdp_multi_teacher_two_processes_equal_one_process(root, teacher_mode):
    """Two live teachers mixed (weights 1 and 3, the second at its own temperature) under FSDP, every teacher
    sharded or replicated: the same per-step losses as one process, and the same student."""
    _, first, data = workspace(root, "llama")
    second = teacher_dir(root / "second", "llama", num_layers=2, seed=9)
    loss = {"alpha_ce": 5.0, "alpha_mlm": 0.0, "alpha_clm": 2.0, "alpha_cos": 1.0, "hidden_teacher": "wide"}
    teachers = [{"path": str(first), "weight": 1.0, "name": "wide"},
                {"path": str(second), "weight": 3.0, "temperature": 1.5, "name": "small"}]
    student = root / "multi-student"
    if not (student / "config.json").exists():
        from distil.student import init_student

        init_student(str(first), str(student), layers=None, num_layers=2)

    def mixed(name, batch, **run):
        path = write_recipe(root / f"{name}.yaml", first, data, root / name, data={"batch_size": batch}, loss=loss,
                            optim=COMMON["optim"], run={**COMMON["run"], **run})
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        values.pop("teacher")
        values["teachers"] = teachers
        values["student"] = {"path": str(student)}
        path.write_text(yaml.safe_dump(values), encoding="utf-8")
        return path

    one = root / "multi-1x8"
    if not (one / "student" / "model.safetensors").exists():
        run_ok([mixed("multi-1x8", 8)], 1)
    result = run_ok([mixed(f"multi-fsdp-{teacher_mode}", 4, fsdp=True), f"teacher.fsdp={teacher_mode}"], 2)
    assert "FSDP: student" in result.stderr
    assert_same(one, root / f"multi-fsdp-{teacher_mode}", KEYS["llama"])


def test_fsdp_sigkill_then_resume_gives_the_same_losses_and_reshards_to_one_process(root):
    """Checkpoints hold one shard per process (torch.distributed.checkpoint): a killed 2-process run resumes
    exactly; the same checkpoint also resumes on 1 process (resharded)."""
    # effective_batch_size keeps the step at 8 sequences on 2 processes (accumulation 1) and on 1 (accumulation 2).
    long = dict(optim={"max_steps": 40, "lr": 3e-3, "effective_batch_size": 8}, run={"dropout": 0.0, "log_every": 1, "checkpoint_every": 5,
                                                          "fsdp": True})
    _, teacher, data = workspace(root, "bert")
    straight = write_recipe(root / "straight.yaml", teacher, data, root / "straight", data={"batch_size": 4}, **long)
    run_ok([straight], 2)
    killed = write_recipe(root / "killed.yaml", teacher, data, root / "killed", data={"batch_size": 4}, **long)
    proc = subprocess.Popen(torchrun_command(2, killed), env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not any(p.name == "step-00000015" for p in (root / "killed" / "checkpoints").glob("step-*")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its third checkpoint"
        time.sleep(0.05)
    kill_all_running(str(killed))  # torchrun and both workers, at once, as a crashed node would
    proc.wait()
    assert not (root / "killed" / "student").exists()
    shard_files = list((root / "killed" / "checkpoints" / "step-00000015" / "sharded").glob("*.distcp"))
    assert len(shard_files) == 2
    resumed = run_ok([killed], 2)
    assert "Resuming from" in resumed.stderr
    expected, got = train_rows(root / "straight"), train_rows(root / "killed")
    assert sorted(got) == list(range(1, 41))
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=1e-5), step

    # 2 -> 1: the step-35 checkpoint of the finished run read by a single process.
    import shutil

    single = root / "single"
    shutil.copytree(root / "straight", single, ignore=shutil.ignore_patterns("student"))
    (single / "checkpoints" / "latest").write_text("step-00000035\n")
    for later in sorted((single / "checkpoints").glob("step-*"))[:-1]:
        if later.name > "step-00000035":
            shutil.rmtree(later)
    one = write_recipe(root / "single.yaml", teacher, data, single, data={"batch_size": 4}, **long)
    # One process under torchrun (FSDP needs a process group, even of one).
    result = subprocess.run(torchrun_command(1, one, torchrun=True), env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stderr and "1 processes x batch 4 x accumulation 2" not in result.stderr
    resharded = train_rows(single)
    for step in range(36, 41):
        assert resharded[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=1e-5), step


def test_multinode_rehearsal_two_local_nodes_equal_one_process(root):
    """torchrun --nnodes 2 --node_rank {0,1} --rdzv-endpoint 127.0.0.1:PORT, one process per "node", is one
    process with the global batch."""
    one = recipe(root, "bert", "mn-1x8", 8)
    nodes = recipe(root, "bert", "mn-2nodes", 4)
    run_ok([one], 1)
    port = free_port()
    procs = [subprocess.Popen(torchrun_command(1, nodes, nnodes=2, node_rank=rank, port=port), env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "2 processes x batch 4" in outputs[0][1] + outputs[1][1]
    assert_same(root / "mn-1x8", root / "mn-2nodes", KEYS["bert"])


def test_fsdp_through_accelerate_launch_use_fsdp(root):
    """`accelerate launch --use_fsdp` with a recipe that does not mention FSDP shards the same way as torchrun
    with run.fsdp=true, and records run.fsdp: true in the run's recipe."""
    import sys

    import yaml

    reference = root / "bert-1x8"
    if not (reference / "student").exists():
        run_ok([recipe(root, "bert", "bert-1x8", 8)], 1)
    launched = recipe(root, "bert", "bert-accelerate-fsdp", 4)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--use_fsdp",
                  "--main_process_port", str(free_port()), "-m", "distil", "train", str(launched)]
    result = subprocess.run(accelerate, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP: student and teacher sharded over 2" in result.stderr
    assert yaml.safe_load((root / "bert-accelerate-fsdp" / "recipe.yaml").read_text())["run"]["fsdp"] is True
    assert_same(reference, root / "bert-accelerate-fsdp", KEYS["bert"])
