"""The model side of the fused output layer: which layer of a model the engine can stand in for, and how.

The math (output layer, logit transform and its derivative, LM cross-entropy, every divergence against dense or
sparse teacher signals, in row chunks) is distil.teacher_signal.engine; this module hands it a model's layers.
`output_projection` finds a model's output Linear; models that transform their logits after it (Gemma-2's
`final_logit_softcapping`: cap * tanh(logits / cap); Cohere's `logit_scale`: logits * scale; Granite's
`logits_scaling`: logits / scaling) have the transform recorded with the projection, the engine applies it to each
chunk (on the student's side and a live teacher's) with its derivative in the gradient, and `projection_replaced`
switches the model's own transform off while the engine stands in for its output layer (else it would be applied
to the fused loss or to the teacher's states). `fused_head_losses` is the live teacher's path, `student_head_losses`
any signals' (the store's).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from distil.loading import vocab_size_of
from distil.teacher_signal.output_layer import LogitTransform
from distil.teacher_signal.engine import CHUNK_ROWS, HeadGradients, HeadTerms, output_layer_losses
from distil.teacher_signal.signals import DenseSignals, Signals, TeacherHead

__all__ = ["CHUNK_ROWS", "HeadGradients", "HeadTerms", "LogitTransform", "POST_PROCESSING", "fused_head_losses",
           "logit_transform", "output_projection", "projection_replaced", "student_head_losses", "teacher_head",
           "transform_of"]

# model_type -> (where the model reads its setting: "config" or "model" (an attribute of the LM module itself),
# the attribute, what it does, the value under which the model leaves its logits as they are). Read from the
# `*ForCausalLM.forward` of transformers 5; a model with one of these config keys that is not listed here keeps
# the plain (unfused) losses, which use the model's own logits.
POST_PROCESSING = {
    "gemma2": ("config", "final_logit_softcapping", "softcap", None),
    "gemma3_text": ("config", "final_logit_softcapping", "softcap", None),
    "vaultgemma": ("config", "final_logit_softcapping", "softcap", None),
    "cohere": ("model", "logit_scale", "multiply", 1.0),
    "cohere2": ("model", "logit_scale", "multiply", 1.0),
    "granite": ("config", "logits_scaling", "divide", 1.0),
    "granitemoe": ("config", "logits_scaling", "divide", 1.0),
    "granitemoeshared": ("config", "logits_scaling", "divide", 1.0),
}
TRANSFORMING_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# projection -> (its model, weakly; the LogitTransform; the POST_PROCESSING entry), filled by output_projection.
_TRANSFORMS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def logit_transform(model: torch.nn.Module) -> LogitTransform | None | bool:
    """The model's post-projection transform: a LogitTransform, None when it has none, False when it has one that
    distil does not know (the fused head then cannot stand in for its output layer)."""
    config = getattr(model, "config", None)
    entry = POST_PROCESSING.get(getattr(config, "model_type", None))
    if entry is None:
        return False if any(getattr(config, key, None) for key in TRANSFORMING_KEYS) else None
    holder, attr, kind, neutral = entry
    value = getattr(model if holder == "model" else config, attr, None)
    if value is None or value == neutral:
        return None
    return LogitTransform(**{kind: float(value)})


def transform_of(projection: torch.nn.Module | None) -> LogitTransform | None:
    """The transform recorded with `projection` by output_projection (None: logits are used as projected)."""
    found = _TRANSFORMS.get(projection) if projection is not None else None
    return found[1] if found is not None else None


@contextlib.contextmanager
def _model_transform_off(projection: torch.nn.Module):
    """The model of `projection` leaves its logits untransformed for the duration of the block (the fused head
    applies the transform itself)."""
    found = _TRANSFORMS.get(projection)
    model = found[0]() if found is not None else None
    if model is None:
        yield
        return
    holder, attr, _, neutral = found[2]
    target = model if holder == "model" else model.config
    before = getattr(target, attr)
    setattr(target, attr, neutral)
    try:
        yield
    finally:
        setattr(target, attr, before)


def _full(tensor):
    """A teacher parameter whole: a sharded one (FSDP) is gathered; it is frozen, so no gradient flows back."""
    return tensor.full_tensor() if tensor is not None and hasattr(tensor, "full_tensor") else tensor


def teacher_head(projection: torch.nn.Module, vocab_limit: int | None = None,
                 transform: LogitTransform | None | bool = False) -> TeacherHead:
    """A live teacher's output layer as the engine projects it: its weight and bias (gathered when sharded), their
    first `vocab_limit` rows, and its logit transform (by default the one output_projection recorded)."""
    keep = slice(None) if vocab_limit is None else slice(0, vocab_limit)
    bias = _full(projection.bias)
    return TeacherHead(_full(projection.weight)[keep], bias[keep] if bias is not None else None,
                       transform_of(projection) if transform is False else transform)


def student_head_losses(hidden, projection, kd_rows, labels, signals: Signals | None, terms: HeadTerms,
                        chunk: int = CHUNK_ROWS, vocab_limit: int | None = None,
                        transform: LogitTransform | None = None):
    """(combined loss, [soft-target sum, logit mse sum, cross-entropy sum]) of the student's output layer
    `projection` over the rows of `hidden` (N, H), against `signals` (one row per kd row, any form): the engine
    (distil.teacher_signal.engine) on the model's layer. vocab_limit: use only the first ids of the output layer.
    transform: the LogitTransform applied after projecting; by default the one output_projection recorded with
    `projection` (the model's own soft-capping / scaling, which projection_replaced switches off)."""
    if transform is None:
        transform = transform_of(projection)
    keep = slice(None) if vocab_limit is None else slice(0, vocab_limit)
    weight = projection.weight[keep]
    bias = projection.bias[keep] if projection.bias is not None else None
    return output_layer_losses(hidden, weight, bias, kd_rows, labels, signals, terms, chunk, transform)


def fused_head_losses(hidden, projection, teacher_hidden, teacher_projection, kd_rows, labels, terms: HeadTerms,
                      chunk: int = CHUNK_ROWS, vocab_limit: int | None = None, transforms: tuple | None = None):
    """(combined loss, [ce_sum, mse_sum, lm_sum]) over the rows of `hidden` (N, H), against a live teacher.

    projection / teacher_projection: the models' output Linear layers; teacher_hidden (N, H'): the states that
    enter the teacher's. kd_rows (N,) bool: rows for the soft-target and MSE terms. labels (N,): the target id of
    each row, -100 where none. vocab_limit: use only the first ids of both output layers (layers padded to
    different sizes beyond a shared tokenizer). transforms: (student's, teacher's) LogitTransform applied after
    projecting; by default those that output_projection recorded with the two projections (the models' own
    soft-capping / scaling).
    """
    if transforms is None:
        transforms = (transform_of(projection), transform_of(teacher_projection))
    signals = None
    if teacher_projection is not None and teacher_hidden is not None:
        signals = DenseSignals(states=teacher_hidden[kd_rows],
                               head=teacher_head(teacher_projection, vocab_limit, transforms[1]))
    return student_head_losses(hidden, projection, kd_rows, labels, signals, terms, chunk, vocab_limit,
                               transforms[0])


def _parent_and_name(model: torch.nn.Module, target: torch.nn.Module):
    for name, module in model.named_modules():
        if module is target and name:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr
    return None, None


def output_projection(model: torch.nn.Module):
    """The model's output Linear when the fused path can stand in for it, else None. A model that transforms its
    logits after the projection in a way distil knows (POST_PROCESSING) has the transform recorded with the
    projection, for fused_head_losses and projection_replaced; one it does not know gets None."""
    config = getattr(model, "config", None)
    transform = logit_transform(model)
    if transform is False:
        return None  # logits transformed after the projection in a way distil does not know: plain losses
    projection = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(projection, torch.nn.Linear):
        return None
    # Some heads report an inner hidden->hidden layer as their output embeddings (DeBERTa-v2 with legacy=False
    # projects with the word embeddings afterwards): only a layer onto the vocabulary can stand for the head.
    if config is None or projection.out_features != vocab_size_of(config):
        return None
    parent, _ = _parent_and_name(model, projection)
    if parent is None:
        return None
    if transform is None:
        _TRANSFORMS.pop(projection, None)
    else:
        _TRANSFORMS[projection] = (weakref.ref(model), transform, POST_PROCESSING[config.model_type])
    return projection


@contextlib.contextmanager
def projection_replaced(projection: torch.nn.Module, forward):
    """Run `forward(states)` where the model calls its output layer, for the duration of the block.

    The module stays where it is (only its forward is swapped on the instance), so wrappers that manage its
    parameters see nothing change: under FSDP the output layer's weight is gathered for the model's forward as
    usual, and the fused head, running inside that forward, reads the full weight and returns its gradient
    through autograd like any layer. The model's `logits` output is then whatever `forward` returns: the
    states themselves for the teacher, the fused loss for the student. A model that transforms its logits
    (soft-capping, scaling) has that switched off meanwhile: the fused head applies it to each chunk itself."""
    projection.forward = forward
    try:
        with _model_transform_off(projection):
            yield
    finally:
        del projection.forward
