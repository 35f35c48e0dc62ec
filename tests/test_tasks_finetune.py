"""End-to-end task fine-tuning and task distillation on tiny models: classification, NER and QA.

A tiny BERT (the teacher's base) is fine-tuned on each task without a teacher; a tiny DistilBERT
MLM checkpoint is then task-distilled from it. Every run must lower its loss and save a model that
reloads with the task's AutoModel class.
"""

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoModelForTokenClassification, BertConfig,
    BertForMaskedLM, BertTokenizer, DistilBertConfig, DistilBertForMaskedLM,
)

from distil.errors import DistilError
from distil.tasks.finetune import check_same_tokenizer, run_task
from distil.tasks.task_data import TeacherLabels, resolve_label_order

VOCAB = Path(__file__).parent / "data" / "tasks" / "vocab.txt"
NAMES = ["john", "mary", "peter", "anna", "paul", "lisa", "tom", "emma"]
CITIES = ["paris", "london", "rome", "madrid", "oslo", "vienna", "berlin"]  # berlin is two tokens: ber ##lin
COMPANIES = ["acme", "globex", "initech", "umbrella"]
FAST = dict(epochs=6, lr=5e-3, batch_size=8, max_length=48, log_every=1, warmup_fraction=0.1, progress=False)


def make_tokenizer(words=None):
    words = words or VOCAB.read_text(encoding="utf-8").split()
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; several threads on a busy machine are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Directories of a tiny BERT MLM (teacher base) and a tiny DistilBERT MLM (student base), same tokenizer."""
    root = tmp_path_factory.mktemp("bases")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    distilbert = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2,
                                                        hidden_dim=64, max_position_embeddings=64))
    for name, model in (("bert", bert), ("distilbert", distilbert)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {"teacher_base": str(root / "bert"), "student_base": str(root / "distilbert")}


def train_losses(output_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "split", "lr"} <= set(lines[0])
    return [line["loss"] for line in lines if line["split"] == "train"]


def assert_loss_goes_down(output_dir: Path) -> None:
    losses = train_losses(output_dir)
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert tail < head * 0.8, f"loss did not go down: first {losses[:3]}, last {losses[-3:]}"


def finetune_then_distil(task, bases, tmp_path, auto_class, train, evaluation, **task_kwargs):
    """Fine-tune the teacher base (no teacher), then distil the student from it; return both metrics."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    teacher_metrics = run_task(task, bases["teacher_base"], train, evaluation, teacher_dir, **FAST, **task_kwargs)
    assert_loss_goes_down(teacher_dir)
    student_metrics = run_task(task, bases["student_base"], train, evaluation, student_dir, teacher=str(teacher_dir),
                               alpha_ce=0.5, alpha_task=0.5, temperature=2.0, **FAST, **task_kwargs)
    assert_loss_goes_down(student_dir)
    lines = [json.loads(line) for line in (student_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_kd", "loss_task"} <= set(lines[0])
    for out, metrics in ((teacher_dir, teacher_metrics), (student_dir, student_metrics)):
        assert json.loads((out / "eval_results.json").read_text()) == pytest.approx(metrics)
        reloaded = auto_class.from_pretrained(out)
        assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
        assert reloaded.config.model_type == ("bert" if out == teacher_dir else "distilbert")
    return teacher_metrics, student_metrics, teacher_dir, student_dir


def test_classification_finetune_and_distil(bases, tmp_path):
    rng = random.Random(0)
    subjects = ["movie", "film", "plot", "acting", "story", "music", "ending", "show"]
    rows = [{"text": f"the {s} was {a}", "label": label}
            for s in subjects for label, adjectives in (("pos", ["good", "great", "fun", "superb"]),
                                                        ("neg", ["bad", "awful", "boring", "dull"]))
            for a in adjectives]
    rng.shuffle(rows)
    train, evaluation = tmp_path / "train.csv", tmp_path / "dev.jsonl"
    train.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows[:48]))
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    teacher_metrics, student_metrics, teacher_dir, student_dir = finetune_then_distil(
        "classification", bases, tmp_path, AutoModelForSequenceClassification, train, evaluation)
    for metrics in (teacher_metrics, student_metrics):
        assert set(metrics) == {"accuracy", "macro_f1", "eval_loss"} and 0 <= metrics["accuracy"] <= 1
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.id2label == {0: "neg", 1: "pos"}  # sorted, the teacher's order
    settings = json.loads((student_dir / "task_config.json").read_text())
    assert settings["label_names"] == ["neg", "pos"] and settings["teacher"] == str(teacher_dir)


def conll(sentences) -> str:
    return "-DOCSTART- O\n\n" + "\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sentences) + "\n"


def test_ner_finetune_and_distil(bases, tmp_path):
    sentences = []
    for name, city, company in itertools.product(NAMES, CITIES, COMPANIES):
        words = [name.title(), "works", "at", company.title(), "in", city.title()]
        sentences.append(list(zip(words, ["B-PER", "O", "O", "B-ORG", "O", "B-LOC"])))
    random.Random(1).shuffle(sentences)
    train, evaluation = tmp_path / "train.txt", tmp_path / "dev.txt"
    train.write_text(conll(sentences[:48]))
    evaluation.write_text(conll(sentences[48:64]))
    teacher_metrics, student_metrics, _, student_dir = finetune_then_distil(
        "ner", bases, tmp_path, AutoModelForTokenClassification, train, evaluation, ner_scheme="IOB2")
    for metrics in (teacher_metrics, student_metrics):
        assert metrics["num_gold_entities"] == 16 * 3 and 0 <= metrics["f1"] <= 1
    assert AutoModelForTokenClassification.from_pretrained(student_dir).config.id2label == {
        0: "B-LOC", 1: "B-ORG", 2: "B-PER", 3: "O"}


