"""metrics.jsonl reads as one uninterrupted run, however often the run was started."""

import json
from types import SimpleNamespace

from distil.metrics_log import METRICS, MetricsLog, read_metrics


def _accelerator():
    return SimpleNamespace(log_with=[])


def _rows(path, steps):
    path.write_text("".join(json.dumps({"step": s, "split": "train", "loss": float(s)}) + "\n" for s in steps))


def test_resume_changed_metrics_keep_only_the_rows_up_to_the_resumed_step(tmp_path):
    _rows(tmp_path / METRICS, [1, 2, 3, 4])
    log = MetricsLog(tmp_path, _accelerator(), enabled=True, resume_step=2)
    log.write(3, "train", {"loss": 30.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_resume_changed_restart_before_the_first_checkpoint_drops_the_earlier_attempt(tmp_path):
    _rows(tmp_path / METRICS, [1, 2, 3])  # an attempt that stopped before its first checkpoint
    log = MetricsLog(tmp_path, _accelerator(), enabled=True, resume_step=0)
    log.write(1, "train", {"loss": 10.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 10.0)]
