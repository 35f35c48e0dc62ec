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


# --- Values that are not values: NaN, infinity and out-of-range numbers are refused when the recipe is read ---

BASE_RECIPE = "teacher: {path: t}\ndata: {path: d}\n"
NON_FINITE = [("nan", ".nan"), ("inf", ".inf"), ("-inf", "-.inf")]  # (override spelling, YAML file spelling)
SAMPLE_KEYS = [("loss", "temperature", "0"), ("loss", "alpha_ce", "-1"), ("optim", "lr", "0"),
               ("optim", "warmup_fraction", "1"), ("loss", "mlm_probability", "1.5"), ("run", "dropout", "1"),
               ("loss", "on_policy_top_p", "0")]


@pytest.mark.parametrize("section,key,out_of_range", SAMPLE_KEYS)
@pytest.mark.parametrize("override_spelling,yaml_spelling", NON_FINITE)
def test_non_finite_values_in_a_recipe_file_and_overrides_are_refused_naming_the_key(
        tmp_path, section, key, out_of_range, override_spelling, yaml_spelling):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE_RECIPE + f"{section}: {{{key}: {yaml_spelling}}}\n")
    with pytest.raises(DistilError, match=rf"Recipe key {section}\.{key} must be .*finite number.*got -?(nan|inf)"):
        load_config(recipe)
    recipe.write_text(BASE_RECIPE)
    with pytest.raises(DistilError, match=rf"Recipe key {section}\.{key} must be .*finite number.*got -?(nan|inf)"):
        load_config(recipe, [f"{section}.{key}={override_spelling}"])


@pytest.mark.parametrize("section,key,out_of_range", SAMPLE_KEYS)
def test_non_finite_out_of_range_values_are_refused_naming_the_key(tmp_path, section, key, out_of_range):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE_RECIPE)
    with pytest.raises(DistilError, match=rf"Recipe key {section}\.{key} must be (in|>)"):
        load_config(recipe, [f"{section}.{key}={out_of_range}"])


def test_non_finite_list_elements_are_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE_RECIPE)
    with pytest.raises(DistilError, match=r"optim\.betas \(each element\) must be in \[0, 1\).*got nan"):
        load_config(recipe, ["optim.betas=[0.9,nan]"])
    with pytest.raises(DistilError, match=r"loss\.mask_replace \(each element\) must be in \[0, 1\].*got inf"):
        load_config(recipe, ["loss.mask_replace=[0.8,.inf,0.1]"])


def _float_fields():
    """Every float (or list of floats) key of every recipe section, found from the dataclasses themselves."""
    from dataclasses import fields

    from distil.config import TrainConfig

    config = TrainConfig()
    for section in fields(config):
        value = getattr(config, section.name)
        for f in fields(value) if hasattr(value, "__dataclass_fields__") else []:
            annotation = str(f.type)
            if annotation.startswith(("float", "list[float]")):
                yield section.name, f.name, annotation.startswith("list")


FLOAT_FIELDS = list(_float_fields())


def test_non_finite_field_list_is_complete():
    names = {f"{s}.{k}" for s, k, _ in FLOAT_FIELDS}
    assert {"loss.temperature", "optim.lr", "optim.betas", "run.dropout", "loss.mask_replace"} <= names
    assert len(names) >= 25


@pytest.mark.parametrize("section,key,is_list", FLOAT_FIELDS, ids=[f"{s}.{k}" for s, k, _ in FLOAT_FIELDS])
def test_non_finite_every_float_field_refuses_nan(tmp_path, section, key, is_list):
    from distil.config import TrainConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE_RECIPE)
    default = getattr(getattr(TrainConfig(), section), key)
    value = f"[{','.join(['nan'] * len(default))}]" if is_list else "nan"
    with pytest.raises(DistilError, match=rf"Recipe key {section}\.{key}"):
        load_config(recipe, [f"{section}.{key}={value}"])


def test_non_finite_values_through_the_python_api(tmp_path):
    import math

    import distil
    from distil.config import TrainConfig

    config = TrainConfig()
    config.teacher.path, config.data.path, config.optim.lr = "t", "d", math.nan
    with pytest.raises(DistilError, match=r"Recipe key optim\.lr must be > 0 \(a finite number\), got nan"):
        distil.train(config)
    recipe = {"teacher": {"path": "t"}, "data": {"path": "d"}, "loss": {"temperature": -math.inf}}
    with pytest.raises(DistilError, match=r"Recipe key loss\.temperature must be > 0.*got -inf"):
        distil.train(recipe)
    with pytest.raises(DistilError, match=r"Recipe key optim\.eps must be > 0.*got 0\.0"):
        distil.train({"teacher": {"path": "t"}, "data": {"path": "d"}}, ["optim.eps=0"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.0])
def test_non_finite_fit_head_learning_rate_is_refused(tmp_path, value):
    from distil.fit_head import fit_head

    # Refused before anything is loaded: the teacher and data need not exist.
    with pytest.raises(DistilError, match=r"fit-head's learning rate \(lr, --lr\) must be > 0 \(a finite number\)"):
        fit_head(str(tmp_path / "no-teacher"), str(tmp_path / "no-data"), str(tmp_path / "out"), lr=value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value,rule", [
    ("lr", float("nan"), "> 0"), ("lr", float("inf"), "> 0"), ("temperature", float("-inf"), "> 0"),
    ("temperature", 0.0, "> 0"), ("alpha_ce", float("nan"), ">= 0"), ("alpha_task", -0.5, ">= 0"),
    ("warmup_fraction", 1.0, r"in \[0, 1\)"), ("weight_decay", float("nan"), ">= 0"),
    ("max_grad_norm", float("inf"), ">= 0"), ("null_score_diff_threshold", float("nan"), "a finite number"),
])
def test_non_finite_task_options_are_refused(tmp_path, option, value, rule):
    import distil

    flag = "--" + option.replace("_", "-")
    with pytest.raises(DistilError, match=rf"The task option {option} \({flag}\) must be {rule}"):
        distil.run_task("classification", str(tmp_path / "no-student"), None, None, str(tmp_path / "out"),
                        **{option: value})


