"""What one optimizer step computes: its batches with their targets, both forwards, and the weighted loss terms.

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

import numpy as np
import torch

from distil import losses
from distil.data.dataset import pad_batch
from distil.data.masking import MLMMasker, causal_lm_labels
from distil.training.attention_capture import (Captured, captured_attention, check_attention_terms_of_spec,
                                               default_relation_layers, head_count, recipe_pairs)
from distil.sentence_embeddings import embed as sentence_embedding
from distil.training.fused_head import HeadTerms, fused_head_losses, projection_replaced
from distil.training.on_policy import generated_targets
from distil.training.projections import SENTENCE_KEY, pair_key, projections_of

LOGIT_TERMS = ("ce", "mlm", "clm", "mse")
HIDDEN_TERMS = ("cos", "hidden_mse")
SENTENCE_TERMS = ("sentence_mse", "sentence_cos")  # on pooled sentence embeddings (see distil.sentence_embeddings)
ATTENTION_TERMS = ("relation", "attention")  # on self-attention, captured by hooks (see attention_capture)
# Attributes under which `transformers` base models keep the norm applied after their last block.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


@dataclass
class Batch:
    input_ids: torch.Tensor          # this process's rows of one micro-batch, on the training device
    attention_mask: torch.Tensor
    labels: torch.Tensor             # MLM targets / causal labels (-100 elsewhere)
    local_tokens: int                # real tokens in these rows
    local_targets: int               # MLM targets (MLM) or predicted positions (CLM) in these rows
    step_tokens: int                 # real tokens in the whole optimizer step (every micro-batch, every process)
    step_targets: int                # MLM targets or predicted positions in the whole optimizer step
    local_rows: int = 0              # sequences in these rows (sentence-embedding terms are means over sequences)
    step_rows: int = 0               # sequences in the whole optimizer step
    sequence_ids: torch.Tensor | None = None  # each row's index in the prepared split (when build_step is told)
    kd_mask: torch.Tensor | None = None  # on-policy rows (training.on_policy): the soft-target positions, those that
                                         # produced the student's own tokens (counted as the targets); None: all real


def _targets(ids: torch.Tensor, mask: torch.Tensor, objective: str, masker: MLMMasker | None,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, labels, target mask): MLM-corrupted ids and targets, or causal next-token labels."""
    if objective == "mlm" and masker is not None:
        ids, labels = masker(ids, mask, generator=generator)
        return ids, labels, labels != -100
    if objective in ("mlm", "embedding"):
        # Hidden-state losses alone (always so for embedding): the student learns the teacher's states on clean
        # text, as it will see it.
        return ids, torch.full_like(ids, -100), torch.zeros_like(mask, dtype=torch.bool)
    labels = causal_lm_labels(ids, mask)
    target_mask = torch.zeros_like(mask, dtype=torch.bool)
    target_mask[:, 1:] = labels[:, 1:] != -100
    return ids, labels, target_mask


