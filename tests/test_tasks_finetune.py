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
    BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification,
    BertTokenizer, DistilBertConfig, DistilBertForMaskedLM,
)

from distil.errors import DistilError
from distil.tasks.finetune import _logits, _model_inputs, check_same_tokenizer, collate, load_student, run_task
from distil.tasks.task_data import (
    TeacherLabels, prepare_classification, prepare_ner, prepare_qa, resolve_label_order,
)

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


def sentiment_rows() -> list[dict]:
    """64 short reviews labelled pos / neg, in a fixed shuffled order."""
    subjects = ["movie", "film", "plot", "acting", "story", "music", "ending", "show"]
    rows = [{"text": f"the {s} was {a}", "label": label}
            for s in subjects for label, adjectives in (("pos", ["good", "great", "fun", "superb"]),
                                                        ("neg", ["bad", "awful", "boring", "dull"]))
            for a in adjectives]
    random.Random(0).shuffle(rows)
    return rows


def test_classification_finetune_and_distil(bases, tmp_path):
    rows = sentiment_rows()
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


def ner_sentences() -> list[list[tuple[str, str]]]:
    """224 "NAME works at COMPANY in CITY" sentences as (word, tag) pairs, in a fixed shuffled order."""
    sentences = []
    for name, city, company in itertools.product(NAMES, CITIES, COMPANIES):
        words = [name.title(), "works", "at", company.title(), "in", city.title()]
        sentences.append(list(zip(words, ["B-PER", "O", "O", "B-ORG", "O", "B-LOC"])))
    random.Random(1).shuffle(sentences)
    return sentences


def test_ner_finetune_and_distil(bases, tmp_path):
    sentences = ner_sentences()
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


def test_overwrite_keeps_files_distil_did_not_write(bases, tmp_path, small_classification):
    out = tmp_path / "o"
    out.mkdir()
    (out / "my_thesis.txt").write_bytes(b"three years of work\n")
    (out / "eval_results.json").write_text('{"mine": true}')  # a name distil uses is not enough to be distil's
    with pytest.raises(DistilError, match=r"--overwrite would delete .*\(eval_results\.json, my_thesis\.txt\)"):
        run_task("classification", bases["student_base"], small_classification, small_classification, out,
                 overwrite=True, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["eval_results.json", "my_thesis.txt"]
    assert (out / "my_thesis.txt").read_bytes() == b"three years of work\n"
    assert (out / "eval_results.json").read_text() == '{"mine": true}'

    kwargs = dict(FAST, epochs=1, max_steps=2)
    done = tmp_path / "done"
    run_task("classification", bases["student_base"], small_classification, small_classification, done, **kwargs)
    assert json.loads((done / ".distil-output.json").read_text())["command"] == "task"
    again = run_task("classification", bases["student_base"], small_classification, small_classification, done,
                     overwrite=True, **dict(kwargs, max_steps=1))
    assert json.loads((done / "eval_results.json").read_text()) == again
    assert json.loads((done / "task_config.json").read_text())["max_steps"] == 1


def test_tokenizers_must_match():
    words = VOCAB.read_text(encoding="utf-8").split()
    check_same_tokenizer(make_tokenizer(), make_tokenizer(), "s", "t")
    with pytest.raises(DistilError, match="different vocabularies"):
        check_same_tokenizer(make_tokenizer(), make_tokenizer([w for w in words if w != "paris"]), "s", "t")
    cased = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False)
    with pytest.raises(DistilError, match="split text differently"):
        check_same_tokenizer(make_tokenizer(), cased, "s", "t")


MNLI_NAMES = ["entailment", "neutral", "contradiction"]  # MNLI's ClassLabel: ids 0, 1, 2
MNLI_ROWS = [("john works in paris", "john works", 0), ("mary lives in rome", "mary works in rome", 1),
             ("tom lives in oslo", "tom lives in madrid", 2), ("anna works at acme", "anna works", 0),
             ("paul lives in vienna", "paul lives in london", 2), ("lisa works in rome", "lisa lives in rome", 1)]
TEACHER_HEADS = {"classification": (BertForSequenceClassification, "classifier"),
                 "ner": (BertForTokenClassification, "classifier"), "qa": (BertForQuestionAnswering, "qa_outputs")}


