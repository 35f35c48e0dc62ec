"""Where a run's numbers go: metrics.jsonl for programs, trackers (TensorBoard, W&B, MLflow, ...) for curves, the
log for people.

Only the main process writes. On resume the lines after the resumed step are dropped (all of them when a run
restarts before its first checkpoint), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return rows


class MetricsLog:
    """metrics.jsonl (always) and the run's trackers (run.report_to, through accelerate: TensorBoard by default).

    Every tracker gets the same names: `train/loss`, `train/loss_ce`, ..., `heldout/student_mlm`, ... (see README).
    """

    def __init__(self, run_dir: Path, acc, enabled: bool, resume_step: int = 0, project: str = "distil",
                 hparams: dict | None = None):
        self.enabled = enabled
        self.path = run_dir / METRICS
        self.acc = acc
        if enabled and self.path.exists():  # a resume, or a restart before the first checkpoint (resume_step 0)
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        for tracker in acc.log_with:
            if getattr(tracker, "name", None) == "tensorboard" and resume_step:
                tracker.init_kwargs["purge_step"] = resume_step  # a resumed run's curves continue, not overlap
        if acc.log_with:
            acc.init_trackers(project, config=_scalars(hparams or {}))
        if enabled:
            self.file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, split: str, values: dict) -> None:
        numbers = {f"{split}/{k}": v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.acc.log_with:
            self.acc.log(numbers, step=step)
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.acc.log_with:
            self.acc.end_training()
        if self.enabled:
            self.file.close()


def _scalars(values: dict, prefix: str = "") -> dict:
    """A recipe as flat `section.key` scalars, which every tracker accepts as hyperparameters."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = "none" if value is None else str(value)
    return flat


def _plain(value):
    if isinstance(value, float):
        return round(value, 6)
    return value
