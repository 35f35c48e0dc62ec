"""Training from a teacher-signal store (`teacher.cache: DIR`): no teacher model is loaded.

`load_models_from_cache` stands in for `training.models.load_models`: it reads the teacher's config and tokenizer from the
store (or teacher.path when given, which must be the teacher the store was written with), loads the student, and
checks, before anything starts, that the store fits the run: the prepared data are the ones it was written for
(fingerprint and lengths), the vocabularies match, the temperature is the store's, and every loss term can be
computed from what the store holds (refused otherwise, saying what would make it work). `CachedObjective` is the
objective of such runs: the soft-target term from the stored sparse distribution (distil.teacher_signal), the
CLM/MLM terms as usual, hidden-state terms against stored last hidden states. A masked-LM teacher's store holds
each sequence's masked input and targets (the teacher scored the masked input): `StoredMasks` gives every training
step those, never freshly drawn masks, and a recipe whose masking settings are not the store's is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from distil.errors import DistilError
from distil.teacher_signal.divergences import Divergence, unsupported_divergence
from distil.teacher_cache import format as fmt
from distil.teacher_cache.reader import TeacherStore

log = logging.getLogger(__name__)

REPRESENTATION_TERMS = ("cos", "hidden_mse", "sentence_mse", "sentence_cos")
STUDENT_ONLY_TERMS = ("mlm", "clm")


class CachedTeacher(torch.nn.Module):
    """Stands where the teacher model would be: its configuration (for layer maps and checks), no weights.
    Called (by held-out evaluation), it returns no logits: the store holds no held-out signals."""

    def __init__(self, config, store: TeacherStore):
        super().__init__()
        self.config = config
        self.store = store

    @property
    def base_model(self):
        return self

    def forward(self, input_ids=None, attention_mask=None, **_):
        return SimpleNamespace(logits=None, hidden_states=None)


def _refuse(message: str) -> None:
    raise DistilError(message)


def check_store_terms(config, store: TeacherStore, pairs: list[tuple[int, int]], n_student: int,
                      n_teacher: int) -> None:
    """Refuse, with what to change, every loss term the store cannot provide."""
    loss, root = config.loss, store.root
    if loss.alpha_mse > 0:
        _refuse(f"loss.alpha_mse needs the teacher's dense logits, which a teacher-signal store ({root}) does not "
                "keep (only its top-k distribution). Set loss.alpha_mse=0, or train with the live teacher (unset "
                "teacher.cache).")
    if loss.alpha_relation > 0 or loss.alpha_attention > 0:
        _refuse(f"loss.alpha_relation and loss.alpha_attention need the teacher's self-attention, which a "
                f"teacher-signal store ({root}) does not keep. Set them to 0, or train with the live teacher (unset "
                "teacher.cache).")
    if loss.alpha_ce > 0:
        problem = unsupported_divergence(loss.divergence, store.sampled > 0)
        if problem:
            _refuse(f"{problem}, and the store {root} holds {store.sampled} sampled tokens per position. Use "
                    "loss.divergence=forward_kl, or a store written without --sampled (its top-k + rest form supports "
                    "every divergence), or the live teacher.")
        if abs(float(loss.temperature) - store.temperature) > 1e-9:
            _refuse(f"The store {root} holds the teacher's distribution at temperature {store.temperature:g}, but "
                    f"loss.temperature is {loss.temperature:g}. Set loss.temperature={store.temperature:g}, or write "
                    f"a store at this temperature (distil cache-teacher --temperature {loss.temperature:g}).")
    wants_hidden = any(getattr(loss, f"alpha_{t}") > 0 for t in REPRESENTATION_TERMS)
    if wants_hidden:
        if store.hidden_states != "last":
            _refuse(f"Hidden-state and sentence-embedding losses need the teacher's hidden states, and the store "
                    f"{root} holds none. Write it with distil cache-teacher --hidden-states last (the last hidden "
                    "state), set those loss weights to 0, or train with the live teacher (unset teacher.cache).")
        other = [p for p in pairs if p != (n_student, n_teacher)]
        if (loss.alpha_cos > 0 or loss.alpha_hidden_mse > 0) and other:
            _refuse(f"The store {root} holds the teacher's last hidden state only, but loss.hidden_layers pairs "
                    f"{other} with other teacher layers. Set loss.hidden_layers=last, or train with the live teacher.")


MASKING_KEYS = (("mlm_probability", "--mlm-probability"), ("mlm_smoothing", "--mlm-smoothing"),
                ("mask_replace", "--mask-replace"))


def check_store_masking(config, store: TeacherStore, objective: str) -> None:
    """An MLM teacher's store fixes the masks: refuse one without them, and a recipe that would mask otherwise."""
    root, masking = store.root, store.masking
    if objective != "mlm":
        return
    if not masking:
        _refuse(f"The store {root} holds a masked-LM teacher's signals on the clean text (it was written by an earlier "
                "distil, without masks), but the student sees masked text: its soft targets at the masked positions "
                "would be the teacher's answers to another input. Write it again with distil cache-teacher "
                "--overwrite (the teacher then scores each sequence masked as training masks it).")
    differing = [(key, flag, getattr(config.loss, key), masking[key]) for key, flag in MASKING_KEYS
                 if not _same_setting(getattr(config.loss, key), masking[key])]
    if differing:
        said = "; ".join(f"loss.{key} is {_shown(want)}, the store's is {_shown(have)}"
                         for key, _, want, have in differing)
        sets = " ".join(f"loss.{key}={json.dumps(have).replace(' ', '')}" for key, _, _, have in differing)
        flags = " ".join(f"{flag} {_shown(want)}" for _, flag, want, _ in differing)
        _refuse(f"The store {root} holds each sequence masked once, and the recipe's masking settings are not the "
                f"ones it was masked with ({said}). Set {sets}, or write a store with the recipe's settings "
                f"(distil cache-teacher ... {flags}).")


