"""The one place a recipe's teachers become a source: `teacher:` (one model or one store, as always) or `teachers:`
(several, each a model or a store with a weight and optionally its own temperature), loaded and checked before the
run starts (`load_teachers`), then assembled into the source the objective reads (`source_from_config`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from distil.errors import DistilError
from distil.loading import load_config, load_model, load_tokenizer, vocab_size_of
from distil.model_kinds import auto_class, head_missing
from distil.teacher_cache import format as fmt
from distil.teacher_cache.reader import TeacherStore
from distil.training.fused_head import output_projection
from distil.cross_tokenizer import CROSS_VOCABULARY_DIVERGENCES
from distil.training.sources.cross_tokenizer import CrossTokenizerStore, CrossTokenizerTeacher
from distil.training.sources.live import LiveTeacher
from distil.training.sources.mixture import TeacherMixture
from distil.training.sources.store import StoreTeacher
from distil.training.store_run import check_store_masking, check_store_matches_data, check_store_terms

log = logging.getLogger(__name__)


@dataclass
class TeacherEntry:
    """One teacher of the recipe."""

    name: str
    path: str | None = None          # a model (hub id or directory)
    cache: str | None = None         # a teacher-signal store (with path: the model it was written with)
    weight: float = 1.0
    temperature: float | None = None  # None: loss.temperature


@dataclass
class LoadedTeacher:
    """A teacher as loaded: its configuration and tokenizer, and its model (called) or its store."""

    entry: TeacherEntry
    config: object
    tokenizer: object
    model: torch.nn.Module | None = None
    store: TeacherStore | None = None
    has_head: bool = True


def teacher_entries(config) -> list[TeacherEntry]:
    """The recipe's teachers: `teachers:` in order, or the single `teacher:`."""
    if not config.teachers:
        return [TeacherEntry(name="teacher", path=config.teacher.path or None, cache=config.teacher.cache)]
    return [TeacherEntry(name=str(e.get("name", i)), path=e.get("path"), cache=e.get("cache"),
                         weight=float(e.get("weight", 1.0)),
                         temperature=float(e["temperature"]) if e.get("temperature") is not None else None)
            for i, e in enumerate(config.teachers)]


def hidden_teacher_index(config, entries: list[TeacherEntry]) -> int:
    """The teacher the hidden-state and self-attention terms compare with (loss.hidden_teacher), refused when the
    recipe has several teachers and such terms without naming one."""
    choice = config.loss.hidden_teacher
    names = [e.name for e in entries]
    if choice is None:
        loss = config.loss
        wants = any(getattr(loss, f"alpha_{t}") > 0 for t in ("cos", "hidden_mse", "sentence_mse", "sentence_cos",
                                                               "relation", "attention"))
        if len(entries) > 1 and wants:
            raise DistilError(f"The recipe has {len(entries)} teachers ({', '.join(names)}) and hidden-state or "
                              "self-attention terms, which compare the student with one teacher. Name it: "
                              f"loss.hidden_teacher={names[0]} (a name or an index from 0).")
        return 0
    if str(choice) in names:
        return names.index(str(choice))
    if isinstance(choice, int) and not isinstance(choice, bool) and 0 <= choice < len(entries):
        return choice
    raise DistilError(f"loss.hidden_teacher={choice!r} names no teacher of the recipe; its teachers are "
                      f"{', '.join(names)} (by name, or by index from 0).")


def _teacher_config(entry: TeacherEntry):
    if not entry.cache:
        return load_config(entry.path)
    store_dir = str(TeacherStore(entry.cache).teacher_dir)
    config = load_config(store_dir)
    if entry.path:
        given = load_config(entry.path)
        manifest = fmt.read_store_manifest(entry.cache)
        if fmt.config_hash(given) != manifest["teacher"]["config_hash"]:
            raise DistilError(
                f"teacher.path {entry.path} is not the teacher the store {entry.cache} was written with "
                f"({manifest.get('teacher_path')}): their configurations differ. Unset teacher.path (the store "
                "holds the teacher's config and tokenizer) or use the store of this teacher.")
        config = given
    return config


