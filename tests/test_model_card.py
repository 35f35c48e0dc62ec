"""The student's README.md is a Hugging Face model card: metadata the hub reads, and evaluation results once
`distil evaluate` has measured the student against its teacher."""

import shutil

import pytest
from huggingface_hub import ModelCard

from distil.config import load_config
from distil.evaluation.evaluate import evaluate
from distil.training.loop import train
from train_fixtures import prepared_data, teacher_dir, write_recipe


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    base = teacher_dir(root, "bert")
    teacher = root / "teacher-licensed"
    shutil.copytree(base, teacher)
    (teacher / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n\n# A tiny teacher\n")
    data = prepared_data(root, base, name="data")
    recipe = write_recipe(root / "r.yaml", teacher, data, root / "run", optim={"max_steps": 3},
                          run={"eval_every": 0})
    summary = train(load_config(recipe))
    return root, teacher, data, root / "run" / "student", summary


def test_model_card_metadata_and_body(distilled):
    root, teacher, _, student, summary = distilled
    card = ModelCard.load(student / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "fill-mask"
    assert meta["license"] == "apache-2.0"  # inherited from the teacher's card
    assert "distillation" in meta["tags"] and "base_model" not in meta  # a local teacher is no hub id
    assert f"{summary['tokens_seen']:,} tokens seen" in card.text
    assert "masked-LM student trained to match the teacher's softened output distribution (KL at temperature 2" \
        in card.text
    assert "alpha_ce: 5.0" in card.text  # the recipe


def test_model_card_base_model_for_hub_teachers():
    from distil.model_card import student_card

    text = student_card(teacher="bert-base-uncased", objective="mlm", has_lm_head=False, weights={"cos": 1.0},
                        temperature=2.0, recipe={"name": "x"}, steps=1, tokens_seen=10, n_parameters=10, heldout={},
                        dataset="wikipedia")
    meta = ModelCard(text).data.to_dict()
    assert meta["base_model"] == "bert-base-uncased" and meta["pipeline_tag"] == "feature-extraction"
    assert meta["datasets"] == ["wikipedia"]
    relations = student_card(teacher="./local", objective="mlm", has_lm_head=False, weights={"relation": 1.0},
                             temperature=2.0, recipe={}, steps=1, tokens_seen=1, n_parameters=1, heldout={})
    assert "self-attention relations" in relations and "base_model" not in ModelCard(relations).data.to_dict()


def test_model_card_names_the_divergence_the_run_used():
    from distil.model_card import student_card

    def card(loss: dict, teacher: dict | None = None) -> str:
        return student_card(teacher="./local", objective="clm", has_lm_head=True, weights={"ce": 1.0},
                            temperature=1.0, recipe={"loss": loss, "teacher": teacher or {}}, steps=1, tokens_seen=1,
                            n_parameters=1, heldout={})

    assert "(KL at temperature 1, scaled by T^2)" in card({"divergence": "forward_kl"})
    assert "(reverse KL at temperature 1" in card({"divergence": "reverse_kl"})
    assert "Jensen-Shannon divergence, beta 0.3, at temperature 1" in card({"divergence": "jsd", "jsd_beta": 0.3})
    assert "(skew KL, alpha 0.2, at" in card({"divergence": "skew_kl", "skew_alpha": 0.2})
    assert "(total variation distance at" in card({"divergence": "tvd"})
    on_policy = card({"divergence": "jsd", "on_policy_fraction": 0.5}, {"cache": None})
    assert "on the student's own generations for 50% of the steps" in on_policy and "store" not in on_policy
    assert "read from a teacher-signal store" in card({}, {"cache": "signals/"})


def test_model_card_gets_the_evaluation_as_model_index(distilled):
    root, teacher, data, student, _ = distilled
    results = evaluate([f"teacher={teacher}", f"student={student}"], data=[str(data)], max_sequences=16, max_length=32,
                       speed_test=False, progress=False)
    card = ModelCard.load(student / "README.md")
    (index,) = card.data.to_dict()["model-index"]
    metrics = {m["name"]: m["value"] for m in index["results"][0]["metrics"]}
    lm = results["models"][1]["lm"]
    assert metrics["masked-token accuracy (held-out)"] == pytest.approx(100 * lm["mlm_accuracy"], abs=1e-3)
    assert metrics["masked-LM loss (held-out)"] == pytest.approx(lm["mlm_loss"], abs=1e-3)
    assert "## Evaluation (distil evaluate)" in card.text and results["markdown"].strip() in card.text
    evaluate([f"teacher={teacher}", f"student={student}"], data=[str(data)], max_sequences=16, max_length=32, speed_test=False,
             progress=False)
    assert ModelCard.load(student / "README.md").text.count("## Evaluation (distil evaluate)") == 1
    # The teacher's own (not distil's) card is never touched.
    assert (teacher / "README.md").read_text().endswith("# A tiny teacher\n")


def test_python_api_trains_from_a_dict_twice_and_stays_light_to_import(distilled, tmp_path):
    import subprocess
    import sys

    import distil

    root, teacher, data, _, _ = distilled
    recipe = {"teacher": {"path": str(teacher)}, "student": {"num_layers": 1}, "data": {"path": str(data)},
              "loss": {"alpha_cos": 1.0, "alpha_ce": 0.0}, "optim": {"max_steps": 2},
              "run": {"output_dir": str(tmp_path / "api"), "progress": False, "report_to": []}}
    first = distil.train(recipe)
    second = distil.train(recipe, overrides=[f"run.output_dir={tmp_path / 'api2'}", "optim.max_steps=3"])
    assert (first["steps"], second["steps"]) == (2, 3)
    with pytest.raises(distil.DistilError, match="Did you mean 'temperature'"):
        distil.train(recipe, overrides=["loss.temprature=3"])
    light = subprocess.run([sys.executable, "-c", "import distil, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert light.stdout.strip() == "False"
    import distil.evaluation.evaluate  # noqa: F401  (a submodule import must not shadow the API's functions)

    assert [getattr(distil, f).__name__ for f in ("prepare", "init_student", "train", "evaluate", "run_task")] == \
        ["prepare", "init_student", "train", "evaluate", "run_task"]
