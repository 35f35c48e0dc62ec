import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from distil.config import load_config
from distil.training.loop import train
from distil.errors import DistilError
from distil.metrics_log import read_metrics
from train_fixtures import prepared_data, teacher_dir, write_recipe

CAUSAL = {"gpt2", "llama"}


def losses_for(family):
    if family in CAUSAL:
        return {"alpha_ce": 5.0, "alpha_clm": 1.0, "alpha_mlm": 0.0, "alpha_cos": 1.0}
    return {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


def run(workspace, family, name, overrides=(), **sections):
    teacher = teacher_dir(workspace, family)
    data = prepared_data(workspace, teacher, name=f"data-{family}")
    sections.setdefault("loss", losses_for(family))
    recipe = write_recipe(workspace / f"{name}.yaml", teacher, data, workspace / name, **sections)
    return train(load_config(recipe, list(overrides))), workspace / name


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_distillation_lowers_the_loss(workspace, family):
    summary, run_dir = run(workspace, family, f"run-{family}", optim={"max_steps": 40, "lr": 1e-2})
    rows = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["loss_ce"] for r in rows[:5]) / 5
    last = sum(r["loss_ce"] for r in rows[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    assert summary["steps"] == 40 and summary["heldout"]
    auto = AutoModelForCausalLM if family in CAUSAL else AutoModelForMaskedLM
    model, info = auto.from_pretrained(run_dir / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected_type = "distilbert" if family == "bert" else family
    assert model.config.model_type == expected_type and model.config.num_hidden_layers == 2


def test_trained_student_reloads_with_the_same_outputs(workspace):
    """The held-out losses the loop measured at the end are reproduced by the reloaded student."""
    from distil.data.dataset import TokenSequences, pad_id_of
    from distil.training.heldout import evaluate_heldout, heldout_batches
    from distil.training.objective import Objective, term_spec_from
    from distil.training.sources.live import LiveTeacher
    from distil.data.masking import build_masker
    from distil.training.accelerator import make_accelerator
    from distil.training.models import layer_pairs, load_models

    summary, run_dir = run(workspace, "bert", "run-reload", optim={"max_steps": 8})
    config = load_config(run_dir / "recipe.yaml", ["run.overwrite=false"])
    config.student.num_layers = None
    config.student.path = str(run_dir / "student")
    acc = make_accelerator(config)
    models = load_models(config, config.student.path, acc.device)
    heldout = TokenSequences(config.data.path, "heldout")
    pairs = layer_pairs(config, models.student.config, models.teacher_config, models.init_record)
    objective = Objective(term_spec_from(config, models.objective, pairs), LiveTeacher(models.teacher_models[0]),
                          models.student, None, acc.autocast)
    masker = build_masker(config, config.data.path, heldout.manifest, 96, models.tokenizer)
    batches = heldout_batches(heldout, config.data.batch_size, config.run.eval_batches)
    again = evaluate_heldout(acc, objective, models.student_trained, heldout, batches, masker,
                             pad_id_of(heldout.manifest))
    for key in ("student_mlm", "teacher_mlm", "kd", "cos"):
        assert again[key] == pytest.approx(summary["heldout"][key], abs=1e-5), key
    base = AutoModel.from_pretrained(run_dir / "student").eval()
    models.student.eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        full = models.student(ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(base(ids).last_hidden_state, full, atol=1e-6)


def test_metrics_tensorboard_and_recipe_written(workspace):
    _, run_dir = run(workspace, "bert", "run-files", optim={"max_steps": 6},
                     run={"report_to": ["tensorboard"], "eval_every": 3, "log_every": 2})
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]
    held = [r for r in rows if r["split"] == "heldout"]
    assert [r["step"] for r in held] == [3, 6]
    assert {"student_mlm", "teacher_mlm", "kd", "cos"} <= set(held[0])
    # TensorBoard (through accelerate's tracker) holds the same numbers under the same names as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    curve = {e.step: e.value for e in events.Scalars("train/loss")}
    assert curve == pytest.approx({r["step"]: r["loss"] for r in rows if r["split"] == "train"}, abs=1e-5)
    assert [e.step for e in events.Scalars("heldout/kd")] == [3, 6]
    assert load_config(run_dir / "recipe.yaml").optim.max_steps == 6
    record = json.loads((run_dir / "student" / "distil_init.json").read_text())
    assert record["teacher_layers"] == [0, 3] and record["steps"] == 6
    assert "\n# Student distilled from" in (run_dir / "student" / "README.md").read_text()


def test_finished_run_is_not_overwritten(workspace):
    _, run_dir = run(workspace, "bert", "run-done", optim={"max_steps": 2})
    before = (run_dir / "student" / "model.safetensors").read_bytes()
    with pytest.raises(DistilError, match="finished run"):
        run(workspace, "bert", "run-done", optim={"max_steps": 2})
    assert (run_dir / "student" / "model.safetensors").read_bytes() == before
    run(workspace, "bert", "run-done", ["run.overwrite=true", "optim.lr=0.01"], optim={"max_steps": 2})
    assert (run_dir / "student" / "model.safetensors").read_bytes() != before


def test_freezing_position_embeddings_keeps_them(workspace):
    _, run_dir = run(workspace, "bert", "run-freeze", optim={"max_steps": 3},
                     run={"freeze_position_embeddings": True})
    init = AutoModelForMaskedLM.from_pretrained(run_dir / "student-init")
    final = AutoModelForMaskedLM.from_pretrained(run_dir / "student")
    pos = "distilbert.embeddings.position_embeddings.weight"
    word = "distilbert.embeddings.word_embeddings.weight"
    assert torch.equal(init.state_dict()[pos], final.state_dict()[pos])
    assert not torch.equal(init.state_dict()[word], final.state_dict()[word])


def headless_teacher(workspace):
    """The tiny BERT saved as a bare BertModel: an encoder without its MLM head."""
    from transformers import AutoTokenizer, BertModel

    teacher = teacher_dir(workspace, "bert")
    headless = workspace / "teacher-headless"
    if not headless.exists():
        BertModel.from_pretrained(teacher).save_pretrained(headless)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(headless)
    return headless


def test_hidden_losses_alone_work_for_a_teacher_without_head(workspace):
    teacher = teacher_dir(workspace, "bert")
    headless = headless_teacher(workspace)
    data = prepared_data(workspace, teacher, name="data-bert")
    recipe = write_recipe(workspace / "headless.yaml", headless, data, workspace / "run-headless",
                          loss={"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 1.0, "alpha_hidden_mse": 1.0},
                          optim={"max_steps": 25})
    summary = train(load_config(recipe))
    rows = [r for r in read_metrics(workspace / "run-headless") if r["split"] == "train"]
    assert rows[-1]["loss_cos"] < rows[0]["loss_cos"]
    assert set(summary["heldout"]) == {"cos", "hidden_mse", "batches", "tokens_per_s"}


# --- start-up checks --------------------------------------------------------------------------------------

def expect_error(workspace, match, family="bert", overrides=(), **sections):
    with pytest.raises(DistilError, match=match):
        run(workspace, family, "run-bad", ["run.overwrite=true", *overrides], **sections)


def test_padded_vocab_student_trains_on_the_tokenizer_ids(workspace, caplog):
    """A student whose output layer is padded beyond the shared 96-token tokenizer (104 rows) against the
    teacher's 96: distilled on the tokenizer's ids, said at start-up."""
    from tiny_models import tiny_bert

    student = workspace / "student-padded"
    model = tiny_bert(num_layers=2)
    model.resize_token_embeddings(104)
    model.save_pretrained(student)
    with caplog.at_level("WARNING"):
        summary, run_dir = run(workspace, "bert", "run-padded", student={"num_layers": None, "path": str(student)},
                               optim={"max_steps": 3})
    assert summary["steps"] == 3 and summary["heldout"]["kd"] > 0
    assert any("differ by padding only (teacher 96 rows, student 104, tokenizer 96 ids)" in r.getMessage()
               for r in caplog.records)


def test_padded_vocab_real_mismatch_is_refused(workspace):
    """A student smaller than the tokenizer, or one with a tokenizer of its own, is a real mismatch."""
    from transformers import AutoTokenizer

    from tiny_models import tiny_bert
    from tiny_tokenizers import word_level_tokenizer

    small = workspace / "student-small-vocab"
    model = tiny_bert(num_layers=2)
    model.resize_token_embeddings(90)
    model.save_pretrained(small)
    expect_error(workspace, "The tokenizer has 96 tokens but the student only 90 embeddings",
                 student={"num_layers": None, "path": str(small)})
    other = workspace / "student-other-tokenizer"
    model = tiny_bert(num_layers=2)
    model.resize_token_embeddings(104)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(word_level_tokenizer(workspace / "tok-other", n_words=99, family="bert")) \
        .save_pretrained(other)
    expect_error(workspace, "the student's own tokenizer is not the teacher's",
                 student={"num_layers": None, "path": str(other)})


def test_hidden_size_mismatch_with_hidden_loss(workspace):
    student = workspace / "student-wide"
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(student)
    expect_error(workspace, r"hidden sizes differ \(teacher 32, student 48\) and loss.hidden_projection is none",
                 student={"num_layers": None, "path": str(student)}, overrides=["loss.hidden_projection=none"])


def test_mlm_recipe_with_headless_teacher(workspace):
    data = prepared_data(workspace, teacher_dir(workspace, "bert"), name="data-bert")
    recipe = write_recipe(workspace / "bad.yaml", headless_teacher(workspace), data, workspace / "run-bad2")
    with pytest.raises(DistilError, match="has no MLM head"):
        train(load_config(recipe))


def test_causal_recipe_with_bidirectional_teacher(workspace):
    expect_error(workspace, "bidirectional", loss={"alpha_ce": 1.0, "alpha_mlm": 0.0, "alpha_clm": 1.0})


@pytest.mark.parametrize("overrides,match", [
    (["loss.alpha_ce=-1"], "must be >= 0"),
    (["loss.alpha_ce=0", "loss.alpha_mlm=0", "loss.alpha_cos=0"], "All loss weights are 0"),
    (["loss.temprature=3"], "Did you mean 'temperature'"),
    (["optim.learning_rate=3"], "Unknown recipe key optim.'learning_rate'"),
    (["loss.alpha_clm=1"], "both set"),
])
def test_recipe_validation(workspace, overrides, match):
    expect_error(workspace, match, overrides=overrides)


def test_data_from_another_tokenizer(workspace):
    other = prepared_data(workspace, teacher_dir(workspace, "roberta"), name="data-roberta")
    expect_error(workspace, "prepared with another tokenizer", data={"path": str(other)})


def test_nan_loss_stops_with_step_and_term(workspace):
    teacher = teacher_dir(workspace, "bert")
    broken = workspace / "teacher-nan"
    if not broken.exists():
        from transformers import AutoTokenizer

        model = AutoModelForMaskedLM.from_pretrained(teacher)
        with torch.no_grad():
            model.cls.predictions.bias.fill_(float("nan"))
        model.save_pretrained(broken)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(broken)
    data = prepared_data(workspace, teacher, name="data-bert")
    recipe = write_recipe(workspace / "nan.yaml", broken, data, workspace / "run-nan")
    with pytest.raises(DistilError, match=r"step 1: loss term 'ce' is nan"):
        train(load_config(recipe))


# --- the objective comes from the teacher, not from the loss weights --------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("weights", [{"alpha_ce": 1.0}, {"alpha_cos": 1.0}], ids=["ce-only", "cos-only"])
def test_objective_of_a_decoder_teacher_is_causal_without_alpha_clm(workspace, family, weights):
    loss = {"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, **weights}
    summary, run_dir = run(workspace, family, f"run-objective-{family}-{'-'.join(weights)}", loss=loss,
                           optim={"max_steps": 12, "lr": 1e-2})
    term = "loss_" + next(iter(weights)).removeprefix("alpha_")
    rows = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert rows[-1][term] < rows[0][term]
    assert AutoModelForCausalLM.from_pretrained(run_dir / "student").config.model_type == family
    if "alpha_ce" in weights:  # the causal held-out metrics, not masked-LM ones
        assert {"student_clm", "teacher_clm", "student_perplexity"} <= set(summary["heldout"])


@pytest.mark.parametrize("family,loss,match", [
    ("gpt2", {"alpha_mlm": 1.0}, "masked-LM .* gpt2 decoder"),
    ("gpt2", {"objective": "mlm"}, "masked-LM .* gpt2 decoder"),
    ("bert", {"alpha_mlm": 0.0, "alpha_clm": 1.0}, "causal-LM .* bidirectional bert encoder"),
    ("bert", {"objective": "clm", "alpha_mlm": 0.0}, "causal-LM .* bidirectional bert encoder"),
])
def test_objective_that_contradicts_the_teacher_is_refused(workspace, family, loss, match):
    expect_error(workspace, match, family=family, loss={"alpha_ce": 1.0, "alpha_mlm": 0.0, **loss})


def test_objective_recipe_key_is_validated():
    from distil.config import TrainConfig
    from distil.recipe_checks import validate

    config = TrainConfig()
    config.teacher.path, config.data.path = "t", "d"
    config.loss.objective = "seq2seq"
    with pytest.raises(DistilError, match="loss.objective must be auto, mlm, clm or embedding"):
        validate(config)


# --- a library user calls train() more than once -----------------------------------------------------------

def test_train_twice_in_one_process_with_another_mixed_precision(workspace):
    first, _ = run(workspace, "bert", "run-twice-fp32", optim={"max_steps": 2})
    second, run_dir = run(workspace, "bert", "run-twice-bf16", optim={"max_steps": 2}, run={"mixed_precision": "bf16"})
    assert first["steps"] == second["steps"] == 2
    assert load_config(run_dir / "recipe.yaml").run.mixed_precision == "bf16"


# --- held-out evaluation ---------------------------------------------------------------------------------

def test_heldout_smaller_than_a_batch_is_evaluated_and_said(workspace, caplog):
    teacher = teacher_dir(workspace, "bert")
    small = prepared_data(workspace, teacher, name="data-small-heldout", n_lines=120, heldout=0.03)
    from distil.data.dataset import TokenSequences

    n_heldout = len(TokenSequences(small, "heldout"))
    assert 0 < n_heldout < 8
    recipe = write_recipe(workspace / "small-heldout.yaml", teacher, small, workspace / "run-small-heldout",
                          optim={"max_steps": 2})
    with caplog.at_level("WARNING"):
        summary = train(load_config(recipe))
    assert summary["heldout"]["batches"] == 1 and {"student_mlm", "teacher_mlm", "kd", "cos"} <= set(summary["heldout"])
    assert sum("fewer than one global batch" in r.message for r in caplog.records) == 1


def test_heldout_means_are_over_tokens_whatever_the_batch_size(workspace):
    """Causal held-out losses (no masks) are token means over the same sequences: batches of 4 (the last one
    partial) and one batch of all of them give the same numbers."""
    from distil.data.dataset import TokenSequences, pad_id_of
    from distil.training.heldout import evaluate_heldout, heldout_batches
    from distil.training.objective import Objective, term_spec_from
    from distil.training.sources.live import LiveTeacher
    from distil.training.accelerator import make_accelerator
    from distil.training.models import layer_pairs, load_models
    from distil.training.student_source import student_source

    teacher = teacher_dir(workspace, "gpt2")
    data = prepared_data(workspace, teacher, name="data-gpt2")
    recipe = write_recipe(workspace / "heldout-means.yaml", teacher, data, workspace / "run-heldout-means",
                          loss={"alpha_ce": 1.0, "alpha_clm": 1.0, "alpha_mlm": 0.0, "alpha_cos": 1.0})
    config = load_config(recipe)
    acc = make_accelerator(config)
    models = load_models(config, student_source(config, workspace / "run-heldout-means", True, lambda: None)[0],
                         acc.device)
    pairs = layer_pairs(config, models.student.config, models.teacher_config, models.init_record)
    objective = Objective(term_spec_from(config, models.objective, pairs), LiveTeacher(models.teacher_models[0]),
                          models.student, None, acc.autocast)
    heldout = TokenSequences(data, "heldout")
    count = len(heldout)
    results = [evaluate_heldout(acc, objective, models.student_trained, heldout, heldout_batches(heldout, size, 100),
                                None, pad_id_of(heldout.manifest)) for size in (count, 4)]
    assert count % 4 and results[1]["batches"] == (count + 3) // 4
    for key in ("student_clm", "teacher_clm", "kd", "cos"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-5), key


def test_tracker_asked_for_but_missing_is_refused(workspace, monkeypatch):
    from distil.training import accelerator

    monkeypatch.setitem(accelerator.TRACKER_MODULES, "wandb", ("distil_no_such_tracker", "wandb"))
    with pytest.raises(DistilError, match=r"run.report_to asks for wandb, which is not installed. Install it \(pip install wandb\)"):
        run(workspace, "bert", "run-tracker", run={"report_to": ["wandb"]})
    assert not (workspace / "run-tracker").exists()
    with pytest.raises(DistilError, match="not trackers distil knows"):
        run(workspace, "bert", "run-tracker", ["run.report_to=tensorbord"])