def build_step(sequences: list[np.ndarray], pad_id: int, objective: str, masker: MLMMasker | None,
               generator: torch.Generator | None, rank: int, world_size: int, device: torch.device,
               micro_batches: int = 1, indices: list[int] | None = None) -> list[Batch]:
    """Split one step batch into `micro_batches` consecutive micro-batches and keep this process's rows of each.

    Targets are drawn over the whole step batch (identically on every process), so how the step is split
    between processes and accumulation steps changes nothing that is computed. A process may get no rows of a
    small final held-out batch: its Batch then has zero rows. `indices`: the sequences' indices in the prepared
    split, kept per row as Batch.sequence_ids (a teacher-signal store is read by them).
    """
    if len(sequences) % micro_batches:
        raise ValueError(f"{len(sequences)} sequences do not split into {micro_batches} equal micro-batches")
    ids, mask = pad_batch(sequences, pad_id)
    ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    ids, labels, target_mask = _targets(ids, mask, objective, masker, generator)
    labels, target_mask, kd_mask = generated_targets(sequences, labels, target_mask, mask)  # on-policy rows only
    per_micro = len(sequences) // micro_batches
    rows = [torch.arange(m * per_micro + rank, (m + 1) * per_micro, world_size, device=device)
            for m in range(micro_batches)]
    tokens, targets = mask.sum(dim=1), target_mask.sum(dim=1)
    # One host transfer for every count of the step.
    counts = torch.stack([tokens.sum(), targets.sum()]
                         + [t for r in rows for t in (tokens[r].sum(), targets[r].sum(),
                                                      tokens[r].max() if len(r) else tokens.new_zeros(()))]).tolist()
    step_tokens, step_targets = int(counts[0]), int(counts[1])
    batches = []
    for m, r in enumerate(rows):
        local_tokens, local_targets, width = (int(c) for c in counts[2 + 3 * m: 5 + 3 * m])
        # Trim columns that are padding in every local row.
        batches.append(Batch(input_ids=ids[r, :width], attention_mask=mask[r, :width], labels=labels[r, :width],
                             local_tokens=local_tokens, local_targets=local_targets,
                             step_tokens=step_tokens, step_targets=step_targets,
                             local_rows=len(r), step_rows=len(sequences),
                             sequence_ids=torch.as_tensor(indices)[r.cpu()] if indices is not None else None,
                             kd_mask=kd_mask[r, :width] if kd_mask is not None else None))
    return batches


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
                    skew_alpha=float(loss.skew_alpha), vocab_limit=vocab_limit,
                    relation_pairs=recipe_pairs(loss.relation_layers), relation_heads=loss.relation_heads,
                    attention_pairs=recipe_pairs(loss.attention_layers),
                    attention_loss=loss.attention_loss, pooling=pooling)


def with_attention_defaults(spec: TermSpec, student: torch.nn.Module, teacher: torch.nn.Module) -> TermSpec:
    """The spec with the self-attention settings left to the models filled in (default relation layer, the
    teacher's head count, the hidden-layer mapping for attention maps), checked against both models."""
    if not (spec.needs_relations or spec.needs_attention_maps):
        return spec
    n_s, n_t = int(student.config.num_hidden_layers), int(teacher.config.num_hidden_layers)
    resolved = dataclasses.replace(
        spec,
        relation_pairs=spec.relation_pairs or default_relation_layers(n_s, n_t),
        relation_heads=spec.relation_heads or head_count(teacher.config),
        attention_pairs=spec.attention_pairs or [(s, t) for s, t in spec.layer_pairs if s > 0 and t > 0])
    check_attention_terms_of_spec(resolved, student, teacher)
    return resolved


