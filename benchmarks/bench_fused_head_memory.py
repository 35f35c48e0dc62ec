"""Peak memory of the fused output layer against the plain formulation, at LLM vocabularies (CPU).

One training step's output layer and logit losses (soft-target KL at T=2 against a teacher's projection, plus the
causal-LM cross-entropy, forward and backward) over R rows of hidden size H, for V = 49,152 (SmolLM2) and
128,256 (Llama-3), float32. Each configuration runs in its own process; the figure is that process's peak RSS
minus the peak RSS of the same process doing everything but the loss (the inputs, weights and their gradient
buffers), i.e. what the loss computation itself adds. Run:

    .venv/bin/python benchmarks/bench_fused_head_memory.py [--rows 2048] [--hidden 576]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one(mode: str, vocab: int, rows: int, hidden: int) -> float:
    import torch

    from distil import losses
    from distil.training.fused_head import HeadTerms, fused_head_losses

    torch.manual_seed(0)
    proj = torch.nn.Linear(hidden, vocab, bias=False)
    t_proj = torch.nn.Linear(hidden, vocab, bias=False)
    h = torch.randn(rows, hidden, requires_grad=True)
    t_h = torch.randn(rows, hidden)
    labels = torch.randint(0, vocab, (rows,))
    proj.weight.grad = torch.zeros_like(proj.weight)  # the gradient buffer exists in every mode
    h.grad = torch.zeros_like(h)
    if mode == "fused":
        total, _ = fused_head_losses(h, proj, t_h, t_proj, torch.ones(rows, dtype=torch.bool), labels,
                                     HeadTerms(2.0, coef_ce=1 / rows, coef_lm=1 / rows))
        total.backward()
    elif mode == "plain":
        s = proj(h)
        with torch.no_grad():
            t = t_proj(t_h)
        total = losses.soft_target_kl(s, t, 2.0) + losses.causal_lm_loss(s.unsqueeze(0), labels.unsqueeze(0))
        total.backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"peak_mb": one(args.one[0], int(args.one[1]), args.rows, args.hidden)}))
        return

    def run(mode, vocab):
        out = subprocess.run([sys.executable, __file__, "--one", mode, str(vocab), "--rows", str(args.rows),
                              "--hidden", str(args.hidden)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]

    print("| vocabulary | rows x hidden | plain: added by the loss (MB) | fused: added by the loss (MB) | fused / plain |")
    print("|---:|---|---:|---:|---:|")
    for vocab in (49_152, 128_256):
        base = run("none", vocab)
        plain, fused = run("plain", vocab) - base, run("fused", vocab) - base
        print(f"| {vocab:,} | {args.rows:,} x {args.hidden} | {plain:,.0f} | {fused:,.0f} | {fused / plain:.3f} |")


if __name__ == "__main__":
    main()
