"""What one micro-step computes: a batch with its targets, both forwards, and the weighted loss terms.

Loss terms are normalised by *global* counts (tokens, MLM targets) of the global batch, which every
process knows, so that data-parallel gradients equal those of one process running the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distil import losses
from distil.data.dataset import local_rows, pad_batch
from distil.data.masking import MLMMasker, causal_lm_labels

LOGIT_TERMS = ("ce", "mlm", "clm", "mse")
HIDDEN_TERMS = ("cos", "hidden_mse")


@dataclass
class Batch:
    input_ids: torch.Tensor          # this process's rows, on the training device
    attention_mask: torch.Tensor
    labels: torch.Tensor | None      # MLM targets / causal labels (-100 elsewhere)
    global_tokens: int               # real tokens in the global batch
    global_targets: int              # MLM targets (MLM) or predicted positions (CLM) in the global batch
    local_tokens: int
    local_targets: int


def build_batch(sequences: list[np.ndarray], pad_id: int, objective: str, masker: MLMMasker | None,
                generator: torch.Generator | None, rank: int, world_size: int, device: torch.device) -> Batch:
    """Pad the global batch, draw its MLM targets (identically on every process), keep this process's rows."""
    ids, mask = pad_batch(sequences, pad_id)
    ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    if objective == "mlm" and masker is not None:
        ids, labels = masker(ids, mask, generator=generator)
        target_mask = labels != -100
    elif objective == "mlm":
        # Hidden-state losses alone: the student learns the teacher's states on clean text, as it will see it.
        labels = torch.full_like(ids, -100)
        target_mask = torch.zeros_like(mask, dtype=torch.bool)
    else:
        labels = causal_lm_labels(ids, mask)
        target_mask = torch.zeros_like(mask, dtype=torch.bool)
        target_mask[:, 1:] = labels[:, 1:] != -100
    rows = local_rows(len(sequences), rank, world_size)
    local_mask = mask[rows]
    # Trim columns that are padding in every local row.
    width = int(local_mask.sum(dim=1).max())
    counts = torch.stack([mask.sum(), target_mask.sum(), local_mask.sum(), target_mask[rows].sum()]).tolist()
    return Batch(
        input_ids=ids[rows, :width], attention_mask=local_mask[:, :width], labels=labels[rows, :width],
        global_tokens=int(counts[0]), global_targets=int(counts[1]),
        local_tokens=int(counts[2]), local_targets=int(counts[3]),
    )


@dataclass
class TermSpec:
    weights: dict[str, float]        # term name -> alpha (only non-zero ones)
    temperature: float
    objective: str                   # mlm | clm
    restrict_ce_to_mask: bool
    layer_pairs: list[tuple[int, int]]

    @property
    def needs_logits(self) -> bool:
        return any(t in self.weights for t in LOGIT_TERMS)

    @property
    def needs_teacher_logits(self) -> bool:
        return any(t in self.weights for t in ("ce", "mse"))

    @property
    def needs_hidden(self) -> bool:
        return any(t in self.weights for t in HIDDEN_TERMS)

    @property
    def needs_teacher(self) -> bool:
        return self.needs_teacher_logits or self.needs_hidden

    @property
    def needs_masking(self) -> bool:
        """MLM corruption only matters to losses on logits; hidden-state matching uses clean text."""
        return self.objective == "mlm" and self.needs_logits


def term_spec_from(config, layer_pairs: list[tuple[int, int]]) -> TermSpec:
    loss = config.loss
    alphas = {"ce": loss.alpha_ce, "mlm": loss.alpha_mlm, "clm": loss.alpha_clm, "mse": loss.alpha_mse,
              "cos": loss.alpha_cos, "hidden_mse": loss.alpha_hidden_mse}
    return TermSpec(weights={k: float(v) for k, v in alphas.items() if v > 0}, temperature=float(loss.temperature),
                    objective=config.objective, restrict_ce_to_mask=bool(loss.restrict_ce_to_mask),
                    layer_pairs=list(layer_pairs))


