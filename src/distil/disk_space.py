"""A full disk, said as such: where, how much is free and about how much the output needs, instead of the raw error
of whichever writer hit it (OSError 28, safetensors' SafetensorError, torch's zip writer, numpy's short write)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from distil.errors import DistilError

# Writers that report a full disk without an errno: safetensors, torch's zip writer, numpy's short writes.
_OPAQUE_WRITE_ERRORS = ("No space left", "os error 28", "iostream error", "failed writing", "unexpected pos",
                        "requested and")
_NEARLY_FULL = 1 << 20  # after a write failed, less than this left free means the disk filled up


@contextlib.contextmanager
def disk_space_errors(path: str | Path, needed_bytes: int | Callable[[], int | None] | None = None,
                      partial: Path | None = None) -> Iterator[None]:
    """Turn a write failure caused by a full disk (or quota) under `path` into a DistilError that says where, how
    much is free and about how much is needed. `needed_bytes` (a number, or a function asked only on failure) is
    the size of the whole output; without it, what was written under `path` before the failure is reported.
    `partial`, if given, is removed on that failure (a half-written temporary outside atomic_output_dir)."""
    try:
        yield
    except Exception as exc:
        if not _is_disk_full(exc, path):
            raise
        written = directory_bytes(Path(path))
        needed = needed_bytes() if callable(needed_bytes) else needed_bytes
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        mount = mount_point(path)
        free = shutil.disk_usage(mount).free
        need = (f"about {human_size(needed)} needed" if needed else
                f"{human_size(written)} was written before it filled")
        raise DistilError(
            f"No space left on {mount} ({human_size(free)} free) while writing {path}; {need}. Nothing half-written "
            "was kept. Free some space there, or choose an output on another filesystem, and run again."
        ) from None


def _is_disk_full(exc: BaseException, path: str | Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, DistilError) or not any(text in str(exc) for text in _OPAQUE_WRITE_ERRORS):
        return False
    if "No space left" in str(exc) or "os error 28" in str(exc):
        return True
    try:
        return shutil.disk_usage(mount_point(path)).free < _NEARLY_FULL
    except OSError:
        return False


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem that holds `path` (or would hold it, if it does not exist yet)."""
    current = Path(os.path.abspath(path))
    while not current.exists():
        current = current.parent
    while not os.path.ismount(current):
        current = current.parent
    return current


def directory_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 if it does not exist)."""
    return bytes_under(path) if path.exists() else 0


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: what saving it writes, give or take the headers."""
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "numel") and hasattr(obj, "element_size"):
        return obj.numel() * obj.element_size()
    return 0


def bytes_under(path: Path) -> int:
    """Bytes of the file or the files under directory `path`."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def human_size(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def reserve_space(path: Path) -> None:
    """Allocate the blocks of file `path` (sparse, as numpy creates a memory-mapped array) now: on a full disk this
    raises ENOSPC here, where a later write through the memory map would kill the process with SIGBUS."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size:
            try:
                os.posix_fallocate(fh.fileno(), 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot reserve
                    raise