def random_teacher(bases, path: Path, task: str, labels: int | list[str] = 2, spread: float = 8.0) -> str:
    """Save a tiny BERT teacher with a random, saved (hence accepted) task head; `labels` is a class count
    (unnamed: LABEL_0...) or names in id order. Weights drawn wider than usual and a head scaled by `spread`
    make its output distributions differ clearly from input to input, so matching them takes more than a bias."""
    names = {} if isinstance(labels, int) else {"id2label": dict(enumerate(labels)),
                                                "label2id": {name: i for i, name in enumerate(labels)}}
    count = {"num_labels": labels} if isinstance(labels, int) else {}
    config = BertConfig.from_pretrained(bases["teacher_base"], initializer_range=0.2, **count, **names)
    model_class, head_name = TEACHER_HEADS[task]
    torch.manual_seed(0)
    model = model_class(config)
    head = getattr(model, head_name)
    with torch.no_grad():
        head.weight.mul_(spread)
        head.bias.zero_()
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def mnli_dataset(path: Path) -> str:
    """An MNLI-shaped `datasets` directory (premise, hypothesis, ClassLabel entailment/neutral/contradiction)."""
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=MNLI_NAMES)})
    split = datasets.Dataset.from_dict({"premise": [r[0] for r in MNLI_ROWS], "hypothesis": [r[1] for r in MNLI_ROWS],
                                        "label": [r[2] for r in MNLI_ROWS]}, features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(path))
    return str(path)


def saved_labels(output_dir: Path) -> tuple[dict, dict]:
    config = AutoModelForSequenceClassification.from_pretrained(output_dir).config
    return config.id2label, config.label2id


ONE_STEP = dict(FAST, epochs=1, max_steps=1)


def test_label_order_of_a_class_label_dataset_is_kept_with_an_unnamed_teacher(bases, tmp_path):
    data_dir = mnli_dataset(tmp_path / "mnli")
    # The data's own ids, not the sorted names (contradiction, entailment, neutral), which would swap the
    # teacher's classes: LABEL_0 is entailment because the ClassLabel says entailment is 0.
    data = prepare_classification(make_tokenizer(), None, None, 48, TeacherLabels(3, None), dataset=data_dir)
    assert data.label_names == MNLI_NAMES
    assert data.train["labels"] == [r[2] for r in MNLI_ROWS] and data.eval["labels"] == [r[2] for r in MNLI_ROWS]
    teacher = random_teacher(bases, tmp_path / "teacher", "classification", 3)
    run_task("classification", bases["student_base"], None, None, tmp_path / "out", teacher=teacher, dataset=data_dir,
             **ONE_STEP)
    assert saved_labels(tmp_path / "out") == ({0: "entailment", 1: "neutral", 2: "contradiction"},
                                              {"entailment": 0, "neutral": 1, "contradiction": 2})
    # Without a teacher the dataset's order is kept as well.
    assert prepare_classification(make_tokenizer(), None, None, 48, dataset=data_dir).label_names == MNLI_NAMES


def test_label_order_maps_the_data_to_a_named_teacher_by_name(bases, tmp_path):
    data_dir = mnli_dataset(tmp_path / "mnli")
    teacher_order = ["neutral", "contradiction", "entailment"]  # differs from the data's ids
    data = prepare_classification(make_tokenizer(), None, None, 48, TeacherLabels(3, teacher_order), dataset=data_dir)
    to_teacher = {0: 2, 1: 0, 2: 1}  # entailment -> 2, neutral -> 0, contradiction -> 1
    assert data.label_names == teacher_order
    assert data.train["labels"] == [to_teacher[r[2]] for r in MNLI_ROWS]
    teacher = random_teacher(bases, tmp_path / "teacher", "classification", teacher_order)
    run_task("classification", bases["student_base"], None, None, tmp_path / "out", teacher=teacher, dataset=data_dir,
             **ONE_STEP)
    assert saved_labels(tmp_path / "out") == ({0: "neutral", 1: "contradiction", 2: "entailment"},
                                              {"neutral": 0, "contradiction": 1, "entailment": 2})


