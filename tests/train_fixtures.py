"""Tiny teachers saved with tokenizers, prepared data and recipes, for end-to-end training tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoTokenizer

from distil.data.prepare import prepare
from tiny_models import VOCAB_SIZE, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta
from tiny_tokenizers import word_level_tokenizer

BUILDERS = {"bert": tiny_bert, "roberta": tiny_roberta, "gpt2": tiny_gpt2, "llama": tiny_llama}
TOKENIZER_FAMILY = {"bert": "bert", "roberta": "roberta", "gpt2": "gpt2", "llama": "gpt2"}
N_SPECIALS = {"bert": 5, "roberta": 5, "gpt2": 2}


def teacher_dir(root: Path, family: str, num_layers: int = 4, **overrides) -> Path:
    """Save a tiny teacher of `family` with a word-level tokenizer whose size matches the model's vocabulary."""
    out = Path(root) / f"teacher-{family}"
    if (out / "config.json").exists():
        return out
    tok_family = TOKENIZER_FAMILY[family]
    tok_dir = word_level_tokenizer(Path(root) / f"tok-{family}", n_words=VOCAB_SIZE - N_SPECIALS[tok_family],
                                   family=tok_family)
    model = BUILDERS[family](num_layers=num_layers, **overrides)
    # Random tiny models predict near-uniform distributions; a larger output layer gives the teacher
    # confident, varied predictions, so that a student has something to learn from it.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    return out


def corpus_lines(n_lines: int = 400, seed: int = 0, n_words: int = 80) -> list[str]:
    """Runs of consecutive words ("w5 w6 w7 ..."): easy structure that a tiny model can pick up."""
    rng = np.random.default_rng([seed, 7])
    lines = []
    for _ in range(n_lines):
        start, length = rng.integers(0, n_words), rng.integers(12, 30)
        lines.append(" ".join(f"w{(start + k) % n_words}" for k in range(length)))
    return lines


def prepared_data(root: Path, teacher: Path, name: str = "data", n_lines: int = 400, heldout: float = 0.1) -> Path:
    out = Path(root) / name
    if (out / "manifest.json").exists():
        return out
    text = Path(root) / f"{name}.txt"
    text.write_text("\n".join(corpus_lines(n_lines)) + "\n", encoding="utf-8")
    prepare([str(text)], str(teacher), str(out), heldout_fraction=heldout, max_length=32, progress=False)
    return out


def write_recipe(path: Path, teacher_path: Path, data_path: Path, output_dir: Path, **sections) -> Path:
    recipe = {
        "teacher": {"path": str(teacher_path)},
        "student": {"num_layers": 2},
        "data": {"path": str(data_path), "batch_size": 8},
        "loss": {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0},
        "optim": {"max_steps": 20, "lr": 3e-3, "warmup_fraction": 0.0},
        "run": {"output_dir": str(output_dir), "log_every": 1, "eval_every": 0, "checkpoint_every": 0,
                "progress": False, "report_to": []},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def bert_workspace(root: Path) -> tuple[Path, Path, Path]:
    """(root, tiny BERT teacher, prepared data) for tests that launch `distil train` in subprocesses."""
    teacher = teacher_dir(root, "bert")
    return root, teacher, prepared_data(root, teacher, name="data")


def subprocess_env() -> dict:
    """Environment for `distil` child processes: one thread each (several share 2 cores), offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(processes: int, *args, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
                     torchrun: bool | None = None, command: str = "train") -> list:
    """`distil COMMAND ARGS` as users launch it: plain for one process, under torchrun for several (or when asked)."""
    import sys

    if not (torchrun or processes > 1 or nnodes > 1):
        return [sys.executable, "-m", "distil", command, *map(str, args)]
    rendezvous = (["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}"] if nnodes > 1 else ["--master_port", str(port or free_port())])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *rendezvous,
            "-m", "distil", command, *map(str, args)]


def launch(args, processes: int, timeout: int = 240):
    import subprocess

    return subprocess.run(torchrun_command(processes, *args), env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def train_rows(run_dir) -> dict:
    """metrics.jsonl's training rows by step."""
    from distil.metrics_log import read_metrics

    return {r["step"]: r for r in read_metrics(run_dir) if r["split"] == "train"}
