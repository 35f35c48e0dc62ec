"""Memory per process of teacher + student under DDP, FSDP (student sharded) and FSDP (both sharded).

Two CPU processes (gloo) distil a BERT-base-shaped teacher (12 x 768, built from a config: random weights) into
a 6-layer DistilBERT for a few steps, once per layout. Each process reports (`distil train` logs it) what it holds
after its first optimizer step: teacher and student parameters, the student's gradients and its AdamW state,
counting only its own shards under FSDP. The table sets these next to what each layout should hold per process:

  DDP                      teacher params + student params + grads + 2 Adam moments (all full)
  FSDP, student sharded    teacher params + (student params + grads + Adam) / 2
  FSDP, both sharded       (teacher params + student params + grads + Adam) / 2

and the peak RSS of the largest worker. The peak RSS is not what sharding cuts here: every process loads the full
models on the host before sharding them (then moves only its shards to its device), so the host peak is the
loading peak. Run:

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
        teacher_mode: str) -> dict:
    """What each of the two workers says it holds after its first optimizer step (the largest of the two), and
    the largest worker's peak RSS."""
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29700 + sum(map(ord, name)) % 200), "-m", "distil", "train", str(path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    held = []
    for line in result.stderr.splitlines():
        if " holds teacher_parameters_mb " in line:
            parts = line.split(" holds ", 1)[1].split(", ")
            held.append({k: float(v.replace(",", "")) for k, v in (p.rsplit(" ", 1) for p in parts)})
    if len(held) != 2:
        raise SystemExit(f"{name}: expected a memory line from each of the 2 processes, got {len(held)}")
    worst = {key: max(h[key] for h in held) for key in held[0]}
    worst["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return worst


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
        print(json.dumps({"layout": args.layout, **run(workdir, teacher, data, args.layout, 6, args.steps, fsdp, mode)}))
        return
    # Each layout in its own process: the kernel's peak-RSS accounting only ever grows.
    measured = {}
    for layout in ("ddp", "fsdp-student", "fsdp-both"):
        out = subprocess.run([sys.executable, __file__, "--layout", layout, "--steps", str(args.steps),
                              "--workdir", str(workdir)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        measured[layout] = json.loads(out.stdout.strip().splitlines()[-1])

    import torch
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    with torch.device("meta"):
        t_model = BertForMaskedLM(BertConfig(vocab_size=30_000, hidden_size=768, num_hidden_layers=12,
                                             num_attention_heads=12, intermediate_size=3072))
        s_model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=30_000, dim=768, n_layers=6, n_heads=12,
                                                         hidden_dim=3072))
    teacher = sum(p.numel() for p in t_model.parameters()) * 4 / 2**20
    student = sum(p.numel() for p in s_model.parameters()) * 4 / 2**20
    expected = {"ddp": (teacher, student), "fsdp-student": (teacher, student / 2),
                "fsdp-both": (teacher / 2, student / 2)}
    rows = []
    for layout, (t_exp, s_exp) in expected.items():
        m = measured[layout]
        held = m["teacher_parameters_mb"] + m["student_parameters_mb"] + m["student_gradients_mb"] + m["optimizer_state_mb"]
        rows.append({"layout": layout, **{k: round(v) for k, v in m.items() if k != "layout"},
                     "held_mb": round(held), "expected_mb": round(t_exp + 4 * s_exp)})
    report = {"teacher_params_mb": round(teacher), "student_params_mb": round(student), "rows": rows,
              "steps": args.steps, "processes": 2}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| layout (2 CPU processes) | teacher params | student params | student grads | Adam state | held, total | "
          "should hold (params + grads + 2 moments) | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['teacher_parameters_mb']:,} | {r['student_parameters_mb']:,} | "
              f"{r['student_gradients_mb']:,} | {r['optimizer_state_mb']:,} | {r['held_mb']:,} | {r['expected_mb']:,} | "
              f"{r['peak_rss_mb']:,} |")
    print("(MB per process; the largest of the two processes)")


if __name__ == "__main__":
    main()
