"""Checkpoints record the sha256 of every file: bytes changed in place (same size) are caught when resuming, the
previous intact checkpoint is used, and a run with no intact checkpoint says so."""

import json
import shutil

import pytest
import torch

from distil.config import load_config
from distil.errors import DistilError
from distil.training import checkpoint as ckpt
from distil.training.loop import train
from train_fixtures import bert_workspace, train_rows, write_recipe

STEPS = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return bert_workspace(tmp_path_factory.mktemp("checksum"))


def finished_run(workspace, name, checkpoint_every=2):
    """A run of STEPS steps with dropout on (an exact resume must restore the generators too) and its rows."""
    root, teacher, data = workspace
    recipe = write_recipe(root / f"{name}.yaml", teacher, data, root / name, optim={"max_steps": STEPS},
                          run={"checkpoint_every": checkpoint_every, "keep_checkpoints": 3})
    train(load_config(recipe))
    return recipe, root / name, train_rows(root / name)


def flip_middle_bytes(path):
    """Change 16 bytes in the middle of a file, keeping its size: what a bad disk or a bad copy does."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def test_checkpoint_checksum_same_size_corruption_falls_back_and_the_run_ends_as_uninterrupted(workspace, caplog):
    recipe, run_dir, straight = finished_run(workspace, "corrupt-newest")
    shutil.rmtree(run_dir / "student")  # as a run killed after its step-4 checkpoint
    weights = run_dir / "checkpoints" / "step-00000004" / ckpt.WEIGHTS
    size = weights.stat().st_size
    flip_middle_bytes(weights)
    assert weights.stat().st_size == size
    with caplog.at_level("INFO"):
        summary = train(load_config(recipe))
    warned = [r.message for r in caplog.records if r.levelname == "WARNING" and "damaged" in r.message]
    assert len(warned) == 1 and "step-00000004" in warned[0] and ckpt.WEIGHTS in warned[0]
    assert "checksum" in warned[0]
    assert any("Resuming from" in r.message and "step-00000002" in r.message for r in caplog.records)
    assert summary["steps"] == STEPS
    resumed = train_rows(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos", "lr"):
            assert resumed[step][key] == pytest.approx(straight[step][key], abs=1e-6), (step, key)


def test_checkpoint_checksum_only_checkpoint_corrupt_is_a_clear_error(workspace, caplog):
    recipe, run_dir, _ = finished_run(workspace, "corrupt-only", checkpoint_every=3)
    shutil.rmtree(run_dir / "student")
    (only,) = (run_dir / "checkpoints").glob("step-*")
    flip_middle_bytes(only / ckpt.OPTIMIZER)
    before = sorted(p.name for p in run_dir.rglob("*"))
    with caplog.at_level("WARNING"), pytest.raises(DistilError, match="none is intact") as caught:
        train(load_config(recipe))
    assert "run.overwrite=true" in str(caught.value)
    assert ckpt.OPTIMIZER in caplog.text and "checksum" in caplog.text
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing changed


def test_checkpoint_checksum_named_checkpoint_that_is_corrupt_is_refused(workspace):
    recipe, run_dir, _ = finished_run(workspace, "corrupt-named")
    shutil.rmtree(run_dir / "student")
    named = run_dir / "checkpoints" / "step-00000002"
    flip_middle_bytes(named / ckpt.rng_file(0))
    with pytest.raises(DistilError, match="cannot be used") as caught:
        train(load_config(recipe, [f"run.resume={named}"]))
    assert ckpt.rng_file(0) in str(caught.value) and "checksum" in str(caught.value)


def small_checkpoints(run_dir, steps=(10, 20)):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in steps:
        ckpt.save_checkpoint(run_dir, step, model, optimizer, {"sampler": {}}, rank=0, is_main=True,
                             barrier=lambda: None, keep=3)
    return [ckpt.checkpoint_dir(run_dir, step) for step in steps]


def test_checkpoint_checksum_records_every_file_and_names_the_changed_one(tmp_path, caplog):
    import hashlib

    _, newest = small_checkpoints(tmp_path)
    state = json.loads((newest / ckpt.STATE).read_text())
    on_disk = sorted(str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file() and p.name != ckpt.STATE)
    assert sorted(state["sha256"]) == sorted(state["files"]) == on_disk
    for name, digest in state["sha256"].items():
        assert hashlib.sha256((newest / name).read_bytes()).hexdigest() == digest
    flip_middle_bytes(newest / "rng-rank0.json")
    with caplog.at_level("WARNING"):
        assert ckpt.find_resumable(tmp_path).name == "step-00000010"
    assert "rng-rank0.json does not match the checksum" in caplog.text


def test_checkpoint_checksum_older_checkpoint_without_checksums_still_loads(tmp_path, caplog):
    """A checkpoint written before checksums were recorded is checked by sizes and header, and says so."""
    _, newest = small_checkpoints(tmp_path)
    state = json.loads((newest / ckpt.STATE).read_text())
    del state["sha256"]
    (newest / ckpt.STATE).write_text(json.dumps(state))
    with caplog.at_level("INFO"):
        assert ckpt.find_resumable(tmp_path) == newest
    assert "without checksums" in caplog.text
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    assert ckpt.load_checkpoint(newest, model, model, optimizer, rank=0, sharded=False)["step"] == 20
