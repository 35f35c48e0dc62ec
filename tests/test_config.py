from pathlib import Path

import pytest

from distil.config import load_config
from distil.errors import DistilError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SEED_RECIPES = ["distilbert-base-uncased", "distilbert-base-cased", "distilbert-base-multilingual-cased",
                "distilroberta-base", "distilgpt2"]


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_seed_recipes_parse_and_keep_the_seed_settings(name):
    config = load_config(RECIPES / f"{name}.yaml")
    assert config.name == name
    assert config.loss.temperature == 2.0 and config.loss.alpha_ce == 5.0 and config.loss.alpha_cos == 1.0
    assert config.optim.lr == 5e-4 and config.optim.betas == [0.9, 0.98] and config.optim.eps == 1e-6
    assert config.student.layers == [0, 2, 4, 7, 9, 11]
    assert config.run.seed == 56 and config.run.freeze_position_embeddings
    # The paper's ~4K-sequence batches: 5 per process x accumulation, whatever the process count.
    assert config.accumulation_steps(1) * 5 == 4000 and config.accumulation_steps(8) * 5 * 8 == 4000
    if name == "distilgpt2":
        assert config.loss.objective == "clm" and config.loss.alpha_clm == 2.0 and config.loss.alpha_mlm == 0
    else:
        assert config.loss.objective == "mlm" and config.loss.alpha_mlm == 2.0
    assert "/" not in config.teacher.path  # a hub id, resolved by transformers where the hub is reachable


@pytest.mark.parametrize("name", ["minilm-l3-demo", "smollm2-causal"])
def test_offline_recipes_parse(name):
    config = load_config(RECIPES / f"{name}.yaml")
    assert config.teacher.path.startswith("python:")


def test_overrides_apply_with_yaml_types():
    config = load_config(RECIPES / "distilbert-base-uncased.yaml",
                         ["loss.temperature=4", "optim.lr=1e-4", "run.mixed_precision=no", "student.layers=[0,11]",
                          "data.group_by_length=false"])
    assert config.loss.temperature == 4.0 and config.optim.lr == 1e-4
    assert config.student.layers == [0, 11] and config.data.group_by_length is False


@pytest.mark.parametrize("override,match", [
    ("loss.alpha_cee=1", "Did you mean 'alpha_ce'"),
    ("optimizer.lr=1", "Did you mean 'optim'"),
    ("loss.temperature", "key=value"),
    ("loss.temperature=hot", "must be float"),
    ("data.batch_size=2.5", "must be int"),
    ("loss.mask_replace=[0.5,0.5,0.5]", "sum to 1"),
    ("loss.hidden_layers=[[1,2,3]]", "pairs"),
    ("run.mixed_precision=fp8", "no, bf16 or fp16"),
    ("optim.warmup_fraction=1.5", "warmup_fraction"),
])
def test_bad_values_are_explained(override, match):
    with pytest.raises(DistilError, match=match):
        load_config(RECIPES / "distilbert-base-uncased.yaml", [override])


def test_missing_recipe_and_two_student_sources(tmp_path):
    with pytest.raises(DistilError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    both = tmp_path / "both.yaml"
    both.write_text("teacher: {path: t}\ndata: {path: d}\nstudent: {path: /some/dir, layers: [0, 2]}\n")
    with pytest.raises(DistilError, match="one way only"):
        load_config(both)


@pytest.mark.parametrize("task,name", [("qa", "distilbert-base-uncased-distilled-squad"),
                                       ("classification", "glue-sst2"), ("ner", "conll2003-ner")])
def test_task_recipes_fill_the_task_options_and_flags_win(task, name):
    from distil.cli import _apply_task_recipe, build_parser

    argv = ["task", task, "--recipe", str(RECIPES / "tasks" / f"{name}.yaml"), "--epochs", "1"]
    args = _apply_task_recipe(build_parser(), argv)
    assert args.student.startswith("distilbert-base-") and args.teacher and args.output_dir
    assert args.alpha_ce == 0.5 and args.alpha_task == 0.5 and args.temperature == 2.0
    assert args.epochs == 1  # the command line wins over the recipe's 3
    if task == "qa":
        assert (args.lr, args.max_length, args.doc_stride) == (3e-5, 384, 128)


def test_task_recipe_with_unknown_key(tmp_path):
    from distil.cli import _apply_task_recipe, build_parser

    bad = tmp_path / "bad.yaml"
    bad.write_text("student: x\nlearning_rate: 1\n")
    with pytest.raises(DistilError, match="unknown keys \\['learning_rate'\\]"):
        _apply_task_recipe(build_parser(), ["task", "qa", "--recipe", str(bad)])


def test_student_on_the_command_line_replaces_the_recipes_way_of_making_one():
    """init-student, then `distil train RECIPE student.path=DIR` on a recipe that sets student.layers."""
    config = load_config(RECIPES / "minilm-l3-demo.yaml", ["student.path=students/mine"])
    assert config.student.path == "students/mine" and config.student.layers is None
    config = load_config(RECIPES / "minilm-l3-demo.yaml", ["student.num_layers=2"])
    assert config.student.num_layers == 2 and config.student.layers is None and config.student.path is None


@pytest.mark.parametrize("override,match", [
    ("optim.betas=[a,b]", r"optim.betas must be a list of floats, got \['a', 'b'\]"),
    ("loss.mask_replace=[x,0.1,0.1]", r"loss.mask_replace must be a list of floats"),
    ("student.layers=[0,two]", r"student.layers must be a list of ints"),
])
def test_bad_input_list_elements_are_explained(override, match):
    with pytest.raises(DistilError, match=match):
        load_config(RECIPES / "distilbert-base-uncased.yaml", [override])


def test_list_elements_of_the_right_kind_are_accepted():
    config = load_config(RECIPES / "distilbert-base-uncased.yaml", ["optim.betas=[0,0.98]", "run.report_to=none"])
    assert config.optim.betas == [0.0, 0.98] and config.run.report_to == []
    assert load_config(RECIPES / "distilbert-base-uncased.yaml", ["run.report_to=tensorboard,wandb"]).run.report_to \
        == ["tensorboard", "wandb"]