def squad_file(path: Path, rows) -> None:
    paragraphs = [{"context": context, "qas": qas} for context, qas in rows]
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))


def squad_rows(seed: int, count: int):
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        n1, n2 = rng.sample(NAMES, 2)
        c1, c2, c3 = rng.sample(CITIES, 3)
        context = f"{n1.title()} lives in {c1.title()}. {n2.title()} works in {c2.title()}."
        qas = [
            {"id": f"{seed}-{index}-a", "question": f"Where does {n1.title()} live?",
             "answers": [{"text": c1.title(), "answer_start": context.index(c1.title())}]},
            {"id": f"{seed}-{index}-b", "question": f"Who works in {c2.title()}?",
             "answers": [{"text": n2.title(), "answer_start": context.index(n2.title())}]},
            {"id": f"{seed}-{index}-c", "question": f"Who lives in {c3.title()}?", "answers": [], "is_impossible": True},
        ]
        rows.append((context, qas))
    return rows


def test_qa_finetune_and_distil(bases, tmp_path):
    train, evaluation = tmp_path / "train.json", tmp_path / "dev.json"
    squad_file(train, squad_rows(0, 16))
    squad_file(evaluation, squad_rows(1, 4))
    teacher_metrics, student_metrics, _, student_dir = finetune_then_distil(
        "qa", bases, tmp_path, AutoModelForQuestionAnswering, train, evaluation, doc_stride=8)
    for metrics in (teacher_metrics, student_metrics):
        assert metrics["total"] == 12 and metrics["HasAns_total"] == 8 and metrics["NoAns_total"] == 4
        assert 0 <= metrics["exact_match"] <= metrics["f1"] <= 100
    predictions = json.loads((student_dir / "predictions.json").read_text())
    assert len(predictions) == 12 and all(isinstance(v, str) for v in predictions.values())


@pytest.fixture
def small_classification(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": l}) + "\n"
                             for t, l in [("good movie", "pos"), ("bad film", "neg")] * 4))
    return train


def test_same_seed_gives_the_same_run(bases, tmp_path, small_classification):
    kwargs = dict(FAST, epochs=1, max_steps=3)
    data = small_classification
    first = run_task("classification", bases["student_base"], data, data, tmp_path / "a", **kwargs)
    second = run_task("classification", bases["student_base"], data, data, tmp_path / "b", **kwargs)
    assert first == second
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()


def test_teacher_without_a_task_head_is_refused(bases, tmp_path, small_classification):
    with pytest.raises(DistilError, match="no trained classification head"):
        run_task("classification", bases["student_base"], small_classification, small_classification, tmp_path / "o",
                 teacher=bases["teacher_base"], **FAST)
    assert not (tmp_path / "o").exists()


def test_finished_output_is_refused_before_training(bases, tmp_path, small_classification):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "eval_results.json").write_text("{}")
    with pytest.raises(DistilError, match="--overwrite"):
        run_task("classification", bases["student_base"], small_classification, small_classification, tmp_path / "o")


def test_tokenizers_must_match():
    words = VOCAB.read_text(encoding="utf-8").split()
    check_same_tokenizer(make_tokenizer(), make_tokenizer(), "s", "t")
    with pytest.raises(DistilError, match="different vocabularies"):
        check_same_tokenizer(make_tokenizer(), make_tokenizer([w for w in words if w != "paris"]), "s", "t")
    cased = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False)
    with pytest.raises(DistilError, match="split text differently"):
        check_same_tokenizer(make_tokenizer(), cased, "s", "t")


def test_label_order_follows_a_teacher_that_names_its_labels():
    assert resolve_label_order(["pos", "neg"], None, sorted) == ["neg", "pos"]
    assert resolve_label_order(["pos", "neg"], TeacherLabels(2, ["pos", "neg"]), sorted) == ["pos", "neg"]
    assert resolve_label_order(["neg"], TeacherLabels(3, ["pos", "neg", "neutral"]), sorted) == ["pos", "neg", "neutral"]
    assert resolve_label_order(["b", "a"], TeacherLabels(2, None), sorted) == ["a", "b"]
    with pytest.raises(DistilError, match="does not predict"):
        resolve_label_order(["pos", "other"], TeacherLabels(2, ["pos", "neg"]), sorted)
    with pytest.raises(DistilError, match="3 labels"):
        resolve_label_order(["a", "b", "c"], TeacherLabels(2, None), sorted)


def test_collate_pads_ids_labels_and_masks():
    import numpy as np

    from distil.tasks.finetune import collate

    columns = {"input_ids": [np.array([2, 7, 3]), np.array([2, 3])], "token_type_ids": [np.array([0, 0, 1]), [0, 0]],
               "labels": [np.array([-100, 4, -100]), np.array([-100, -100])], "start_positions": [1, 0]}
    batch = collate(columns, [1, 0], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[2, 3, 0], [2, 7, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100], [-100, 4, -100]]
    assert batch["start_positions"].tolist() == [0, 1]


def test_learning_rate_warms_up_then_decays_linearly():
    from distil.tasks.finetune import linear_warmup_decay

    factor = linear_warmup_decay(warmup_steps=3, total_steps=10)
    assert [round(factor(step), 4) for step in range(11)] == [
        0.25, 0.5, 0.75, 1.0, round(6 / 7, 4), round(5 / 7, 4), round(4 / 7, 4), round(3 / 7, 4), round(2 / 7, 4),
        round(1 / 7, 4), 0.0]
