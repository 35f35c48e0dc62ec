"""Where a run's student comes from: a path, a config, or teacher layers built into run_dir/student-init (kept
only once every start-up check has passed)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from distil.config import TrainConfig
from distil.errors import DistilError

log = logging.getLogger(__name__)


STUDENT_INIT = "student-init"


def _matches_recipe(student_dir: Path, config: TrainConfig) -> bool:
    """Whether a student-init directory was built from the recipe's teacher, layers, architecture and kind (with
    an LM head, or the base model of an embedding student)."""
    from distil.layer_copy import resolve_layers
    from distil.student import INIT_FILE

    try:
        record = json.loads((student_dir / INIT_FILE).read_text(encoding="utf-8"))
        s = config.student
        expected = resolve_layers(int(record["teacher_num_layers"]), s.layers, s.num_layers)
    except (OSError, ValueError, KeyError, TypeError, DistilError):
        return False
    return (record.get("teacher") == config.teacher.path and record.get("teacher_layers") == expected
            and s.architecture in ("auto", record.get("architecture"))
            and record.get("objective", "auto") == init_student_objective(config))


def init_student_objective(config: TrainConfig) -> str:
    """What init-student builds for the recipe: the base model for an embedding objective, else the LM."""
    return "embedding" if config.loss.objective == "embedding" else "auto"


def student_source(config: TrainConfig, run_dir: Path, is_main: bool, barrier) -> tuple[str, Path | None]:
    """(student directory to load, directory to move to run_dir/student-init once every start-up check passed).

    A student given by path or config is loaded as it is. One built from teacher layers is kept in the run
    directory; until the run has started it is built beside it, so that a start that fails leaves no run
    directory behind. A student-init that does not match the recipe (left by a failed start with other
    layers) is rebuilt, never reused."""
    s = config.student
    if s.path:
        return s.path, None
    if s.config:
        return s.config, None
    kept = run_dir / STUDENT_INIT
    if not config.run.overwrite and (kept / "config.json").exists() and _matches_recipe(kept, config):
        return str(kept), None
    pending = run_dir.parent / f".{run_dir.name}.{STUDENT_INIT}.tmp"
    if is_main:
        from distil.student import init_student

        if kept.exists() and not config.run.overwrite:
            log.warning("%s was built for another recipe (teacher or layers differ); building it again.", kept)
        shutil.rmtree(pending, ignore_errors=True)
        init_student(config.teacher.path, str(pending), layers=s.layers, num_layers=s.num_layers,
                     architecture=s.architecture, overwrite=True, objective=init_student_objective(config))
    barrier()
    return str(pending), pending


@contextlib.contextmanager
def discarded_on_error(path: Path | None):
    """Remove `path` (a student-init built for a start that then fails a check) when the block raises."""
    try:
        yield
    except BaseException:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        raise


def keep_student_init(pending: Path | None, run_dir: Path) -> None:
    """Move a student-init built beside the run directory into it (main process, after the start-up checks)."""
    if pending is None:
        return
    kept = run_dir / STUDENT_INIT
    if kept.exists():
        shutil.rmtree(kept)
    os.replace(pending, kept)