def _same_setting(a, b) -> bool:
    a, b = np.atleast_1d(np.asarray(a, dtype=float)), np.atleast_1d(np.asarray(b, dtype=float))
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=1e-9))


def _shown(value) -> str:
    return " ".join(f"{float(v):g}" for v in value) if isinstance(value, (list, tuple)) else f"{float(value):g}"


class StoredMasks:
    """The masks of an MLM teacher's store for training steps: `for_step(indices)` is the masker of one step
    batch (called by build_step as an MLMMasker is), returning each row's stored masked input and its labels."""

    def __init__(self, store: TeacherStore):
        self.store = store

    def for_step(self, indices: list[int]):
        def masker(ids: torch.Tensor, attention_mask: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            if ids.shape[0] != len(indices):
                raise ValueError(f"a step batch of {ids.shape[0]} rows was given {len(indices)} sequence indices")
            masked, labels = ids.clone().cpu(), torch.full(ids.shape, -100, dtype=ids.dtype)
            clean = ids.cpu()
            for row, (sequence, count) in enumerate(zip(indices, attention_mask.sum(dim=1).tolist())):
                stored, target = (torch.from_numpy(a) for a in self.store.masks(int(sequence), int(count)))
                if not torch.equal(stored[~target], clean[row, :count][~target]):
                    _refuse(f"Sequence {sequence}'s tokens differ from the ones the store {self.store.root} masked: "
                            "the store was written for other data. Write it again for these data.")
                masked[row, :count] = stored
                labels[row, :count] = torch.where(target, clean[row, :count], -100)
            return masked.to(ids.device), labels.to(ids.device)

        return masker


def stored_masks_of(models) -> StoredMasks | None:
    """The stored masks training steps use (a store of an MLM teacher), or None (live teacher, CLM store)."""
    teacher = models.teacher
    if isinstance(teacher, CachedTeacher) and teacher.store.masking and models.objective == "mlm":
        return StoredMasks(teacher.store)
    return None


def check_store_matches_data(config, store: TeacherStore, train_lengths: np.ndarray) -> None:
    m, root = store.manifest, store.root
    if m["split"] != "train":
        _refuse(f"The store {root} was written for the {m['split']!r} split; training reads the train split. Write "
                "a store with distil cache-teacher --split train.")
    got = fmt.data_fingerprint(config.data.path, "train")
    if got != m["data"]["fingerprint"]:
        _refuse(f"The store {root} was written for other data than {config.data.path} (data fingerprint "
                f"{m['data']['fingerprint']}, these data {got}; written from {m.get('data_path')}). Its positions "
                "would not be these tokens'. Write a store for these data (distil cache-teacher --data "
                f"{config.data.path}), or set data.path to the data it was written for.")
    if m["data"].get("max_length") != config.data.max_length or not np.array_equal(store.lengths(), train_lengths):
        _refuse(f"The store {root} holds sequences cut at max_length {m['data'].get('max_length')}, but "
                f"data.max_length is {config.data.max_length}: the positions differ. Set data.max_length="
                f"{'null' if m['data'].get('max_length') is None else m['data'].get('max_length')}, or write the "
                "store " + ("without --max-length." if config.data.max_length is None
                            else f"with --max-length {config.data.max_length}."))


def load_models_from_cache(config, student_dir: str, device: torch.device):
    """training.models.load_models for `teacher.cache` runs: the student, the teacher's config and tokenizer, no teacher."""
    from distil.data.dataset import TokenSequences
    from distil.loading import load_config, load_model, load_tokenizer
    from distil.sentence_embeddings import resolve_pooling, teacher_pooling
    from distil.checks import check_data_matches_tokenizer, check_vocabularies
    from distil.loading import vocab_size_of
    from distil.model_kinds import auto_class, resolve_objective
    from distil.training.models import Models, layer_pairs, override_dropout, student_config

    loss = config.loss
    store = TeacherStore(config.teacher.cache)
    if config.run.fsdp:
        _refuse("teacher.cache with FSDP is not supported yet (there is no teacher to shard): train with DDP "
                "(torchrun / accelerate launch without --use_fsdp).")
    teacher_config = load_config(str(store.teacher_dir))
    if config.teacher.path:
        given = load_config(config.teacher.path)
        if fmt.config_hash(given) != store.manifest["teacher"]["config_hash"]:
            _refuse(f"teacher.path {config.teacher.path} is not the teacher the store {store.root} was written with "
                    f"({store.manifest.get('teacher_path')}): their configurations differ. Unset teacher.path (the "
                    "store holds the teacher's config and tokenizer) or use the store of this teacher.")
        teacher_config = given
    objective = resolve_objective(config, teacher_config)
    tokenizer = load_tokenizer(config.teacher.tokenizer or config.teacher.path or str(store.teacher_dir))

    student_cfg = student_config(config, student_dir)
    original_dropout = override_dropout(student_cfg, config.run.dropout)
    if config.student.config:
        torch.manual_seed(config.run.seed)
        student = auto_class(objective).from_config(student_cfg)
    else:
        student, _ = load_model(student_dir, auto_class(objective), config=student_cfg, dtype=torch.float32)
    student.train().to(device)
    init_record = None
    record_path = Path(student_dir) / "distil_init.json" if Path(student_dir).is_dir() and not config.student.config \
        else None
    if record_path is not None and record_path.exists():
        init_record = json.loads(record_path.read_text(encoding="utf-8"))

    vocab_limit = check_vocabularies(teacher_config, student.config, tokenizer, config,
                                           None if config.student.config else student_dir)
    if vocab_limit is None and store.manifest["vocab_size"] < vocab_size_of(student.config):
        vocab_limit = int(store.manifest["vocab_size"])  # the teacher's padding rows were left out when caching
    check_data_matches_tokenizer(config.data.path, tokenizer, teacher_config)
    pairs = layer_pairs(config, student.config, teacher_config, init_record)
    check_store_terms(config, store, pairs, int(student.config.num_hidden_layers),
                      int(teacher_config.num_hidden_layers))
    check_store_masking(config, store, objective)
    check_store_matches_data(config, store, TokenSequences(config.data.path, "train", config.data.max_length).lengths)

    wants_logits = any(getattr(loss, k) > 0 for k in ("alpha_ce", "alpha_mlm", "alpha_clm"))
    wants_sentence = loss.alpha_sentence_mse > 0 or loss.alpha_sentence_cos > 0
    pooling = resolve_pooling(loss, str(store.teacher_dir)) if wants_sentence \
        else teacher_pooling(config.teacher.path or str(store.teacher_dir))
    log.info("Training from the teacher-signal store %s (k=%d, k'=%d, T=%g): no teacher model is loaded",
             store.root, store.k, store.sampled, store.temperature)
    return Models(teacher=CachedTeacher(teacher_config, store), teacher_has_head=True, student=student,
                        student_trained=student if wants_logits else student.base_model, tokenizer=tokenizer,
                        init_record=init_record, original_dropout=original_dropout, objective=objective,
                        vocab_limit=vocab_limit, sentence_pooling=pooling)


class CachedObjective:
    """The weighted loss of one micro-batch (its share of the step's mean), with the teacher's signals read from
    the store for the batch's sequences. Same interface as training.objective.Objective.

    `spec` is what held-out evaluation measures: the student's own terms only (the store holds the train split's
    signals, none for the held-out split); training uses all the recipe's terms."""

    def __init__(self, spec, teacher: CachedTeacher, student: torch.nn.Module, fused=None, autocast=None):
        from distil.training.objective import final_norm_of
        from distil.training.projections import projections_of

        self.train_spec = spec
        self.spec = dataclasses.replace(spec, weights={k: v for k, v in spec.weights.items()
                                                       if k in STUDENT_ONLY_TERMS})
        self.store = teacher.store
        self.teacher = teacher
        self.student = student
        # (student projection, None) when the output layer can be fused (run.fused_head): the sparse head computes
        # the student's logits chunk by chunk; else the plain logits.
        self.fused = fused
        self.autocast = autocast
        self.teacher_norm = None
        self.student_norm = final_norm_of(student)
        self.project = projections_of(student)
        self.n_teacher = int(teacher.config.num_hidden_layers)

    def __call__(self, student_module: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
        from distil.training.objective import HiddenStates, compute_terms, forward, step_share, weighted_total

        spec = self.train_spec
        if batch.sequence_ids is None:
            raise DistilError("Training from a teacher-signal store needs each batch's sequence indices "
                              "(build_step(..., indices=...)).")
        real = batch.attention_mask.bool()
        counts = real.sum(dim=1).tolist()
        targets = self.store.targets(batch.sequence_ids.tolist(), counts, want_hidden=spec.needs_hidden,
                                     device=batch.input_ids.device)
        if self.fused is not None and spec.needs_logits:
            total, logit_shares, s_hidden = self._fused_logit_terms(student_module, batch, targets)
            s_logits = None
        else:
            total, logit_shares = None, {}
            s_logits, s_hidden = forward(student_module, batch, spec.needs_hidden, self.student_norm)
        t_hidden = None
        if spec.needs_hidden:
            final = torch.zeros(*real.shape, targets.hidden.shape[-1], dtype=s_hidden.final.dtype,
                                device=real.device)
            final[real] = targets.hidden.to(final.dtype)
            t_hidden = HiddenStates(blocks=(None,) * self.n_teacher + (final,), final=final)
        others = tuple(name for name in spec.weights if name != "ce" and name not in logit_shares)
        terms = compute_terms(spec, batch, s_logits, s_hidden, None, t_hidden, only=others, project=self.project) \
            if others else {}
        if "ce" in spec.weights and "ce" not in logit_shares:
            logits = s_logits[..., :spec.vocab_limit] if spec.vocab_limit is not None else s_logits
            rows = logits[real]
            if spec.restrict_ce_to_mask:
                keep = (batch.labels != -100)[real]
                rows, targets = rows[keep], targets.rows(keep)
                local, step = batch.local_targets, batch.step_targets
            else:
                local, step = batch.local_tokens, batch.step_tokens
            divergence = Divergence(spec.divergence, spec.temperature, spec.jsd_beta, spec.skew_alpha)
            value = divergence.value(rows, targets) / rows.shape[0] if rows.shape[0] else rows.sum() * 0.0
            terms["ce"] = (value, local, step)
        shares = step_share(terms)
        rest = weighted_total(shares, spec.weights) if shares else 0.0
        shares.update(logit_shares)
        total = rest if total is None else total + rest
        return total, {k: v.detach() for k, v in shares.items()}

    def _fused_logit_terms(self, student_module, batch, targets):
        """(weighted logit terms, their step shares, student HiddenStates or None) through the output-layer
        engine: the student's output layer, the soft-target term and the LM cross-entropy in row chunks."""
        from distil.training.fused_head import HeadTerms, projection_replaced, student_head_losses
        from distil.training.objective import forward, row_targets

        spec = self.train_spec
        projection = self.fused[0]
        flat_real, kd_rows, row_labels = row_targets(spec, batch)
        kd_targets = targets if bool(kd_rows.all()) else targets.rows(kd_rows)
        kd_step = batch.step_targets if spec.restrict_ce_to_mask else batch.step_tokens
        lm_name = "clm" if spec.objective == "clm" else "mlm"
        w = spec.weights
        terms = HeadTerms(temperature=spec.temperature, divergence=spec.divergence, jsd_beta=spec.jsd_beta,
                          skew_alpha=spec.skew_alpha, coef_ce=w.get("ce", 0.0) / max(kd_step, 1),
                          coef_lm=w.get(lm_name, 0.0) / max(batch.step_targets, 1))
        shares: dict = {}

        def head(states):  # runs where the student calls its output layer, inside its forward
            hidden = states.reshape(-1, states.shape[-1])[flat_real]
            total, sums = student_head_losses(hidden, projection, kd_rows, row_labels, kd_targets, terms,
                                              vocab_limit=spec.vocab_limit)
            for index, name, denominator in ((0, "ce", kd_step), (2, lm_name, batch.step_targets)):
                if name in w:
                    shares[name] = sums[index] / max(denominator, 1)
            return total

        with projection_replaced(projection, head):
            total, s_hidden = forward(student_module, batch, spec.needs_hidden, self.student_norm)
        return total, shares, s_hidden


def objective_for(models):
    """The objective class of a run: from the store when the teacher is one, else the live teacher's."""
    from distil.training.objective import Objective

    return CachedObjective if isinstance(models.teacher, CachedTeacher) else Objective