def forward(model, batch: Batch, want_hidden: bool):
    """Run a model (full LM or its base) and return (logits or None, hidden_states tuple or None)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=want_hidden,
                return_dict=True)
    logits = getattr(out, "logits", None)
    return logits, (out.hidden_states if want_hidden else None)


def compute_terms(spec: TermSpec, batch: Batch, s_logits, s_hidden, t_logits, t_hidden,
                  only: tuple[str, ...] | None = None) -> dict[str, tuple]:
    """Each term as (local mean, local count, global count): the mean over this process's rows and the
    counts that turn it into this process's share of the global mean. `only` limits the terms computed."""
    real = batch.attention_mask.bool()
    if spec.objective == "clm":
        predicted = torch.zeros_like(real)
        predicted[:, 1:] = batch.labels[:, 1:] != -100
    else:
        predicted = batch.labels != -100
    kd_rows = predicted if spec.restrict_ce_to_mask else real
    kd_local = batch.local_targets if spec.restrict_ce_to_mask else batch.local_tokens
    kd_global = batch.global_targets if spec.restrict_ce_to_mask else batch.global_tokens

    terms: dict[str, tuple] = {}
    w = {k: v for k, v in spec.weights.items() if only is None or k in only}
    if "ce" in w:
        terms["ce"] = (losses.soft_target_kl(s_logits, t_logits, spec.temperature, kd_rows), kd_local, kd_global)
    if "mse" in w:
        terms["mse"] = (losses.logit_mse(s_logits, t_logits, kd_rows), kd_local, kd_global)
    if "mlm" in w:
        terms["mlm"] = (losses.masked_lm_loss(s_logits, batch.labels), batch.local_targets, batch.global_targets)
    if "clm" in w:
        terms["clm"] = (losses.causal_lm_loss(s_logits, batch.labels), batch.local_targets, batch.global_targets)
    if "cos" in w or "hidden_mse" in w:
        for name, fn in (("cos", losses.hidden_cosine), ("hidden_mse", losses.hidden_mse)):
            if name in w:
                per_pair = [fn(s_hidden[s], t_hidden[t], real) for s, t in spec.layer_pairs]
                terms[name] = (torch.stack(per_pair).mean(), batch.local_tokens, batch.global_tokens)
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
    return flat_real, kd_rows, row_labels


def fused_logit_terms(spec: TermSpec, batch: Batch, s_states, t_states, s_projection, t_projection):
    """Logit terms through the fused head: (differentiable weighted total, {term: detached global share})."""
    from distil.fused_head import HeadTerms, fused_head_losses

    flat_real, kd_rows, row_labels = row_targets(spec, batch)
    kd_global = batch.global_targets if spec.restrict_ce_to_mask else batch.global_tokens
    w = spec.weights
    lm_name = "clm" if spec.objective == "clm" else "mlm"
    terms = HeadTerms(temperature=spec.temperature, coef_ce=w.get("ce", 0.0) / max(kd_global, 1),
                      coef_mse=w.get("mse", 0.0) / max(kd_global, 1),
                      coef_lm=w.get(lm_name, 0.0) / max(batch.global_targets, 1))
    hidden = s_states.reshape(-1, s_states.shape[-1])[flat_real]
    teacher = t_states.reshape(-1, t_states.shape[-1])[flat_real] if t_states is not None else None
    total, sums = fused_head_losses(hidden, s_projection, teacher, t_projection, kd_rows, row_labels, terms)
    shares = {}
    for index, name, denominator in ((0, "ce", kd_global), (1, "mse", kd_global), (2, lm_name, batch.global_targets)):
        if name in w:
            shares[name] = sums[index] / max(denominator, 1)
    return total, shares


def global_share(terms: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """This process's contribution to each global mean: summed over processes it gives the global value."""
    return {name: mean * (local / max(glob, 1)) for name, (mean, local, glob) in terms.items()}


def weighted_total(shares: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    return sum(weights[name] * value for name, value in shares.items())
