"""Peak memory per process of teacher + student under DDP, FSDP (student sharded) and FSDP (both sharded).

Two CPU processes (gloo) distil a BERT-base-shaped teacher (12 x 768, built from a config: random weights) into
a 6-layer DistilBERT for a few steps, once per layout. Each run's peak RSS per process (the largest worker's,
from the kernel's resource accounting) is printed next to the bytes each layout should hold per process:

  DDP                      teacher params + student params + grads + 2 Adam moments (all full)
  FSDP, student sharded    teacher params + (student params + grads + Adam) / 2
  FSDP, both sharded       (teacher params + student params + grads + Adam) / 2

plus what every process holds in every layout (the interpreter, torch's libraries, activations, the data).
So the check is on differences: sharding the student should save half its parameters, gradients and Adam state
against DDP; sharding the teacher too should save half the teacher's parameters more. Run:

    .venv/bin/python benchmarks/bench_fsdp_memory.py [--steps 3] [--out benchmarks/out/fsdp_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def build(workdir: Path, layers: int) -> tuple[Path, Path]:
    """A BERT-base-shaped teacher with `layers` layers (random weights) and prepared data with its tokenizer."""
    if (workdir / f"teacher-{layers}" / "config.json").exists():
        return workdir / f"teacher-{layers}", workdir / "data"
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from distil.data.prepare import prepare
    from tiny_tokenizers import word_level_tokenizer

    teacher = workdir / f"teacher-{layers}"
    tok = word_level_tokenizer(workdir / "tok", n_words=30_000 - 5, family="bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30_000, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    BertForMaskedLM(config).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tok).save_pretrained(teacher)
    data = workdir / "data"
    if not (data / "manifest.json").exists():
        text = workdir / "text.txt"
        text.write_text("\n".join(" ".join(f"w{(i * 7 + k) % 29_000}" for k in range(120)) for i in range(400)) + "\n")
        prepare([str(text)], str(teacher), str(data), heldout_fraction=0.0, max_length=128, progress=False)
    return teacher, data


def run(workdir: Path, teacher: Path, data: Path, name: str, student_layers: int, steps: int, fsdp: bool,
        teacher_mode: str) -> float:
    """Peak RSS (MB) of the largest of the two worker processes."""
    recipe = {
        "teacher": {"path": str(teacher), "fsdp": teacher_mode},
        "student": {"num_layers": student_layers},
        "data": {"path": str(data), "batch_size": 4},
        "loss": {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0},
        "optim": {"max_steps": steps},
        "run": {"output_dir": str(workdir / name), "fsdp": fsdp, "progress": False, "report_to": [],
                "eval_every": 0, "checkpoint_every": 0},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29700 + hash(name) % 200),
           "-m", "distil", "train", str(path)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise SystemExit(f"{name}: no child used more memory than an earlier run; run the layouts in separate calls")
    return peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "fsdp_memory.json"))
    parser.add_argument("--layout", choices=["ddp", "fsdp-student", "fsdp-both"], default=None,
                        help="run one layout only (the script calls itself once per layout)")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="distil-fsdp-mem-"))
    if args.layout is not None:
        teacher, data = build(workdir, 12)
        fsdp, mode = {"ddp": (False, "shard"), "fsdp-student": (True, "replicate"), "fsdp-both": (True, "shard")}[
            args.layout]
        peak = run(workdir, teacher, data, args.layout, 6, args.steps, fsdp, mode)
        print(json.dumps({"layout": args.layout, "peak_rss_mb": peak}))
        return
    # Each layout in its own process: the kernel's peak-RSS accounting only ever grows.
    peaks = {}
    for layout in ("ddp", "fsdp-student", "fsdp-both"):
        out = subprocess.run([sys.executable, __file__, "--layout", layout, "--steps", str(args.steps),
                              "--workdir", str(workdir)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        peaks[layout] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]

    import torch
    from transformers import BertConfig, BertForMaskedLM

    def params(layers):
        with torch.device("meta"):
            model = BertForMaskedLM(BertConfig(vocab_size=30_000, hidden_size=768, num_hidden_layers=layers,
                                               num_attention_heads=12, intermediate_size=3072))
        return sum(p.numel() for p in model.parameters()) * 4 / 2**20

    teacher, student = params(12), params(6) * 0.985  # DistilBERT drops the token-type table and the pooler
    state = 4 * student  # params, grads, two Adam moments
    expected = {"ddp": teacher + state, "fsdp-student": teacher + state / 2, "fsdp-both": (teacher + state) / 2}
    rows = [{"layout": layout, "peak_rss_mb": round(peaks[layout]), "expected_state_mb": round(expected[layout]),
             "saved_vs_ddp_mb": round(peaks["ddp"] - peaks[layout]),
             "expected_saving_mb": round(expected["ddp"] - expected[layout])} for layout in expected]
    report = {"teacher_params_mb": round(teacher), "student_params_mb": round(student), "rows": rows,
              "steps": args.steps, "processes": 2}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| layout | peak RSS per process (MB) | params + grads + Adam it should hold (MB) | saved vs DDP, measured | "
          "saved vs DDP, expected |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['layout']} | {row['peak_rss_mb']:,} | {row['expected_state_mb']:,} | {row['saved_vs_ddp_mb']:,} | "
              f"{row['expected_saving_mb']:,} |")


if __name__ == "__main__":
    main()