def test_label_order_is_required_for_string_labels_with_an_unnamed_teacher(bases, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("premise,hypothesis,label\n" + "".join(f"{p},{h},{MNLI_NAMES[y]}\n" for p, h, y in MNLI_ROWS))
    teacher = random_teacher(bases, tmp_path / "teacher", "classification", 3)
    with pytest.raises(DistilError) as refused:
        run_task("classification", bases["student_base"], train, train, tmp_path / "out", teacher=teacher, **ONE_STEP)
    message = str(refused.value)
    assert "[LABEL_0, LABEL_1, LABEL_2] vs data labels [contradiction, entailment, neutral]" in message
    assert "--label-order" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    run_task("classification", bases["student_base"], train, train, tmp_path / "out", teacher=teacher,
             label_order="entailment,neutral,contradiction", **ONE_STEP)
    assert saved_labels(tmp_path / "out")[0] == {0: "entailment", 1: "neutral", 2: "contradiction"}
    settings = json.loads((tmp_path / "out" / "task_config.json").read_text())
    assert settings["label_names"] == settings["label_order"] == MNLI_NAMES
    data = prepare_classification(make_tokenizer(), train, train, 48, TeacherLabels(3, None),
                                  label_order=["neutral", "contradiction", "entailment"])
    assert data.train["labels"] == [{0: 2, 1: 0, 2: 1}[r[2]] for r in MNLI_ROWS]


def test_label_order_integer_labels_are_the_class_ids_of_an_unnamed_teacher(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\ngood movie,2\nbad film,0\nfun plot,2\n")
    data = prepare_classification(make_tokenizer(), train, train, 48, TeacherLabels(3, None))
    assert data.label_names == ["0", "1", "2"] and data.train["labels"] == [2, 0, 2]  # class 1 is unused, not dropped
    with pytest.raises(DistilError, match=r"\['2'\] are not among the teacher's 2 classes"):
        prepare_classification(make_tokenizer(), train, train, 48, TeacherLabels(2, None))


def test_label_order_resolution_rules():
    from distil.tasks.task_data import DataLabels

    nli = ["contradiction", "entailment", "neutral"]
    # No teacher: the data's own order when it has one, else sorted (numbers as numbers).
    assert resolve_label_order(DataLabels(["pos", "neg"]), None) == ["neg", "pos"]
    assert resolve_label_order(DataLabels(["10", "2"]), None) == ["2", "10"]
    assert resolve_label_order(DataLabels(["neutral"], MNLI_NAMES), None) == MNLI_NAMES
    # A named teacher: its names, whatever the data's order; a label it lacks is refused.
    assert resolve_label_order(DataLabels(nli, MNLI_NAMES), TeacherLabels(3, nli)) == nli
    assert resolve_label_order(DataLabels(["neg"]), TeacherLabels(3, ["pos", "neg", "x"])) == ["pos", "neg", "x"]
    with pytest.raises(DistilError, match=r"labels \['other'\] that the teacher does not predict"):
        resolve_label_order(DataLabels(["pos", "other"]), TeacherLabels(2, ["pos", "neg"]))
    # An unnamed teacher: the data's order, integer ids, or an explicit order; never a guess.
    assert resolve_label_order(DataLabels(nli, MNLI_NAMES), TeacherLabels(3, None)) == MNLI_NAMES
    with pytest.raises(DistilError, match="3 output classes but the training data names 2"):
        resolve_label_order(DataLabels(["a"], ["a", "b"]), TeacherLabels(3, None))
    assert resolve_label_order(DataLabels(["1", "0"]), TeacherLabels(2, None)) == ["0", "1"]
    with pytest.raises(DistilError, match=r"\[LABEL_0, LABEL_1\] vs data labels \[a, b\]"):
        resolve_label_order(DataLabels(["b", "a"]), TeacherLabels(2, None))
    with pytest.raises(DistilError, match="2 output classes but the training data has 3 labels"):
        resolve_label_order(DataLabels(["a", "b", "c"]), TeacherLabels(2, None))
    assert resolve_label_order(DataLabels(["b", "a"]), TeacherLabels(2, None), ["b", "a"]) == ["b", "a"]
    assert resolve_label_order(DataLabels(["b", "a"]), TeacherLabels(2, None), " b, a") == ["b", "a"]
    # An explicit order must cover the data, fit the teacher, and agree with a teacher that names its classes.
    assert resolve_label_order(DataLabels(["pos", "neg"]), TeacherLabels(2, ["POS", "NEG"]), ["pos", "neg"]) == [
        "pos", "neg"]
    with pytest.raises(DistilError, match=r"lacks labels \['c'\]"):
        resolve_label_order(DataLabels(["a", "c"]), TeacherLabels(2, None), ["a", "b"])
    with pytest.raises(DistilError, match="names 3 labels"):
        resolve_label_order(DataLabels(["a", "b"]), TeacherLabels(2, None), ["a", "b", "c"])
    with pytest.raises(DistilError, match=r"duplicates: \['a'\]"):
        resolve_label_order(DataLabels(["a"]), None, ["a", "a"])
    with pytest.raises(DistilError, match="contradicts the teacher"):
        resolve_label_order(DataLabels(["pos", "neg"]), TeacherLabels(2, ["neg", "pos"]), ["pos", "neg"])


def test_label_order_teacher_with_other_labels_is_refused(bases, tmp_path, small_classification):
    """A teacher whose classes are not the data's labels would hand the student wrong soft targets."""
    other = random_teacher(bases, tmp_path / "other", "classification", ["good", "bad"])
    with pytest.raises(DistilError, match=r"labels \['neg', 'pos'\] that the teacher does not predict"):
        run_task("classification", bases["student_base"], small_classification, small_classification,
                 tmp_path / "o", teacher=other, **ONE_STEP)
    swapped = random_teacher(bases, tmp_path / "swapped", "classification", ["pos", "neg"])
    with pytest.raises(DistilError, match="contradicts the teacher"):
        run_task("classification", bases["student_base"], small_classification, small_classification,
                 tmp_path / "o", teacher=swapped, label_order=["neg", "pos"], **ONE_STEP)
    three = random_teacher(bases, tmp_path / "three", "classification", 3)
    with pytest.raises(DistilError, match="3 output classes but the training file .* has 2 labels"):
        run_task("classification", bases["student_base"], small_classification, small_classification,
                 tmp_path / "o", teacher=three, **ONE_STEP)
    ner_teacher = random_teacher(bases, tmp_path / "ner", "ner", ["O", "B-PER"])
    conll_file = tmp_path / "train.txt"
    conll_file.write_text(conll(ner_sentences()[:4]))
    with pytest.raises(DistilError, match=r"labels \['B-LOC', 'B-ORG'\] that the teacher does not predict"):
        run_task("ner", bases["student_base"], conll_file, conll_file, tmp_path / "o", teacher=ner_teacher, **ONE_STEP)
    assert not (tmp_path / "o").exists()


def teacher_student_kl(task: str, teacher, student, columns: dict[str, list]) -> float:
    """Mean KL(teacher || student) at temperature 1 over the rows the loss sees: each sentence
    (classification), each word's first sub-token (ner), or each window's start and end
    distributions over its real tokens (qa)."""
    batch = collate(columns, list(range(len(columns["input_ids"]))), make_tokenizer().pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        teacher_out = _logits(task, teacher(**_model_inputs(teacher, batch)))
        student_out = _logits(task, student(**_model_inputs(student, batch)))
    divergences = []
    for teacher_logits, student_logits in zip(teacher_out, student_out):
        if task == "qa":  # a distribution over positions: padding is no position
            padding = batch["attention_mask"] == 0
            teacher_logits, student_logits = teacher_logits.masked_fill(padding, -1e4), student_logits.masked_fill(
                padding, -1e4)
        log_t, log_s = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
        per_row = (log_t.exp() * (log_t - log_s)).sum(-1)
        divergences.append(per_row[batch["labels"] != -100].mean() if task == "ner" else per_row.mean())
    return float(sum(divergences) / len(divergences))


def pure_distillation_case(task: str, tmp_path: Path):
    """(train file, teacher labels, AutoModel class, extra run_task kwargs) of a tiny fixed case."""
    if task == "classification":
        train = tmp_path / "train.jsonl"
        train.write_text("".join(json.dumps(row) + "\n" for row in sentiment_rows()[:16]))
        return train, ["neg", "pos"], AutoModelForSequenceClassification, {}
    if task == "ner":
        train = tmp_path / "train.txt"
        train.write_text(conll(ner_sentences()[:16]))
        return train, ["B-LOC", "B-ORG", "B-PER", "O"], AutoModelForTokenClassification, {"ner_scheme": "IOB2"}
    train = tmp_path / "train.json"
    squad_file(train, squad_rows(0, 8))
    return train, None, AutoModelForQuestionAnswering, {"doc_stride": 8}


@pytest.mark.parametrize("task", ["classification", "ner", "qa"])
def test_pure_distillation_moves_the_student_toward_the_teacher(bases, tmp_path, task):
    """alpha_task=0: only the teacher's soft targets teach. Dropping, swapping or misaligning its logits
    leaves KL(teacher || student) where it was or raises it; used as intended, it falls below half."""
    train, labels, auto_class, extra = pure_distillation_case(task, tmp_path)
    teacher_dir = random_teacher(bases, tmp_path / "teacher", task, labels or 2)
    teacher = auto_class.from_pretrained(teacher_dir).eval()
    tokenizer = make_tokenizer()
    if task == "classification":
        data = prepare_classification(tokenizer, train, train, 48, TeacherLabels(2, labels))
    elif task == "ner":
        data = prepare_ner(tokenizer, train, train, 48, TeacherLabels(4, labels))
    else:
        data = prepare_qa(tokenizer, train, train, 48, doc_stride=8)
    torch.manual_seed(42)  # run_task seeds the same way just before it builds the student
    initial = load_student(task, bases["student_base"], data.label_names).eval()
    before = teacher_student_kl(task, teacher, initial, data.train)
    assert before > 0.1  # the teacher disagrees clearly with a fresh head, so the fall below is not noise
    run_task(task, bases["student_base"], train, train, tmp_path / "out", teacher=teacher_dir, alpha_ce=1.0,
             alpha_task=0.0, temperature=2.0, epochs=100, max_steps=40, lr=1e-2, batch_size=8, max_length=48,
             warmup_fraction=0.0, log_every=10, progress=False, **extra)
    after = teacher_student_kl(task, teacher, auto_class.from_pretrained(tmp_path / "out").eval(), data.train)
    assert after < 0.5 * before, f"KL(teacher || student) went from {before:.4f} to {after:.4f}"


def test_collate_pads_ids_labels_and_masks():
    import numpy as np

    columns = {"input_ids": [np.array([2, 7, 3]), np.array([2, 3])], "token_type_ids": [np.array([0, 0, 1]), [0, 0]],
               "labels": [np.array([-100, 4, -100]), np.array([-100, -100])], "start_positions": [1, 0]}
    batch = collate(columns, [1, 0], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[2, 3, 0], [2, 7, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100], [-100, 4, -100]]
    assert batch["start_positions"].tolist() == [0, 1]


def test_learning_rate_warms_up_then_decays_linearly():
    from distil.training.optimisation import linear_warmup_decay

    factor = linear_warmup_decay(warmup_steps=3, total_steps=10)
    assert [round(factor(step), 4) for step in range(11)] == [
        0.25, 0.5, 0.75, 1.0, round(6 / 7, 4), round(5 / 7, 4), round(4 / 7, 4), round(3 / 7, 4), round(2 / 7, 4),
        round(1 / 7, 4), 0.0]


def test_label_order_of_an_already_fine_tuned_student_head_must_match(bases, tmp_path, small_classification):
    """A student that already has a trained head keeps it: classes in another order would be read swapped."""
    train = evaluation = small_classification
    first = tmp_path / "first"
    run_task("classification", bases["student_base"], train, evaluation, first, **{**FAST, "epochs": 1})
    assert saved_labels(first)[0] == {0: "neg", 1: "pos"}
    with pytest.raises(DistilError, match=r"already has a trained classification head for the classes \['neg', 'pos'\]"):
        run_task("classification", str(first), train, evaluation, tmp_path / "swapped", label_order=["pos", "neg"],
                 **{**FAST, "epochs": 1})
    assert not (tmp_path / "swapped").exists()
    run_task("classification", str(first), train, evaluation, tmp_path / "same", **{**FAST, "epochs": 1})


@pytest.mark.parametrize("teacher,alpha_ce,alpha_task,match", [
    (False, 0.0, 0.0, "both 0"), (False, 0.5, 0.0, "no teacher"), (True, 0.0, 0.0, "both 0"),
])
def test_task_with_nothing_to_learn_is_refused_before_any_output(bases, tmp_path, small_classification, teacher,
                                                                 alpha_ce, alpha_task, match):
    data = small_classification
    teacher_path = random_teacher(bases, tmp_path / "t", "classification", labels=["neg", "pos"]) if teacher else None
    with pytest.raises(DistilError, match=match):
        run_task("classification", bases["student_base"], data, data, tmp_path / "out", teacher=teacher_path,
                 alpha_ce=alpha_ce, alpha_task=alpha_task, **FAST)
    assert not (tmp_path / "out").exists()
