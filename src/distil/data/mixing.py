"""Mixing several corpora with weights: `distil prepare --mix a.txt:0.7 b.jsonl:0.3 ...` (multilingual, multi-domain).

What the weights mean. Weights are relative: they are normalised to probabilities p_i = w_i / sum(w), so
`a:7 b:3` is the same mix as `a:0.7 b:0.3`. The mixed corpus is built one line at a time. For line k a source is
drawn with probabilities p, and that source's next line is taken; every source is read once, front to back, in
its own order. The draw is exact and reproducible: with u_k the k-th value of
`numpy.random.default_rng([seed, 1]).random()` and c the cumulative sums of p, line k comes from the source i
with c_(i-1) <= u_k < c_i (c_(-1) = 0).

When it stops. The mix ends at the first draw that picks a source with no line left; the lines the other sources
have not given by then are not used. Nothing is repeated or up-sampled, so no line is seen twice in training and
no line can land in both the train and the held-out split. Each source's share of the lines is p_i in
expectation, and the mix is about n_i / p_i lines long for the source i that runs out first (n_i its lines).

What a line is. A line is one sequence a source gives the tokenizer: a non-empty line of a text file, the non-empty
text of one dataset row. Empty lines and skipped bad lines are never drawn. The shares hold for lines, before
long lines are cut into chunks, before short or mostly-unknown sequences are dropped and before the --heldout
draw (its own random stream, also from --seed), so a source's share of the tokens also depends on its line lengths.
The manifest ("mix") and the printed summary give, per source, the lines taken and their share, and which source
ran out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from distil.data.textfiles import ReadStats
from distil.errors import DistilError

MIX_STREAM = 1  # second word of the mix generator's seed: independent of the held-out draw's default_rng(seed)
DRAWS_PER_BLOCK = 4096

LineSource = Callable[[ReadStats], Iterator[str]]


def parse_mix(entries: Sequence[str | tuple[str, float]]) -> list[tuple[str, float]]:
    """`SOURCE:WEIGHT` strings (or (source, weight) pairs) -> [(source, weight)], refusing unusable weights."""
    parsed: list[tuple[str, float]] = []
    for entry in entries:
        if isinstance(entry, str):
            name, sep, weight_text = entry.rpartition(":")
            if not sep or not name:
                raise DistilError(
                    f"--mix {entry!r} has no weight. Write each source as SOURCE:WEIGHT, "
                    "e.g. --mix en.txt:0.7 fr.txt:0.3."
                )
            try:
                weight = float(weight_text)
            except ValueError:
                raise DistilError(
                    f"--mix {entry!r}: the weight {weight_text!r} is not a number. "
                    "Write SOURCE:WEIGHT, e.g. en.txt:0.7."
                ) from None
        else:
            name, weight = entry
            weight = float(weight)
        if not math.isfinite(weight) or weight <= 0:
            raise DistilError(
                f"--mix {name}: the weight must be a positive number, got {weight}. Weights are relative "
                "(normalised to sum to 1); leave a source out rather than giving it weight 0."
            )
        if any(name == seen for seen, _ in parsed):
            raise DistilError(f"--mix lists {name} twice. Give each source once, with its whole weight.")
        parsed.append((name, weight))
    if not parsed:
        raise DistilError("--mix needs at least one SOURCE:WEIGHT.")
    return parsed


def mix_probabilities(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def draw_sources(probabilities: np.ndarray, seed: int) -> Iterator[int]:
    """The source index of each line in turn, as the module docstring defines it (an endless stream)."""
    cdf = np.cumsum(probabilities)
    cdf[-1] = 1.0  # a rounding shortfall must not leave u just below 1 without a source
    rng = np.random.default_rng([seed, MIX_STREAM])
    while True:
        # Drawing in blocks gives the same u_k as drawing one at a time: each double takes one generator step.
        yield from np.searchsorted(cdf, rng.random(DRAWS_PER_BLOCK), side="right").tolist()


@dataclass
class WeightedMix:
    """Interleaves line sources by a seeded weighted draw per line until one runs out; counts lines per source."""

    names: list[str]
    weights: list[float]
    openers: list[LineSource]
    seed: int
    details: list[dict] = field(default_factory=list)  # per source, extra manifest fields (e.g. a dataset's identity)
    taken: list[int] = field(init=False)
    stopped_by: str | None = field(init=False, default=None)

    def __post_init__(self):
        self.taken = [0] * len(self.names)
        self.details = self.details or [{} for _ in self.names]

    def lines(self, stats: ReadStats) -> Iterator[str]:
        iterators = [open_lines(stats) for open_lines in self.openers]
        try:
            for index in draw_sources(mix_probabilities(self.weights), self.seed):
                try:
                    text = next(iterators[index])
                except StopIteration:
                    self.stopped_by = self.names[index]
                    return
                self.taken[index] += 1
                yield text
        finally:
            for iterator in iterators:
                iterator.close()  # sources cut short close their files now, not at garbage collection

    def manifest(self) -> dict:
        total = sum(self.taken)
        probabilities = mix_probabilities(self.weights)
        return {
            "rule": "one seeded weighted draw per line; stops when the drawn source has no line left",
            "seed": self.seed,
            "stopped_by": self.stopped_by,
            "lines": total,
            "sources": [
                {"source": name, "weight": weight, "probability": round(float(p), 6), "lines": n,
                 "share": round(n / total, 6) if total else 0.0, **detail}
                for name, weight, p, n, detail in zip(self.names, self.weights, probabilities, self.taken, self.details)
            ],
        }


def mix_summary(mix: dict) -> list[str]:
    """Printed lines for the manifest's "mix" entry."""
    parts = [f"{s['source']} {s['lines']:,} line{'' if s['lines'] == 1 else 's'} ({100 * s['share']:.1f}%, "
             f"weight {s['weight']:g})" for s in mix["sources"]]
    return [f"  mix (seed {mix['seed']}, stopped when {mix['stopped_by']} ran out): " + ", ".join(parts)]
