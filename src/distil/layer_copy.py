"""A student's layers copied from its teacher: which teacher layers (`select_layers`, `resolve_layers`) and the
copy itself. A BERT teacher gives a DistilBERT student, with the seed's weight renaming
(`bert_to_distilbert`). Any other teacher (and BERT with architecture="same") gives a student of its own
architecture with fewer layers (`same_architecture_student`): the config is shrunk, the model is built from it
(so per-layer attributes such as Llama's `layer_idx` are right for the new positions) and the teacher's state
dict is loaded with block index i_teacher renamed to i_student. Either way, a student made from all teacher layers
computes exactly what the teacher does.
"""

from __future__ import annotations

import copy
import logging
import math
import re

from distil.errors import DistilError

logger = logging.getLogger(__name__)

DISTILBERT_LAYER_NORM_EPS = 1e-12  # DistilBERT's modules hard-code this epsilon

# BERT encoder layer -> DistilBERT transformer block, parameter prefixes (weight and bias follow).
_BERT_TO_DISTILBERT_BLOCK = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}

_BERT_TO_DISTILBERT_HEAD = {
    "cls.predictions.transform.dense.weight": "vocab_transform.weight",
    "cls.predictions.transform.dense.bias": "vocab_transform.bias",
    "cls.predictions.transform.LayerNorm.weight": "vocab_layer_norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "vocab_layer_norm.bias",
    "cls.predictions.decoder.weight": "vocab_projector.weight",
    # The decoder's own bias is what BERT's forward adds; cls.predictions.bias is the same tensor only while
    # transformers ties the two (it does not when tie_word_embeddings is false).
    "cls.predictions.decoder.bias": "vocab_projector.bias",
}

# Config lists that happen to have one entry per token or id, never per layer.
_NOT_PER_LAYER = re.compile(r"(^architectures$|token_ids?$|_ids$|tokens$)")


def select_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """Spread `num_layers` over the teacher's layers, keeping the first and the last (12 -> 6: 0,2,4,7,9,11).

    A one-layer student keeps layer 0: it is the only layer trained on embedding outputs.
    """
    if num_teacher_layers < 1:
        raise DistilError(
            f"The teacher reports {num_teacher_layers} layers; a student needs a teacher with at least one."
        )
    if not 1 <= num_layers <= num_teacher_layers:
        raise DistilError(
            f"Cannot build a student with {num_layers} layers from a teacher with {num_teacher_layers}. "
            f"Choose --num-layers between 1 and {num_teacher_layers}."
        )
    if num_layers == 1:
        return [0]
    return [round(i * (num_teacher_layers - 1) / (num_layers - 1)) for i in range(num_layers)]


