"""Step time of the fused output layer (forward + backward) of two source trees, interleaved A/B, one thread.

The output layer and logit losses of one training step at the training-step benchmark's shapes (bench_train_step:
global batch 16 x ~46 real tokens = 736 rows, hidden 384, vocabulary 30,522, T=2, alpha_ce 5, alpha_mlm 2 on ~15%
of the rows), against a live teacher's projection, through `distil.training.fused_head.fused_head_losses` of each
tree. Configurations: `all_rows` (the soft-target term on every real token, the default) and `masked_rows`
(restrict_ce_to_mask: soft targets on the labelled rows only).

Both trees are loaded into one process (A's modules are imported, kept by reference and removed from sys.modules
before B's are imported), and each round times one call of A and one of B back to back, alternating which goes
first: on a machine shared with other work, a neighbour's load then falls on both sides of a pair alike, and the
per-round ratio B / A and its median over rounds are what the comparison rests on. Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/bench_engine_ab.py --a /path/to/old/src --b src --rounds 15
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch

ROWS, HIDDEN, VOCAB = 736, 384, 30_522


def load_tree(path: str):
    """(fused_head_losses, HeadTerms) of the distil package under `path`."""
    for name in [m for m in sys.modules if m == "distil" or m.startswith("distil.")]:
        del sys.modules[name]
    sys.path.insert(0, os.path.abspath(path))
    try:
        module = importlib.import_module("distil.training.fused_head")
    finally:
        sys.path.pop(0)
    return module.fused_head_losses, module.HeadTerms


def problem(config: str):
    torch.manual_seed(0)
    projection = torch.nn.Linear(HIDDEN, VOCAB)
    teacher_projection = torch.nn.Linear(HIDDEN, VOCAB)
    hidden = torch.randn(ROWS, HIDDEN, requires_grad=True)
    teacher_hidden = torch.randn(ROWS, HIDDEN) * 2
    labelled = torch.rand(ROWS) < 0.15
    labels = torch.where(labelled, torch.randint(0, VOCAB, (ROWS,)), torch.full((ROWS,), -100))
    kd_rows = labelled if config == "masked_rows" else torch.ones(ROWS, dtype=torch.bool)
    return projection, teacher_projection, hidden, teacher_hidden, kd_rows, labels, labelled


def timed_call(tree, data) -> tuple[float, float]:
    fused_head_losses, head_terms = tree
    projection, teacher_projection, hidden, teacher_hidden, kd_rows, labels, labelled = data
    terms = head_terms(2.0, coef_ce=5.0 / int(kd_rows.sum()), coef_lm=2.0 / int(labelled.sum()))
    hidden.grad = None
    projection.zero_grad()
    started = time.perf_counter()
    total, _ = fused_head_losses(hidden, projection, teacher_hidden, teacher_projection, kd_rows, labels, terms)
    total.backward()
    return time.perf_counter() - started, total.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="source tree A (a directory holding the distil package)")
    parser.add_argument("--b", required=True, help="source tree B")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--configs", nargs="*", default=["all_rows", "masked_rows"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    trees = {"a": load_tree(args.a), "b": load_tree(args.b)}
    for config in args.configs:
        data = problem(config)
        losses = {side: timed_call(tree, data)[1] for side, tree in trees.items()}  # warm-up (workspace, pages)
        assert abs(losses["a"] - losses["b"]) <= 1e-4 * abs(losses["a"]), losses
        ratios, sums = [], {"a": 0.0, "b": 0.0}
        print(f"| {config} round | A (s) | B (s) | B / A |\n|---:|---:|---:|---:|")
        for index in range(args.rounds):
            order = ("a", "b") if index % 2 == 0 else ("b", "a")
            got = {side: timed_call(trees[side], data)[0] for side in order}
            ratios.append(got["b"] / got["a"])
            sums["a"] += got["a"]
            sums["b"] += got["b"]
            print(f"| {index + 1} | {got['a']:.3f} | {got['b']:.3f} | {ratios[-1]:.3f} |", flush=True)
        print(f"{config}: median B / A over {args.rounds} rounds = {statistics.median(ratios):.3f} "
              f"(total time B / A = {sums['b'] / sums['a']:.3f})\n")


if __name__ == "__main__":
    main()
