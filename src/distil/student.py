"""Building a smaller student from chosen teacher layers (`distil init-student`).

A BERT teacher gives a DistilBERT student, with the seed's weight renaming. Any other teacher (and BERT
with architecture="same") gives a student of its own architecture with fewer layers: the config is
shrunk, the model is built from it (so per-layer attributes such as Llama's `layer_idx` are right for
the new positions) and the teacher's state dict is loaded with block index i_teacher renamed to
i_student. Either way, a student made from all teacher layers computes exactly what the teacher does.
For a sentence-embedding student (objective="embedding") the base model is built instead (DistilBertModel,
BertModel, ...): the teacher's LM head, when it has one, is left behind, and none is made up when it has not.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from pathlib import Path

from distil.errors import DistilError
from distil.loading import load_config, load_model, load_tokenizer
from distil.disk_space import disk_space_errors, tensor_bytes
from distil.outputs import atomic_output_dir, check_output_dir, write_json_atomic

logger = logging.getLogger(__name__)

ARCHITECTURES = ("auto", "distilbert", "same")
OBJECTIVES = ("auto", "embedding")  # auto: the teacher's LM class with its head; embedding: the base model
INIT_FILE = "distil_init.json"
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


def init_student(
    teacher: str,
    output_dir: str,
    layers: list[int] | None,
    num_layers: int | None,
    architecture: str = "auto",
    overwrite: bool = False,
    tokenizer: str | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    calibration_data: str | None = None,
    calibration_sequences: int = 256,
    transplant_vocabulary: bool = False,
    objective: str = "auto",
) -> dict:
    """Write a student built from teacher layers to `output_dir` and return a summary of what was made.

    The student gets the teacher's tokenizer, or `tokenizer` (a directory or hub id) for a teacher saved without one.
    `hidden_size`, `intermediate_size` and `num_heads` prune the width too (distil.pruning), ranking channels, heads
    and neurons by their activations on `calibration_sequences` sequences of the prepared `calibration_data`.
    `transplant_vocabulary` gives the student `tokenizer`'s own vocabulary (distil.cross_tokenizer.transplant).
    `objective` "embedding" builds the base model with no LM head (the student of a sentence encoder)."""
    start = time.perf_counter()
    if architecture not in ARCHITECTURES:
        raise DistilError(f"Unknown student architecture {architecture!r}. Choose one of {', '.join(ARCHITECTURES)}.")
    if objective not in OBJECTIVES:
        raise DistilError(f"Unknown student objective {objective!r}. Choose auto (the teacher's language model, with "
                          "its head) or embedding (the base model of a sentence encoder, no head).")
    base = objective == "embedding"
    config = load_config(teacher)
    num_teacher_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_teacher_layers, int):
        raise DistilError(
            f"The teacher config ({config.model_type}) has no num_hidden_layers, so its layers cannot be chosen. "
            "Use a transformer whose config gives its layer count (BERT, RoBERTa, GPT-2, Llama, ...)."
        )
    arch = _resolve_architecture(config, architecture)
    chosen = resolve_layers(num_teacher_layers, layers, num_layers)
    width = _resolve_width(config, hidden_size, intermediate_size, num_heads, calibration_data)
    if base and width is not None:
        raise DistilError(
            "Width pruning (--hidden-size, --intermediate-size, --num-heads) works on the language-model classes, not "
            "on the base model that --objective embedding builds. Leave out --objective embedding: a run with "
            "loss.objective: embedding and this student as student.path loads its base model only, and saves no head."
        )
    _refuse_output_over_teacher(teacher, output_dir)  # first: its message says more than check_output_dir's
    check_output_dir(output_dir, overwrite)  # fail before the slow load; atomic_output_dir checks again
    if transplant_vocabulary:  # the student takes `tokenizer`'s own vocabulary; the teacher's splits its tokens
        teacher_tokenizer, tokenizer = _transplant_tokenizers(teacher, tokenizer, calibration_data if width else None)
    else:
        tokenizer = _student_tokenizer(teacher, config, tokenizer, output_dir, calibration_data if width else None)

    if base:
        from transformers import AutoModel

        from distil.model_kinds import check_embedding_teacher

        check_embedding_teacher(config, teacher)
    auto_class = AutoModel if base else _auto_class_for(config)
    logger.info("Loading teacher %s as %s", teacher, auto_class.__name__)
    model, info = load_model(teacher, auto_class, config=config)  # reusing the config skips a second GGUF parse
    model.eval()
    had_head = _check_teacher_weights(model, info, teacher, base)

    if arch == "distilbert":
        student = bert_to_distilbert(model, chosen, with_head=not base)
    else:
        student = same_architecture_student(model, chosen)
    pruning_record = None
    if width is not None:
        from distil.pruning import width_prune

        logger.info("Measuring activation importance on %s for width pruning", calibration_data)
        student, pruning_record = width_prune(student, calibration_data, calibration_sequences, width)
    transplant_record = None
    if transplant_vocabulary:
        from distil.cross_tokenizer.transplant import transplant_vocabulary as transplant

        transplant_record = transplant(student, teacher_tokenizer, tokenizer)

    meta = {
        "teacher": teacher,
        "teacher_model_type": config.model_type,
        "teacher_num_layers": num_teacher_layers,
        "teacher_layers": chosen,
        "architecture": arch,
        "teacher_had_lm_head": had_head,
    }
    if base:
        meta["objective"] = objective  # a run's student-init is reused only for the same kind of student
    if pruning_record is not None:
        meta["width_pruning"] = pruning_record
    if transplant_record is not None:
        meta["vocabulary_transplant"] = transplant_record
    with atomic_output_dir(output_dir, overwrite, command="init-student") as tmp, \
            disk_space_errors(tmp, lambda: tensor_bytes(student.state_dict()), partial=tmp):
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(Path(tmp) / INIT_FILE, meta)

    teacher_params, student_params = _count_params(model), _count_params(student)
    seconds = time.perf_counter() - start
    summary = {
        "teacher": teacher,
        "layers": chosen,
        "architecture": arch,
        "student_model_type": student.config.model_type,
        "params": {"teacher": teacher_params, "student": student_params},
        "teacher_had_lm_head": had_head,
        "width": None if width is None else {"hidden_size": width.hidden_size, "intermediate_size": width.intermediate_size,
                                             "num_heads": width.num_heads, "num_key_value_heads": width.num_key_value_heads},
        "output_dir": str(output_dir),
        "seconds": round(seconds, 2),
        "vocabulary_transplant": transplant_record,
    }
    print(
        f"Student written to {output_dir}: {student.config.model_type} with {len(chosen)} of {num_teacher_layers} "
        f"teacher layers {chosen}{_width_note(width)}; parameters {teacher_params / 1e6:.2f}M -> {student_params / 1e6:.2f}M "
        f"({student_params / teacher_params:.0%}); {seconds:.1f}s."
        + ("" if transplant_record is None else
           f" Vocabulary of {tokenizer.name_or_path}: {transplant_record['tokens_exact']} of "
           f"{transplant_record['vocab_size']} tokens exact, {transplant_record['tokens_composed']} composed from the "
           f"teacher's pieces, {transplant_record['tokens_fallback']} from the mean embedding.")
    )
    return summary


def _width_note(width) -> str:
    if width is None:
        return ""
    return (f", width pruned to hidden {width.hidden_size}, {width.num_heads} heads "
            f"({width.num_key_value_heads} key/value), FFN {width.intermediate_size}")


def _resolve_width(config, hidden_size, intermediate_size, num_heads, calibration_data):
    """The checked width request (distil.pruning.WidthSizes), or None when only layers are chosen."""
    if hidden_size is None and intermediate_size is None and num_heads is None:
        if calibration_data is not None:
            raise DistilError(
                "Calibration data (--calibration-data) is only used for width pruning, and no width was asked for. "
                "Add --hidden-size, --intermediate-size and/or --num-heads, or leave out --calibration-data."
            )
        return None
    from distil.pruning import resolve_sizes

    sizes = resolve_sizes(config, hidden_size, intermediate_size, num_heads)
    if calibration_data is None:
        raise DistilError(
            "Width pruning (--hidden-size, --intermediate-size, --num-heads) ranks channels, heads and neurons by "
            "their activations, so it needs calibration text. Give --calibration-data DIR, a directory written by "
            "`distil prepare` with the teacher's tokenizer."
        )
    from distil.data.shards import read_manifest

    read_manifest(calibration_data)  # fail before the slow load
    return sizes


def _resolve_architecture(config, architecture: str) -> str:
    is_bert = config.model_type == "bert"
    if architecture == "distilbert" and not is_bert:
        raise DistilError(
            f"A DistilBERT student can only be built from a BERT teacher, and this teacher is {config.model_type}. "
            "Use --architecture same (or auto) for a student of the teacher's own architecture with fewer layers."
        )
    if architecture == "same" or not is_bert:
        return "same"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise DistilError(
            "This BERT teacher is configured as a decoder (is_decoder or add_cross_attention), which DistilBERT "
            "cannot represent. Use --architecture same."
        )
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise DistilError(
            f"This BERT teacher uses {config.position_embedding_type} position embeddings; DistilBERT only has "
            "absolute ones. Use --architecture same."
        )
    return "distilbert"


def _refuse_output_over_teacher(teacher: str, output_dir: str) -> None:
    """--overwrite replaces the output directory, which must not hold the teacher being read."""
    teacher_path = Path(teacher).expanduser()
    if not teacher_path.exists():
        return
    out = Path(output_dir).expanduser().resolve()
    src = teacher_path.resolve()
    if src == out or out in src.parents:
        raise DistilError(
            f"The output directory {output_dir} holds the teacher {teacher}; writing the student there would "
            "replace the teacher. Choose another output directory."
        )


def _auto_class_for(config):
    """Masked LM for encoder-only families (BERT is in both mappings), causal LM for decoders."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    if not getattr(config, "is_decoder", False) and type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return AutoModelForMaskedLM
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    raise DistilError(
        f"The teacher's architecture ({config.model_type}) has neither a masked-LM nor a causal-LM model in "
        "transformers, so distil cannot build a language-model student from it. Use a BERT/RoBERTa-style "
        "encoder or a GPT/Llama-style decoder."
    )


