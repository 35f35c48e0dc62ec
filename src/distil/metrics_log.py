"""Where a run's numbers go: metrics.jsonl for programs, TensorBoard for curves, the log for people.

Only the main process writes. On resume the lines after the resumed step are dropped, so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

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
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / METRICS
        self.writer = None
        if not enabled:
            return
        if resume_step:
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                log.warning("tensorboard is not installed; curves go to metrics.jsonl only.")

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _plain(value):
    if isinstance(value, float):
        return round(value, 6)
    return value
