"""`distil report` on hand-written run directories and a hand-written evaluation result."""

import json
import struct
from pathlib import Path

import pytest
import yaml

from distil.errors import DistilError
from distil.report import _heldout_panels, _training_panels, load_runs, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(root: Path, name: str, scale: float, with_teacher: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    rows = []
    for step in (10, 20, 30, 40):
        rows.append({"step": step, "split": "train", "loss": scale * 3 / step, "loss_ce": scale * 2 / step,
                     "loss_mlm": scale / step, "lr": 5e-4 * step / 40, "tokens_per_s": 1000.0 + step,
                     "tokens_seen": 640 * step, "epoch": step / 100, "elapsed_s": step * 1.5})
        if step % 20 == 0:
            heldout = {"step": step, "split": "heldout", "student_mlm": scale * 4 / step, "kd": scale / step, "batches": 5}
            if with_teacher:
                heldout["teacher_mlm"] = 0.05
            rows.append(heldout)
    # A line cut short by a crash is skipped, not fatal.
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 50, "spl')
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"name": f"recipe-{name}", "teacher": {"path": "bert-base-uncased"}}))
    return folder


def _evaluation(path: Path) -> Path:
    def model(name, params, accuracy, latency, task):
        return {"name": name, "path": f"/models/{name}", "lm": {"mlm_loss": 2.0, "mlm_accuracy": accuracy},
                "fidelity": None, "size": {"params": {"total": params, "embedding": params // 4,
                                                      "non_embedding": params - params // 4}, "disk_bytes": 4 * params},
                "speed": {"cpu": {"latency_ms": latency, "sequences_per_s": 1000 / latency, "tokens_per_s": 128000 / latency}},
                "downstream": {"accuracy": {"mean": task, "std": 0.01, "min": task - 0.01, "max": task + 0.01, "runs": []},
                               "macro_f1": {"mean": task - 0.05, "std": 0.02, "min": 0, "max": 1, "runs": []},
                               "seeds": [1, 2]},
                "notes": []}

    path.write_text(json.dumps({"settings": {}, "models": [model("teacher", 110_000_000, 0.6, 20.0, 0.9),
                                                           model("student", 66_000_000, 0.54, 10.0, 0.873)]}))
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_plots_and_summary(tmp_path):
    runs = [_run(tmp_path, "distilled", 1.0), _run(tmp_path, "baseline", 2.0, with_teacher=False)]
    out = tmp_path / "report"
    result = report([str(r) for r in runs], str(out), evaluation=str(_evaluation(tmp_path / "eval.json")))
    expected = ["training_losses.png", "heldout.png", "learning_rate.png", "tokens_per_s.png", "eval_quality.png",
                "eval_size.png", "eval_speed.png"]
    assert result["plots"] == expected
    for name in expected:
        width, height = _png_size(out / name)
        assert width >= 400 and height >= 300 and (out / name).stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| distilled | recipe-distilled | bert-base-uncased | 40 | 25,600 | 0.0750 | 60 |" in summary
    assert "| student_mlm | 0.1000 | 0.2000 |" in summary           # final held-out: 4 / 40 and 2 * 4 / 40
    assert "| teacher_mlm | 0.0500 | – |" in summary
    assert "| parameters (base model) | 110.00M | 66.00M (0.600×) |" in summary
    assert "| CPU latency, batch 1 (ms; ratio = speed-up) | 20.00 | 10.00 (2.000×) |" in summary
    assert "| task accuracy (mean over seeds) | 90.00% | 87.30% (0.970×) |" in summary
    assert "| task accuracy, std over seeds (points) | 1.00 | 1.00 |" in summary
    for name in expected:
        assert f"]({name})" in summary
    assert sorted(p.name for p in out.iterdir()) == sorted(expected + ["summary.md", ".distil-output.json"])


def test_plotted_series_are_the_logged_numbers(tmp_path):
    runs = load_runs([str(_run(tmp_path, "a", 1.0)), str(_run(tmp_path, "b", 2.0, with_teacher=False))])
    training = dict(_training_panels(runs))
    assert list(training) == ["total loss", "ce", "mlm"]
    label, xs, ys, color, style = training["ce"][1]
    assert (label, xs, color) == ("b", [10, 20, 30, 40], "C1") and ys == pytest.approx([0.4, 0.2, 0.4 / 3, 0.1])
    heldout = dict(_heldout_panels(runs))
    assert list(heldout) == ["mlm", "kd"]
    assert [(line[0], line[4]) for line in heldout["mlm"]] == [("a student", "-"), ("a teacher", "--"), ("b student", "-")]
    assert heldout["mlm"][1][2] == [0.05, 0.05]


def test_report_is_atomic_and_refuses_existing_output(tmp_path):
    run = _run(tmp_path, "run", 1.0)
    out = tmp_path / "report"
    report([str(run)], str(out))
    assert "eval_quality.png" not in [p.name for p in out.iterdir()]
    with pytest.raises(DistilError, match="already holds results"):
        report([str(run)], str(out))
    report([str(run)], str(out), overwrite=True)
    with pytest.raises(DistilError):   # a bad evaluation file: nothing half-written is left
        report([str(run)], str(tmp_path / "second"), evaluation=str(tmp_path / "missing.json"))
    assert not (tmp_path / "second").exists()
    assert not any(p.name.startswith(".second") for p in tmp_path.iterdir())


def test_runs_with_the_same_name_are_told_apart(tmp_path):
    runs = load_runs([str(_run(tmp_path / "x", "run", 1.0)), str(_run(tmp_path / "y", "run", 1.0))])
    assert [r["name"] for r in runs] == ["x/run", "y/run"]


@pytest.mark.parametrize("case, message", [
    ("no_runs", "at least one run"),
    ("missing_dir", "does not exist"),
    ("no_metrics", "nothing to plot"),
    ("bad_json", "not valid JSON"),
    ("not_evaluation", "not a distil evaluate result"),
])
def test_bad_input_gives_distil_error(tmp_path, case, message):
    run = _run(tmp_path, "run", 1.0)
    evaluation = None
    run_dirs = [str(run)]
    if case == "no_runs":
        run_dirs = []
    elif case == "missing_dir":
        run_dirs = [str(tmp_path / "nope")]
    elif case == "no_metrics":
        (tmp_path / "empty").mkdir()
        run_dirs = [str(tmp_path / "empty")]
    elif case == "bad_json":
        evaluation = tmp_path / "e.json"
        evaluation.write_text("{not json")
    else:
        evaluation = tmp_path / "e.json"
        evaluation.write_text(json.dumps({"models": []}))
    with pytest.raises(DistilError, match=message):
        report(run_dirs, str(tmp_path / "out"), evaluation=str(evaluation) if evaluation else None)


def test_report_overwrite_keeps_files_it_did_not_write(tmp_path):
    run = _run(tmp_path, "run", 1.0)
    out = tmp_path / "slides"
    out.mkdir()
    (out / "talk.md").write_text("# My talk\n")
    (out / "figure.png").write_bytes(PNG_SIGNATURE + b"mine")
    with pytest.raises(DistilError, match=r"--overwrite would delete .*\(figure\.png, talk\.md\)"):
        report([str(run)], str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["figure.png", "talk.md"]
    assert (out / "talk.md").read_text() == "# My talk\n" and (out / "figure.png").read_bytes() == PNG_SIGNATURE + b"mine"
    assert not any(p.name.startswith(".slides") for p in tmp_path.iterdir())
    # A report distil wrote, also one from before the marker (known by its summary.md), is replaced.
    report([str(run)], str(tmp_path / "report"))
    (tmp_path / "report" / ".distil-output.json").unlink()
    (tmp_path / "report" / "learning_rate.png").write_bytes(b"stale plot")
    report([str(run)], str(tmp_path / "report"), evaluation=str(_evaluation(tmp_path / "eval.json")), overwrite=True)
    assert _png_size(tmp_path / "report" / "learning_rate.png")[0] >= 400
    assert "eval_quality.png" in [p.name for p in (tmp_path / "report").iterdir()]
