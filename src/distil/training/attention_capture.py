"""What the relation and attention-map terms see of a model's self-attention, captured with forward hooks.

No model code is forked: hooks on the query / key / value projection modules record their outputs (before the
attention softmax, and before rotary embedding on decoders, which is applied after the projection), and a hook
on the self-attention module records the attention probabilities it returns. Known layouts:

  BERT, RoBERTa, ELECTRA   attention.self.{query, key, value}
  DistilBERT               attention.{q_lin, k_lin, v_lin}
  Llama, Mistral, Qwen2..  self_attn.{q_proj, k_proj, v_proj}  (grouped-query: K and V are narrower than Q)
  GPT-2                    attn.c_attn (Q, K and V side by side in one projection)

Layers are 1-based block numbers, as hidden_states indices: layer i is block i.

`transformers` returns attention probabilities only from its eager attention: the fused sdpa / flash kernels
never form the (L x L) matrix and return None. Runs with attention-map terms therefore switch both models to
eager attention (`use_eager_attention`); relation terms need no probabilities and keep the fast kernels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from distil.errors import DistilError

SEPARATE_PROJECTIONS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))
FUSED_PROJECTION = "c_attn"


@dataclass
class Captured:
    """Per 1-based layer: the (query, key, value) projection outputs (B, L, W) and the attention maps (B, H, L, L)."""

    qkv: dict[int, list] = field(default_factory=dict)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)


def _projections(module: torch.nn.Module):
    """(q, k, v) modules, or the fused QKV module, of a self-attention module; None if it is none we know."""
    if getattr(module, "is_cross_attention", False) or "Cross" in type(module).__name__:
        return None
    for names in SEPARATE_PROJECTIONS:
        found = [getattr(module, n, None) for n in names]
        if all(isinstance(m, torch.nn.Module) for m in found):
            return tuple(found)
    fused = getattr(module, FUSED_PROJECTION, None)
    return fused if isinstance(fused, torch.nn.Module) else None


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of each block, in order (index i - 1 for layer i); DistilError when unknown."""
    found = [m for m in model.modules() if _projections(m) is not None]
    n_layers = int(model.config.num_hidden_layers)
    if len(found) != n_layers:
        raise DistilError(
            f"Relation and attention-map losses need the query/key/value projections of each layer, but distil does "
            f"not know where a {model.config.model_type} model keeps them (found {len(found)} for {n_layers} layers). "
            "They work for BERT/RoBERTa, DistilBERT, GPT-2 and Llama-style models; set loss.alpha_relation and "
            "loss.alpha_attention to 0 for this one."
        )
    return found


def projection_widths(attention: torch.nn.Module) -> tuple[int, int]:
    """(query width, key/value width) of a self-attention module: the widths relation heads must divide."""
    projections = _projections(attention)
    if isinstance(projections, tuple):
        q, k, _ = (getattr(m, "out_features", None) or m.weight.shape[0] for m in projections)
        return int(q), int(k)
    fused = getattr(projections, "nf", None) or projections.weight.shape[-1]
    return int(fused) // 3, int(fused) // 3


def head_count(model_config) -> int:
    return int(model_config.num_attention_heads)


def use_eager_attention(model: torch.nn.Module) -> None:
    """Switch a model to eager attention, the only implementation that returns attention probabilities."""
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")


