"""The accelerator a run trains under (devices, processes, mixed precision, trackers) and the seeds it starts from."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch

from distil.config import TrainConfig
from distil.errors import DistilError


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate keeps one process-wide state, fixed by the first Accelerator: a second train() in the same
    # process (a notebook, a sweep) with another mixed precision would be refused. Start from a clean state;
    # the process group of a distributed launch (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # A rank that dies must not leave the others waiting forever at a collective.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.run.collective_timeout_s))
    # Without a GPU, accelerate only sets up gloo data parallelism (torchrun on CPU) when told cpu=True.
    on_cpu = not torch.cuda.is_available()
    # `accelerate launch --use_fsdp` asks for FSDP through the environment; distil shards the models itself
    # (training/parallel.py reads the same variable), so accelerate must not build its own FSDP plugin, which
    # would also refuse to start without a GPU.
    use_fsdp = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        return Accelerator(mixed_precision=config.run.mixed_precision, kwargs_handlers=[timeout], cpu=on_cpu,
                           log_with=trackers(config) or None, project_dir=config.run.output_dir)
    except ValueError as exc:
        raise DistilError(f"Mixed precision {config.run.mixed_precision!r} is not available here: {exc}") from None
    finally:
        if use_fsdp is not None:
            os.environ["ACCELERATE_USE_FSDP"] = use_fsdp


# The module each tracker of run.report_to needs, and the package that provides it.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio"),
                   "comet_ml": ("comet_ml", "comet-ml"), "aim": ("aim", "aim"), "clearml": ("clearml", "clearml"),
                   "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab")}


def trackers(config: TrainConfig) -> list:
    """accelerate trackers for run.report_to; TensorBoard writes to <run>/tensorboard. A tracker that is asked for
    but not installed is refused before anything starts."""
    import importlib.util

    from accelerate.tracking import TensorBoardTracker

    chosen = []
    for name in config.run.report_to:
        module, package = TRACKER_MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise DistilError(f"run.report_to asks for {name}, which is not installed. Install it (pip install "
                              f"{package}) or leave it out of run.report_to (tensorboard is the default).")
        chosen.append(TensorBoardTracker("tensorboard", config.run.output_dir) if name == "tensorboard" else name)
    return chosen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
