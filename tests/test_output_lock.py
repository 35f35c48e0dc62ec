"""One writer per output: a second command writing the same output is refused, a lock left by a killed process is
taken over (and said), and nothing that appears in the output while a command runs is deleted by it.

Real processes throughout: the lock is held by another process (a distil process, or a lock file naming a live one)
and the commands run as `distil ...` subprocesses where the race is between processes.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distil.config import load_config
from distil.data.prepare import prepare
from distil.errors import DistilError
from tiny_tokenizers import word_level_tokenizer
from train_fixtures import bert_workspace, subprocess_env, train_rows, write_recipe

HOLD_LOCK = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from distil.outputs import output_lock\n"
    "with output_lock(sys.argv[1], 'prepare'):\n"
    "    Path(sys.argv[2]).touch()\n"
    "    time.sleep(120)\n"
)


def words(*ns):
    return " ".join(f"w{n}" for n in ns)


@pytest.fixture
def text_and_tokenizer(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(words(*range(12)) + "\n" + words(*range(20, 34)) + "\n")
    return src, word_level_tokenizer(tmp_path / "tok", n_words=50, family="bert")


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def distil_cli(*args) -> list[str]:
    return [sys.executable, "-m", "distil", *map(str, args)]


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def test_output_lock_refuses_prepare_while_another_process_writes(tmp_path, text_and_tokenizer):
    src, tok = text_and_tokenizer
    out = tmp_path / "data"
    holding = tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), str(holding)], env=subprocess_env())
    try:
        wait_for(holding, holder)
        lock = tmp_path / ".data.lock"
        record = json.loads(lock.read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        assert record["command"] == "prepare"
        refused = subprocess.run(distil_cli("prepare", src, "--tokenizer", tok, "-o", out), env=subprocess_env(),
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"{out} is being written by distil prepare (process {holder.pid} on {socket.gethostname()}, " \
               f"started {record['started']}); its lock is {lock}. Nothing was changed." in refused.stderr
        assert not out.exists() and lock.exists()
    finally:
        stop(holder)
    # Its holder killed, the lock is stale: the next run takes it over, says so, and leaves no lock behind.
    prepare([str(src)], str(tok), str(out), progress=False)
    assert (out / "manifest.json").exists() and not (tmp_path / ".data.lock").exists()


def test_output_lock_file_naming_a_live_process_refuses_and_a_dead_one_is_taken_over(tmp_path, text_and_tokenizer,
                                                                                    caplog):
    src, tok = text_and_tokenizer
    out = tmp_path / "data"
    lock = tmp_path / ".data.lock"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "command": "prepare",
                                    "started": "2030-01-01 00:00:00 +0000"}))
        with pytest.raises(DistilError, match=rf"process {sleeper.pid} on .*its lock is {lock}") as caught:
            prepare([str(src)], str(tok), str(out), progress=False)
        assert f"If process {sleeper.pid} is not a distil command, delete {lock}" in str(caught.value)
        assert not out.exists()
    finally:
        stop(sleeper)
    with caplog.at_level(logging.WARNING, logger="distil.outputs"):
        prepare([str(src)], str(tok), str(out), progress=False)
    assert [r.getMessage() for r in caplog.records if "lock" in r.getMessage()] == [
        f"took over the lock {lock} of distil prepare (process {sleeper.pid}, started 2030-01-01 00:00:00 +0000), "
        "which no longer runs"]
    assert (out / "manifest.json").exists() and not lock.exists()


def test_output_lock_of_another_machine_is_refused(tmp_path, text_and_tokenizer):
    src, tok = text_and_tokenizer
    lock = tmp_path / ".data.lock"
    lock.write_text(json.dumps({"pid": 1234, "host": "elsewhere.example", "command": "prepare", "started": "then"}))
    with pytest.raises(DistilError, match="comes from another machine") as caught:
        prepare([str(src)], str(tok), str(tmp_path / "data"), progress=False)
    assert f"delete {lock}" in str(caught.value) and lock.exists()


def test_output_lock_two_prepare_processes_started_together_one_wins(tmp_path):
    """Both start at once: one writes the output, the other is refused (by the lock while the first runs, or by
    the finished output after it), and the output is the winner's, whole."""
    tok = word_level_tokenizer(tmp_path / "tok", n_words=50, family="bert")
    src = tmp_path / "corpus.txt"
    src.write_text("".join(words(*range(i % 20, i % 20 + 25)) + "\n" for i in range(60_000)))
    out = tmp_path / "data"
    runs = [subprocess.Popen(distil_cli("prepare", src, "--tokenizer", tok, "-o", out), env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2)
    assert "Traceback" not in refusal
    assert f"its lock is {tmp_path / '.data.lock'}" in refusal or f"{out} already holds results" in refusal
    reference = tmp_path / "reference"
    prepare([str(src)], str(tok), str(reference), progress=False)
    assert (out / "train.tokens.bin").read_bytes() == (reference / "train.tokens.bin").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".data")) == []


