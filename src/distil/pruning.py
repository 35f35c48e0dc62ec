"""Minitron-style width pruning at init: keep the most active embedding channels, heads and FFN neurons.

Importance is measured on a calibration sample of prepared data, on the (layer-selected) model that is pruned.
Each score is a per-sequence mean over real (non-padding) tokens of a magnitude, aggregated over sequences by the
L2 norm:
  FFN neuron j of layer l     |input of the down projection|_j        (activation after the nonlinearity/gate)
  attention head h of layer l ||input of the output projection, head h's slice||_2  (the head's attention output)
  embedding channel c         sum over every hidden-size norm of the body of |norm output|_c
(Channels are scored on the norms' outputs, as Minitron does: that is what the following layers read, scale
included, whereas a pre-norm decoder's norm input is the raw residual stream.)
Every layer keeps the same number of heads and neurons (its own ones); the kept indices stay in their original
order. Ties are broken by index (the lower index wins), so the same calibration gives the same student.

Grouped-query attention keeps its ratio: a key/value head is kept with all the query heads that share it, groups
being ranked by the summed importance of their query heads. The head size never changes: BERT-style models need
hidden size = heads x teacher head size; Llama-style models record head_dim in the config.

Norms over fewer channels: a pruned LayerNorm takes its mean and variance (an RMSNorm its root mean square) over
the kept channels only, so even on the teacher's own input its output on a kept channel c is not the teacher's.
Per token, with mu, sigma over all channels and mu', sigma' over the kept ones,
  (x_c - mu) / sigma = a (x_c - mu') / sigma' + b,   a = sigma' / sigma,  b = (mu' - mu) / sigma
(RMSNorm: a = rms' / rms, b = 0). The norm that reads the embeddings (BERT-style: the embeddings' LayerNorm;
Llama-style: layer 0's input norm) sees in the student exactly the teacher's kept channels, so its a and b,
averaged over the real tokens of the calibration sample, are folded into its kept weight and bias:
gamma' = gamma a, beta' = beta + gamma b (`measure_norm_corrections`). This removes the systematic part of the
error (kept channels larger or smaller than the rest); the per-token spread of a and b remains: measured on tiny
models with half the channels kept, relative error of that norm's output 0.28 -> 0.15 (BERT) and 0.24 -> 0.05
(Llama) when the kept channels are 3x larger than the others, 0.218 -> 0.217 when all channels are alike. Deeper
norms read a stream that the removed heads, neurons and channels have already changed, so the same correction
has no exact footing there (measured: some states better, the logits up to 7% worse); they are left as sliced.
Keeping every channel changes nothing.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import numpy as np

from distil.errors import DistilError

# Llama-style decoders: model.layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, RMSNorms, head_dim in
# the config. (Qwen2's q/k/v biases follow their rows; Qwen3's per-head q/k norms are head-sized and stay whole.)
DECODERS = ("llama", "mistral", "qwen2", "qwen3")
_STANDARD_NAMES = ("hidden_size", "intermediate_size", "num_attention_heads")
# Hidden, FFN and head-count names of each supported student type (config attributes written on pruning).
_SIZE_NAMES = {"distilbert": ("dim", "hidden_dim", "n_heads"), "bert": _STANDARD_NAMES, "roberta": _STANDARD_NAMES,
               **{name: _STANDARD_NAMES for name in DECODERS}}


@dataclass(frozen=True)
class Layout:
    """Where a family keeps the weights that width pruning slices (module names, blocks relative to `blocks`)."""

    blocks: str
    query: tuple[str, ...]
    key_value: tuple[str, ...]
    attn_out: str
    ffn_in: tuple[str, ...]
    ffn_down: str
    block_norms: tuple[str, ...]
    outer_norms: tuple[str, ...]  # hidden-size norms outside the blocks that importance is summed over
    head_norms: tuple[str, ...]  # hidden-size norms of the LM head (sliced, not scored)
    channel_columns: tuple[str, ...]  # weights (rows, hidden): embeddings, decoders
    channel_square: tuple[str, ...]  # (hidden, hidden) transforms of the MLM head
    embedding_norm: str  # the hidden-size norm that reads the embeddings (its statistics are corrected)


def _encoder_layout(prefix: str, head: tuple[str, str, str]) -> Layout:
    dense, norm, decoder = head
    return Layout(
        blocks=f"{prefix}.encoder.layer", query=("attention.self.query",),
        key_value=("attention.self.key", "attention.self.value"), attn_out="attention.output.dense",
        ffn_in=("intermediate.dense",), ffn_down="output.dense",
        block_norms=("attention.output.LayerNorm", "output.LayerNorm"), outer_norms=(f"{prefix}.embeddings.LayerNorm",),
        head_norms=(norm,),
        channel_columns=tuple(f"{prefix}.embeddings.{e}_embeddings" for e in ("word", "position", "token_type"))
        + (decoder,),
        channel_square=(dense,), embedding_norm=f"{prefix}.embeddings.LayerNorm",
    )


_DECODER_LAYOUT = Layout(
    blocks="model.layers", query=("self_attn.q_proj",), key_value=("self_attn.k_proj", "self_attn.v_proj"),
    attn_out="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_down="mlp.down_proj",
    block_norms=("input_layernorm", "post_attention_layernorm"), outer_norms=("model.norm",), head_norms=(),
    channel_columns=("model.embed_tokens", "lm_head"), channel_square=(),
    embedding_norm="model.layers.0.input_layernorm",
)
LAYOUTS = {
    "distilbert": Layout(
        blocks="distilbert.transformer.layer", query=("attention.q_lin",), key_value=("attention.k_lin", "attention.v_lin"),
        attn_out="attention.out_lin", ffn_in=("ffn.lin1",), ffn_down="ffn.lin2",
        block_norms=("sa_layer_norm", "output_layer_norm"), outer_norms=("distilbert.embeddings.LayerNorm",),
        head_norms=("vocab_layer_norm",),
        channel_columns=("distilbert.embeddings.word_embeddings", "distilbert.embeddings.position_embeddings",
                         "vocab_projector"),
        channel_square=("vocab_transform",), embedding_norm="distilbert.embeddings.LayerNorm",
    ),
    "bert": _encoder_layout("bert", ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                                     "cls.predictions.decoder")),
    "roberta": _encoder_layout("roberta", ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder")),
    **{name: _DECODER_LAYOUT for name in DECODERS},
}


@dataclass(frozen=True)
class WidthSizes:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_key_value_heads: int
    head_dim: int


@dataclass
class Importance:
    channels: np.ndarray  # (hidden,)
    heads: list[np.ndarray]  # per layer, (num_heads,)
    neurons: list[np.ndarray]  # per layer, (intermediate,)
    sequences: int
    tokens: int


@dataclass
class WidthPlan:
    """Kept indices, each sorted ascending: channels, and per layer the kept key/value groups and neurons."""

    sizes: WidthSizes
    channels: list[int]
    kv_groups: list[list[int]]  # per layer; with group size 1 these are the kept heads
    neurons: list[list[int]]

    def heads(self, layer: int, group_size: int) -> list[int]:
        return [g * group_size + j for g in self.kv_groups[layer] for j in range(group_size)]


def layout_for(model) -> Layout:
    layout = LAYOUTS.get(model.config.model_type)
    names = dict(model.named_modules())
    if layout is None or f"{layout.blocks}.0.{layout.attn_out}" not in names:
        raise DistilError(
            f"Width pruning (--hidden-size, --intermediate-size, --num-heads) supports BERT/DistilBERT, RoBERTa and "
            f"Llama-style students, not {model.config.model_type} ({type(model).__name__}). Prune layers only "
            "(--layers / --num-layers), or use one of those architectures."
        )
    return layout


def teacher_sizes(config) -> WidthSizes:
    """The widths of a BERT, RoBERTa, DistilBERT or Llama-style config."""
    if config.model_type == "distilbert":
        hidden, ffn, heads = config.dim, config.hidden_dim, config.n_heads
    else:
        hidden, ffn, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return WidthSizes(hidden, ffn, heads, kv, head_dim)


def resolve_sizes(config, hidden_size: int | None, intermediate_size: int | None, num_heads: int | None) -> WidthSizes:
    """Check a width request against the teacher config; unset sizes keep the teacher's (BERT-style heads follow H)."""
    if config.model_type not in _SIZE_NAMES:
        raise DistilError(
            f"Width pruning supports BERT, RoBERTa and Llama-style teachers ({', '.join(DECODERS)}), not "
            f"{config.model_type}. "
            "Prune layers only (--layers / --num-layers)."
        )
    t = teacher_sizes(config)
    encoder = config.model_type not in DECODERS
    for flag, value, most in (("--hidden-size", hidden_size, t.hidden_size),
                              ("--intermediate-size", intermediate_size, t.intermediate_size),
                              ("--num-heads", num_heads, t.num_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
            raise DistilError(
                f"{flag} {value} is not possible: width pruning keeps a subset of the teacher's, which has {most}. "
                f"Give a whole number between 1 and {most}."
            )
    hidden = hidden_size or t.hidden_size
    ffn = intermediate_size or t.intermediate_size
    if num_heads is None:
        num_heads = hidden // t.head_dim if encoder and hidden % t.head_dim == 0 else t.num_heads
    if encoder:
        # BERT-style attention projects hidden -> hidden, so heads x head size must equal the hidden size.
        if hidden % num_heads:
            raise DistilError(
                f"The hidden size {hidden} is not divisible by {num_heads} attention heads. In BERT-style models the "
                f"heads split the hidden size; with the teacher's head size {t.head_dim}, use --num-heads "
                f"{max(1, hidden // t.head_dim)} with --hidden-size {max(1, hidden // t.head_dim) * t.head_dim}."
            )
        if hidden // num_heads != t.head_dim:
            fits = max(1, hidden // t.head_dim)
            raise DistilError(
                f"{num_heads} heads of a {hidden}-wide student would be {hidden // num_heads} wide, but pruning keeps "
                f"whole teacher heads of size {t.head_dim}, and BERT-style heads split the hidden size. Choose "
                f"--hidden-size = --num-heads x {t.head_dim} (e.g. --hidden-size {fits * t.head_dim} --num-heads "
                f"{fits}, or --hidden-size {num_heads * t.head_dim} --num-heads {num_heads})."
            )
    group = t.num_heads // t.num_key_value_heads
    if num_heads % group:
        raise DistilError(
            f"The teacher shares each key/value head among {group} query heads (grouped-query attention), and "
            f"pruning keeps whole groups: --num-heads must be a multiple of {group}, not {num_heads}."
        )
    if not encoder and hidden % num_heads:
        # The projections would not need it (head_dim is recorded), but transformers' Llama-family configs refuse
        # a hidden size that the query heads do not divide, so such a student could not be saved or loaded.
        below = hidden - hidden % num_heads
        sizes = [h for h in (below, below + num_heads) if 1 <= h <= t.hidden_size]
        heads = [n for n in range(group, t.num_heads + 1, group) if hidden % n == 0]
        raise DistilError(
            f"--hidden-size {hidden} is not a multiple of the student's {num_heads} attention heads, which "
            f"transformers' {config.model_type} configuration requires. Use --hidden-size "
            f"{' or '.join(map(str, sizes))}"
            + (f", or --num-heads {' or '.join(map(str, heads))} with --hidden-size {hidden}." if heads else ".")
        )
    return WidthSizes(hidden, ffn, num_heads, num_heads // group, t.head_dim)


def load_calibration(data_dir: str, num_sequences: int, vocab_size: int) -> tuple[list[np.ndarray], int]:
    """(sequences, padding id): `num_sequences` train sequences spread evenly over a prepared directory (all of
    them if it has fewer)."""
    from distil.data.dataset import TokenSequences, pad_id_of

    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
        raise DistilError(f"The calibration sample needs at least one sequence, got {num_sequences}.")
    data = TokenSequences(data_dir, "train")
    if data.manifest.get("vocab_size", 0) > vocab_size:
        raise DistilError(
            f"The calibration data {data_dir} was prepared with a tokenizer of {data.manifest['vocab_size']} tokens, "
            f"more than the teacher's {vocab_size}. Prepare it with the teacher's tokenizer."
        )
    n = min(num_sequences, len(data))
    picks = np.unique(np.linspace(0, len(data) - 1, n).round().astype(np.int64))
    return [data[int(i)] for i in picks], pad_id_of(data.manifest)


def measure_importance(model, sequences: list[np.ndarray], pad_id: int, batch_size: int = 16) -> Importance:
    """Activation importance of channels, heads and neurons of `model` on `sequences` (see the module doc)."""
    import torch

    layout = layout_for(model)
    modules = dict(model.named_modules())
    n_layers = len(modules[layout.blocks])
    sizes = teacher_sizes(model.config)
    squares = {"channels": torch.zeros(sizes.hidden_size, dtype=torch.float64),
               "heads": [torch.zeros(sizes.num_heads, dtype=torch.float64) for _ in range(n_layers)],
               "neurons": [torch.zeros(sizes.intermediate_size, dtype=torch.float64) for _ in range(n_layers)]}
    current = {}

    def per_sequence_mean(values):  # (B, S, K) -> (B, K), mean over real tokens
        mask = current["mask"].to(values.dtype).unsqueeze(-1)
        return (values * mask).sum(1) / mask.sum(1)

    def add_channels(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        current["channels"] += per_sequence_mean(out.detach().double().abs())

    def heads_hook(layer):
        def hook(module, args):
            ctx = args[0].detach().double()
            per_head = ctx.reshape(*ctx.shape[:2], sizes.num_heads, sizes.head_dim).norm(dim=-1)
            squares["heads"][layer] += per_sequence_mean(per_head).square().sum(0)
        return hook

    def neurons_hook(layer):
        def hook(module, args):
            squares["neurons"][layer] += per_sequence_mean(args[0].detach().double().abs()).square().sum(0)
        return hook

    handles = []
    norm_names = list(layout.outer_norms) + [f"{layout.blocks}.{i}.{n}" for i in range(n_layers) for n in layout.block_norms]
    for name in norm_names:
        handles.append(modules[name].register_forward_hook(add_channels))
    for i in range(n_layers):
        handles.append(modules[f"{layout.blocks}.{i}.{layout.attn_out}"].register_forward_pre_hook(heads_hook(i)))
        handles.append(modules[f"{layout.blocks}.{i}.{layout.ffn_down}"].register_forward_pre_hook(neurons_hook(i)))
    tokens = 0
    try:
        for ids, mask, run in calibration_batches(model, sequences, pad_id, batch_size):
            current["mask"] = mask
            # Channel scores of one sequence are summed over the norms before the L2 over sequences.
            current["channels"] = torch.zeros(len(ids), sizes.hidden_size, dtype=torch.float64)
            run()
            squares["channels"] += current["channels"].square().sum(0)
            tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return Importance(
        channels=squares["channels"].sqrt().numpy(), heads=[h.sqrt().numpy() for h in squares["heads"]],
        neurons=[n.sqrt().numpy() for n in squares["neurons"]], sequences=len(sequences), tokens=tokens,
    )


@dataclass(frozen=True)
class NormCorrection:
    """Calibration means of a = (spread over kept channels) / (spread over all) and b = (mean over kept - mean
    over all) / (spread over all) of a norm's input (see the module doc); b is 0 for RMSNorm."""

    scale: float
    shift: float


def _norm_kind(module) -> tuple[str, float]:
    """("layer", eps) for LayerNorm, ("rms", eps) for the RMSNorms of Llama-style models."""
    import torch

    if isinstance(module, torch.nn.LayerNorm):
        return "layer", float(module.eps)
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
    if eps is None:
        raise DistilError(f"Width pruning does not know the normalisation {type(module).__name__}. Prune layers only.")
    return "rms", float(eps)


def norm_statistics(x, kept, kind: str, eps: float):
    """Per-token (a, b) of the norm's input x (..., hidden) for the `kept` channel indices, in float64."""
    import torch

    x = x.double()
    part = x[..., kept]
    if kind == "rms":
        spread = (x.square().mean(-1) + eps).sqrt()
        return (part.square().mean(-1) + eps).sqrt() / spread, torch.zeros_like(spread)
    mean, kept_mean = x.mean(-1), part.mean(-1)
    spread = (x.var(-1, unbiased=False) + eps).sqrt()
    return (part.var(-1, unbiased=False) + eps).sqrt() / spread, (kept_mean - mean) / spread


def measure_norm_corrections(model, sequences: list[np.ndarray], pad_id: int, channels: list[int],
                             batch_size: int = 16) -> dict[str, NormCorrection]:
    """{name: correction} of the norm that reads the embeddings, for keeping `channels` (module doc), from the
    teacher's own inputs to it on the calibration sample; empty when every channel is kept."""
    import torch

    layout = layout_for(model)
    if list(channels) == list(range(teacher_sizes(model.config).hidden_size)):
        return {}
    norm = dict(model.named_modules())[layout.embedding_norm]
    kind, eps = _norm_kind(norm)
    kept = torch.as_tensor(channels)
    sums, current = torch.zeros(2, dtype=torch.float64), {}

    def record(_module, args):
        scale, shift = norm_statistics(args[0].detach(), kept, kind, eps)
        real = current["mask"].to(torch.float64)
        sums.add_(torch.stack([(scale * real).sum(), (shift * real).sum()]))

    handle = norm.register_forward_pre_hook(record)
    tokens = 0
    try:
        for _, mask, run in calibration_batches(model, sequences, pad_id, batch_size):
            current["mask"] = mask
            run()
            tokens += int(mask.sum())
    finally:
        handle.remove()
    return {layout.embedding_norm: NormCorrection(float(sums[0]) / tokens, float(sums[1]) / tokens)}


def calibration_batches(model, sequences: list, pad_id: int, batch_size: int):
    """(ids, mask, run) per batch of the calibration sequences: run() feeds the batch through the model's base,
    without gradients, so that the caller's hooks see it once the caller has set up what they read."""
    import torch

    from distil.data.dataset import pad_batch

    extra = {"use_cache": False} if model.config.model_type in DECODERS else {}
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[start : start + batch_size], pad_id)
        yield ids, mask, torch.no_grad()(lambda ids=ids, mask=mask: model.base_model(input_ids=ids, attention_mask=mask,
                                                                                     **extra))


def top_indices(scores: np.ndarray, keep: int) -> list[int]:
    """The `keep` highest scores' indices in ascending index order; equal scores prefer the lower index."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return sorted(int(i) for i in order[:keep])


def plan_from_importance(importance: Importance, sizes: WidthSizes, teacher: WidthSizes) -> WidthPlan:
    group = teacher.num_heads // teacher.num_key_value_heads
    return WidthPlan(
        sizes=sizes,
        channels=top_indices(importance.channels, sizes.hidden_size),
        kv_groups=[top_indices(h.reshape(-1, group).sum(1), sizes.num_key_value_heads) for h in importance.heads],
        neurons=[top_indices(n, sizes.intermediate_size) for n in importance.neurons],
    )


def pruned_config(config, sizes: WidthSizes):
    cfg = copy.deepcopy(config)
    hidden, ffn, heads = _SIZE_NAMES[config.model_type]
    setattr(cfg, hidden, sizes.hidden_size)
    setattr(cfg, ffn, sizes.intermediate_size)
    setattr(cfg, heads, sizes.num_heads)
    if config.model_type in DECODERS:
        cfg.num_key_value_heads = sizes.num_key_value_heads
        cfg.head_dim = sizes.head_dim  # no longer hidden / heads in general
    return cfg


def prune_width(model, plan: WidthPlan, norm_corrections: dict[str, NormCorrection] | None = None):
    """A new model of `model`'s class holding only the kept channels, heads and neurons of its weights; with
    `norm_corrections` (measure_norm_corrections), each named norm's kept scale and bias corrected."""
    import torch

    layout = layout_for(model)
    teacher = teacher_sizes(model.config)
    group = teacher.num_heads // teacher.num_key_value_heads
    d = teacher.head_dim
    n_layers = len(plan.neurons)
    channel = torch.tensor(plan.channels)

    def expand(units: list[int]) -> torch.Tensor:
        return torch.tensor([u * d + j for u in units for j in range(d)])

    # module name -> (row index, column index); None keeps that dimension whole.
    rules: dict[str, tuple] = {}
    for name in layout.channel_columns:
        rules[name] = (None, channel)
    for name in layout.channel_square:
        rules[name] = (channel, channel)
    for name in layout.outer_norms + layout.head_norms:
        rules[name] = (channel, None)
    for i in range(n_layers):
        block = f"{layout.blocks}.{i}."
        heads = expand(plan.heads(i, group))
        kv = expand(plan.kv_groups[i]) if group > 1 else heads
        neurons = torch.tensor(plan.neurons[i])
        rules.update({block + n: (heads, channel) for n in layout.query})
        rules.update({block + n: (kv, channel) for n in layout.key_value})
        rules[block + layout.attn_out] = (channel, heads)
        rules.update({block + n: (neurons, channel) for n in layout.ffn_in})
        rules[block + layout.ffn_down] = (channel, neurons)
        rules.update({block + n: (channel, None) for n in layout.block_norms})

    student = type(model)(pruned_config(model.config, plan.sizes)).to(next(model.parameters()).dtype)
    expected = student.state_dict()
    target = {}
    param = re.compile(r"^(.*)\.(weight|bias)$")
    for key, tensor in model.state_dict().items():
        m = param.match(key)
        rule = rules.get(m.group(1)) if m else None
        if rule is not None:
            rows, cols = rule  # a bias follows its weight's rows (a decoder's, per vocabulary entry, stays whole)
            if rows is not None:
                tensor = tensor[rows]
            if cols is not None and tensor.dim() == 2:
                tensor = tensor[:, cols]
        if key in expected and expected[key].shape != tensor.shape:
            raise DistilError(
                f"Width pruning does not know how to slice {key} ({tuple(tensor.shape)} -> "
                f"{tuple(expected[key].shape)}) in this {model.config.model_type} model. Prune layers only."
            )
        target[key] = tensor.contiguous()
    for name, correction in (norm_corrections or {}).items():
        # gamma' = gamma a, beta' = beta + gamma b (module doc); the bias uses the uncorrected kept scale.
        weight = target[f"{name}.weight"]
        if f"{name}.bias" in target:
            target[f"{name}.bias"] = target[f"{name}.bias"] + weight * correction.shift
        target[f"{name}.weight"] = weight * correction.scale
    student.load_state_dict(target, strict=True)
    return student.eval()


def width_prune(model, calibration_data: str, calibration_sequences: int, sizes: WidthSizes) -> tuple[object, dict]:
    """Measure importance on the calibration sample, keep the top units, return (pruned model, record)."""
    teacher = teacher_sizes(model.config)
    sequences, pad_id = load_calibration(calibration_data, calibration_sequences, model.config.vocab_size)
    importance = measure_importance(model, sequences, pad_id)
    plan = plan_from_importance(importance, sizes, teacher)
    corrections = measure_norm_corrections(model, sequences, pad_id, plan.channels)
    student = prune_width(model, plan, corrections)
    group = teacher.num_heads // teacher.num_key_value_heads
    record = {
        "hidden_size": {"teacher": teacher.hidden_size, "student": sizes.hidden_size},
        "intermediate_size": {"teacher": teacher.intermediate_size, "student": sizes.intermediate_size},
        "num_heads": {"teacher": teacher.num_heads, "student": sizes.num_heads},
        "num_key_value_heads": {"teacher": teacher.num_key_value_heads, "student": sizes.num_key_value_heads},
        "head_dim": sizes.head_dim,
        "kept_channels": plan.channels,
        "kept_heads_per_layer": [plan.heads(i, group) for i in range(len(plan.neurons))],
        "kept_neurons_per_layer": [len(n) for n in plan.neurons],
        "calibration": {"data": str(calibration_data), "sequences": importance.sequences, "tokens": importance.tokens},
        "importance": "per-sequence mean over tokens of |activation| (heads: L2 norm of the head's attention output), "
                      "L2 over sequences; channels summed over the hidden-size norms' outputs",
        "norm_corrections": {name: {"scale": c.scale, "shift": c.shift} for name, c in corrections.items()},
    }
    return student, record
