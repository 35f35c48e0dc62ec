"""Score causal students against their teacher on held-out text: perplexity, next-token agreement, CPU speed.

Usage: python benchmarks/llm_ablation/score.py PREPARED_DIR OUT_JSON teacher=DIR NAME=DIR ...
       python benchmarks/llm_ablation/score.py --table OUT_JSON     (markdown: mean ± std over NAME@SEED rows)
- perplexity: exp of the token-weighted next-token cross-entropy on the prepared held-out split (the first
  MAX_SEQUENCES sequences, the same for every model);
- agreement: the fraction of those positions where the model's most likely next token is the teacher's;
- speed: tokens/s of a forward at batch 8 x 128 tokens, one model per architecture (trained rows share their
  starting student's), timed in interleaved rounds (one process, so the ratios hold even on a busy machine).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distil.data.dataset import TokenSequences, pad_batch, pad_id_of
from distil.data.masking import causal_lm_labels
from distil.evaluation.speed import architecture_fingerprint, measure_speeds

MAX_SEQUENCES, BATCH = 128, 8


@torch.inference_mode()
def main() -> None:
    data, out, named = sys.argv[1], Path(sys.argv[2]), [a.split("=", 1) for a in sys.argv[3:]]
    heldout = TokenSequences(data, "heldout")
    pad_id = pad_id_of(heldout.manifest)
    sequences = [heldout[i] for i in range(min(MAX_SEQUENCES, len(heldout)))]
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in named}
    sums = {name: [0.0, 0, 0] for name in models}  # loss sum, agreeing positions, positions
    for start in range(0, len(sequences), BATCH):
        ids, mask = pad_batch(sequences[start:start + BATCH], pad_id)
        labels = causal_lm_labels(ids, mask)
        predicted = labels[:, 1:] != -100
        teacher_top = None
        for name, model in models.items():  # the teacher first (named first on the command line)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][predicted].float()
            top = logits.argmax(dim=-1)
            teacher_top = top if teacher_top is None else teacher_top
            loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][predicted], reduction="sum")
            sums[name][0] += float(loss)
            sums[name][1] += int((top == teacher_top).sum())
            sums[name][2] += int(predicted.sum())
    timed: dict[str, torch.nn.Module] = {}  # one model per architecture: students of one shape run alike
    for model in models.values():
        timed.setdefault(architecture_fingerprint(model), model)
    speeds = dict(zip(timed, measure_speeds(list(timed.values()), "cpu", seq_length=128, batch_size=BATCH, warmup=2,
                                            repeats=10)))
    result = {}
    for name, (loss, agree, count) in sums.items():
        speed = speeds[architecture_fingerprint(models[name])]
        result[name] = {"perplexity": math.exp(loss / count), "next_token_agreement": agree / count,
                        "tokens_per_s": speed["tokens_per_s"], "positions": count,
                        "parameters": sum(p.numel() for p in models[name].parameters())}
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name, row in result.items():
        print(f"{name}: perplexity {row['perplexity']:.2f}, agreement {row['next_token_agreement']:.4f}, "
              f"{row['tokens_per_s']:,.0f} tokens/s")


def table(path: Path) -> None:
    """Rows NAME@SEED grouped by NAME: mean ± sample std over seeds; tokens/s relative to the teacher's."""
    scores = json.loads(path.read_text(encoding="utf-8"))
    groups: dict[str, list[dict]] = {}
    for name, row in scores.items():
        groups.setdefault(name.split("@")[0], []).append(row)
    teacher = scores["teacher"]

    def cell(rows, key, fmt):
        values = [r[key] for r in rows]
        spread = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
        return f"{statistics.mean(values):{fmt}}{spread}"

    print("| model | seeds | parameters | held-out perplexity | next-token agreement | CPU tokens/s (speed-up) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rows in groups.items():
        speed = rows[0]["tokens_per_s"]
        seeds = len(rows) if "@" in next(n for n in scores if n.split("@")[0] == name) else "-"
        print(f"| {name} | {seeds} | {rows[0]['parameters'] / 1e6:.1f}M | {cell(rows, 'perplexity', '.1f')} | "
              f"{cell(rows, 'next_token_agreement', '.3f')} | {speed:,.0f} ({speed / teacher['tokens_per_s']:.2f}x) |")


if __name__ == "__main__":
    table(Path(sys.argv[2])) if sys.argv[1] == "--table" else main()