@pytest.mark.parametrize("argv", [
    ["task", "classification", "s", "-o", "o", "--lr", "nan"],
    ["task", "qa", "s", "-o", "o", "--temperature", "inf"],
    ["fit-head", "t", "--data", "d", "-o", "o", "--lr=-inf"],
    ["prepare", "f.txt", "--tokenizer", "t", "-o", "o", "--heldout", "nan"],
])
def test_non_finite_command_line_flags_are_refused_naming_the_flag(argv, capsys):
    from distil.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    flag, value = argv[-1].split("=") if "=" in argv[-1] else argv[-2:]
    assert f"argument {flag}: expected a finite number, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["None", "null", "~"])
def test_small_inputs_none_and_null_alike_for_optional_keys(tmp_path, spelling):
    """The teacher store's message suggests data.max_length=None: both spellings mean null, in a file too."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE_RECIPE + "data: {path: d, max_length: 64}\nrun: {dropout: 0.1}\n")
    config = load_config(recipe, [f"data.max_length={spelling}", f"run.dropout={spelling}"])
    assert config.data.max_length is None and config.run.dropout is None
    recipe.write_text(BASE_RECIPE + f"data: {{path: d, max_length: {spelling}}}\n")
    assert load_config(recipe).data.max_length is None


def test_small_inputs_python_api_refuses_what_is_not_a_recipe(tmp_path):
    import distil

    for wrong in ([1, 2, 3], 5, b"recipe.yaml"):
        with pytest.raises(DistilError, match="distil.train takes a recipe path, a TrainConfig or a dict"):
            distil.train(wrong)
    with pytest.raises(DistilError, match="overrides must be a list of 'section.key=value' strings"):
        distil.train({"teacher": {"path": "t"}, "data": {"path": "d"}}, "optim.lr=1")


def test_small_inputs_task_device_and_max_length(tmp_path):
    import torch

    import distil
    from train_fixtures import teacher_dir

    if not torch.cuda.is_available():
        with pytest.raises(DistilError, match="--device cuda was asked for, but torch sees no GPU here"):
            distil.run_task("classification", str(tmp_path / "s"), None, None, str(tmp_path / "out"), device="cuda")
    with pytest.raises(DistilError, match="Unknown device 'gpu0'"):
        distil.run_task("classification", str(tmp_path / "s"), None, None, str(tmp_path / "out"), device="gpu0")
    with pytest.raises(DistilError, match="max_length must be at least 1 token, got 0"):
        distil.run_task("ner", str(tmp_path / "s"), None, None, str(tmp_path / "out"), max_length=0)
    student = teacher_dir(tmp_path, "bert", num_layers=1)  # its tokenizer adds [CLS] and [SEP]
    for max_length in (1, 2):
        with pytest.raises(DistilError, match=f"max_length {max_length} leaves no room for text: the tokenizer adds 2"):
            distil.run_task("classification", str(student), None, None, str(tmp_path / "out"), max_length=max_length,
                            device="cpu")
    assert not (tmp_path / "out").exists()


def test_small_inputs_store_max_length_advice_can_be_followed(tmp_path):
    """The teacher store's mismatch message names a value the parser takes (null) and flags that exist."""
    from types import SimpleNamespace

    import numpy as np

    from distil.teacher_cache import format as store_format
    from distil.training.store_run import check_store_matches_data
    from train_fixtures import prepared_data, teacher_dir

    data = prepared_data(tmp_path, teacher_dir(tmp_path, "bert"), n_lines=40)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {{path: t}}\ndata: {{path: {data}}}\n")
    lengths = np.array([5, 7])

    def store(max_length):
        manifest = {"split": "train", "data": {"fingerprint": store_format.data_fingerprint(data, "train"),
                                               "max_length": max_length}}
        return SimpleNamespace(manifest=manifest, root="STORE", lengths=lambda: lengths)

    with pytest.raises(DistilError, match=r"Set data.max_length=null, or write the store with --max-length 16\.$"):
        check_store_matches_data(load_config(recipe, ["data.max_length=16"]), store(None), lengths)
    check_store_matches_data(load_config(recipe, ["data.max_length=16", "data.max_length=null"]), store(None), lengths)
    with pytest.raises(DistilError, match=r"Set data.max_length=16, or write the store without --max-length\.$"):
        check_store_matches_data(load_config(recipe), store(16), lengths)


def test_non_finite_task_recipe_value_is_refused_naming_the_option(tmp_path, capsys):
    """A task recipe's values bypass the flags' parsing (they become defaults): run_task checks them itself."""
    from distil.cli import main

    recipe = tmp_path / "task.yaml"
    recipe.write_text(f"student: {tmp_path / 'no-student'}\noutput_dir: {tmp_path / 'out'}\nlr: .nan\n")
    assert main(["task", "classification", "--recipe", str(recipe)]) == 2
    assert "The task option lr (--lr) must be > 0 (a finite number), got nan." in capsys.readouterr().err