@pytest.fixture
def user_file_appears_mid_run(monkeypatch):
    """While prepare writes its output, the user saves a file into the output directory."""
    import distil.data.prepare as prepare_module

    write_batch = prepare_module._write_batch
    target = {}

    def write_and_user_saves(*args, **kwargs):
        if "dir" in target:
            Path(target["dir"]).mkdir(exist_ok=True)
            (Path(target["dir"]) / "my_notes.txt").write_text("written while prepare ran\n")
        return write_batch(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_write_batch", write_and_user_saves)
    return target


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_lock_user_file_created_during_prepare_is_kept(tmp_path, text_and_tokenizer,
                                                              user_file_appears_mid_run, overwrite):
    src, tok = text_and_tokenizer
    out = tmp_path / "data"
    if overwrite:  # a finished output there, which --overwrite would replace
        prepare([str(src)], str(tok), str(out), progress=False)
    user_file_appears_mid_run["dir"] = out
    with pytest.raises(DistilError, match="changed while distil prepare was writing it") as caught:
        prepare([str(src)], str(tok), str(out), overwrite=overwrite, progress=False)
    kept = tmp_path / f"data.new-{os.getpid()}"
    assert "my_notes.txt" in str(caught.value) and f"the new result is kept in {kept}" in str(caught.value)
    assert (out / "my_notes.txt").read_text() == "written while prepare ran\n"
    assert (kept / "manifest.json").exists()
    assert (out / "manifest.json").exists() == overwrite  # the earlier output, untouched
    assert not (tmp_path / ".data.lock").exists()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return bert_workspace(tmp_path_factory.mktemp("lock-train"))


def test_output_lock_second_train_into_one_run_dir_is_refused(workspace):
    from distil.training.loop import train

    root, teacher, data = workspace
    run_dir = root / "run"
    steps = 60
    recipe = write_recipe(root / "run.yaml", teacher, data, run_dir, optim={"max_steps": steps})
    first = subprocess.Popen(distil_cli("train", recipe), env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(run_dir / "metrics.jsonl", first, seconds=240)  # the first run is training
        with pytest.raises(DistilError, match=rf"{run_dir} is being written by distil train \(process {first.pid} "):
            train(load_config(recipe))
        code, (_, err) = first.wait(timeout=300), first.communicate()
    finally:
        if first.poll() is None:
            stop(first)
    assert code == 0, err
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"] == list(range(1, steps + 1))
    assert sorted(train_rows(run_dir)) == list(range(1, steps + 1))
    assert not (root / ".run.lock").exists()


@pytest.mark.parametrize("command", ["init-student", "static-student", "fit-head", "report", "task"])
def test_output_lock_is_taken_before_the_work_starts(tmp_path, command):
    """A command holds its output's lock from its start: a second writer is refused before it loads a model or
    reads data (here the teacher and the inputs do not even exist, and the lock is what it reports)."""
    from distil.fit_head import fit_head
    from distil.report import report
    from distil.static_student import static_student
    from distil.student import init_student
    from distil.tasks.finetune import run_task

    out = tmp_path / "out"
    missing = str(tmp_path / "no-such-model")
    runs = {
        "init-student": lambda: init_student(missing, str(out), None, num_layers=1),
        "static-student": lambda: static_student(missing, str(out), steps=0),
        "fit-head": lambda: fit_head(missing, missing, str(out)),
        "report": lambda: report([missing], str(out)),
        "task": lambda: run_task("classification", missing, missing, missing, str(out)),
    }
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / ".out.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                        "command": command, "started": "2030-01-01 00:00:00"}))
        with pytest.raises(DistilError, match=rf"process {sleeper.pid} "):
            runs[command]()
    finally:
        stop(sleeper)
    assert not out.exists()