@dataclass
class HiddenStates:
    """A model's hidden states, like with like: `blocks[i]` is the output of block i (0: the embeddings), before
    any final norm; `final` is what the output layer sees (the last block's output after the final norm of
    pre-norm decoders such as GPT-2 and Llama; the same tensor as blocks[-1] for BERT-style encoders)."""

    blocks: tuple[torch.Tensor, ...]
    final: torch.Tensor

    def pair_with(self, other: "HiddenStates", index: int, other_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two states a hidden loss compares: last against last is final against final (the seed's
        DistilGPT2 term); any other pair compares block outputs, so a normed state never meets a raw one."""
        if index == len(self.blocks) - 1 and other_index == len(other.blocks) - 1:
            return self.final, other.final
        return self.blocks[index], other.blocks[other_index]


def final_norm_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm a pre-norm decoder applies after its last block, or None (post-norm encoders have none)."""
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


@contextlib.contextmanager
def _input_of(module: torch.nn.Module | None):
    """Record what `module` is called with (the last block's output, for a final norm)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0])) if module is not None else None
    try:
        yield seen
    finally:
        if handle is not None:
            handle.remove()


def forward(model, batch: Batch, want_hidden: bool, final_norm: torch.nn.Module | None = None):
    """Run a model (full LM or its base) and return (logits or None, HiddenStates or None)."""
    with _input_of(final_norm if want_hidden else None) as before_norm:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    output_hidden_states=want_hidden, return_dict=True)
    logits = getattr(out, "logits", None)
    if not want_hidden:
        return logits, None
    states = tuple(out.hidden_states)
    blocks = states[:-1] + (before_norm[-1],) if before_norm else states
    return logits, HiddenStates(blocks=blocks, final=states[-1])


def compute_terms(spec: TermSpec, batch: Batch, s_logits, s_hidden: HiddenStates | None, t_logits,
                  t_hidden: HiddenStates | None, only: tuple[str, ...] | None = None,
                  s_attention: Captured | None = None, t_attention: Captured | None = None,
                  project=None) -> dict[str, tuple]:
    """Each term as (local mean, local count, step count): the mean over this process's rows and the counts
    that turn it into this micro-batch's share of the step's mean. `only` limits the terms computed.
    `*_attention`: what the self-attention terms need, captured during the forwards (captured_attention).
    `project`: the learned student -> teacher width maps (training.projections), when the widths differ."""
    real = batch.attention_mask.bool()
    if spec.objective == "clm":
        predicted = torch.zeros_like(real)
        predicted[:, 1:] = batch.labels[:, 1:] != -100
    else:
        predicted = batch.labels != -100
    kd_rows = predicted if spec.restrict_ce_to_mask else real
    kd_local = batch.local_targets if spec.restrict_ce_to_mask else batch.local_tokens
    kd_step = batch.step_targets if spec.restrict_ce_to_mask else batch.step_tokens
    if batch.kd_mask is not None:  # on-policy rows: soft targets on the student's own tokens only
        kd_rows, kd_local, kd_step = batch.kd_mask, batch.local_targets, batch.step_targets

    terms: dict[str, tuple] = {}
    w = {k: v for k, v in spec.weights.items() if only is None or k in only}
    if spec.vocab_limit is not None:  # padding rows of the output layers are no tokens: left out on both sides
        s_logits = s_logits[..., :spec.vocab_limit] if s_logits is not None else None
        t_logits = t_logits[..., :spec.vocab_limit] if t_logits is not None else None
    if "ce" in w:
        terms["ce"] = (losses.soft_target_loss(s_logits, t_logits, spec.temperature, kd_rows, spec.divergence,
                                               spec.jsd_beta, spec.skew_alpha), kd_local, kd_step)
    if "mse" in w:
        terms["mse"] = (losses.logit_mse(s_logits, t_logits, kd_rows), kd_local, kd_step)
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
    kd_rows = (row_labels != -100) if spec.restrict_ce_to_mask else torch.ones_like(row_labels, dtype=torch.bool)
    if batch.kd_mask is not None:  # on-policy rows: soft targets on the student's own tokens only
        kd_rows = batch.kd_mask.reshape(-1)[flat_real]
    return flat_real, kd_rows, row_labels


def fused_logit_terms(spec: TermSpec, batch: Batch, s_states, t_states, s_projection, t_projection):
    """Logit terms through the fused head: (differentiable weighted total, {term: detached step share})."""
    flat_real, kd_rows, row_labels = row_targets(spec, batch)
    kd_step = batch.step_targets if spec.restrict_ce_to_mask or batch.kd_mask is not None else batch.step_tokens
    w = spec.weights
    lm_name = "clm" if spec.objective == "clm" else "mlm"
    terms = HeadTerms(temperature=spec.temperature, divergence=spec.divergence, jsd_beta=spec.jsd_beta,
                      skew_alpha=spec.skew_alpha, coef_ce=w.get("ce", 0.0) / max(kd_step, 1),
                      coef_mse=w.get("mse", 0.0) / max(kd_step, 1),
                      coef_lm=w.get(lm_name, 0.0) / max(batch.step_targets, 1))
    hidden = s_states.reshape(-1, s_states.shape[-1])[flat_real]
    teacher = t_states.reshape(-1, t_states.shape[-1])[flat_real] if t_states is not None else None
    total, sums = fused_head_losses(hidden, s_projection, teacher, t_projection, kd_rows, row_labels, terms,
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


class Objective:
    """The weighted loss of one micro-batch, as its share of the optimizer step's mean.

    Runs the frozen teacher without gradients and the student with them, through the fused output layer
    (`fused` = (student projection, teacher projection or None)) when there is one. The self-attention terms
    (relation, attention) read what hooks capture during the same two forwards, in either path.
    """

    def __init__(self, spec: TermSpec, teacher: torch.nn.Module, student: torch.nn.Module, fused: tuple | None,
                 autocast):
        self.spec = with_attention_defaults(spec, student, teacher)
        self.teacher = teacher
        self.student = student
        self.fused = fused
        self.autocast = autocast
        self.teacher_norm = final_norm_of(teacher)
        self.student_norm = final_norm_of(student)
        # Learned width maps, when the run has them (attached to the trained module by add_projections).
        self.project = projections_of(student)

    def __call__(self, student_module: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        """(differentiable weighted share of the step loss, {term: detached share})."""
        spec = self.spec
        if self.fused is None:
            t_logits, t_hidden, t_attention = self.teacher_outputs(batch)
            with captured_attention(self.student, *spec.captured_layers(0)) as s_attention:
                s_logits, s_hidden = forward(student_module, batch, spec.needs_hidden, self.student_norm)
            shares = step_share(compute_terms(spec, batch, s_logits, s_hidden, t_logits, t_hidden,
                                              s_attention=s_attention, t_attention=t_attention,
                                              project=self.project))
            return weighted_total(shares, spec.weights), {k: v.detach() for k, v in shares.items()}
        s_proj, t_proj = self.fused
        t_states, t_hidden, t_attention = self.teacher_outputs(batch, states_only=t_proj is not None)
        logit_shares: dict = {}

        def fused_head(states):  # runs where the student calls its output layer, inside its forward
            total, shares = fused_logit_terms(spec, batch, states, t_states if t_proj is not None else None,
                                              s_proj, t_proj)
            logit_shares.update(shares)
            return total

        with projection_replaced(s_proj, fused_head), \
                captured_attention(self.student, *spec.captured_layers(0)) as s_attention:
            total, s_hidden = forward(student_module, batch, spec.needs_hidden, self.student_norm)
        shares = dict(logit_shares)
        others = [t for t in HIDDEN_TERMS + SENTENCE_TERMS + ATTENTION_TERMS if t in spec.weights]
        if others:
            rest = step_share(compute_terms(spec, batch, None, s_hidden, None, t_hidden, only=tuple(others),
                                            s_attention=s_attention, t_attention=t_attention, project=self.project))
            total = total + weighted_total(rest, spec.weights)
            shares.update({k: v.detach() for k, v in rest.items()})
        return total, shares

    @torch.no_grad()  # no_grad, not inference_mode: teacher outputs feed the loss, whose backward saves them
    def teacher_outputs(self, batch: Batch, states_only: bool = False):
        """(logits, or the states that enter the output layer when `states_only`; HiddenStates or None;
        Captured self-attention). A student-only baseline (alpha_mlm alone) runs no teacher."""
        if not self.spec.needs_teacher:
            return None, None, None
        with self.autocast():
            t_proj = self.fused[1] if states_only else None
            replaced = projection_replaced(t_proj, lambda states: states) if t_proj is not None \
                else contextlib.nullcontext()
            with replaced, captured_attention(self.teacher, *self.spec.captured_layers(1)) as captured:
                logits, hidden = forward(self.teacher, batch, self.spec.needs_hidden, self.teacher_norm)
            return logits, hidden, captured
