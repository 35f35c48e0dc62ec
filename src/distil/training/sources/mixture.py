"""Several teachers as one source: their distributions mixed per position in probability space,

    m = sum_i w_i softmax(z_i / T_i)       (weights normalised to sum to 1; T_i each teacher's temperature)

the distribution of "pick teacher i with probability w_i, then a token from it". It keeps every teacher's support:
a token one teacher is sure of keeps at least w_i of that certainty. (Averaging logits instead gives the geometric
mixture, prod_i p_i^(w_i) renormalised: it sharpens where the teachers agree and can give a token one teacher is
sure of almost no probability when another rules it out.)

The mixed signal is handed to the engine in the form its divergences already take, so nothing below changes:
- every member dense (live teachers): MixedSignals, a dense signal whose logits are T * log m, T the run's
  temperature (distil.teacher_signal.signals). The divergence softens teacher logits at T, and
  softmax(T log m / T) = m: the student is compared with m itself. It is mixed only when the engine asks for a
  chunk of rows, so live teachers handing on their output layer's input keep the fused path's memory bound.
- any member sparse (a store): SparseSignals over the union of the members' top ids (a dense member contributes
  its own top ids, as many as the largest store keeps), with m at each and the rest mass sum_i w_i R_i. A dense
  member's probabilities are exact everywhere. A store knows its top-k and its rest mass R_i only, so at a union id
  outside its own top-k it is taken to spread R_i evenly over the V - k_i ids it did not keep (its share there
  R_i / (V - k_i)); the mixture is exact when every store holds the whole vocabulary (k_i = V). Rows whose union is
  narrower than the widest are filled with ids outside the union, at the same even share. Stores with sampled
  tail tokens are refused in a mixture (their draws follow one teacher's tail, not the mixture's).
A member of weight 0 is left out; a single remaining member at the run's temperature passes its signals through
unchanged (so weights 1 and 0 give exactly the first teacher's loss).

Hidden-state and self-attention terms compare the student with one named teacher (`loss.hidden_teacher`): its
hidden states and attention are what the mixture returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distil.teacher_signal.signals import LOG_FLOOR, DenseSignals, MixedSignals, Signals, SparseSignals
from distil.training.sources.interface import TeacherOutputs, TeacherRequest


def _log_probs(signals: DenseSignals, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    return F.log_softmax(signals.teacher_logits().to(dtype) / temperature, dim=-1)


def _union_ids(parts: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(N, K) ids: each row's distinct ids of `parts` (each (N, k_i)), then ids outside them, K = min(sum k_i, V)."""
    candidates = torch.cat(parts, dim=1)
    n, total = candidates.shape
    width = min(total, vocab_size)
    ordered, _ = candidates.sort(dim=1)
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    distinct, _ = ordered.masked_fill(repeated, vocab_size).sort(dim=1)   # distinct ids first, then V (none)
    distinct = distinct[:, :width]
    count = (distinct < vocab_size).sum(dim=1, keepdim=True)
    # Among the first min(V, 2K) ids at least K - count lie outside the union: the fillers are taken from them.
    pool = torch.arange(min(vocab_size, 2 * width), device=candidates.device).expand(n, -1)
    in_union = (pool.unsqueeze(2) == distinct.unsqueeze(1)).any(dim=2)
    outside, _ = torch.where(in_union, vocab_size + pool, pool).sort(dim=1)
    slot = torch.arange(width, device=candidates.device).expand(n, -1)
    filler = outside.gather(1, (slot - count).clamp(0, outside.shape[1] - 1))
    return torch.where(slot < count, distinct, filler)


