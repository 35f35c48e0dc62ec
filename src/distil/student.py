"""`distil init-student`: a smaller student from chosen teacher layers (copied by distil.layer_copy: a BERT
teacher gives a DistilBERT student, any other teacher a student of its own architecture), optionally pruned in
width (distil.pruning) or given another tokenizer's vocabulary (distil.cross_tokenizer.transplant), checked as
train checks it and written as a save_pretrained directory.
For a sentence-embedding student (objective="embedding") the base model is built instead (DistilBertModel,
BertModel, ...): the teacher's LM head, when it has one, is left behind, and none is made up when it has not.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from distil.errors import DistilError
from distil.layer_copy import bert_to_distilbert, resolve_layers, same_architecture_student
from distil.loading import load_config, load_model, load_tokenizer
from distil.disk_space import disk_space_errors, tensor_bytes
from distil.outputs import atomic_output_dir, check_output_dir, locks_output, write_json_atomic

logger = logging.getLogger(__name__)

ARCHITECTURES = ("auto", "distilbert", "same")
OBJECTIVES = ("auto", "embedding")  # auto: the teacher's LM class with its head; embedding: the base model
INIT_FILE = "distil_init.json"


@locks_output("init-student")
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


