"""From the teacher's dense logits at a sequence's positions to what the store keeps: top-k, rest mass, draws.

Pure functions on tensors; the writer calls them once per sequence with a generator seeded by the sequence's
index, so a sequence's draws do not depend on batching, process count or resumption.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distil.teacher_signal.signals import LOG_FLOOR, SparseSignals

SEED_STRIDE = 1_000_003


def sequence_generator(seed: int, sequence_index: int) -> torch.Generator:
    """The generator of one sequence's draws: fixed by the store's seed and the sequence's index alone."""
    generator = torch.Generator()
    generator.manual_seed(seed * SEED_STRIDE + sequence_index)
    return generator


def sparse_signals(logits: Tensor, k: int, temperature: float, sampled: int = 0,
                   generator: torch.Generator | None = None, proposal_temperature: float = 1.0) -> SparseSignals:
    """Top-k log-probabilities of softmax(logits / T) (L, V), the log of the mass outside them, and `sampled`
    draws (with replacement) from a proposal over the tail: r proportional to p^(1 / proposal_temperature) on the
    tokens outside the top-k (1: the tail renormalised; > 1: flatter, more of the far tail). Each draw keeps
    log p and its importance log-weight log(p / (sampled * r)), so that sum_j w_j f(j) estimates the sum of p f
    over the tail without bias. With proposal_temperature 1 every weight is R / sampled: the weights sum to the
    rest mass exactly, which is why a control variate on R gains nothing there (benchmarks/bench_tail_estimator.py)."""
    z = logits.float() / temperature
    logp = torch.log_softmax(z, dim=-1)
    top_logp, top_ids = logp.topk(k, dim=-1)
    outside = logp.scatter(1, top_ids, float("-inf"))
    log_rest = torch.logsumexp(outside, dim=-1).clamp_min(LOG_FLOOR) if k < logp.shape[-1] \
        else torch.full(logp.shape[:1], LOG_FLOOR)
    n = logp.shape[0]
    if sampled <= 0:
        empty = torch.zeros(n, 0)
        return SparseSignals(top_ids, top_logp, log_rest, empty.long(), empty, empty)
    log_r = torch.log_softmax(outside / proposal_temperature, dim=-1)   # -inf on the top-k: never drawn
    draws = torch.multinomial(log_r.exp(), sampled, replacement=True, generator=generator)
    sample_logp = logp.gather(1, draws)
    sample_logw = sample_logp - log_r.gather(1, draws) - math.log(sampled)
    return SparseSignals(top_ids, top_logp, log_rest, draws, sample_logp, sample_logw)
