"""Writing results so that nothing finished is lost and nothing half-written is left behind.

Every command that produces a directory writes it under a temporary sibling name and renames it
into place only when complete. A directory that already holds a finished result is refused unless
the user passes --overwrite; a leftover temporary directory from a crashed run is cleaned up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from distil.errors import DistilError


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an output directory that already has content, unless overwriting is allowed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DistilError(f"The output path {path} exists and is a file, not a directory. Choose another output path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DistilError(
            f"The output directory {path} already holds results. Nothing was changed. "
            "Pass --overwrite to replace it, or choose another output directory."
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block completes.

    On success the previous content of `path` (allowed only with overwrite) is replaced in one
    rename; on any exception the temporary directory is removed and `path` is untouched.
    """
    final = check_output_dir(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing `dst` as close to atomically as a filesystem allows."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON to `path` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