@contextlib.contextmanager
def captured_attention(model: torch.nn.Module, relation_layers: set[int], map_layers: set[int]):
    """Within the block, forwards of `model` record Q/K/V of `relation_layers` and attention maps of
    `map_layers` into the yielded Captured (the latest forward's values)."""
    captured = Captured()
    handles = []
    if relation_layers or map_layers:
        modules = attention_modules(model)
        for layer in sorted(relation_layers):
            projections = _projections(modules[layer - 1])
            if isinstance(projections, tuple):
                slots = [None, None, None]
                captured.qkv[layer] = slots
                for index, module in enumerate(projections):
                    handles.append(module.register_forward_hook(_store_output(slots, index)))
            else:
                handles.append(projections.register_forward_hook(_store_fused(captured.qkv, layer)))
        for layer in sorted(map_layers):
            handles.append(modules[layer - 1].register_forward_hook(_store_map(captured.maps, layer)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _store_output(slots: list, index: int):
    def hook(_module, _args, output):
        slots[index] = output
    return hook


def _store_fused(qkv: dict, layer: int):
    def hook(_module, _args, output):
        qkv[layer] = list(output.chunk(3, dim=-1))
    return hook


def _store_map(maps: dict, layer: int):
    def hook(module, _args, output):
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if probs is None:
            raise DistilError(
                f"The attention-map loss needs attention probabilities, but {type(module).__name__} returned none: "
                "fused attention kernels (sdpa, flash) never form them. Load the models with "
                "attn_implementation='eager' (distil train does this when loss.alpha_attention > 0), or use "
                "loss.alpha_relation instead."
            )
        maps[layer] = probs
    return hook


def default_relation_layers(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """The student's last layer against the teacher's last layer; against the upper-middle teacher layer
    round(0.75 * n_teacher) when the teacher is at least twice as deep (MiniLMv2 distils an upper-middle layer
    of deep teachers, whose last layers are specialised to the pre-training task)."""
    teacher_layer = round(0.75 * n_teacher) if n_teacher >= 2 * n_student else n_teacher
    return [(n_student, teacher_layer)]


def recipe_pairs(choice) -> list[tuple[int, int]] | None:
    """loss.relation_layers / loss.attention_layers as given ([s, t] or [[s, t], ...]) as a list of pairs."""
    if choice is None:
        return None
    if len(choice) == 2 and all(isinstance(i, int) for i in choice):
        return [(int(choice[0]), int(choice[1]))]
    return [(int(s), int(t)) for s, t in choice]


def check_layers_in_range(pairs, n_student: int, n_teacher: int, key: str) -> None:
    for s, t in pairs:
        if not (1 <= s <= n_student and 1 <= t <= n_teacher):
            raise DistilError(
                f"{key} pair [{s}, {t}] is out of range: the student has layers 1..{n_student} and the teacher "
                f"1..{n_teacher} (layer i is block i; 0, the embeddings, has no attention)."
            )


def check_relation_heads(heads: int, student: torch.nn.Module, teacher: torch.nn.Module,
                         pairs: list[tuple[int, int]]) -> None:
    """Relation heads split the concatenated Q and K/V of both models: `heads` must divide every width."""
    s_modules, t_modules = attention_modules(student), attention_modules(teacher)
    for s, t in pairs:
        for who, module in (("student", s_modules[s - 1]), ("teacher", t_modules[t - 1])):
            q_width, kv_width = projection_widths(module)
            if q_width % heads or kv_width % heads:
                raise DistilError(
                    f"loss.relation_heads={heads} does not divide the {who}'s query width {q_width} and key/value "
                    f"width {kv_width} (grouped-query attention makes K and V narrower than Q): each relation head "
                    "takes an equal slice of the concatenated heads. Set loss.relation_heads to a common divisor of "
                    "the query and key/value widths of both models (e.g. the student's key/value head count)."
                )


def check_attention_settings(student: torch.nn.Module, teacher: torch.nn.Module,
                             relation_pairs: list[tuple[int, int]] | None, relation_heads: int | None,
                             attention_pairs: list[tuple[int, int]] | None, wants_maps: bool) -> None:
    """DistilError unless the relation term (when `relation_pairs`) and the attention-map term (when `wants_maps`;
    `attention_pairs` None: not yet known) can be computed for these two models."""
    n_s, n_t = int(student.config.num_hidden_layers), int(teacher.config.num_hidden_layers)
    if relation_pairs is not None:
        check_layers_in_range(relation_pairs, n_s, n_t, "loss.relation_layers")
        check_relation_heads(relation_heads or head_count(teacher.config), student, teacher, relation_pairs)
    if wants_maps:
        attention_modules(student), attention_modules(teacher)
        if attention_pairs is not None and not attention_pairs:
            raise DistilError("The attention-map loss has no layer pairs: loss.hidden_layers maps only the embeddings "
                              "(layer 0), which have no attention. Set loss.attention_layers to "
                              "[[student_layer, teacher_layer], ...] with layers counted from 1.")
        if attention_pairs is not None:
            check_layers_in_range(attention_pairs, n_s, n_t, "loss.attention_layers")
        s_heads, t_heads = head_count(student.config), head_count(teacher.config)
        if s_heads != t_heads:
            raise DistilError(
                f"The attention-map loss (loss.alpha_attention) compares attention heads one to one, but the student "
                f"has {s_heads} heads and the teacher {t_heads}. Use a student with the teacher's head count, or "
                "distil self-attention relations instead (loss.alpha_relation), which re-split the heads and work "
                "across head counts and widths."
            )


def check_attention_terms(teacher: torch.nn.Module, student: torch.nn.Module, loss) -> None:
    """Start-up check of a recipe's relation and attention-map terms (`loss`: its LossConfig)."""
    n_s, n_t = int(student.config.num_hidden_layers), int(teacher.config.num_hidden_layers)
    relations = None
    if loss.alpha_relation > 0:
        relations = recipe_pairs(loss.relation_layers) or default_relation_layers(n_s, n_t)
    check_attention_settings(student, teacher, relations, loss.relation_heads, recipe_pairs(loss.attention_layers),
                             loss.alpha_attention > 0)


def check_attention_terms_of_spec(spec, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """The same check on a resolved TermSpec."""
    check_attention_settings(student, teacher, spec.relation_pairs if spec.needs_relations else None,
                             spec.relation_heads, spec.attention_pairs, spec.needs_attention_maps)
