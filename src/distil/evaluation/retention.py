"""Downstream retention: fine-tune every model the same way on one labelled task and compare the scores.

Each model gets a fresh classification head and the same settings (epochs, learning rate, batch size,
maximum length) for each seed; fine-tuning is `distil.tasks.finetune.run_task` without a teacher. Several
seeds give a mean and a spread, because a single fine-tune of a small model can move by a point or two
with the seed alone.
"""

from __future__ import annotations

import logging
import re
import statistics
from pathlib import Path

from distil.errors import DistilError

log = logging.getLogger(__name__)

SCORES = ("accuracy", "macro_f1")


def spread(values: list[float]) -> dict:
    """mean, std (sample standard deviation; 0 for one value), min, max and the values themselves."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "runs": list(values)}


def _folder_name(index: int, name: str) -> str:
    return f"{index:02d}-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model")


def fine_tune_all(models: list[tuple[str, str]], train_file: str, eval_file: str, work_dir: str | Path,
                  seeds: list[int], settings: dict, progress: bool = True) -> list[dict]:
    """Fine-tune each (name, path) once per seed; return per model the spread of accuracy and macro-F1.

    `settings` are run_task keyword arguments shared by every run (epochs, lr, batch_size, max_length,
    text_columns, label_column, device, ...). Fine-tuned models are written under `work_dir`.
    """
    from distil.tasks.finetune import run_task

    if not seeds:
        raise DistilError("Give at least one fine-tuning seed (--seeds 1 or more).")
    for path in (train_file, eval_file):
        if not Path(path).is_file():
            raise DistilError(f"The task file {path} does not exist. Give .csv / .tsv / .jsonl files with text and label columns.")
    results = []
    for index, (name, path) in enumerate(models):
        runs = []
        for seed in seeds:
            output = Path(work_dir) / _folder_name(index, name) / f"seed-{seed}"
            log.info("fine-tuning %s (seed %d) on %s", name, seed, train_file)
            metrics = run_task("classification", path, train_file, eval_file, output, seed=seed, progress=progress,
                               overwrite=True, **settings)
            runs.append(metrics)
        summary = {score: spread([float(r[score]) for r in runs]) for score in SCORES}
        summary["eval_loss"] = spread([float(r["eval_loss"]) for r in runs])
        summary["seeds"] = list(seeds)
        results.append(summary)
    return results
