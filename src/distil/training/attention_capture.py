"""What the relation and attention-map terms see of a model's self-attention, captured with forward hooks.

No model code is forked: hooks on the query / key / value projection modules record their outputs (before the
attention softmax and its dropout, and before rotary embedding on decoders, which is applied after the
projection). Known layouts:

  BERT, RoBERTa, ELECTRA   attention.self.{query, key, value}
  DistilBERT               attention.{q_lin, k_lin, v_lin}
  Llama, Mistral, Qwen2..  self_attn.{q_proj, k_proj, v_proj}  (grouped-query: K and V are narrower than Q)
  GPT-2                    attn.c_attn (Q, K and V side by side in one projection)

Layers are 1-based block numbers, as hidden_states indices: layer i is block i.

Relations use the projections as they are. Attention maps are rebuilt from the captured Q and K as the model
scores them, S = Q K^T * scale (the module's own `scaling`), per head: rotary embedding applied with the
(cos, sin) the block hands its attention module, and each key/value head repeated for the query heads of its
group. They are never read from the attention module's returned probabilities: `transformers` returns those
after attention dropout, so in training mode a student identical to its teacher would be scored as far from it,
and the fused sdpa / flash kernels return none at all. The scores work with any attention implementation.
Attention variants whose scores are not Q K^T * scale of the projections (per-head q/k norms, logit
soft-capping) are refused at start-up; a sliding window is refused when a batch is longer than it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from distil.errors import DistilError

SEPARATE_PROJECTIONS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))
FUSED_PROJECTION = "c_attn"
# Attention-module attributes that change the scores after the Q / K projections in ways the maps do not rebuild.
UNSUPPORTED_SCORE_PARTS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


@dataclass
class ScoreInputs:
    """What one layer's attention scores are built from, captured before the softmax and its dropout."""

    heads: int
    kv_heads: int
    scaling: float | None           # None: 1 / sqrt(head size)
    sliding_window: int | None
    query: torch.Tensor | None = None   # (B, L, heads x head size) projection output
    key: torch.Tensor | None = None     # (B, L, kv_heads x head size)
    rotary: tuple | None = None         # (cos, sin), each (B, L, head size), when the layer rotates Q and K


@dataclass
class Captured:
    """Per 1-based layer: the (query, key, value) projection outputs (B, L, W) of relation layers, and what the
    attention scores of map layers are built from (`scores(layer)`)."""

    qkv: dict[int, list] = field(default_factory=dict)
    score_inputs: dict[int, ScoreInputs] = field(default_factory=dict)

    def scores(self, layer: int) -> torch.Tensor:
        return attention_scores(self.score_inputs[layer])


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


def key_value_head_count(model_config) -> int:
    return int(getattr(model_config, "num_key_value_heads", None) or head_count(model_config))


def check_scores_rebuildable(model: torch.nn.Module) -> None:
    """DistilError unless every layer's attention scores are Q K^T * scale of its projections (see module doc)."""
    config = model.config
    for module in attention_modules(model):
        extra = [name for name in UNSUPPORTED_SCORE_PARTS if getattr(module, name, None) is not None]
        if getattr(config, "attn_logit_softcapping", None) is not None:
            extra.append("attention logit soft-capping")
        if extra:
            raise DistilError(
                f"The attention-map loss rebuilds each layer's attention scores from its query and key projections, "
                f"but this {config.model_type} model changes them after the projections ({', '.join(extra)}), which "
                "distil does not rebuild. Use loss.alpha_relation (self-attention relations of the projections) "
                "instead, or set loss.alpha_attention to 0."
            )


