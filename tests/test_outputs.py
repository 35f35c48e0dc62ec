"""--overwrite replaces only what distil wrote, and leftovers of killed runs are cleaned up by the next run.

The user's files must come out of a refused --overwrite byte for byte; distil's own outputs (new ones with their
marker, older ones by the files they have always held, a run directory, a demo tree) are still replaced. Temporary
directories named after a process that is gone are removed by the next run for the same output; those of a live
process are left alone.
"""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distil.cli import main
from distil.config import load_config
from distil.data.prepare import prepare
from distil.errors import DistilError
from distil.student import init_student
from tiny_models import tiny_bert, tiny_tokenizer
from tiny_tokenizers import word_level_tokenizer
from train_fixtures import bert_workspace, write_recipe

THESIS = "Chapter 1.\nEverything I have written in three years.\n".encode() + bytes(range(256))
NOTES = b"notes kept next to the thesis\n"
MARKER_NAME = ".distil-output.json"


def words(*ns):
    return " ".join(f"w{n}" for n in ns)


def user_directory(path: Path) -> Path:
    """A directory of the user's own: a file at the top and one in a sub-folder."""
    (path / "notes").mkdir(parents=True)
    (path / "my_thesis.txt").write_bytes(THESIS)
    (path / "notes" / "todo.txt").write_bytes(NOTES)
    return path


def assert_untouched(path: Path) -> None:
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) == ["my_thesis.txt", "notes",
                                                                              "notes/todo.txt"]
    assert (path / "my_thesis.txt").read_bytes() == THESIS
    assert (path / "notes" / "todo.txt").read_bytes() == NOTES


