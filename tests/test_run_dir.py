"""A run directory says what the run is: a resume with a changed recipe is refused or logged, a failed start
leaves nothing behind, and a stale student-init is never reused."""

import shutil

import pytest
import yaml

from distil.config import load_config
from distil.errors import DistilError
from distil.training.loop import train
from train_fixtures import bert_workspace, write_recipe


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return bert_workspace(tmp_path_factory.mktemp("run-dir"))


def unfinished_run(workspace, name):
    """A run with a checkpoint at step 2 whose final student is gone: what a killed run leaves."""
    root, teacher, data = workspace
    recipe = write_recipe(root / f"{name}.yaml", teacher, data, root / name, student={"layers": [0, 3], "num_layers": None},
                          optim={"max_steps": 4}, run={"checkpoint_every": 2})
    train(load_config(recipe))
    shutil.rmtree(root / name / "student")
    return recipe, root / name


@pytest.mark.parametrize("overrides,changed", [
    (["student.layers=[0,2]"], "student.layers: [0, 3] -> [0, 2]"),
    (["data.batch_size=4"], "data.batch_size: 8 -> 4"),
    (["loss.temperature=4"], "loss.temperature: 2.0 -> 4.0"),
    (["loss.alpha_cos=0", "loss.objective=mlm"], "loss.alpha_cos: 1.0 -> 0.0; loss.objective: 'auto' -> 'mlm'"),
])
def test_resume_changed_recipe_is_refused_naming_each_key(workspace, overrides, changed):
    recipe, run_dir = unfinished_run(workspace, "refused-" + overrides[0].split("=")[0].replace(".", "-"))
    before = (run_dir / "recipe.yaml").read_bytes()
    with pytest.raises(DistilError, match="another recipe") as caught:
        train(load_config(recipe, overrides))
    assert changed in str(caught.value)
    assert (run_dir / "recipe.yaml").read_bytes() == before  # never rewritten to something the run is not
    assert not (run_dir / "student").exists()


def test_resume_changed_step_count_and_intervals_are_allowed_and_logged(workspace, caplog):
    recipe, run_dir = unfinished_run(workspace, "allowed")
    with caplog.at_level("INFO"):
        # optim.epochs does not count while optim.max_steps is set: the total stays 4 (a new total is refused).
        summary = train(load_config(recipe, ["optim.epochs=5", "run.log_every=2"]))
    assert summary["steps"] == 4
    logged = [r.message for r in caplog.records if r.message.startswith("Resuming with")]
    assert logged == ["Resuming with optim.epochs changed: 3.0 -> 5.0", "Resuming with run.log_every changed: 1 -> 2"]
    recorded = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recorded["optim"]["epochs"] == 5 and recorded["run"]["log_every"] == 2


def test_failed_start_leaves_no_run_directory(workspace):
    root, teacher, data = workspace
    recipe = write_recipe(root / "failing.yaml", teacher, data, root / "failing", student={"layers": [0, 9], "num_layers": None})
    with pytest.raises(DistilError, match="layer"):
        train(load_config(recipe))
    recipe = write_recipe(root / "failing.yaml", teacher, data, root / "failing", student={"layers": [0, 3], "num_layers": None},
                          loss={"alpha_ce": 1.0, "alpha_mlm": 0.0, "alpha_cos": 1.0, "hidden_layers": [[9, 9]]})
    with pytest.raises(DistilError, match="out of range"):
        train(load_config(recipe))
    assert not (root / "failing").exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".failing")]


def test_stale_student_init_is_rebuilt_for_the_recipe(workspace):
    """A start that failed after building student-init with layers [0, 1, 2] (the old order of things), then a
    fixed recipe with layers [0, 3]: the student must have the recipe's layers, not the stale ones."""
    import json

    from distil.student import init_student

    root, teacher, data = workspace
    run_dir = root / "stale"
    init_student(str(teacher), str(run_dir / "student-init"), layers=[0, 1, 2], num_layers=None)
    recipe = write_recipe(root / "stale.yaml", teacher, data, run_dir, student={"layers": [0, 3], "num_layers": None},
                          optim={"max_steps": 1})
    train(load_config(recipe))
    record = json.loads((run_dir / "student" / "distil_init.json").read_text())
    assert record["teacher_layers"] == [0, 3]
    assert json.loads((run_dir / "student-init" / "distil_init.json").read_text())["teacher_layers"] == [0, 3]


def test_overwrite_with_a_failing_start_keeps_the_finished_run(workspace):
    root, teacher, data = workspace
    recipe = write_recipe(root / "kept.yaml", teacher, data, root / "kept", optim={"max_steps": 1})
    train(load_config(recipe))
    before = (root / "kept" / "student" / "model.safetensors").read_bytes()
    with pytest.raises(DistilError, match="out of range"):
        train(load_config(recipe, ["run.overwrite=true", "loss.hidden_layers=[[9,9]]"]))
    assert (root / "kept" / "student" / "model.safetensors").read_bytes() == before
    train(load_config(recipe, ["run.overwrite=true", "optim.lr=0.01"]))
    assert (root / "kept" / "student" / "model.safetensors").read_bytes() != before
