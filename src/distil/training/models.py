"""The models a run trains with: teacher and student loaded, checked against each other and the data, and placed.

Each check turns a known trap into a message that says what to change, before hours of compute are spent.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from distil.checks import check_data_matches_tokenizer, check_vocabularies
from distil.config import TrainConfig
from distil.errors import DistilError
from distil.loading import load_config, load_model, load_tokenizer
from distil.model_kinds import auto_class, head_missing, learned_position_limit, resolve_objective
from distil.sentence_embeddings import resolve_pooling, teacher_pooling
from distil.training.attention_capture import check_attention_terms
from distil.training.fused_head import output_projection

log = logging.getLogger(__name__)


@dataclass
class Models:
    teacher: torch.nn.Module          # what the loop calls: the full LM, or its base when no logits are needed
    teacher_has_head: bool
    student: torch.nn.Module          # the full student (what gets saved)
    student_trained: torch.nn.Module  # what the loop calls and optimises: `student` or its base
    tokenizer: object
    init_record: dict | None          # distil_init.json of the student, when it was built from teacher layers
    original_dropout: dict            # config dropout values to restore when saving
    objective: str                    # mlm | clm | embedding, resolved from loss.objective and the teacher
    vocab_limit: int | None = None    # output layers padded differently: logit losses on the first vocab_limit ids
    sentence_pooling: object = None   # SentencePooling: of the sentence terms, or the teacher's own (a


def resolve_teacher_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    choice = config.teacher.dtype
    if choice == "auto":
        if device.type == "cpu":
            return torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.run.mixed_precision, torch.float32)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def load_models(config: TrainConfig, student_dir: str, device: torch.device) -> Models:
    """Load teacher and student, run the start-up checks, and place both on `device` (a run from a teacher-signal
    store loads with training.store_run.load_models_from_cache instead)."""
    loss = config.loss
    wants_logits = any(getattr(loss, k) > 0 for k in ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse"))
    wants_sentence = loss.alpha_sentence_mse > 0 or loss.alpha_sentence_cos > 0
    wants_teacher_logits = loss.alpha_ce > 0 or loss.alpha_mse > 0

    teacher_config = load_config(config.teacher.path)
    objective = resolve_objective(config, teacher_config)
    tokenizer = load_tokenizer(config.teacher.tokenizer or config.teacher.path)
    teacher_dtype = resolve_teacher_dtype(config, device)
    log.info("Loading teacher %s (%s)", config.teacher.path, teacher_dtype)
    teacher, info = load_model(config.teacher.path, auto_class(objective), dtype=teacher_dtype)
    # An embedding run loads the base model: no head is built, none is asked for.
    has_head = objective != "embedding" and not head_missing(info)
    if wants_teacher_logits and not has_head:
        encoder_hint = (" A sentence encoder (such as a sentence-transformers model) is distilled with "
                        "loss.objective=embedding: no LM head is built or saved, and the student is written as a "
                        "sentence-transformers model.") if objective == "mlm" else ""
        raise DistilError(
            f"The teacher {config.teacher.path} has no {'MLM' if objective == 'mlm' else 'LM'} head (its checkpoint holds "
            "only the encoder), so soft-target and logit losses would distil a random head. Set loss.alpha_ce and "
            "loss.alpha_mse to 0 and use hidden-state losses (loss.alpha_cos, loss.alpha_hidden_mse), or fit a head "
            f"first.{encoder_hint}"
        )
    if not has_head and not wants_logits and objective == "mlm":
        log.warning("The teacher %s has no MLM head and the recipe has no logit terms: the student is trained from "
                    "hidden states and saved with an MLM head that is never trained. For a sentence encoder, "
                    "loss.objective=embedding builds and saves no head and writes a sentence-transformers student.",
                    config.teacher.path)
    teacher.eval().requires_grad_(False)
    # Under FSDP the models are sharded on the host and only each process's shards go to the device.
    placement = torch.device("cpu") if config.run.fsdp else device
    teacher.to(placement)

    student_cfg = student_config(config, student_dir)
    original_dropout = override_dropout(student_cfg, config.run.dropout)
    student_path = Path(student_dir)
    if config.student.config:
        torch.manual_seed(config.run.seed)
        student = auto_class(objective).from_config(student_cfg)
    else:
        student, _ = load_model(student_dir, auto_class(objective), config=student_cfg, dtype=torch.float32)
    student.train()
    student.to(placement)

    init_record = None
    # A student from random weights has no teacher layers, whatever sits beside its config.
    record_path = student_path / "distil_init.json" if student_path.is_dir() and not config.student.config else None
    if record_path is not None and record_path.exists():
        init_record = json.loads(record_path.read_text(encoding="utf-8"))

    vocab_limit = check_vocabularies(teacher.config, student.config, tokenizer, config,
                                     None if config.student.config else student_dir)
    # An embedding student is always written as a sentence-transformers model: it pools as the recipe says (auto:
    # as the teacher's own config, else mean).
    sentence_pooling = resolve_pooling(loss, config.teacher.path) if wants_sentence or objective == "embedding" \
        else teacher_pooling(config.teacher.path)
    if wants_sentence:
        log.info("sentence embeddings: %s pooling%s, from %s", sentence_pooling.mode,
                 ", L2-normalised" if sentence_pooling.normalize else "", sentence_pooling.source)
    check_attention_terms(teacher, student, config.loss)
    check_data_matches_tokenizer(config.data.path, tokenizer, teacher.config)

    teacher_called = teacher if (wants_teacher_logits and has_head) else teacher.base_model
    student_trained = student if wants_logits else student.base_model
    return Models(teacher=teacher_called, teacher_has_head=has_head, student=student, student_trained=student_trained,
                  tokenizer=tokenizer, init_record=init_record, original_dropout=original_dropout, objective=objective,
                  vocab_limit=vocab_limit, sentence_pooling=sentence_pooling)


def student_config(config: TrainConfig, student_dir: str):
    if config.student.config:
        return load_config(config.student.config)
    return load_config(student_dir)


# A config attribute is a dropout probability when its name says so: BERT's hidden_dropout_prob, DistilBERT's
# dropout, Llama's attention_dropout, GPT-2's resid_pdrop / embd_pdrop / attn_pdrop, T5's dropout_rate.
DROPOUT_KEY = re.compile(r"dropout|pdrop")


def override_dropout(model_config, value: float | None) -> dict:
    """Set every dropout probability of `model_config` to `value`; returns the values it replaced (restored on
    save, so the student keeps its architecture's dropout). None leaves the config as it is."""
    original = {}
    if value is None:
        return original
    for key, current in list(model_config.to_dict().items()):
        # A config.json may write a probability as 0 or 1 (ints); None ("use the other one") and flags stay.
        if DROPOUT_KEY.search(key) and isinstance(current, (int, float)) and not isinstance(current, bool):
            original[key] = current
            setattr(model_config, key, float(value))
    if original:
        log.info("run.dropout=%g: student %s set (were %s)", value, ", ".join(original),
                 ", ".join(f"{k}={v}" for k, v in original.items()))
    else:
        log.warning("run.dropout=%g is not applied: the student config (%s) has no dropout setting, so its dropout, "
                    "if it has any, stays as built", value, getattr(model_config, "model_type", "") or "no model type")
    return original


def check_positions(models: Models, longest: int, config: TrainConfig) -> None:
    """Sequences longer than a model's position table fail inside the first forward; say so before it."""
    for who, model in (("teacher", models.teacher), ("student", models.student)):
        limit = learned_position_limit(model)
        if limit is not None and longest > limit:
            raise DistilError(
                f"The data in {config.data.path} holds sequences of up to {longest} tokens, but the {who} has "
                f"positions for {limit}. Set data.max_length={limit} (sequences are shortened inside their framing), "
                f"or prepare the data again with --max-length {limit}."
            )


def layer_pairs(config: TrainConfig, student_config, teacher_config, init_record: dict | None) -> list[tuple[int, int]]:
    """Pairs of hidden-state indices (0 = embeddings, i = output of layer i) compared by hidden losses."""
    n_s, n_t = int(student_config.num_hidden_layers), int(teacher_config.num_hidden_layers)
    choice = config.loss.hidden_layers
    if choice == "last":
        return [(n_s, n_t)]
    if choice == "mapped":
        if init_record and len(init_record.get("teacher_layers", [])) == n_s:
            sources = init_record["teacher_layers"]
        else:
            from distil.layer_copy import select_layers

            sources = select_layers(n_t, n_s)
        pairs = [(j + 1, t + 1) for j, t in enumerate(sources)]
        if pairs[-1] != (n_s, n_t):
            pairs.append((n_s, n_t))
        return pairs
    pairs = [(int(s), int(t)) for s, t in choice]
    for s, t in pairs:
        if s > n_s or t > n_t:
            raise DistilError(
                f"loss.hidden_layers pair [{s}, {t}] is out of range: the student has hidden states 0..{n_s} and the "
                f"teacher 0..{n_t} (0 is the embedding output)."
            )
    return pairs


def freeze_embeddings(student: torch.nn.Module, positions: bool, token_types: bool) -> list[str]:
    """Freeze position / token-type embeddings, as the seed's --freeze_pos_embs; returns the frozen names."""
    frozen = []
    for name, param in student.named_parameters():
        is_pos = name.endswith(("position_embeddings.weight", "wpe.weight"))
        is_type = name.endswith("token_type_embeddings.weight")
        if (positions and is_pos) or (token_types and is_type):
            param.requires_grad_(False)
            frozen.append(name)
    if positions and not any("position" in n or "wpe" in n for n in frozen):
        log.warning("run.freeze_position_embeddings is set but the student has no learned position embeddings "
                    "(rotary or sinusoidal positions); nothing frozen.")
    return frozen


def fused_projections(config: TrainConfig, models, spec) -> tuple | None:
    """(student projection, teacher projection or None) when the fused head can replace the output layers."""
    if not (config.run.fused_head and spec.needs_logits):
        return None
    s_proj = output_projection(models.student)
    teacher_head = spec.needs_teacher_logits and not config.teacher.cache  # a store holds the teacher's output
    t_proj = output_projection(models.teacher) if teacher_head else None
    if s_proj is None or (teacher_head and t_proj is None):
        log.info("The output layer is not a plain linear projection; using the unfused logit losses.")
        return None
    return s_proj, t_proj
