"""Checkpoints that let a run continue exactly: weights, optimizer, scheduler, grad scaler, counters,
the sampler's position and every random generator, written atomically and checked when read back.

Layout of <run>/checkpoints/step-00000100/:
  student.safetensors      the student's weights (safetensors: no pickle)           } DDP / one process
  optimizer.pt             optimizer state (tensors and numbers only; read back with weights_only=True) }
  sharded/                 the trained module and optimizer state, one shard per process (FSDP), written with
                           torch.distributed.checkpoint: read back by any number of processes (resharded)
  rng-rank<R>.safetensors  each process's torch CPU/CUDA generator states
  state.json               step, sampler position, scheduler and its shape, scaler, python/numpy generator states,
                           and the size and sha256 of every other file
A checkpoint directory only appears under its final name once complete (temp name + rename), and
`latest` names the newest one. A checkpoint whose files do not match the sizes and checksums recorded in
state.json (a truncated copy, a full disk, bytes changed in place) is skipped with a warning naming the file, in
favour of the previous one. A temporary `.tmp-step-*` left by a write that never finished (a full disk, a kill)
is distil's own leftover: ignored when choosing where to resume, and removed once the run has started again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from distil.disk_space import disk_space_errors, tensor_bytes
from distil.errors import DistilError
from distil.outputs import keep_umask, write_json_atomic

log = logging.getLogger(__name__)

STATE = "state.json"
WEIGHTS = "student.safetensors"
OPTIMIZER = "optimizer.pt"
SHARDED = "sharded"
LATEST = "latest"
TEMPORARY_PREFIX = ".tmp-"
CHUNK_BYTES = 1 << 22  # read 4 MiB at a time when checksumming: memory stays flat in file size


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
    `sharded_module` and the optimizer) and publish it atomically. A full disk is said plainly, with about the
    space needed, and the half-written temporary is removed."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f"{TEMPORARY_PREFIX}{final.name}")
    needed = lambda: tensor_bytes([student.state_dict(), optimizer.state_dict()])  # noqa: E731
    with disk_space_errors(final.parent, needed, partial=tmp if is_main else None):
        return _write_checkpoint(final, tmp, step, student, optimizer, state, rank, is_main, barrier, keep,
                                 sharded_module)


def _write_checkpoint(final: Path, tmp: Path, step: int, student, optimizer, state: dict, rank: int, is_main: bool,
                      barrier, keep: int, sharded_module) -> Path:
    run_dir = final.parent.parent
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
        written = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in written}
        checksums = {str(p.relative_to(tmp)): _sha256(p, sync=True) for p in written}
        write_json_atomic(tmp / STATE, {**state, "step": step, "files": files, "sha256": checksums,
                                        "sharded": sharded_module is not None})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (run_dir / "checkpoints" / LATEST).write_text(final.name + "\n", encoding="utf-8")
        _prune(run_dir / "checkpoints", keep)
    barrier()
    return final


def _sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256, read in chunks; with `sync`, the file is also flushed to disk (one pass for both)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
        if sync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


def leftovers(root: Path) -> list[Path]:
    """Temporary checkpoint directories of writes that never finished (a full disk, a kill mid-write)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(f"{TEMPORARY_PREFIX}step-"))


def _ignored_leftovers(root: Path) -> list[Path]:
    found = leftovers(root)
    for stale in found:
        log.info("Ignoring %s: a checkpoint write that never finished.", stale)
    return found


def holds_only_leftovers(root: Path) -> bool:
    """Whether a run's checkpoints/ holds nothing but unfinished writes (the first checkpoint never completed)."""
    return root.is_dir() and len(_ignored_leftovers(root)) == len(list(root.iterdir()))


def remove_leftovers(run_dir: Path) -> None:
    """Delete what unfinished checkpoint writes left behind; called once a (re)started run has passed its checks."""
    for stale in leftovers(run_dir / "checkpoints"):
        log.info("Removing %s, left by a checkpoint write that never finished.", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint directory (a missing, cut or changed file, unreadable weights), or None
    when every file recorded in state.json is there with its recorded size and sha256.

    Checkpoints written before checksums were recorded are checked by sizes and the weights' header only."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        files, checksums = state["files"], state.get("sha256")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {STATE} cannot be read ({exc})"
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} holds {actual:,} bytes, not the {size:,} written"
    if checksums is None:
        log.info("Checkpoint %s was written by an older distil without checksums: checked by file sizes only.", path)
    else:
        for name, expected in checksums.items():
            if _sha256(path / name) != expected:
                return f"{name} does not match the checksum recorded when it was written (its bytes changed since)"
    if state.get("sharded"):
        return None if (path / SHARDED / ".metadata").is_file() else f"{SHARDED}/.metadata is missing"
    try:
        with open(path / WEIGHTS, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            json.loads(fh.read(header))
    except (OSError, ValueError) as exc:
        return f"{WEIGHTS} cannot be read ({exc})"
    return None


def find_resumable(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run; damaged newer ones are reported, naming what is wrong, and skipped."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    _ignored_leftovers(root)
    for candidate in sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True):
        problem = damage(candidate)
        if problem is None:
            return candidate
        log.warning("Checkpoint %s is damaged: %s. Falling back to the one before it.", candidate, problem)
    return None


def verified(path: Path) -> Path:
    """`path` if it is an intact checkpoint; a checkpoint named by the user is never silently replaced."""
    problem = damage(path)
    if problem is not None:
        raise DistilError(
            f"The checkpoint {path} (run.resume) cannot be used: {problem}. Nothing was changed. Name another "
            "checkpoint with run.resume=PATH, use run.resume=auto to take the newest intact one of the run, or start "
            "over with run.overwrite=true."
        )
    return path


def read_state(path: Path) -> dict:
    """A checkpoint's state.json: step, sampler position, schedule and the process count that wrote it."""
    return json.loads((path / STATE).read_text(encoding="utf-8"))


def load_checkpoint(path: Path, student, trained, optimizer, rank: int, sharded: bool) -> dict:
    """Restore weights, optimizer and this process's generators; returns state.json for the rest.

    A sharded (FSDP) checkpoint is read by any number of processes, sharded or not: torch.distributed.checkpoint
    reshards it. A full checkpoint (DDP, one process) is refused by a sharded run."""
    state = read_state(path)
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