def _check_teacher_weights(model, info: dict, teacher: str, base: bool = False) -> bool:
    """Warn about weights the checkpoint lacked; return whether it had its LM head (`base`: the teacher was loaded
    as its base model, and a head in its checkpoint is left behind)."""
    missing = sorted(info.get("missing_keys") or [])
    if base:
        # A checkpoint of the LM class (BertForMaskedLM) has no pooler: no student computes with it (DistilBERT has
        # none, sentence embeddings pool the last hidden states), so only the encoder's own weights matter.
        body_missing = [k for k in missing if not k.startswith("pooler.")]
        if body_missing:
            logger.warning(
                "The teacher checkpoint %s lacks %d encoder weights (e.g. %s); they are random, so the student copies "
                "random weights there. Check that the checkpoint matches its config.json.",
                teacher, len(body_missing), ", ".join(body_missing[:3]),
            )
        from distil.model_kinds import is_head_weight

        return any(is_head_weight(key) for key in info.get("unexpected_keys") or [])
    prefix = f"{model.base_model_prefix}."
    head_missing = [k for k in missing if not k.startswith(prefix)]
    body_missing = [k for k in missing if k.startswith(prefix)]
    if body_missing:
        logger.warning(
            "The teacher checkpoint %s lacks %d body weights (e.g. %s); they are random, so the student copies "
            "random weights there. Check that the checkpoint matches its config.json.",
            teacher, len(body_missing), ", ".join(body_missing[:3]),
        )
    if head_missing:
        logger.warning(
            "The teacher %s has no LM head in its checkpoint (missing %s): the student's LM head is freshly "
            "initialised (a decoder tied to the word embeddings stays tied to the copied embeddings). The teacher's "
            "logits are random too, so logit distillation needs a teacher with a trained head; with this teacher "
            "use hidden-state losses.",
            teacher, ", ".join(head_missing),
        )
    return not head_missing


