import pytest

from distil.cli import build_parser, main

COMMANDS = ["prepare", "init-student", "train", "task", "evaluate", "report", "demo", "fit-head", "cache-teacher",
            "static-student"]


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


def test_every_option_of_every_command_is_described():
    parser, commands = subparsers()
    assert sorted(commands) == sorted(COMMANDS)
    for name, sub in commands.items():
        assert sub.description, name
        for action in sub._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 8, (name, action.dest)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_cleanly(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: distil " + command in capsys.readouterr().out


def test_user_errors_are_one_paragraph_without_traceback(tmp_path, capsys):
    code = main(["init-student", str(tmp_path / "missing-teacher"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("distil init-student: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_destroys_the_process_group_before_exit(tmp_path, monkeypatch):
    """A process group left to the interpreter's exit aborted a finished torchrun process now and then (gloo
    threads torn down in no fixed order: exit code -6 after 'Finished'); every command closes it, also on errors."""
    import torch.distributed as dist

    destroyed = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: destroyed.append(group))
    assert main(["init-student", str(tmp_path / "missing-teacher"), "-o", str(tmp_path / "out")]) == 2
    assert destroyed == [None]


def test_recipe_errors_come_before_torch_is_imported(tmp_path):
    """A mistyped key is reported without importing torch (which takes seconds on a cold start)."""
    import subprocess
    import sys

    code = ("import sys; from distil.cli import main; rc = main(['train', sys.argv[1], 'loss.temprature=3']); "
            "print('torch' in sys.modules, rc)")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {path: t}\ndata: {path: d}\n")
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "2"], result.stderr
    assert "Did you mean 'temperature'" in result.stderr