def teacher_configs(config) -> list:
    """Each teacher's model configuration, in the recipe's order (no weights loaded)."""
    return [_teacher_config(e) for e in teacher_entries(config)]


def _check_same_vocabulary(teachers: list[LoadedTeacher]) -> None:
    first = teachers[0]
    for other in teachers[1:]:
        same = vocab_size_of(other.config) == vocab_size_of(first.config) and \
            other.tokenizer.get_vocab() == first.tokenizer.get_vocab()
        if not same:
            raise DistilError(
                f"The teachers {first.entry.name} and {other.entry.name} have different vocabularies "
                f"({vocab_size_of(first.config)} and {vocab_size_of(other.config)} entries, or other tokens): their "
                "distributions are mixed id by id, so they need the same tokenizer. Use teachers that share one, or "
                "distil across tokenizers (distil.cross_tokenizer) one teacher at a time.")


def load_teachers(config, objective: str, wants_teacher_logits: bool, placement: torch.device,
                  dtype: torch.dtype) -> list[LoadedTeacher]:
    """Every teacher of the recipe: a model loaded (frozen, on `placement`) or a store opened; refused with what
    to change when one has no head where logits are needed, or when their vocabularies differ."""
    teachers = []
    for entry, teacher_config in zip(teacher_entries(config), teacher_configs(config)):
        if entry.cache:
            if config.run.fsdp:
                raise DistilError("A teacher-signal store with FSDP is not supported yet (there is no teacher to "
                                  "shard): train with DDP (torchrun / accelerate launch without --use_fsdp).")
            store = TeacherStore(entry.cache)
            tokenizer = load_tokenizer(config.teacher.tokenizer or entry.path or str(store.teacher_dir))
            teachers.append(LoadedTeacher(entry, teacher_config, tokenizer, store=store))
            continue
        tokenizer = load_tokenizer(config.teacher.tokenizer or entry.path)
        log.info("Loading teacher %s (%s)", entry.path, dtype)
        model, info = load_model(entry.path, auto_class(objective), dtype=dtype)
        # An embedding run loads the base model: no head is built, none is asked for.
        has_head = objective != "embedding" and not head_missing(info)
        if wants_teacher_logits and not has_head:
            encoder_hint = (" A sentence encoder (such as a sentence-transformers model) is distilled with "
                            "loss.objective=embedding: no LM head is built or saved, and the student is written as a "
                            "sentence-transformers model.") if objective == "mlm" else ""
            raise DistilError(
                f"The teacher {entry.path} has no {'MLM' if objective == 'mlm' else 'LM'} head (its checkpoint holds "
                "only the encoder), so soft-target and logit losses would distil a random head. Set loss.alpha_ce and "
                "loss.alpha_mse to 0 and use hidden-state losses (loss.alpha_cos, loss.alpha_hidden_mse), or fit a "
                f"head first.{encoder_hint}")
        wants_logits = any(getattr(config.loss, k) > 0 for k in ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse"))
        if not has_head and not wants_logits and objective == "mlm":
            log.warning("The teacher %s has no MLM head and the recipe has no logit terms: the student is trained "
                        "from hidden states and saved with an MLM head that is never trained. For a sentence encoder, "
                        "loss.objective=embedding builds and saves no head and writes a sentence-transformers "
                        "student.", entry.path)
        model.eval().requires_grad_(False)
        model.to(placement)
        called = model if wants_teacher_logits and has_head else model.base_model
        teachers.append(LoadedTeacher(entry, model.config, tokenizer, model=called, has_head=has_head))
    _check_same_vocabulary(teachers)
    if len(teachers) > 1 and config.loss.alpha_mse > 0:
        raise DistilError("loss.alpha_mse compares the student's logits with one teacher's, and a mixture of teachers "
                          "has a distribution but no logits. Set loss.alpha_mse=0 (the soft-target term compares "
                          "the distributions), or train with one teacher.")
    return teachers


def source_from_config(config, models, spec, autocast, train_lengths: np.ndarray):
    """The run's teacher source (training.sources): each loaded teacher as a live or a store source, checked
    against the recipe's terms and data, and several mixed by their weights at their temperatures."""
    teachers = models.teachers
    if spec.divergence in CROSS_VOCABULARY_DIVERGENCES:
        return _cross_tokenizer_source(config, models, autocast, train_lengths)
    entries = [t.entry for t in teachers]
    hidden = hidden_teacher_index(config, entries)
    run_temperature = float(config.loss.temperature)
    fused = config.run.fused_head and spec.needs_teacher_logits
    sources, temperatures = [], []
    for index, teacher in enumerate(teachers):
        temperature = teacher.entry.temperature if teacher.entry.temperature is not None else run_temperature
        if teacher.store is not None:
            store = teacher.store
            check_store_terms(config, store, spec.layer_pairs, int(models.student.config.num_hidden_layers),
                              int(teacher.config.num_hidden_layers), temperature, representation=index == hidden)
            if len(teachers) > 1 and store.sampled and config.loss.alpha_ce > 0:
                raise DistilError(f"The store {store.root} holds sampled tail tokens, which follow its own teacher's "
                                  "tail and not the mixture's. Mix stores written without --sampled (top-k + rest).")
            check_store_masking(config, store, models.objective)
            check_store_matches_data(config, store, train_lengths)
            sources.append(StoreTeacher(store, teacher.config, teacher.entry.name))
        else:
            head = output_projection(teacher.model) if fused and teacher.has_head else None
            sources.append(LiveTeacher(teacher.model, head, autocast, models.vocab_limit, teacher.has_head,
                                       teacher.entry.name))
        temperatures.append(temperature)
    if len(sources) == 1 and (temperatures[0] == run_temperature or teachers[0].store is not None):
        return sources[0]
    return TeacherMixture(sources, [e.weight for e in entries], temperatures, run_temperature,
                          models.vocab_limit or vocab_size_of(models.teacher_config), hidden)


def _cross_tokenizer_source(config, models, autocast, train_lengths: np.ndarray):
    """The one teacher of another tokenizer than the student's (models.tokenizer), live or from a store written
    for this student's tokenizer (checked at load: training.models, distil.checks.check_cross_tokenizer_run)."""
    teacher = models.teachers[0]
    if teacher.store is None:
        vocab = min(vocab_size_of(teacher.config), len(teacher.tokenizer))
        return CrossTokenizerTeacher(teacher.model, teacher.tokenizer, models.tokenizer, vocab, autocast,
                                     teacher.entry.name)
    store = teacher.store
    if not store.student_tokenizer:
        raise DistilError(f"The store {store.root} was written on data of the teacher's own tokenizer, and "
                          f"loss.divergence={config.loss.divergence} trains a student of another one. Write a store "
                          "for it: distil cache-teacher --student-tokenizer STUDENT_DIR --data (the student's "
                          "prepared data).")
    temperature = float(teacher.entry.temperature or config.loss.temperature)
    if abs(temperature - store.temperature) > 1e-9:
        raise DistilError(f"The store {store.root} holds the teacher's distribution at temperature "
                          f"{store.temperature:g}, but loss.temperature is {temperature:g}. Set it to "
                          f"{store.temperature:g}, or write a store at this temperature.")
    check_store_matches_data(config, store, train_lengths)
    return CrossTokenizerStore(store, teacher.config, teacher.tokenizer, models.tokenizer, teacher.entry.name)


def teacher_stores(models) -> list[TeacherStore]:
    return [t.store for t in models.teachers if t.store is not None]
