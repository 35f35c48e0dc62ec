"""Held-out evaluation during training: student and teacher losses on fixed batches with fixed masks.

The batches and the MLM masks are the same at every evaluation and in every run with the same data and batch
size, so the numbers are comparable across steps and runs. A final batch smaller than the others (or a held-out
split smaller than one global batch) is evaluated as it is: every mean is over the tokens actually seen. `kd` is
the divergence the run trains (loss.divergence, by the one definition in distil.teacher_signal.divergences, at the
recipe's temperature) over every real token, and `divergence` names it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from distil import losses
from distil.data.dataset import TokenSequences
from distil.training.attention_capture import captured_attention
from distil.training.objective import (ATTENTION_TERMS, HIDDEN_TERMS, SENTENCE_TERMS, Objective, build_step,
                                       compute_terms, forward,
                                       step_share)

log = logging.getLogger(__name__)

HELDOUT_MASK_SEED = 12345


def heldout_batches(heldout: TokenSequences, global_batch: int, max_batches: int) -> list[list[int]]:
    """The first `max_batches` global batches of the held-out split, in order; the last may be partial."""
    count = min(len(heldout), global_batch * max_batches)
    if 0 < len(heldout) < global_batch:
        log.warning("The held-out split has %d sequences, fewer than one global batch of %d (batch size x "
                    "processes); it is evaluated as one smaller batch.", len(heldout), global_batch)
    return [list(range(start, min(count, start + global_batch))) for start in range(0, count, global_batch)]


@torch.no_grad()
def evaluate_heldout(acc, objective: Objective, student: torch.nn.Module, heldout: TokenSequences,
                     batches: list[list[int]], masker, pad_id: int, sharded: bool = False) -> dict:
    """Means over the given held-out batches: the student's and the teacher's own LM loss, their soft-target
    divergence (the recipe's, at its temperature; named by "divergence"), and the hidden-state terms of the recipe;
    plus tokens/s."""
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    spec = objective.spec
    was_training = student.training
    student.eval()
    generator = torch.Generator(device=device)
    own_name = spec.objective
    # The recipe's hidden-state and self-attention terms, measured the same way as in training.
    representation = tuple(t for t in HIDDEN_TERMS + SENTENCE_TERMS + ATTENTION_TERMS if t in spec.weights)
    names = ["student_" + own_name, "teacher_" + own_name, "kd"] + list(representation)
    # Sums of token-weighted values and of the counts they are weighted by, reduced over processes at the end.
    sums = torch.zeros(len(names), device=device)
    counts = torch.zeros(len(names), device=device)
    own = losses.causal_lm_loss if spec.objective == "clm" else losses.masked_lm_loss
    started, tokens = time.perf_counter(), 0
    for index, indices in enumerate(batches):
        generator.manual_seed(HELDOUT_MASK_SEED + index)
        batch = build_step([heldout[i] for i in indices], pad_id, spec.objective, masker, generator, rank, world,
                           device)[0]
        tokens += batch.step_tokens
        if batch.input_ids.shape[0] == 0:
            if sharded:  # sharded models gather parameters inside forward: every process must run it
                padding = torch.full((1, 1), pad_id, device=device)
                stand_in = dataclasses.replace(batch, input_ids=padding, attention_mask=torch.ones_like(padding))
                forward(objective.teacher, stand_in, spec.needs_hidden, objective.teacher_norm)
                forward(student, stand_in, spec.needs_hidden, objective.student_norm)
            continue  # this process has no row of a small final batch
        with acc.autocast():
            with captured_attention(objective.teacher, *spec.captured_layers(1)) as t_attention:
                t_logits, t_hidden = forward(objective.teacher, batch, spec.needs_hidden, objective.teacher_norm)
            with captured_attention(objective.student, *spec.captured_layers(0)) as s_attention:
                s_logits, s_hidden = forward(student, batch, spec.needs_hidden, objective.student_norm)
        if spec.vocab_limit is not None:  # output layers padded differently: the tokenizer's ids only
            s_logits = s_logits[..., :spec.vocab_limit] if s_logits is not None else None
            t_logits = t_logits[..., :spec.vocab_limit] if t_logits is not None else None
        values: dict[str, tuple] = {}
        if s_logits is not None:
            values["student_" + own_name] = (own(s_logits, batch.labels), batch.local_targets, 1)
        if t_logits is not None:
            values["teacher_" + own_name] = (own(t_logits, batch.labels), batch.local_targets, 1)
        if s_logits is not None and t_logits is not None:
            values["kd"] = (losses.soft_target_loss(s_logits, t_logits, spec.temperature, batch.attention_mask.bool(),
                                                    spec.divergence, spec.jsd_beta, spec.skew_alpha),
                            batch.local_tokens, 1)
        if representation:
            terms = compute_terms(spec, batch, s_logits, s_hidden, t_logits, t_hidden, only=representation,
                                  s_attention=s_attention, t_attention=t_attention, project=objective.project)
            values.update({k: (mean, local, 1) for k, (mean, local, _) in terms.items()})
        weighted = step_share(values)  # mean x local count: a sum over this process's rows
        for i, name in enumerate(names):
            if name in weighted:
                sums[i] += weighted[name].float()
                counts[i] += values[name][1]
    if was_training:
        student.train()
    sums = acc.reduce(sums, reduction="sum").tolist()
    counts = acc.reduce(counts, reduction="sum").tolist()
    result = {name: total / count for name, total, count in zip(names, sums, counts) if count > 0}
    if "kd" in result:
        result["divergence"] = spec.divergence
    if spec.objective == "clm":
        for who in ("student", "teacher"):
            if f"{who}_clm" in result:
                result[f"{who}_perplexity"] = math.exp(min(result[f"{who}_clm"], 50.0))
    result["batches"] = len(batches)
    result["tokens_per_s"] = tokens / max(time.perf_counter() - started, 1e-9)
    return result
