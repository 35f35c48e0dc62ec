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

from distil.checks import check_cross_tokenizer_run, check_data_matches_tokenizer, check_vocabularies
from distil.config import TrainConfig
from distil.cross_tokenizer import CROSS_VOCABULARY_DIVERGENCES
from distil.errors import DistilError
from distil.loading import load_config, load_model, vocab_size_of
from distil.model_kinds import auto_class, learned_position_limit, resolve_objective
from distil.sentence_embeddings import resolve_pooling, teacher_pooling
from distil.training.attention_capture import check_attention_terms
from distil.training.fused_head import output_projection
from distil.training.sources.setup import hidden_teacher_index, load_teachers, teacher_configs, teacher_entries

log = logging.getLogger(__name__)


@dataclass
class Models:
    teachers: list                    # training.sources.setup.LoadedTeacher: each a model (called) or a store
    teacher_config: object            # the configuration of the teacher the hidden-state terms compare with
    student: torch.nn.Module          # the full student (what gets saved)
    student_trained: torch.nn.Module  # what the loop calls and optimises: `student` or its base
    tokenizer: object
    init_record: dict | None          # distil_init.json of the student, when it was built from teacher layers
    original_dropout: dict            # config dropout values to restore when saving
    objective: str                    # mlm | clm | embedding, resolved from loss.objective and the teacher
    vocab_limit: int | None = None    # output layers padded differently: logit losses on the first vocab_limit ids
    sentence_pooling: object = None   # SentencePooling: of the sentence terms, or the teacher's own (a

    @property
    def teacher_models(self) -> list[torch.nn.Module]:
        """The teacher models run in process (none when every teacher is a store)."""
        return [t.model for t in self.teachers if t.model is not None]


def resolve_teacher_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    choice = config.teacher.dtype
    if choice == "auto":
        if device.type == "cpu":
            return torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.run.mixed_precision, torch.float32)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def load_models(config: TrainConfig, student_dir: str, device: torch.device) -> Models:
    """Load the teachers (models or stores, training.sources.setup) and the student, run the start-up checks, and
    place both on `device`."""
    loss = config.loss
    wants_logits = any(getattr(loss, k) > 0 for k in ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse"))
    wants_sentence = loss.alpha_sentence_mse > 0 or loss.alpha_sentence_cos > 0
    wants_teacher_logits = loss.alpha_ce > 0 or loss.alpha_mse > 0

    hidden = hidden_teacher_index(config, teacher_entries(config))
    objective = resolve_objective(config, teacher_configs(config)[hidden])
    # Under FSDP the models are sharded on the host and only each process's shards go to the device.
    placement = torch.device("cpu") if config.run.fsdp else device
    teachers = load_teachers(config, objective, wants_teacher_logits, placement,
                             resolve_teacher_dtype(config, device))
    reference = teachers[hidden]
    teacher_source_dir = reference.entry.path or str(reference.store.teacher_dir)
    tokenizer = reference.tokenizer

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

    if loss.divergence in CROSS_VOCABULARY_DIVERGENCES:
        # A teacher of another tokenizer (training.sources.cross_tokenizer): the data, the logit terms and the
        # saved student are the student's own tokenizer's.
        tokenizer = check_cross_tokenizer_run(config, objective, tokenizer, student_dir)
        vocab_limit = len(tokenizer) if len(tokenizer) < vocab_size_of(student.config) else None
    else:
        vocab_limit = check_vocabularies(reference.config, student.config, tokenizer, config,
                                         None if config.student.config else student_dir)
        stored_vocab = min((int(t.store.manifest["vocab_size"]) for t in teachers if t.store is not None), default=None)
        if vocab_limit is None and stored_vocab is not None and stored_vocab < vocab_size_of(student.config):
            vocab_limit = stored_vocab  # the teacher's padding rows were left out when caching
    # An embedding student is always written as a sentence-transformers model: it pools as the recipe says (auto:
    # as the teacher's own config, else mean).
    sentence_pooling = resolve_pooling(loss, teacher_source_dir) if wants_sentence or objective == "embedding" \
        else teacher_pooling(teacher_source_dir)
    if wants_sentence:
        log.info("sentence embeddings: %s pooling%s, from %s", sentence_pooling.mode,
                 ", L2-normalised" if sentence_pooling.normalize else "", sentence_pooling.source)
    if reference.model is not None:
        check_attention_terms(reference.model, student, config.loss)
    check_data_matches_tokenizer(config.data.path, tokenizer, reference.config)

    student_trained = student if wants_logits else student.base_model
    return Models(teachers=teachers, teacher_config=reference.config, student=student,
                  student_trained=student_trained, tokenizer=tokenizer, init_record=init_record,
                  original_dropout=original_dropout, objective=objective, vocab_limit=vocab_limit,
                  sentence_pooling=sentence_pooling)


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


def too_short_for(models: Models, longest: int) -> tuple[str, int] | None:
    """(teacher or student, its position count) of the first model whose learned position table is shorter than
    `longest` tokens, or None when every model takes them."""
    for who, model in [("teacher", t) for t in models.teacher_models] + [("student", models.student)]:
        limit = learned_position_limit(model)
        if limit is not None and longest > limit:
            return who, limit
    return None


def check_positions(models: Models, longest: int, config: TrainConfig) -> None:
    """Sequences longer than a model's position table fail inside the first forward; say so before it."""
    if (short := too_short_for(models, longest)) is not None:
        who, limit = short
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


def student_projection(config: TrainConfig, models, spec) -> torch.nn.Module | None:
    """The student's output layer when the output-layer engine can stand in for it (run.fused_head), else None."""
    if not (config.run.fused_head and spec.needs_logits):
        return None
    if spec.divergence in CROSS_VOCABULARY_DIVERGENCES:
        log.info("loss.divergence=%s compares two vocabularies, which the output-layer engine's closed forms do not: "
                 "the student's logits are built whole (the plain path) despite run.fused_head.", spec.divergence)
        return None
    projection = output_projection(models.student)
    if projection is None:
        log.info("The student's output layer is not a plain linear projection; using the unfused logit losses.")
    return projection
