"""Resuming a run with a recipe that is not the one it was started with.

A checkpoint is only meaningful for the models, layers, data, objective and losses it was trained with: a
change to any of these is refused, naming each changed key. Settings that only say how long to go on and what
to record along the way may change mid-run; each change is logged. The run's recipe.yaml is then rewritten
with those changes, so that it always says what the run is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from distil.config import TrainConfig
from distil.errors import DistilError

log = logging.getLogger(__name__)

# Keys that may differ between the recorded recipe and the one a run is resumed with.
SAFE_TO_CHANGE = frozenset({
    "name", "description",
    "optim.max_steps", "optim.epochs",
    "run.log_every", "run.eval_every", "run.eval_batches", "run.checkpoint_every", "run.keep_checkpoints",
    "run.report_to", "run.progress", "run.collective_timeout_s", "run.resume", "run.overwrite",
    "run.output_dir",  # a run directory moved or copied elsewhere
})


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_changes(recorded: dict, current: dict) -> dict[str, tuple]:
    """{dotted key: (recorded value, current value)} for every key whose value differs."""
    old, new = _flatten(recorded), _flatten(current)
    missing = object()
    return {key: (old.get(key, missing), new.get(key, missing)) for key in sorted(set(old) | set(new))
            if old.get(key, missing) != new.get(key, missing)}


def check_resume_recipe(run_dir: Path, config: TrainConfig) -> None:
    """Refuse a resume whose recipe changes what the checkpoint means; log the changes that are allowed."""
    path = run_dir / "recipe.yaml"
    if not path.exists():
        return  # a run from an older version, or one whose recipe was removed: nothing to compare with
    recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    changes = recipe_changes(recorded, config.to_dict())
    refused = {k: v for k, v in changes.items() if k not in SAFE_TO_CHANGE}
    if refused:
        listed = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in refused.items())
        raise DistilError(
            f"{run_dir} holds checkpoints of a run started with another recipe, and resuming would silently train "
            f"something else. Changed: {listed}. Nothing was changed. Resume with the recorded recipe "
            f"({path}), choose another run.output_dir for the new recipe, or pass run.overwrite=true to start over "
            "there. Only step counts and logging, evaluation and checkpoint intervals may change mid-run."
        )
    for key, (old, new) in changes.items():
        if key not in ("run.resume", "run.overwrite"):
            log.info("Resuming with %s changed: %s -> %s", key, _show(old), _show(new))


def _show(value) -> str:
    return "(unset)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