def _score_inputs(model: torch.nn.Module, module: torch.nn.Module) -> ScoreInputs:
    config = model.config
    window = getattr(module, "sliding_window") if hasattr(module, "sliding_window") \
        else getattr(config, "sliding_window", None)
    return ScoreInputs(heads=head_count(config), kv_heads=key_value_head_count(config),
                       scaling=getattr(module, "scaling", None), sliding_window=window)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_scores(inputs: ScoreInputs) -> torch.Tensor:
    """Pre-softmax attention scores (B, heads, L, L) in float32, unmasked: per head Q K^T * scale after rotary
    embedding (when the layer has one), each key head repeated for the query heads of its group."""
    batch, length, width = inputs.query.shape
    if inputs.sliding_window is not None and length > inputs.sliding_window:
        raise DistilError(
            f"A batch of {length} positions is longer than the model's sliding attention window "
            f"({inputs.sliding_window}), which the attention-map loss does not rebuild. Use sequences of at most "
            f"{inputs.sliding_window} tokens (prepare --max-length), or loss.alpha_relation instead."
        )
    head_size = width // inputs.heads
    query = inputs.query.float().view(batch, length, inputs.heads, head_size).transpose(1, 2)
    key = inputs.key.float().view(batch, length, inputs.kv_heads, head_size).transpose(1, 2)
    if inputs.rotary is not None:
        cos, sin = (t.float().unsqueeze(1) for t in inputs.rotary)
        if cos.shape[-1] != head_size:
            raise DistilError(
                f"This model rotates {cos.shape[-1]} of each head's {head_size} dimensions (partial rotary "
                "embedding), which the attention-map loss does not rebuild. Use loss.alpha_relation instead."
            )
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
    if inputs.kv_heads != inputs.heads:
        key = key.repeat_interleave(inputs.heads // inputs.kv_heads, dim=1)
    scaling = inputs.scaling if inputs.scaling is not None else head_size ** -0.5
    return query @ key.transpose(-1, -2) * scaling


@contextlib.contextmanager
def captured_attention(model: torch.nn.Module, relation_layers: set[int], map_layers: set[int]):
    """Within the block, forwards of `model` record Q/K/V of `relation_layers` and the score inputs of
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
            attention = modules[layer - 1]
            inputs = captured.score_inputs[layer] = _score_inputs(model, attention)
            projections = _projections(attention)
            if isinstance(projections, tuple):
                handles.append(projections[0].register_forward_hook(_store_attribute(inputs, "query")))
                handles.append(projections[1].register_forward_hook(_store_attribute(inputs, "key")))
            else:
                handles.append(projections.register_forward_hook(_store_fused_query_key(inputs)))
            handles.append(attention.register_forward_pre_hook(_store_rotary(inputs), with_kwargs=True))
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


def _store_attribute(inputs: ScoreInputs, name: str):
    def hook(_module, _args, output):
        setattr(inputs, name, output)
    return hook


def _store_fused_query_key(inputs: ScoreInputs):
    def hook(_module, _args, output):
        inputs.query, inputs.key, _ = output.chunk(3, dim=-1)
    return hook


def _store_rotary(inputs: ScoreInputs):
    """The (cos, sin) a Llama-style block passes its attention module; None for models without rotary."""
    def hook(_module, _args, kwargs):
        inputs.rotary = kwargs.get("position_embeddings")
    return hook


# MiniLMv2 (Wang et al. 2021) distils the last layer of base-size (12-layer) teachers and an upper-middle layer of
# large (24-layer) ones: layer 21 of 24 for BERT-large and RoBERTa-large. Deeper teachers keep that proportion.
LARGE_TEACHER_LAYERS = 24
LARGE_TEACHER_RELATION_LAYER = 21


def default_relation_layers(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """MiniLMv2's choice: the student's last layer against the teacher's last layer, or, for a teacher of 24 or
    more layers, against its layer round(21/24 x n) (21 of 24). The student's depth does not enter."""
    teacher_layer = n_teacher
    if n_teacher >= LARGE_TEACHER_LAYERS:
        teacher_layer = round(LARGE_TEACHER_RELATION_LAYER * n_teacher / LARGE_TEACHER_LAYERS)
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
        check_scores_rebuildable(student), check_scores_rebuildable(teacher)
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
