"""The peer baseline of the broad-text embedding ablation: sentence-transformers' own layer-reduction distillation.

The recipe of sentence-transformers' example (training/distillation/model_distillation_layer_reduction.py), run
through its own trainer: the student is the teacher with only some of its layers kept, trained with MSELoss to
the teacher's sentence embeddings of the training sentences (computed once), linear schedule with 10% warm-up.
Only the budget is set to the ablation's (sentences, batch, steps, sequence length), so both recipes see the same
text for the same number of steps.

Usage:
    python st_layer_reduction.py targets TEACHER TRAIN_TXT SENTENCES MAX_LENGTH OUT.npz
        the first SENTENCES lines of TRAIN_TXT and the teacher's embeddings of them (shared by every seed)
    python st_layer_reduction.py train TEACHER TARGETS.npz LAYERS OUT_DIR --lr LR --seed SEED --steps N --batch B
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch


def targets(teacher: str, train_txt: Path, sentences: int, max_length: int, out: Path) -> None:
    from sentence_transformers import SentenceTransformer

    lines = [line.strip() for line in train_txt.read_text(encoding="utf-8").splitlines() if line.strip()][:sentences]
    model = SentenceTransformer(teacher, device="cpu")
    model.max_seq_length = max_length
    embeddings = model.encode(lines, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    tmp = out.with_suffix(".partial.npz")
    np.savez(tmp, sentences=np.array(lines), embeddings=embeddings.astype(np.float32))
    os.replace(tmp, out)
    print(f"{len(lines)} sentences -> {embeddings.shape} teacher embeddings in {out}")


def train(teacher: str, targets_file: Path, layers: list[int], out: Path, lr: float, seed: int, steps: int,
          batch: int, max_length: int) -> None:
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MSELoss

    torch.manual_seed(seed)
    student = SentenceTransformer(teacher, device="cpu")
    encoder = student[0].auto_model  # the example's layer removal: keep the chosen encoder blocks, in order
    encoder.encoder.layer = torch.nn.ModuleList([encoder.encoder.layer[i] for i in layers])
    encoder.config.num_hidden_layers = len(layers)
    student.max_seq_length = max_length
    data = np.load(targets_file, allow_pickle=False)
    dataset = Dataset.from_dict({"sentence": [str(s) for s in data["sentences"]],
                                 "label": [row.tolist() for row in data["embeddings"]]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out) + ".trainer", max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        warmup_ratio=0.1, lr_scheduler_type="linear", seed=seed, data_seed=seed, logging_steps=max(1, steps // 10),
        save_strategy="no", report_to=[], use_cpu=True, dataloader_drop_last=True)
    SentenceTransformerTrainer(model=student, args=args, train_dataset=dataset, loss=MSELoss(student)).train()
    student.save(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("targets")
    t.add_argument("teacher")
    t.add_argument("train_txt", type=Path)
    t.add_argument("sentences", type=int)
    t.add_argument("max_length", type=int)
    t.add_argument("out", type=Path)
    r = sub.add_parser("train")
    r.add_argument("teacher")
    r.add_argument("targets", type=Path)
    r.add_argument("layers", help="teacher layers to keep, e.g. 0,2,5")
    r.add_argument("out", type=Path)
    r.add_argument("--lr", type=float, required=True)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--batch", type=int, required=True)
    r.add_argument("--max-length", type=int, required=True)
    a = parser.parse_args()
    if a.command == "targets":
        targets(a.teacher, a.train_txt, a.sentences, a.max_length, a.out)
    else:
        train(a.teacher, a.targets, [int(i) for i in a.layers.split(",")], a.out, a.lr, a.seed, a.steps, a.batch,
              a.max_length)


if __name__ == "__main__":
    main()