def no_siblings_of(path: Path) -> bool:
    return not [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def marker(path: Path) -> dict:
    return json.loads((path / MARKER_NAME).read_text())


@pytest.fixture
def text_and_tokenizer(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(words(*range(12)) + "\n" + words(*range(20, 34)) + "\n")
    return src, word_level_tokenizer(tmp_path / "tok", n_words=50, family="bert")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return bert_workspace(tmp_path_factory.mktemp("outputs-train"))


# --- prepare ---------------------------------------------------------------------------------------------------

def test_prepare_overwrite_refuses_a_directory_of_user_files(tmp_path, text_and_tokenizer, capsys):
    src, tok = text_and_tokenizer
    out = user_directory(tmp_path / "thesis")
    code = main(["prepare", str(src), "--tokenizer", str(tok), "-o", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(out) in err and "my_thesis.txt, notes" in err and "not an output of distil" in err
    assert "Choose another output directory" in err
    assert_untouched(out)
    assert no_siblings_of(out)


def test_prepare_overwrite_replaces_its_own_output_new_and_legacy(tmp_path, text_and_tokenizer):
    src, tok = text_and_tokenizer
    out = tmp_path / "data"
    prepare([str(src)], str(tok), str(out), progress=False)
    assert marker(out) == {"written_by": "distil", "command": "prepare", "version": "0.1.0"}
    first = (out / "train.tokens.bin").read_bytes()
    src.write_text(words(*range(30, 45)) + "\n")
    prepare([str(src)], str(tok), str(out), overwrite=True, progress=False)
    second = (out / "train.tokens.bin").read_bytes()
    assert second != first and len(second) == 17 * 2  # one sequence: [CLS] + 15 words + [SEP], uint16
    # An output of an older version has no marker, only its manifest.json: still distil's, still replaced.
    (out / MARKER_NAME).unlink()
    src.write_text(words(*range(12)) + "\n" + words(*range(20, 34)) + "\n")
    prepare([str(src)], str(tok), str(out), overwrite=True, progress=False)
    assert (out / "train.tokens.bin").read_bytes() == first and marker(out)["command"] == "prepare"
    assert no_siblings_of(out)


def test_overwrite_refuses_a_lookalike_without_distils_files(tmp_path, text_and_tokenizer):
    """A file called like one of distil's (summary.md) in a directory distil did not write is not enough."""
    src, tok = text_and_tokenizer
    out = user_directory(tmp_path / "paper")
    (out / "summary.md").write_text("# My summary\n")
    with pytest.raises(DistilError, match="summary.md") as caught:
        prepare([str(src)], str(tok), str(out), overwrite=True, progress=False)
    assert "Nothing was changed" in str(caught.value)
    assert (out / "summary.md").read_text() == "# My summary\n" and (out / "my_thesis.txt").read_bytes() == THESIS


# --- init-student ----------------------------------------------------------------------------------------------

def test_init_student_overwrite_refuses_user_files_and_replaces_a_student(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    tiny_bert().save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    out = user_directory(tmp_path / "thesis")
    code = main(["init-student", str(teacher), "-o", str(out), "--num-layers", "2", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "my_thesis.txt" in err and "Traceback" not in err
    assert_untouched(out)

    student = tmp_path / "student"
    init_student(str(teacher), str(student), layers=[0, 1], num_layers=None)
    assert marker(student)["command"] == "init-student"
    init_student(str(teacher), str(student), layers=[0, 3], num_layers=None, overwrite=True)
    assert json.loads((student / "distil_init.json").read_text())["teacher_layers"] == [0, 3]


# --- train -----------------------------------------------------------------------------------------------------

def test_train_overwrite_refuses_a_directory_of_user_files(workspace):
    from distil.training.loop import train

    root, teacher, data = workspace
    run_dir = user_directory(root / "thesis-run")
    recipe = write_recipe(root / "thesis-run.yaml", teacher, data, run_dir, optim={"max_steps": 2})
    with pytest.raises(DistilError, match="run.overwrite=true would delete") as caught:
        train(load_config(recipe, ["run.overwrite=true"]))
    assert "my_thesis.txt" in str(caught.value) and str(run_dir) in str(caught.value)
    assert_untouched(run_dir)


def test_train_overwrite_refuses_a_run_directory_holding_user_files(workspace):
    """A real run, and then the user keeps a file in it: the run is distil's, the file is not."""
    from distil.training.loop import train

    root, teacher, data = workspace
    run_dir = root / "run-with-notes"
    recipe = write_recipe(root / "run-with-notes.yaml", teacher, data, run_dir, optim={"max_steps": 2})
    train(load_config(recipe))
    (run_dir / "my_thesis.txt").write_bytes(THESIS)
    before = (run_dir / "student" / "model.safetensors").read_bytes()
    with pytest.raises(DistilError, match="distil train output but also holds files") as caught:
        train(load_config(recipe, ["run.overwrite=true", "optim.lr=0.01"]))
    assert "(my_thesis.txt)" in str(caught.value)
    assert (run_dir / "my_thesis.txt").read_bytes() == THESIS
    assert (run_dir / "student" / "model.safetensors").read_bytes() == before

    (run_dir / "my_thesis.txt").unlink()
    (run_dir / ".student.tmp-999999999").mkdir()  # a leftover of a killed run belongs to the run
    train(load_config(recipe, ["run.overwrite=true", "optim.lr=0.01"]))
    assert (run_dir / "student" / "model.safetensors").read_bytes() != before
    assert marker(run_dir / "student")["command"] == "train"
    assert not (run_dir / ".student.tmp-999999999").exists()


# --- demo ------------------------------------------------------------------------------------------------------

class StopAfterCleanUp(Exception):
    """Raised by a stand-in for the demo's first step, so that only its output handling runs."""


@pytest.fixture
def demo_stops_at_prepare(monkeypatch):
    import distil.data.prepare

    def stop(*_args, **_kwargs):
        raise StopAfterCleanUp
    monkeypatch.setattr(distil.data.prepare, "prepare", stop)


def test_demo_overwrite_refuses_a_directory_of_user_files(tmp_path, demo_stops_at_prepare):
    from distil.demo import run_demo

    out = user_directory(tmp_path / "thesis")
    with pytest.raises(DistilError, match="--overwrite would delete") as caught:
        run_demo(str(out), overwrite=True)
    assert "my_thesis.txt, notes" in str(caught.value)
    assert_untouched(out)


def demo_tree(root: Path, text_and_tokenizer) -> Path:
    """What an older `distil demo` left: prepared data, a run directory, an evaluation and a report."""
    src, tok = text_and_tokenizer
    prepare([str(src)], str(tok), str(root / "data"), progress=False)
    (root / "data" / MARKER_NAME).unlink()  # older versions wrote no marker
    (root / "run" / "checkpoints").mkdir(parents=True)
    (root / "run" / "recipe.yaml").write_text("name: demo\n")
    (root / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    (root / "evaluation.json").write_text('{"settings": {}, "models": [], "markdown": ""}\n')
    (root / "report").mkdir()
    (root / "report" / "summary.md").write_text("# distil report\n")
    return root


def test_demo_overwrite_replaces_a_demo_tree_but_not_one_with_user_files(tmp_path, text_and_tokenizer,
                                                                          demo_stops_at_prepare):
    from distil.demo import run_demo
    from distil.outputs import foreign_entries, output_command

    out = demo_tree(tmp_path / "demo-output", text_and_tokenizer)
    assert output_command(out) == "demo" and foreign_entries(out) == []
    (out / "run" / "my_thesis.txt").write_bytes(THESIS)
    with pytest.raises(DistilError, match=r"run/my_thesis\.txt"):
        run_demo(str(out), overwrite=True)
    assert (out / "run" / "my_thesis.txt").read_bytes() == THESIS and (out / "data" / "manifest.json").exists()

    (out / "run" / "my_thesis.txt").unlink()
    with pytest.raises(StopAfterCleanUp):
        run_demo(str(out), overwrite=True)
    assert [p.name for p in out.iterdir()] == [MARKER_NAME] and marker(out)["command"] == "demo"
    # The new tree carries the demo's marker from the start: once it holds results, --overwrite replaces it.
    demo_tree(out, text_and_tokenizer)
    with pytest.raises(DistilError, match="already holds results"):
        run_demo(str(out))
    with pytest.raises(StopAfterCleanUp):
        run_demo(str(out), overwrite=True)
    assert [p.name for p in out.iterdir()] == [MARKER_NAME]


# --- leftovers of killed runs -----------------------------------------------------------------------------------

def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftover(path: Path, size: int) -> Path:
    path.mkdir()
    (path / "train.tokens.bin").write_bytes(b"\0" * size)
    return path


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path, text_and_tokenizer, caplog):
    src, tok = text_and_tokenizer
    out = tmp_path / "data"
    dead = dead_pid()
    stale_tmp = leftover(tmp_path / f".data.tmp-{dead}", 2500)
    stale_old = leftover(tmp_path / f".data.old-{dead}", 500)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_tmp = leftover(tmp_path / f".data.tmp-{live.pid}", 10)
        other = leftover(tmp_path / f".other.tmp-{dead}", 10)  # another output's: not this run's business
        with caplog.at_level(logging.WARNING, logger="distil.outputs"):
            prepare([str(src)], str(tok), str(out), progress=False)
        assert not stale_tmp.exists() and not stale_old.exists()
        assert live_tmp.exists() and other.exists() and (out / "manifest.json").exists()
        lines = [r.getMessage() for r in caplog.records if r.name == "distil.outputs"]
        assert lines == [f"removed {stale_old}, left by process {dead} that no longer runs (500 bytes freed)",
                         f"removed {stale_tmp}, left by process {dead} that no longer runs (2.5 KB freed)"]
    finally:
        live.kill()
        live.wait()


def test_stale_temporary_of_a_prepare_killed_with_sigkill_is_removed_by_the_rerun(tmp_path, text_and_tokenizer):
    """The real thing: a process dies by SIGKILL inside atomic_output_dir, then prepare runs for the same output."""
    src, tok = text_and_tokenizer
    out = tmp_path / "data"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from distil.outputs import atomic_output_dir\n"
        "with atomic_output_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'train.tokens.bin').write_bytes(bytes(4096))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".data.tmp-")]
    assert len(left) == 1 and (tmp_path / left[0] / "train.tokens.bin").stat().st_size == 4096
    prepare([str(src)], str(tok), str(out), progress=False)
    assert no_siblings_of(out) and (out / "manifest.json").exists()
