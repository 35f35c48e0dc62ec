"""Resuming a run with a recipe, or a process count, that is not the one it was started with.

A checkpoint is only meaningful for the models, layers, data, objective and losses it was trained with: a
change to any of these is refused, naming each changed key. Its sampler position and learning-rate schedule
count optimizer steps of a given size (processes x batch x accumulation sequences): how a step is split may
change, its size may not, and the schedule's total must stay the same. Settings that only say what to record
along the way may change mid-run; each change is logged. The run's recipe.yaml is then rewritten with those
changes, so that it always says what the run is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from distil.config import TrainConfig
from distil.errors import DistilError

log = logging.getLogger(__name__)

# Keys that may differ between the recorded recipe and the one a run is resumed with. The step counts may only be
# restated (epochs replaced by the same number of max_steps): check_resume_schedule refuses a different total.
SAFE_TO_CHANGE = frozenset({
    "name", "description",
    "optim.max_steps", "optim.epochs",
    "run.log_every", "run.eval_every", "run.eval_batches", "run.checkpoint_every", "run.keep_checkpoints",
    "run.report_to", "run.progress", "run.collective_timeout_s", "run.resume", "run.overwrite",
    "run.output_dir",  # a run directory moved or copied elsewhere
})
# How a step is split between processes, micro-batches and rows: free to change while the step's size stays.
STEP_SPLIT = frozenset({"data.batch_size", "optim.gradient_accumulation", "optim.effective_batch_size"})


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


def check_resume_recipe(run_dir: Path, config: TrainConfig, state: dict, world: int) -> None:
    """Refuse a resume whose recipe or process count changes what the checkpoint means; log allowed changes.

    `state` is the checkpoint's state.json, `world` the number of processes resuming it."""
    path = run_dir / "recipe.yaml"
    # No recipe: a run from an older version, or one whose recipe was removed: only the step's size is compared.
    changes = {}
    if path.exists():
        recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        changes = recipe_changes(recorded, config.to_dict())
    refused = {k: v for k, v in changes.items() if k not in SAFE_TO_CHANGE | STEP_SPLIT}
    step_change = _step_size_change(state, config, world, changes)
    if step_change:
        refused.update({k: v for k, v in changes.items() if k in STEP_SPLIT})
        if state.get("world_size", world) != world:
            refused["processes"] = (state["world_size"], world)
    if refused:
        listed = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in refused.items())
        raise DistilError(
            f"{run_dir} holds checkpoints of a run started with another recipe or process count, and resuming would "
            f"silently train something else. Changed: {listed}.{step_change} Nothing was changed. Resume with the "
            f"recorded recipe ({path}), choose another run.output_dir for the new recipe, or pass run.overwrite=true "
            "to start over there. Only how a step is split (processes, data.batch_size, accumulation: not the step's "
            "size) and the logging, evaluation and checkpoint intervals may change mid-run."
        )
    for key, (old, new) in changes.items():
        if key not in ("run.resume", "run.overwrite"):
            log.info("Resuming with %s changed: %s -> %s", key, _show(old), _show(new))
    if state.get("world_size", world) != world:
        log.info("Resuming with %d processes instead of %d; each optimizer step still holds %d sequences.",
                 world, state["world_size"], _step_size(config, world))


def _step_size(config: TrainConfig, world: int) -> int:
    return config.data.batch_size * world * config.accumulation_steps(world)


def _step_size_change(state: dict, config: TrainConfig, world: int, changes: dict) -> str:
    """'' when a resume keeps the checkpoint's step size; else sentences saying what moves and how to keep it."""
    recorded = (state.get("sampler") or {}).get("global_batch_size")
    recorded_world = state.get("world_size", world)
    size = _step_size(config, world)
    if recorded is None:  # written before step sizes were recorded: only an unchanged split is known to be safe
        if recorded_world == world and not STEP_SPLIT & set(changes):
            return ""
        return (" This checkpoint was written by an older distil that did not record its step's size, so the "
                "process count, data.batch_size and the accumulation must stay as they were.")
    if recorded == size:
        return ""
    split = (f"{world} process{'es' if world > 1 else ''} x batch {config.data.batch_size} x accumulation "
             f"{config.accumulation_steps(world)}")
    return (f" One optimizer step would hold {size} sequences ({split}) instead of the {recorded} that the "
            "checkpoint's sampler position and learning-rate schedule count in: the run would skip or repeat data "
            f"and change its schedule. {_keep_step_advice(recorded, world, config.data.batch_size)}")


def _keep_step_advice(step: int, world: int, batch_size: int) -> str:
    if step % world:
        return (f"A step of {step} sequences cannot be shared by {world} processes: resume on a process count that "
                f"divides {step}.")
    per_process = step // world
    if per_process % batch_size == 0:
        return (f"Keep the step at {step} sequences with optim.gradient_accumulation={per_process // batch_size}, "
                f"or with optim.effective_batch_size={step} (the accumulation then follows the process count).")
    fitting = max(b for b in range(1, batch_size + 1) if per_process % b == 0)
    return (f"Keep the step at {step} sequences with data.batch_size={fitting} and "
            f"optim.gradient_accumulation={per_process // fitting} on {world} processes.")


def check_resume_schedule(checkpoint: Path, state: dict, schedule: dict, config: TrainConfig) -> None:
    """Refuse a resume whose learning-rate schedule is not the checkpoint's (another total number of steps): the
    scheduler is rebuilt from the recipe, and a new total would move the learning rate mid-run."""
    # Older checkpoints recorded the total only.
    recorded = state.get("schedule") or ({"total_steps": state["total_steps"]} if "total_steps" in state else {})
    differs = [k for k in recorded if k in schedule and recorded[k] != schedule[k]]
    if not differs:
        return
    old, new = recorded.get("total_steps"), schedule["total_steps"]
    how = (f"optim.max_steps={config.optim.max_steps}" if config.optim.max_steps is not None
           else f"optim.epochs={config.optim.epochs}")
    run_dir = checkpoint.parent.parent
    raise DistilError(
        f"The checkpoint {checkpoint} belongs to a run of {old} optimizer steps, whose learning rate falls linearly "
        f"to 0 at step {old}; this recipe makes it {new} steps ({how}), which would move the learning rate mid-run "
        f"(schedule {_show(recorded)} -> {_show(schedule)}). Nothing was changed. Resume with optim.max_steps={old}. "
        f"To train longer, let this run finish, then start a new run from its student (student.path="
        f"{run_dir / 'student'}, another run.output_dir)."
    )


def _show(value) -> str:
    return "(unset)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
