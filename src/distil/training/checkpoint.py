"""Checkpoints that let a run continue exactly: weights, optimizer, scheduler, grad scaler, counters,
the sampler's position and every random generator, written atomically and checked when read back.

Layout of <run>/checkpoints/step-00000100/:
  student.safetensors      the student's weights (safetensors: no pickle)           } DDP / one process
  optimizer.pt             optimizer state (tensors and numbers only; read back with weights_only=True) }
  sharded/                 the trained module and optimizer state, one shard per process (FSDP), written with
                           torch.distributed.checkpoint: read back by any number of processes (resharded)
  rng-rank<R>.safetensors  each process's torch CPU/CUDA generator states
  state.json               step, sampler position, scheduler, scaler, python/numpy generator states, file sizes
A checkpoint directory only appears under its final name once complete (temp name + rename), and
`latest` names the newest one. A checkpoint whose files do not match the sizes recorded in
state.json (a truncated copy, a full disk) is skipped with a warning in favour of the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from distil.errors import DistilError
from distil.outputs import keep_umask, write_json_atomic

log = logging.getLogger(__name__)

STATE = "state.json"
WEIGHTS = "student.safetensors"
OPTIMIZER = "optimizer.pt"
SHARDED = "sharded"
LATEST = "latest"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def capture_rng() -> tuple[dict, dict]:
    """(json-able python/numpy states, tensors of torch states) of this process."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    plain = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda{i}"] = state
    return plain, tensors


def restore_rng(plain: dict, tensors: dict) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run_dir: Path, step: int, student, optimizer, state: dict, rank: int, is_main: bool,
                    barrier, keep: int, sharded_module=None) -> Path:
    """Write a checkpoint from every process (each saves its own generators, and under FSDP its shards of
    `sharded_module` and the optimizer) and publish it atomically."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    plain_rng, tensor_rng = capture_rng()
    save_file(tensor_rng, str(tmp / rng_file(rank)))
    write_json_atomic(tmp / f"rng-rank{rank}.json", plain_rng)
    if sharded_module is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(sharded_module, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / SHARDED))
    barrier()
    if is_main:
        if sharded_module is None:
            save_model(student, str(tmp / WEIGHTS))
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        keep_umask(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json_atomic(tmp / STATE, {**state, "step": step, "files": files, "sharded": sharded_module is not None})
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (run_dir / "checkpoints" / LATEST).write_text(final.name + "\n", encoding="utf-8")
        _prune(run_dir / "checkpoints", keep)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(path: Path) -> bool:
    """All files recorded in state.json are there with their recorded sizes, and the weights parse."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        for name, size in state["files"].items():
            if (path / name).stat().st_size != size:
                return False
        if state.get("sharded"):
            return (path / SHARDED / ".metadata").is_file()
        with open(path / WEIGHTS, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            json.loads(fh.read(header))
        return True
    except (OSError, ValueError, KeyError):
        return False


def find_resumable(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run; damaged newer ones are reported and skipped."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    for candidate in sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True):
        if is_complete(candidate):
            return candidate
        log.warning("Checkpoint %s is incomplete or damaged; falling back to the one before it.", candidate)
    return None


def load_checkpoint(path: Path, student, trained, optimizer, rank: int, sharded: bool) -> dict:
    """Restore weights, optimizer and this process's generators; returns state.json for the rest.

    A sharded (FSDP) checkpoint is read by any number of processes, sharded or not: torch.distributed.checkpoint
    reshards it. A full checkpoint (DDP, one process) is refused by a sharded run."""
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    if state.get("sharded"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(trained, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        dcp.load(loaded, checkpoint_id=str(path / SHARDED))
        set_state_dict(trained, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    elif sharded:
        raise DistilError(
            f"The checkpoint {path} was written without FSDP (full weights from one process), and this run shards "
            "the student. Resume it the way it was started (without run.fsdp / --use_fsdp), or start over with "
            "run.overwrite=true."
        )
    else:
        load_model(student, str(path / WEIGHTS))
        optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True))
    own = path / rng_file(rank)
    if own.exists():
        plain = json.loads((path / f"rng-rank{rank}.json").read_text(encoding="utf-8"))
        restore_rng(plain, load_file(str(own)))
    else:
        log.warning("Checkpoint %s has no generator state for process %d (different process count?); "
                    "random draws will differ from an uninterrupted run.", path, rank)
    return state
