"""What one micro-batch computes: the teacher's signals from its source, the student's forward, and the weighted
loss terms, as this micro-batch's share of the optimizer step's mean. (The batches themselves: training.batches.)

Normalisation: every term is a mean over the whole optimizer step, all micro-batches of all processes. The
sampler hands out one *step batch* (processes x accumulation x batch sequences), its MLM targets are drawn once,
and its counts (real tokens, MLM targets, predicted positions) are known before the first forward. Each
micro-batch then contributes sum(its rows) / count(the whole step), so the gradients summed over micro-batches
and processes are those of the step's mean, whatever the split. N processes x accumulation A x batch B compute
what one process with batch N*A*B computes (tested, dropout off).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from distil import losses
from distil.sentence_embeddings import embed as sentence_embedding
from distil.cross_tokenizer.divergence import soft_target_divergence
from distil.teacher_signal.signals import Signals
from distil.training.attention_capture import (Captured, captured_attention, check_attention_terms_of_spec,
                                               default_relation_layers, head_count, recipe_pairs)
from distil.training.batches import Batch
from distil.training.fused_head import HeadTerms, projection_replaced, student_head_losses
from distil.training.model_outputs import HiddenStates, final_norm_of, forward
from distil.training.projections import SENTENCE_KEY, pair_key, projections_of
from distil.training.sources.interface import TeacherOutputs, TeacherRequest, TeacherSource

LOGIT_TERMS = ("ce", "mlm", "clm", "mse")
HIDDEN_TERMS = ("cos", "hidden_mse")
SENTENCE_TERMS = ("sentence_mse", "sentence_cos")  # on pooled sentence embeddings (see distil.sentence_embeddings)
ATTENTION_TERMS = ("relation", "attention")  # on self-attention, captured by hooks (see attention_capture)

@dataclass
class TermSpec:
    weights: dict[str, float]        # term name -> alpha (only non-zero ones)
    temperature: float
    objective: str                   # mlm | clm | embedding
    restrict_ce_to_mask: bool
    layer_pairs: list[tuple[int, int]]
    divergence: str = "forward_kl"   # what the "ce" (soft-target) term computes, see distil.teacher_signal.divergences
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    uld_weight: float = 1.0          # hybrid (a teacher of another tokenizer): weight of its ULD part
    vocab_limit: int | None = None   # teacher and student output layers padded differently: compare these ids only
    # Self-attention terms (1-based layers). None: resolved against the models when the Objective is built.
    relation_pairs: list[tuple[int, int]] | None = None    # (student layer, teacher layer) of the relation term
    relation_heads: int | None = None                      # None: the teacher's head count
    attention_pairs: list[tuple[int, int]] | None = None   # None: layer_pairs without the embeddings
    attention_loss: str = "kl"                             # kl | mse_probs | mse_scores (losses.relations)
    pooling: object = None           # SentencePooling of the sentence-embedding terms (distil.sentence_embeddings)

    @property
    def needs_logits(self) -> bool:
        return any(t in self.weights for t in LOGIT_TERMS)

    @property
    def needs_teacher_logits(self) -> bool:
        return any(t in self.weights for t in ("ce", "mse"))

    @property
    def needs_hidden_pairs(self) -> bool:
        return any(t in self.weights for t in HIDDEN_TERMS)

    @property
    def needs_sentence(self) -> bool:
        return any(t in self.weights for t in SENTENCE_TERMS)

    @property
    def needs_hidden(self) -> bool:
        return self.needs_hidden_pairs or self.needs_sentence

    @property
    def needs_relations(self) -> bool:
        return "relation" in self.weights

    @property
    def needs_attention_maps(self) -> bool:
        return "attention" in self.weights

    @property
    def needs_teacher(self) -> bool:
        return self.needs_teacher_logits or self.needs_hidden or self.needs_relations or self.needs_attention_maps

    def captured_layers(self, side: int) -> tuple[set[int], set[int]]:
        """(layers whose Q/K/V are captured, layers whose attention maps are captured) of the student (side 0)
        or the teacher (side 1)."""
        relations = {p[side] for p in self.relation_pairs or ()} if self.needs_relations else set()
        maps = {p[side] for p in self.attention_pairs or ()} if self.needs_attention_maps else set()
        return relations, maps

    @property
    def needs_masking(self) -> bool:
        """MLM corruption only matters to losses on logits; hidden-state matching (and every embedding run)
        uses clean text."""
        return self.objective == "mlm" and self.needs_logits


def term_spec_from(config, objective: str, layer_pairs: list[tuple[int, int]], vocab_limit: int | None = None,
                   pooling=None) -> TermSpec:
    loss = config.loss
    return TermSpec(weights=loss.weights(), temperature=float(loss.temperature),
                    objective=objective, restrict_ce_to_mask=bool(loss.restrict_ce_to_mask),
                    layer_pairs=list(layer_pairs), divergence=loss.divergence, jsd_beta=float(loss.jsd_beta),
                    skew_alpha=float(loss.skew_alpha), uld_weight=float(loss.uld_weight), vocab_limit=vocab_limit,
                    relation_pairs=recipe_pairs(loss.relation_layers), relation_heads=loss.relation_heads,
                    attention_pairs=recipe_pairs(loss.attention_layers),
                    attention_loss=loss.attention_loss, pooling=pooling)


def with_attention_defaults(spec: TermSpec, student: torch.nn.Module, teacher: torch.nn.Module | None) -> TermSpec:
    """The spec with the self-attention settings left to the models filled in (default relation layer, the
    teacher's head count, the hidden-layer mapping for attention maps), checked against both models."""
    if not (spec.needs_relations or spec.needs_attention_maps):
        return spec
    if teacher is None:
        raise ValueError("self-attention terms need a teacher model run in process")
    n_s, n_t = int(student.config.num_hidden_layers), int(teacher.config.num_hidden_layers)
    resolved = dataclasses.replace(
        spec,
        relation_pairs=spec.relation_pairs or default_relation_layers(n_s, n_t),
        relation_heads=spec.relation_heads or head_count(teacher.config),
        attention_pairs=spec.attention_pairs or [(s, t) for s, t in spec.layer_pairs if s > 0 and t > 0])
    check_attention_terms_of_spec(resolved, student, teacher)
    return resolved


def kd_positions(spec: TermSpec, batch: Batch) -> tuple[torch.Tensor, int, int]:
    """(the (B, L) positions the soft-target and logit-MSE terms count, their count in these rows, in the step):
    every real position, the MLM targets (loss.restrict_ce_to_mask), or an on-policy row's generated tokens."""
    if batch.kd_mask is not None:  # on-policy rows: soft targets on the student's own tokens only
        return batch.kd_mask, batch.local_targets, batch.step_targets
    if spec.restrict_ce_to_mask:
        return batch.labels != -100, batch.local_targets, batch.step_targets
    return batch.attention_mask.bool(), batch.local_tokens, batch.step_tokens


def compute_terms(spec: TermSpec, batch: Batch, s_logits, s_hidden: HiddenStates | None, signals: Signals | None,
                  t_hidden: HiddenStates | None, only: tuple[str, ...] | None = None,
                  s_attention: Captured | None = None, t_attention: Captured | None = None,
                  project=None) -> dict[str, tuple]:
    """Each term as (local mean, local count, step count): the mean over this process's rows and the counts
    that turn it into this micro-batch's share of the step's mean. `only` limits the terms computed.
    `signals`: the teacher's, one row per kd position (kd_positions). `*_attention`: what the self-attention terms
    need, captured during the forwards (captured_attention). `project`: the learned student -> teacher width maps
    (training.projections), when the widths differ."""
    real = batch.attention_mask.bool()
    kd_rows, kd_local, kd_step = kd_positions(spec, batch)
    terms: dict[str, tuple] = {}
    w = {k: v for k, v in spec.weights.items() if only is None or k in only}
    if spec.vocab_limit is not None and s_logits is not None:  # padding rows of the output layer are no tokens
        s_logits = s_logits[..., :spec.vocab_limit]
    if "ce" in w or "mse" in w:
        rows = s_logits[kd_rows]
        if "ce" in w:
            divergence = soft_target_divergence(spec)  # over one vocabulary, or across two (uld, hybrid)
            value = divergence.value(rows, signals) / rows.shape[0] if rows.shape[0] else rows.sum() * 0.0
            terms["ce"] = (value, kd_local, kd_step)
        if "mse" in w:
            terms["mse"] = (losses.logit_mse(rows, signals.teacher_logits()), kd_local, kd_step)
    if "mlm" in w:
        terms["mlm"] = (losses.masked_lm_loss(s_logits, batch.labels), batch.local_targets, batch.step_targets)
    if "clm" in w:
        terms["clm"] = (losses.causal_lm_loss(s_logits, batch.labels), batch.local_targets, batch.step_targets)
    for name, fn in (("cos", losses.hidden_cosine), ("hidden_mse", losses.hidden_mse)):
        if name in w:
            per_pair = []
            for s, t in spec.layer_pairs:
                student, teacher = s_hidden.pair_with(t_hidden, s, t)
                if project is not None:
                    student = project(pair_key(s, t), student)
                per_pair.append(fn(student, teacher, real))
            terms[name] = (torch.stack(per_pair).mean(), batch.local_tokens, batch.step_tokens)
    if any(name in w for name in SENTENCE_TERMS):
        dense = (lambda x: project(SENTENCE_KEY, x)) if project is not None else None
        s_embedding = sentence_embedding(s_hidden.final, real, spec.pooling, dense)
        t_embedding = sentence_embedding(t_hidden.final, real, spec.pooling)
        for name, fn in (("sentence_mse", losses.sentence_mse), ("sentence_cos", losses.sentence_cosine)):
            if name in w:
                terms[name] = (fn(s_embedding, t_embedding), batch.local_rows, batch.step_rows)
    causal = spec.objective == "clm"
    if "relation" in w:
        per_pair = [losses.relation_loss(s_attention.qkv[s], t_attention.qkv[t], real, spec.relation_heads, causal)
                    for s, t in spec.relation_pairs]
        terms["relation"] = (torch.stack(per_pair).mean(), batch.local_tokens, batch.step_tokens)
    if "attention" in w:
        per_pair = [losses.attention_map_loss(s_attention.scores(s), t_attention.scores(t), real, spec.attention_loss,
                                              causal) for s, t in spec.attention_pairs]
        terms["attention"] = (torch.stack(per_pair).mean(), batch.local_tokens, batch.step_tokens)
    return terms


def row_targets(spec: TermSpec, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the fused head: (indices of real positions, kd mask over them, target id of each, -100 if none)."""
    real = batch.attention_mask.bool()
    if spec.objective == "clm":
        labels = torch.full_like(batch.labels, -100)
        labels[:, :-1] = batch.labels[:, 1:]  # position i predicts token i + 1
    else:
        labels = batch.labels
    flat_real = real.reshape(-1).nonzero().squeeze(1)
    row_labels = labels.reshape(-1)[flat_real]
    kd_rows = kd_positions(spec, batch)[0].reshape(-1)[flat_real]
    return flat_real, kd_rows, row_labels


def fused_logit_terms(spec: TermSpec, batch: Batch, s_states, signals: Signals | None, s_projection):
    """Logit terms through the output-layer engine, against the teacher's signals at the kd positions:
    (differentiable weighted total, {term: detached step share})."""
    flat_real, kd_rows, row_labels = row_targets(spec, batch)
    kd_step = kd_positions(spec, batch)[2]
    w = spec.weights
    lm_name = "clm" if spec.objective == "clm" else "mlm"
    terms = HeadTerms(temperature=spec.temperature, divergence=spec.divergence, jsd_beta=spec.jsd_beta,
                      skew_alpha=spec.skew_alpha, coef_ce=w.get("ce", 0.0) / max(kd_step, 1),
                      coef_mse=w.get("mse", 0.0) / max(kd_step, 1),
                      coef_lm=w.get(lm_name, 0.0) / max(batch.step_targets, 1))
    hidden = s_states.reshape(-1, s_states.shape[-1])[flat_real]
    total, sums = student_head_losses(hidden, s_projection, kd_rows, row_labels, signals, terms,
                                      vocab_limit=spec.vocab_limit)
    shares = {}
    for index, name, denominator in ((0, "ce", kd_step), (1, "mse", kd_step), (2, lm_name, batch.step_targets)):
        if name in w:
            shares[name] = sums[index] / max(denominator, 1)
    return total, shares


def step_share(terms: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """This micro-batch's contribution to each step mean: summed over micro-batches and processes it gives the
    step's value."""
    return {name: mean * (local / max(step, 1)) for name, (mean, local, step) in terms.items()}


def weighted_total(shares: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    return sum(weights[name] * value for name, value in shares.items())


def teacher_request(spec: TermSpec, batch: Batch) -> TeacherRequest:
    """What the recipe's terms need from the teacher for `batch`."""
    return TeacherRequest(kd_rows=kd_positions(spec, batch)[0] if spec.needs_teacher_logits else None,
                          hidden=spec.needs_hidden, attention=spec.captured_layers(1))


class Objective:
    """The weighted loss of one micro-batch, as its share of the optimizer step's mean.

    The teacher's signals come from `source` (training.sources: a live model, a store, a mixture; the objective
    does not ask which). The student runs with gradients, through the output-layer engine when `projection` (its
    output Linear, training.fused_head.output_projection) is given, else with its plain logits. The
    self-attention terms (relation, attention) read what hooks capture during the forwards, in either path.
    """

    def __init__(self, spec: TermSpec, source: TeacherSource, student: torch.nn.Module,
                 projection: torch.nn.Module | None = None, autocast=contextlib.nullcontext):
        self.spec = with_attention_defaults(spec, student, source.model)
        self.source = source
        self.student = student
        self.projection = projection
        self.autocast = autocast
        self.student_norm = final_norm_of(student)
        # Learned width maps, when the run has them (attached to the trained module by add_projections).
        self.project = projections_of(student)

    def teacher_outputs(self, batch: Batch) -> TeacherOutputs:
        """The source's answer to what the recipe's terms need (nothing for a student-only baseline)."""
        if not self.spec.needs_teacher:
            return TeacherOutputs()
        return self.source.outputs(batch, teacher_request(self.spec, batch))

    def __call__(self, student_module: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        """(differentiable weighted share of the step loss, {term: detached share})."""
        spec = self.spec
        teacher = self.teacher_outputs(batch)
        if self.projection is None:
            with captured_attention(self.student, *spec.captured_layers(0)) as s_attention:
                s_logits, s_hidden = forward(student_module, batch, spec.needs_hidden, self.student_norm)
            shares = step_share(compute_terms(spec, batch, s_logits, s_hidden, teacher.signals, teacher.hidden,
                                              s_attention=s_attention, t_attention=teacher.attention,
                                              project=self.project))
            return weighted_total(shares, spec.weights), {k: v.detach() for k, v in shares.items()}
        logit_shares: dict = {}

        def fused_head(states):  # runs where the student calls its output layer, inside its forward
            total, shares = fused_logit_terms(spec, batch, states, teacher.signals, self.projection)
            logit_shares.update(shares)
            return total

        with projection_replaced(self.projection, fused_head), \
                captured_attention(self.student, *spec.captured_layers(0)) as s_attention:
            total, s_hidden = forward(student_module, batch, spec.needs_hidden, self.student_norm)
        shares = dict(logit_shares)
        others = [t for t in HIDDEN_TERMS + SENTENCE_TERMS + ATTENTION_TERMS if t in spec.weights]
        if others:
            rest = step_share(compute_terms(spec, batch, None, s_hidden, None, teacher.hidden, only=tuple(others),
                                            s_attention=s_attention, t_attention=teacher.attention,
                                            project=self.project))
            total = total + weighted_total(rest, spec.weights)
            shares.update({k: v.detach() for k, v in rest.items()})
        return total, shares