def _student_tokenizer(teacher: str, config, tokenizer: str | None, output_dir: str, calibration_data: str | None):
    """The tokenizer to save with the student, checked as train checks it: its ids are the teacher's (and so are
    those of the calibration data, when width pruning reads it)."""
    from distil.checks import check_data_matches_any, check_student_tokenizer

    teacher_tokenizer = _try_load_tokenizer(teacher, output_dir, warn=tokenizer is None)
    given = load_tokenizer(tokenizer) if tokenizer else None
    if given is not None:
        check_student_tokenizer(given, teacher_tokenizer, config, tokenizer, teacher)
    if calibration_data is not None:
        known = [t for t in (teacher_tokenizer, given) if t is not None]
        if not known:
            raise DistilError(
                f"The teacher {teacher} has no tokenizer, so nothing tells whether the calibration data "
                f"{calibration_data} holds its token ids. Give the teacher's tokenizer with --tokenizer NAME_OR_DIR."
            )
        check_data_matches_any(calibration_data, known)
    return given if given is not None else teacher_tokenizer


def _transplant_tokenizers(teacher: str, tokenizer: str | None, calibration_data: str | None = None):
    """(the teacher's tokenizer, the new one) for a vocabulary transplant: the teacher's splits the new tokens."""
    if not tokenizer:
        raise DistilError(
            "--transplant-vocabulary gives the student another tokenizer's vocabulary, and none was named. Add "
            "--tokenizer NAME_OR_DIR (the student's tokenizer), or leave out --transplant-vocabulary."
        )
    try:
        teacher_tokenizer = load_tokenizer(teacher)
    except DistilError:
        raise DistilError(
            f"The teacher {teacher} has no tokenizer, and a vocabulary transplant needs it to split each new token into "
            "teacher tokens. Save the teacher's tokenizer with the teacher (save_pretrained) and run again."
        ) from None
    if calibration_data is not None:  # width pruning runs the teacher: the data must hold its ids
        from distil.checks import check_data_matches_any

        check_data_matches_any(calibration_data, [teacher_tokenizer])
    return teacher_tokenizer, load_tokenizer(tokenizer)


def _try_load_tokenizer(teacher: str, output_dir: str, warn: bool = True):
    """The teacher's tokenizer, or None (with a warning that says what to do) when the teacher ships none."""
    try:
        return load_tokenizer(teacher)
    except DistilError:
        if warn:
            logger.warning(
                "The teacher %s has no tokenizer, so the student in %s gets none: distil prepare, train and evaluate "
                "will need one named explicitly (--tokenizer, teacher.tokenizer). Run init-student again with "
                "--tokenizer NAME_OR_DIR (the teacher's tokenizer) to save it with the student.", teacher, output_dir
            )
        return None


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


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