def resolve_layers(num_teacher_layers: int, layers: list[int] | None, num_layers: int | None) -> list[int]:
    """Check an explicit layer list, or spread `num_layers` (default: half the teacher's, rounded up)."""
    if layers is not None and num_layers is not None:
        raise DistilError("Give either a layer list (--layers) or a layer count (--num-layers), not both.")
    if layers is None:
        if num_layers is None:
            num_layers = math.ceil(num_teacher_layers / 2)
        return select_layers(num_teacher_layers, num_layers)
    layers = list(layers)
    if not layers:
        raise DistilError(
            "The layer list is empty: a student needs at least one layer. "
            "Give teacher layer indices such as --layers 0,2,4,7,9,11, or use --num-layers."
        )
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_teacher_layers]
    if bad:
        example = _as_flag(select_layers(num_teacher_layers, math.ceil(num_teacher_layers / 2)))
        raise DistilError(
            f"Layer indices {bad} are out of range: the teacher has {num_teacher_layers} layers, numbered 0 to "
            f"{num_teacher_layers - 1}. Give indices in that range, e.g. {example}."
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise DistilError(
            f"The layer list {layers} is not strictly increasing. Give each teacher layer once, in order "
            f"(e.g. {_as_flag(sorted(set(layers)))}): the student keeps the teacher's layer order."
        )
    return layers


def _as_flag(layers: list[int]) -> str:
    return "--layers " + ",".join(map(str, layers))


def bert_to_distilbert(teacher, layers: list[int], with_head: bool = True):
    """A DistilBertForMaskedLM holding the BERT teacher's embeddings, chosen layers and MLM head; without the head
    (`with_head` False), a DistilBertModel, from a BertForMaskedLM or a bare BertModel teacher."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertModel

    cfg = teacher.config
    if with_head and not (hasattr(teacher, "cls") and hasattr(teacher, "bert")):
        raise DistilError(
            f"The BERT teacher was loaded as {type(teacher).__name__}, not BertForMaskedLM. Use --architecture same."
        )
    eps = getattr(cfg, "layer_norm_eps", DISTILBERT_LAYER_NORM_EPS)
    if eps != DISTILBERT_LAYER_NORM_EPS:
        logger.warning(
            "The teacher's layer_norm_eps is %g but DistilBERT hard-codes %g, so the student's layer norms differ "
            "slightly from the teacher's. Use --architecture same for an exact copy.", eps, DISTILBERT_LAYER_NORM_EPS,
        )
    student_cfg = DistilBertConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=len(layers),
        n_heads=cfg.num_attention_heads,
        dim=cfg.hidden_size,
        hidden_dim=cfg.intermediate_size,
        dropout=cfg.hidden_dropout_prob,
        attention_dropout=cfg.attention_probs_dropout_prob,
        activation=cfg.hidden_act,
        initializer_range=cfg.initializer_range,
        pad_token_id=cfg.pad_token_id,
        # A head tied to the embeddings stays tied; an untied one keeps its own copied weight.
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
    )
    # The encoder's weights by their BertModel names (a BertForMaskedLM keeps them under `bert.`).
    source = getattr(teacher, "bert", teacher).state_dict()
    dtype = source["embeddings.word_embeddings.weight"].dtype
    student_cfg.dtype = dtype
    used = set()

    def take(key: str):
        used.add(key)
        return source[key]

    body = "distilbert." if with_head else ""  # DistilBertForMaskedLM keeps its DistilBertModel there
    target = {}
    emb = "embeddings."
    target[f"{body}embeddings.word_embeddings.weight"] = take(emb + "word_embeddings.weight")
    # DistilBERT has no token-type embeddings. Dropping BERT's (as the seed did) shifts every input vector by
    # token_type_embeddings[0] and changes the outputs. Every position of a single-segment input (all token type
    # ids 0, which is how MLM distillation feeds the teacher) adds that same row, so adding it to each position
    # embedding is exact there.
    target[f"{body}embeddings.position_embeddings.weight"] = (
        take(emb + "position_embeddings.weight") + take(emb + "token_type_embeddings.weight")[0]
    )
    for name in ("LayerNorm.weight", "LayerNorm.bias"):
        target[f"{body}embeddings.{name}"] = take(emb + name)
    for student_idx, teacher_idx in enumerate(layers):
        for bert_name, distil_name in _BERT_TO_DISTILBERT_BLOCK.items():
            for kind in ("weight", "bias"):
                target[f"{body}transformer.layer.{student_idx}.{distil_name}.{kind}"] = take(
                    f"encoder.layer.{teacher_idx}.{bert_name}.{kind}"
                )
    if with_head:
        head = teacher.state_dict()
        for bert_key, distil_key in _BERT_TO_DISTILBERT_HEAD.items():
            target[distil_key] = head[bert_key]

    layer_key = re.compile(r"^encoder\.layer\.(\d+)\.")

    def left_out_on_purpose(key: str) -> bool:
        m = layer_key.match(key)
        return key.startswith("pooler.") or (m is not None and int(m.group(1)) not in layers)

    unmapped = [k for k in source if k not in used and not left_out_on_purpose(k)]
    if unmapped:
        raise DistilError(
            f"This BERT teacher has weights DistilBERT has no place for ({', '.join(unmapped[:4])}). "
            "Use --architecture same to keep the teacher's own architecture."
        )
    student = (DistilBertForMaskedLM if with_head else DistilBertModel)(student_cfg).to(dtype)
    _load_exact(student, target)
    return student.eval()


def find_layer_list(model) -> tuple[str, int]:
    """Name and length of the model's block list: an nn.ModuleList with one entry per hidden layer."""
    from torch import nn

    n = model.config.num_hidden_layers
    candidates = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and any(True for _ in module.parameters())
    ]
    # A list nested inside another candidate (e.g. experts inside a block) is not the block list.
    outer = [c for c in candidates if not any(c != o and c.startswith(o + ".") for o in candidates)]
    if len(outer) != 1:
        found = ", ".join(outer) if outer else "none"
        raise DistilError(
            f"Could not find this {model.config.model_type} model's layers: expected exactly one indexed list of "
            f"{n} blocks (found: {found}). Encoder-decoder models and models that share or group layers are not "
            "supported; use a BERT/RoBERTa-style encoder or a GPT/Llama-style decoder."
        )
    return outer[0], n


