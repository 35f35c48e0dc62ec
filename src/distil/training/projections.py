"""Learned projections for hidden-state and sentence-embedding losses between models of different widths.

A width-reduced student (hidden d_s < d_t, e.g. from `distil init-student --hidden-size`) cannot be compared with
its teacher state by state. As in TinyBERT, a linear map W (d_s -> d_t) is trained with the student and the loss
compares W h_s with h_t: one map per compared layer pair, and one for the pooled sentence embedding. The map goes
from the student into the teacher's space, as TinyBERT's W_h does: the fixed teacher states stay the target. (A
map of the teacher into the student's space would be trained to the target it is compared with, and map and
student can then shrink together to zero.)

The maps live on the trained module as one sub-module (so the optimizer, DDP and the checkpoints carry them
like any weight), are saved beside the final student as `projections.safetensors`, and are taken out of the
student before it is written: the final student is a plain model of its own width. A student pruned from the
teacher starts with each map sending its channel i back to the teacher channel it was cut from (zeros on the
removed channels), so at step 0 the loss compares each kept channel with the teacher's same channel. The values
there are close to the teacher's, not equal: the removed heads, neurons and channels no longer contribute, and
the pruned norms take their statistics over the kept channels only (corrected from calibration for the norm that
reads the embeddings, see distil.pruning).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from distil.errors import DistilError

log = logging.getLogger(__name__)

ATTRIBUTE = "distil_projections"   # the sub-module's name on the trained module
PROJECTIONS_FILE = "projections.safetensors"
SENTENCE_KEY = "sentence"


def pair_key(student_layer: int, teacher_layer: int) -> str:
    return f"layer_{student_layer}_to_{teacher_layer}"


class Projections(torch.nn.Module):
    """One Linear(d_s, d_t) per key; `kept_channels` (d_s teacher channel indices) starts each as their scatter
    (student channel i -> teacher channel kept_channels[i])."""

    def __init__(self, keys: list[str], student_width: int, teacher_width: int,
                 kept_channels: list[int] | None = None):
        super().__init__()
        self.maps = torch.nn.ModuleDict({key: torch.nn.Linear(student_width, teacher_width) for key in keys})
        for linear in self.maps.values():
            with torch.no_grad():
                linear.bias.zero_()
                if kept_channels is not None and len(kept_channels) == student_width:
                    linear.weight.zero_()
                    linear.weight[torch.as_tensor(kept_channels), torch.arange(student_width)] = 1.0
                else:  # orthonormal columns: the student's geometry is carried over unscaled
                    torch.nn.init.orthogonal_(linear.weight)

    def forward(self, key: str, states: torch.Tensor) -> torch.Tensor:
        linear = self.maps[key]
        return linear(states.to(linear.weight.dtype))


def projection_keys(spec, student_width: int, teacher_width: int, mode: str) -> list[str]:
    """The maps a run needs: none when the widths match (unless loss.hidden_projection=linear)."""
    if mode == "none" or (mode == "auto" and student_width == teacher_width):
        return []
    keys = [pair_key(s, t) for s, t in spec.layer_pairs] if spec.needs_hidden_pairs else []
    return keys + ([SENTENCE_KEY] if spec.needs_sentence else [])


def add_projections(config, models, spec) -> Projections | None:
    """Attach the maps the run needs to the trained module (before the optimizer is built), or refuse."""
    from distil.loading import hidden_size_of

    d_s, d_t = hidden_size_of(models.student.config), hidden_size_of(models.teacher_config)
    mode = config.loss.hidden_projection
    if not (spec.needs_hidden_pairs or spec.needs_sentence):
        return None
    if mode == "none" and d_s != d_t:
        raise DistilError(
            f"Hidden-state and sentence-embedding losses compare student and teacher vectors, but the hidden sizes "
            f"differ (teacher {d_t}, student {d_s}) and loss.hidden_projection is none. Set loss.hidden_projection="
            "auto to train a linear map from the student's width to the teacher's (TinyBERT), use a student of the "
            "teacher's width, or use the relation loss (loss.alpha_relation), which compares any widths."
        )
    keys = projection_keys(spec, d_s, d_t, mode)
    if not keys:
        return None
    if config.run.fsdp:
        raise DistilError(
            f"Learned projections (student width {d_s}, teacher {d_t}) are not sharded by distil's FSDP path yet. "
            "Train this student without run.fsdp (DDP: torchrun or accelerate launch without --use_fsdp), or use "
            "loss.alpha_relation, which needs no projection."
        )
    kept = ((models.init_record or {}).get("width_pruning") or {}).get("kept_channels")
    projections = Projections(keys, d_s, d_t, kept).to(next(models.student.parameters()).device)
    models.student_trained.add_module(ATTRIBUTE, projections)
    log.info("learned projections %d -> %d for %s (%s; %s)", d_s, d_t, ", ".join(keys),
             "trained with the student, dropped from the final student",
             "started from the pruned channels" if kept and len(kept) == d_s else "orthogonal start")
    return projections


def projections_of(module: torch.nn.Module) -> Projections | None:
    found = getattr(module, ATTRIBUTE, None)
    if found is None and hasattr(module, "base_model"):
        found = getattr(module.base_model, ATTRIBUTE, None)
    return found


@contextlib.contextmanager
def detached(student: torch.nn.Module):
    """The student without its projections (for save_pretrained); yields them (None if it had none)."""
    owner = student if hasattr(student, ATTRIBUTE) else getattr(student, "base_model", student)
    projections = owner._modules.pop(ATTRIBUTE, None)
    try:
        yield projections
    finally:
        if projections is not None:
            owner._modules[ATTRIBUTE] = projections
