"""Held-out evaluation during training: student and teacher losses on fixed batches with fixed masks.

The batches and the MLM masks are the same at every evaluation and in every run with the same data and batch
size, so the numbers are comparable across steps and runs. A final batch smaller than the others (or a held-out
split smaller than one global batch) is evaluated as it is: every mean is over the tokens actually seen. `kd` is
the divergence the run trains (loss.divergence, by the one definition in distil.teacher_signal.divergences, at the
recipe's temperature) over every real token, against the run's teacher source (a mixture's mixed signals), and
`divergence` names it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from distil import losses
from distil.data.dataset import TokenSequences
from distil.cross_tokenizer.divergence import soft_target_divergence
from distil.teacher_signal.signals import DenseSignals
from distil.training.attention_capture import captured_attention
from distil.training.batches import build_step
from distil.training.model_outputs import forward
from distil.training.objective import (ATTENTION_TERMS, compute_terms, HIDDEN_TERMS, Objective, SENTENCE_TERMS,
                                       step_share)
from distil.training.sources.interface import TeacherOutputs, TeacherRequest

log = logging.getLogger(__name__)

HELDOUT_MASK_SEED = 12345


def heldout_batches(heldout: TokenSequences, global_batch: int, max_batches: int) -> list[list[int]]:
    """The first `max_batches` global batches of the held-out split, in order; the last may be partial."""
    count = min(len(heldout), global_batch * max_batches)
    if 0 < len(heldout) < global_batch:
        log.warning("The held-out split has %d sequences, fewer than one global batch of %d (batch size x "
                    "processes); it is evaluated as one smaller batch.", len(heldout), global_batch)
    return [list(range(start, min(count, start + global_batch))) for start in range(0, count, global_batch)]


def _own_loss(own, signals: DenseSignals, real: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A model's own LM loss from its logits at the real positions (one row each)."""
    rows = signals.teacher_logits()
    logits = rows.new_zeros(*real.shape, rows.shape[-1])
    logits[real] = rows
    return own(logits, labels)


@torch.no_grad()
def evaluate_heldout(acc, objective: Objective, student: torch.nn.Module, heldout: TokenSequences,
                     batches: list[list[int]], masker, pad_id: int, sharded: bool = False) -> dict:
    """Means over the given held-out batches: the student's own LM loss, its soft-target divergence from the
    teacher's signals (the recipe's, at its temperature; named by "divergence"), and the hidden-state terms of the
    recipe; with a teacher run in process, the teacher's own LM loss; with several teachers, the divergence from
    each alone at the run's temperature (kd_NAME) besides the one from their mixture (kd); plus tokens/s. A source that holds no held-out signals
    (a store) gives the student's own loss only."""
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    spec, source = objective.spec, objective.source
    was_training = student.training
    student.eval()
    generator = torch.Generator(device=device)
    own_name = spec.objective
    with_teacher = source.covers_heldout and spec.needs_teacher
    # The recipe's hidden-state and self-attention terms, measured the same way as in training.
    representation = tuple(t for t in HIDDEN_TERMS + SENTENCE_TERMS + ATTENTION_TERMS
                           if t in spec.weights and with_teacher)
    members = source.members if len(source.members) > 1 and with_teacher and spec.needs_teacher_logits else []
    own_teachers = [(name, m) for name, m in source.members if m.temperature is None and m.own_vocabulary] \
        if with_teacher and spec.needs_teacher_logits else []
    teacher_names = ["teacher_" + own_name + (f"_{name}" if len(source.members) > 1 else "")
                     for name, _ in own_teachers]
    names = (["student_" + own_name] + teacher_names + ["kd"] + [f"kd_{name}" for name, _ in members]
             + list(representation))
    divergence = soft_target_divergence(spec)
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
                if with_teacher:
                    for _, member in source.members:
                        member.outputs(stand_in, TeacherRequest(kd_rows=stand_in.attention_mask.bool(),
                                                                hidden=spec.needs_hidden))
                forward(student, stand_in, spec.needs_hidden, objective.student_norm)
            continue  # this process has no row of a small final batch
        real = batch.attention_mask.bool()
        request = TeacherRequest(kd_rows=real if spec.needs_teacher_logits else None, hidden=spec.needs_hidden,
                                 attention=spec.captured_layers(1))
        teacher = source.outputs(batch, request) if with_teacher else TeacherOutputs()
        with acc.autocast():
            with captured_attention(objective.student, *spec.captured_layers(0)) as s_attention:
                s_logits, s_hidden = forward(student, batch, spec.needs_hidden, objective.student_norm)
        if spec.vocab_limit is not None and s_logits is not None:  # output layers padded differently
            s_logits = s_logits[..., :spec.vocab_limit]
        values: dict[str, tuple] = {}
        if s_logits is not None:
            values["student_" + own_name] = (own(s_logits, batch.labels), batch.local_targets, 1)
            rows = s_logits[real]
            if teacher.signals is not None:
                values["kd"] = (divergence.value(rows, teacher.signals) / rows.shape[0], batch.local_tokens, 1)
            member_signals = {name: m.outputs(batch, TeacherRequest(kd_rows=real)).signals for name, m in members}
            for name, signals in member_signals.items():
                values[f"kd_{name}"] = (divergence.value(rows, signals) / rows.shape[0], batch.local_tokens, 1)
            for (name, member), key in zip(own_teachers, teacher_names):
                signals = member_signals.get(name) if members else teacher.signals
                values[key] = (_own_loss(own, signals, real, batch.labels), batch.local_targets, 1)
        if representation:
            terms = compute_terms(spec, batch, s_logits, s_hidden, teacher.signals, teacher.hidden,
                                  only=representation, s_attention=s_attention, t_attention=teacher.attention,
                                  project=objective.project)
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
        for key in ["student_clm"] + teacher_names:
            if key in result:
                result[key.replace("_clm", "_perplexity")] = math.exp(min(result[key], 50.0))
    result["batches"] = len(batches)
    result["tokens_per_s"] = tokens / max(time.perf_counter() - started, 1e-9)
    return result
