"""Does the known rest mass R, used as a control variate, lower the variance of the sampled tail's gradient?

The store keeps the teacher's top-k, the rest mass R = 1 - sum of the top-k probabilities, and k' tokens drawn from
a proposal r over the tail with importance weights w_j = p_j / (k' r_j) (distil.teacher_cache.signals). The
sampled forward-KL estimate's gradient with respect to the student's logits z (at T = 1) is

  g = (sum_k p_k + W) q - p on the top-k - w on the drawn tokens,    W = sum_j w_j,  E[W] = R,

and its mean over draws is the dense q - p. Three estimators of the same gradient, each over many seeded draws:

  plain            g as stored and trained on (autograd of distil.teacher_signal.divergences.sampled_forward_kl_sum)
  additive CV      g + (R - W) q: W replaced by its known mean R, still unbiased (the control variate W - R with
                   coefficient q; no longer sums to 0 over the vocabulary)
  self-normalised  the weights rescaled to sum to R (w_j R / W), then the same sampled_forward_kl_sum: biased by
                   O(1 / k'), sums to 0

With the default proposal (r = the tail itself, proposal_temperature 1) every w_j = R / k', so W = R already and
the three coincide (up to the store's float16 log-weights); only a flatter proposal (proposal_temperature > 1, to
reach further into the tail) gives W a variance that R could remove. Measured on Zipf-like teachers (p_i ~
1 / rank^s, ids shuffled; s = 1.35: rest mass 0.14 at k = 128, as SmolLM2's on text; s = 1.1: a heavier tail) and a
student that is the teacher blurred and perturbed; figures relative to ||g_dense||^2:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tail_estimator.py      # about 35 s on one CPU thread

Prints a Markdown table (mean squared error = variance + bias^2, and the bias of the mean, whose noise floor is
sqrt(mse / draws)) and writes benchmarks/out/tail_estimator.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from distil.teacher_signal.divergences import sampled_forward_kl_sum
from distil.teacher_signal.signals import SparseSignals as SparseTargets
from distil.teacher_cache.signals import sparse_signals

OUT = Path(__file__).resolve().parent / "out"
DRAWS = 1000
BATCH = 100


def zipf_pair(vocab: int, exponent: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher logits, student logits) (vocab,): a Zipf teacher over shuffled ids and a student that is the teacher
    blurred (x 0.8) with N(0, 1) noise."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(vocab, generator=gen).double() + 1
    teacher = -exponent * ranks.log()
    student = 0.8 * teacher + torch.randn(vocab, generator=gen, dtype=torch.float64)
    return teacher.float(), student.float()


def gradients(student: torch.Tensor, targets: SparseTargets) -> torch.Tensor:
    """One row of d(sampled estimate)/d logits per row of `targets` (each row a separate draw)."""
    x = student.expand(targets.top_ids.shape[0], -1).clone().requires_grad_(True)
    sampled_forward_kl_sum(x, targets, 1.0).backward()
    return x.grad.double()


def statistics(teacher, student, k, drawn, proposal_temperature, seed) -> tuple[dict, float]:
    """({estimator: (relative mean squared error, relative bias)} over DRAWS draws, the rest mass R)."""
    q = torch.softmax(student.double(), -1)
    dense = q - torch.softmax(teacher.double(), -1)
    norm = float(dense.square().sum())
    names = ("plain", "additive CV", "self-normalised")
    squared = dict.fromkeys(names, 0.0)
    total = {name: torch.zeros_like(dense) for name in names}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(DRAWS // BATCH):
        s = sparse_signals(teacher.expand(BATCH, -1), k, 1.0, drawn, gen, proposal_temperature)
        logw = s.sample_logw.half().float()                 # as the store keeps them
        plain = gradients(student, SparseTargets(s.top_ids, s.top_logp, s.log_rest, s.sample_ids, s.sample_logp,
                                                 logw))
        weight_sum = logw.double().exp().sum(1, keepdim=True)
        normalised = logw + (s.log_rest - torch.logsumexp(logw, dim=1)).unsqueeze(1)
        for name, g in (("plain", plain),
                        ("additive CV", plain + (s.log_rest.double().exp().unsqueeze(1) - weight_sum) * q),
                        ("self-normalised", gradients(student, SparseTargets(s.top_ids, s.top_logp, s.log_rest,
                                                                             s.sample_ids, s.sample_logp,
                                                                             normalised)))):
            squared[name] += float((g - dense).square().sum())
            total[name] += g.sum(0)
    result = {name: (squared[name] / DRAWS / norm,
                     math.sqrt(float((total[name] / DRAWS - dense).square().sum()) / norm)) for name in names}
    return result, float(s.log_rest[0].exp())


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    # (vocabulary, Zipf exponent, k, k'): rest mass near SmolLM2's 0.14 at k = 128, and a heavier tail (s = 1.1)
    settings = [(5_000, 1.3, 32, 8), (50_000, 1.35, 32, 16), (50_000, 1.35, 128, 16), (50_000, 1.1, 128, 8)]
    for vocab, exponent, k, drawn in settings:
        teacher, student = zipf_pair(vocab, exponent, seed=vocab + k)
        for proposal_temperature in (1.0, 2.0):
            stats, rest = statistics(teacher, student, k, drawn, proposal_temperature, seed=k + drawn)
            row = {"vocab": vocab, "k": k, "sampled": drawn, "proposal_temperature": proposal_temperature,
                   "rest_mass": rest}
            for name, (mse, bias) in stats.items():
                row[f"{name}: mse"], row[f"{name}: bias"] = mse, bias
            rows.append(row)
    seconds = time.perf_counter() - start
    names = ("plain", "additive CV", "self-normalised")
    print(f"{DRAWS} draws per setting; E||g - g_dense||^2 / ||g_dense||^2 (bias: ||E g - g_dense|| / ||g_dense||)\n")
    print("| vocab | k | k' | proposal T | R | " + " | ".join(names) + " |")
    print("|---:|---:|---:|---:|---:|" + "---:|" * len(names))
    for row in rows:
        cells = [f"{row[f'{n}: mse']:.4f} ({row[f'{n}: bias']:.3f})" for n in names]
        print(f"| {row['vocab']:,} | {row['k']} | {row['sampled']} | {row['proposal_temperature']:g} | "
              f"{row['rest_mass']:.3f} | " + " | ".join(cells) + " |")
    print(f"\n{seconds:.1f} s")
    OUT.mkdir(exist_ok=True)
    (OUT / "tail_estimator.json").write_text(json.dumps({"draws": DRAWS, "seconds": seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
