"""Bad input on the command line: a one-paragraph message that names the file, key or value, a non-zero exit
status, no traceback, and every earlier result left as it was."""

import subprocess
import sys

import pytest

from train_fixtures import subprocess_env, teacher_dir, write_recipe


def distil(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "distil", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=subprocess_env(), cwd=cwd)


def assert_refused(result, *phrases):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("distil ") and ": error: " in message
    for phrase in phrases:
        assert phrase in message, message


def test_bad_input_recipe_that_is_a_directory_or_binary(tmp_path):
    assert_refused(distil("train", tmp_path), f"The recipe {tmp_path} is a directory")
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02PK\x03\x04")
    assert_refused(distil("train", binary), f"The recipe {binary} is not a text file")


def test_bad_input_task_recipe_with_a_yaml_syntax_error(tmp_path):
    recipe = tmp_path / "task.yaml"
    recipe.write_text("epochs: 3\nlr: [5e-5\n")
    result = distil("task", "classification", "--recipe", recipe)
    assert_refused(result, f"The task recipe {recipe} is not valid YAML at line 3, column 1")


@pytest.mark.parametrize("override,phrase", [
    ("optim.betas=[a,b]", "optim.betas must be a list of floats"),
    ("loss.mask_replace=[x,0.1,0.1]", "loss.mask_replace must be a list of floats"),
])
def test_bad_input_list_keys_with_wrong_elements(tmp_path, override, phrase):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {path: t}\ndata: {path: d}\n")
    assert_refused(distil("train", recipe, override), phrase)


def test_bad_input_output_dir_that_is_a_file(tmp_path):
    finished = tmp_path / "results.txt"
    finished.write_text("my results\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {{path: t}}\ndata: {{path: d}}\nrun: {{output_dir: {finished}}}\n")
    assert_refused(distil("train", recipe), f"run.output_dir {finished} is an existing file")
    assert finished.read_text() == "my results\n"


def test_bad_input_data_longer_than_the_models_positions(tmp_path):
    """Prepared at 80 tokens for a model with 64 positions: refused at start, before the first step."""
    teacher = teacher_dir(tmp_path, "bert")
    long = tmp_path / "data-80"
    text = tmp_path / "long.txt"
    text.write_text("\n".join(" ".join(f"w{(i + k) % 80}" for k in range(75)) for i in range(40)) + "\n")
    assert distil("prepare", text, "--tokenizer", teacher, "--output-dir", long, "--max-length", 80).returncode == 0
    manifest = (long / "manifest.json").read_bytes()
    recipe = write_recipe(tmp_path / "r.yaml", teacher, long, tmp_path / "run")
    assert_refused(distil("train", recipe), "sequences of up to 77 tokens, but the teacher has positions for 64",
                   "data.max_length=64")
    assert not (tmp_path / "run").exists()
    assert (long / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("command", ["prepare", "init-student", "train", "evaluate", "report"])
def test_bad_input_output_directory_not_writable(tmp_path, monkeypatch, capsys, command):
    """A read-only place (simulated: these tests run as root, whom permissions do not stop) is refused before
    any work, naming the directory."""
    import os

    from distil.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    teacher = teacher_dir(tmp_path, "bert")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(f"w{k}" for k in range(i, i + 15)) for i in range(20)) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", teacher, tmp_path / "data", locked / "run")
    if command == "train":
        assert main(["prepare", str(text), "--tokenizer", str(teacher), "--output-dir", str(tmp_path / "data")]) == 0
    argv = {
        "prepare": ["prepare", str(text), "--tokenizer", str(teacher), "--output-dir", str(locked / "data")],
        "init-student": ["init-student", str(teacher), "--output-dir", str(locked / "student"), "--num-layers", "1"],
        "train": ["train", str(recipe)],
        "evaluate": ["evaluate", f"teacher={teacher}", "--output", str(locked / "eval.json"), "--no-speed"],
        "report": ["report", str(tmp_path), "--output-dir", str(locked / "report")],
    }[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{locked}, where it would be created, is not writable" in err, err
    assert list(locked.iterdir()) == []


def test_weights_keep_the_users_umask(tmp_path):
    """safetensors writes weights as 0600; a student directory's files are all readable as the umask says."""
    import os

    from distil.student import init_student

    mask = os.umask(0o022)
    try:
        init_student(str(teacher_dir(tmp_path, "bert")), str(tmp_path / "student"), layers=None, num_layers=1)
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "student").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("override,phrase", [
    ("loss.temperature=nan", "Recipe key loss.temperature must be > 0 (a finite number), got nan"),
    ("optim.lr=.inf", "Recipe key optim.lr must be > 0 (a finite number), got inf"),
])
def test_bad_input_non_finite_override_on_the_command_line(tmp_path, override, phrase):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {path: t}\ndata: {path: d}\n")
    assert_refused(distil("train", recipe, override), phrase)