def _sparse_mixture(parts: list[Signals], weights: list[float], temperatures: list[float],
                    vocab_size: int) -> SparseSignals:
    """The mixture over the union of the members' top ids, with the rest mass combined (see the module docstring)."""
    widest = max(p.top_ids.shape[1] for p in parts if isinstance(p, SparseSignals))
    dtype = torch.float64  # sums of probabilities and their differences: exact enough to keep m + rest = 1
    log_probs = {i: _log_probs(p, temperatures[i], dtype) for i, p in enumerate(parts) if isinstance(p, DenseSignals)}
    own_ids = [p.top_ids if isinstance(p, SparseSignals) else log_probs[i].topk(min(widest, vocab_size), dim=1).indices
               for i, p in enumerate(parts)]
    ids = _union_ids(own_ids, vocab_size)
    mixed = torch.zeros(ids.shape, dtype=dtype, device=ids.device)
    rest = torch.zeros(ids.shape[0], dtype=dtype, device=ids.device)
    for i, (part, weight) in enumerate(zip(parts, weights)):
        if i in log_probs:
            probs = log_probs[i].gather(1, ids).exp()
            part_rest = log_probs[i].scatter(1, ids, float("-inf")).logsumexp(dim=1).exp()
        else:
            if part.sampled:
                raise ValueError("a store with sampled tail tokens cannot be mixed")
            k = part.top_ids.shape[1]
            match = ids.unsqueeze(2) == part.top_ids.unsqueeze(1)                     # (N, K, k)
            known = match.any(dim=2)
            stored = (match * part.top_logp.to(dtype).exp().unsqueeze(1)).sum(dim=2)
            part_rest_mass = part.log_rest.to(dtype).exp()
            share = part_rest_mass / (vocab_size - k) if vocab_size > k else torch.zeros_like(part_rest_mass)
            probs = torch.where(known, stored, share.unsqueeze(1))
            part_rest = (part_rest_mass - (~known).sum(dim=1) * share).clamp_min(0.0)
        mixed += weight * probs
        rest += weight * part_rest
    top_logp, order = mixed.log().clamp_min(LOG_FLOOR).sort(dim=1, descending=True)
    return SparseSignals(top_ids=ids.gather(1, order), top_logp=top_logp.float(),
                         log_rest=rest.log().clamp_min(LOG_FLOOR).float())


def mix_signals(parts: list[Signals], weights: list[float], temperatures: list[float], run_temperature: float,
                vocab_size: int) -> Signals:
    """The members' signals (one row per kd position each) mixed per position in probability space. `weights`
    need not be normalised; `temperatures`: each member's (a store's: the one it was written at)."""
    total = float(sum(weights))
    kept = [(p, w / total, t) for p, w, t in zip(parts, weights, temperatures) if w > 0]
    if len(kept) == 1 and isinstance(kept[0][0], SparseSignals):
        return kept[0][0]
    if len(kept) == 1 and kept[0][2] == run_temperature:
        return kept[0][0]
    parts, weights, temperatures = (list(x) for x in zip(*kept))
    if all(isinstance(p, DenseSignals) for p in parts):   # mixed when the engine asks, chunk by chunk
        return MixedSignals(members=tuple(parts), weights=tuple(weights), temperatures=tuple(temperatures),
                            run_temperature=run_temperature)
    return _sparse_mixture(parts, weights, temperatures, vocab_size)


class TeacherMixture:
    """Several sources, weighted, as one (see the module docstring)."""

    has_head = True

    def __init__(self, sources: list, weights: list[float], temperatures: list[float], run_temperature: float,
                 vocab_size: int, hidden_member: int = 0):
        self.sources, self.weights, self.temperatures = list(sources), list(weights), list(temperatures)
        self.run_temperature = float(run_temperature)
        self.vocab_size = int(vocab_size)
        self.hidden_member = hidden_member
        reference = self.sources[hidden_member]
        self.name = "+".join(s.name for s in self.sources)
        self.config = reference.config
        self.model = reference.model
        self.hidden_states = reference.hidden_states
        self.temperature = None
        self.covers_heldout = all(s.covers_heldout for s in self.sources)
        self.own_vocabulary = all(s.own_vocabulary for s in self.sources)

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [m for s in self.sources for m in s.modules]

    @property
    def members(self) -> list:
        return [(s.name, s) for s in self.sources]

    def outputs(self, batch, request: TeacherRequest) -> TeacherOutputs:
        signals_only = TeacherRequest(kd_rows=request.kd_rows)
        answers = [s.outputs(batch, request if i == self.hidden_member else signals_only)
                   for i, s in enumerate(self.sources)]
        reference = answers[self.hidden_member]
        signals = None
        if request.kd_rows is not None:
            signals = mix_signals([a.signals for a in answers], self.weights, self.temperatures, self.run_temperature,
                                  self.vocab_size)
        return TeacherOutputs(signals=signals, hidden=reference.hidden, attention=reference.attention)

    def describe(self) -> str:
        total = sum(self.weights)
        return "teachers mixed in probability space: " + "; ".join(f"{s.describe()}, weight {w / total:.3g}, temperature {t:g}"
                         + (" (hidden-state terms)" if i == self.hidden_member else "")
                         for i, (s, w, t) in enumerate(zip(self.sources, self.weights, self.temperatures)))
