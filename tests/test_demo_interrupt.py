"""`distil demo` stopped by Ctrl-C stops (exit 130, checkpoint saved), and the same command resumes it: steps
already done are kept, training continues from its checkpoint, a finished demo is replaced only with --overwrite."""

import json

import pytest

import distil.data.prepare
import distil.evaluation.evaluate
import distil.report
import distil.training.loop
from distil.cli import main


@pytest.fixture
def pipeline(monkeypatch):
    """The demo's four steps recorded and stood in for (their own tests run them for real); train stops by
    SIGINT the first time, as Ctrl-C does, and finishes the second."""
    calls = []

    def prepare(inputs, tokenizer, output_dir, **kwargs):
        calls.append("prepare")
        from pathlib import Path

        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "manifest.json").write_text("{}")

    def train(config):
        calls.append("train")
        from pathlib import Path

        run = Path(config.run.output_dir)
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        if calls.count("train") == 1:
            return {"run_dir": str(run), "steps": 7, "total_steps": 150, "stopped_early": True, "stopped_by": "SIGINT"}
        (run / "student").mkdir()
        (run / "student" / "config.json").write_text("{}")
        return {"run_dir": str(run), "steps": 150, "total_steps": 150, "stopped_early": False}

    def evaluate(models, output=None, **kwargs):
        calls.append("evaluate")
        from pathlib import Path

        Path(output).write_text(json.dumps({"settings": {}, "models": [], "markdown": ""}))
        return {}

    def report(runs, output_dir, **kwargs):
        calls.append("report")
        from pathlib import Path

        Path(output_dir).mkdir()
        (Path(output_dir) / "summary.md").write_text("# distil report\n")

    monkeypatch.setattr(distil.data.prepare, "prepare", prepare)
    monkeypatch.setattr(distil.training.loop, "train", train)
    monkeypatch.setattr(distil.evaluation.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(distil.report, "report", report)
    return calls


def test_demo_interrupt_stops_and_the_rerun_resumes(tmp_path, pipeline, capsys):
    out = tmp_path / "demo-output"
    assert main(["demo", "--output-dir", str(out), "--overwrite"]) == 130
    assert pipeline == ["prepare", "train"]  # stopped: no evaluation of an unfinished student
    assert "Run the same command again to resume" in capsys.readouterr().out
    # make demo passes --overwrite: an unfinished demo is resumed all the same, not wiped
    assert main(["demo", "--output-dir", str(out), "--overwrite"]) == 0
    assert pipeline == ["prepare", "train", "train", "evaluate", "report"]
    assert "Resuming the unfinished demo" in capsys.readouterr().out
    # finished: without --overwrite it is kept; with it, it starts over
    assert main(["demo", "--output-dir", str(out)]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(out), "--overwrite"]) == 0
    assert pipeline[5:] == ["prepare", "train", "evaluate", "report"]