def shrink_config(config, layers: list[int]):
    """A copy of `config` with only `layers`, per-layer lists (e.g. layer_types) sliced to match."""
    n = config.num_hidden_layers
    student_cfg = copy.deepcopy(config)
    sliced = []
    for name, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == n and not _NOT_PER_LAYER.search(name):
            setattr(student_cfg, name, type(value)(value[i] for i in layers))
            sliced.append(name)
    student_cfg.num_hidden_layers = len(layers)  # attribute maps send this to n_layer, n_layers, ...
    if getattr(student_cfg, "quantization_config", None) is not None:
        # A teacher loaded from GGUF (or another quantized checkpoint) records it in its config; the student holds
        # plain float weights, and with the record kept save_pretrained would refuse to write it.
        del student_cfg.quantization_config
        logger.info("The student holds unquantized weights: the teacher's quantization_config is not copied.")
    if getattr(config, "is_heterogeneous", False):
        # Sparse per-layer overrides are keyed by layer index: keep the chosen layers' under their new index.
        overrides = {int(k): v for k, v in (config.to_dict().get("per_layer_config") or {}).items()}
        student_cfg.per_layer_config = None
        student_cfg.per_layer_config = {s: overrides[t] for s, t in enumerate(layers) if t in overrides}
        sliced.append("per_layer_config")
    if sliced:
        logger.info("Kept the chosen layers' entries of the per-layer config lists %s", ", ".join(sliced))
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        logger.warning(
            "The teacher scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx), so a copied "
            "layer that moves to a new position computes differently in the student."
        )
    return student_cfg


def same_architecture_student(teacher, layers: list[int]):
    """A model of the teacher's own class with only `layers`, built from its config and loaded strictly."""
    list_name, _ = find_layer_list(teacher)
    student_cfg = shrink_config(teacher.config, layers)
    source = teacher.state_dict()
    dtype = next(teacher.parameters()).dtype
    block = re.compile(rf"^{re.escape(list_name)}\.(\d+)\.(.*)$")
    new_index = {t: s for s, t in enumerate(layers)}
    target = {}
    for key, tensor in source.items():
        m = block.match(key)
        if m is None:
            target[key] = tensor
        elif int(m.group(1)) in new_index:
            target[f"{list_name}.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor
    try:
        student = type(teacher)(student_cfg).to(dtype)
    except (ValueError, TypeError) as exc:
        raise DistilError(
            f"Could not build a {len(layers)}-layer {teacher.config.model_type} from the teacher's config: {exc} "
            "Choose layers this architecture allows, or another teacher."
        ) from None
    _load_exact(student, target)
    return student.eval()


def _load_exact(student, state: dict) -> None:
    """Load every student weight from `state`; a missing or surplus key means the layouts do not match."""
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DistilError(
            f"The teacher's weights do not fit the {type(student).__name__} student: {str(exc).splitlines()[0]} "
            "This architecture's layers are not independent copies (e.g. layer-dependent shapes); choose another "
            "teacher or architecture."
        ) from None
