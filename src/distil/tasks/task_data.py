"""Per-task data preparation for `run_task`: read files, fix the label order, tokenize, and score.

The label order matters most with a teacher: its logit i must mean the label the student calls i,
or its soft targets contradict the hard labels (see `resolve_label_order`).

Each `prepare_*` function returns a `TaskData`: tokenized training and evaluation columns (plain
lists, padded per batch later), the label names in id order, and a `score` function that turns
the model's evaluation outputs into the task's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from distil.errors import DistilError
from distil.tasks import classification, ner, qa
from distil.tasks.squad_metric import squad_scores

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """Tokenized columns per split; `score(outputs)` -> (metrics, extra JSON files to write)."""

    train: dict[str, list]
    eval: dict[str, list]
    label_names: list[str] | None
    score: Callable[[dict[str, list[np.ndarray]]], tuple[dict, dict]]
    details: dict = field(default_factory=dict)


@dataclass
class TeacherLabels:
    """What the teacher's config says about its output classes: names in id order, or None when unnamed."""

    num_labels: int
    names: list[str] | None

    @classmethod
    def from_config(cls, config) -> "TeacherLabels":
        names = [str(config.id2label[i]) for i in range(config.num_labels)]
        generic = all(name == f"LABEL_{i}" for i, name in enumerate(names))
        return cls(config.num_labels, None if generic else names)


@dataclass
class DataLabels:
    """The training data's labels and what the data itself fixes about their ids."""

    seen: list[str]  # distinct labels the training data uses
    id_order: list[str] | None = None  # names in id order when the source fixes them (a ClassLabel column)
    source: str = "the training data"  # for messages


def resolve_label_order(data: DataLabels, teacher: TeacherLabels | None,
                        label_order: Sequence[str] | None = None) -> list[str]:
    """Label names in id order (logit i of teacher and student is label i).

    In this order of precedence: an explicit `label_order` (the data's names in the teacher's id
    order); the teacher's own names (its logits follow them, the data is mapped by name); the
    order the data fixes (ClassLabel names); integer labels, which are the ids themselves when the
    teacher is unnamed; the sorted labels when there is no teacher. An unnamed teacher with
    labels whose order nothing fixes is refused: a guess could silently swap its classes.
    """
    seen = sorted(set(data.seen))
    if label_order is not None:
        names = label_order.split(",") if isinstance(label_order, str) else list(label_order)
        return _explicit_order(names, seen, teacher, data.source)
    if teacher is None:
        return list(data.id_order) if data.id_order is not None else classification.sorted_labels(seen)
    if teacher.names is not None:
        unknown = [label for label in seen if label not in teacher.names]
        if unknown:
            raise DistilError(
                f"{_capital(data.source)} has labels {unknown} that the teacher does not predict (teacher labels in "
                f"id order: {teacher.names}). Student and teacher must share the label set: use the teacher's "
                "training data, or, if the teacher's classes are the same labels under other names, give the data's "
                "label names in the teacher's id order with label_order (--label-order)."
            )
        if data.id_order is not None and data.id_order != teacher.names:
            log.info("label ids follow the teacher's names %s, not the data's order %s (labels mapped by name)",
                     teacher.names, data.id_order)
        return list(teacher.names)
    unnamed = [f"LABEL_{i}" for i in range(teacher.num_labels)]
    if data.id_order is not None:
        if len(data.id_order) != teacher.num_labels:
            raise DistilError(
                f"The teacher has {teacher.num_labels} output classes but {data.source} names "
                f"{len(data.id_order)} labels ({data.id_order}). Student and teacher must predict the same label set."
            )
        return list(data.id_order)
    if all(classification.is_integer_label(label) for label in seen):
        outside = [label for label in seen if not 0 <= int(label) < teacher.num_labels]
        if outside:
            raise DistilError(
                f"{_capital(data.source)} has integer labels, read as the teacher's class ids, but {outside} are not "
                f"among the teacher's {teacher.num_labels} classes (0 to {teacher.num_labels - 1}). Use the "
                "teacher's training data, or a teacher fine-tuned on these labels."
            )
        return [str(i) for i in range(teacher.num_labels)]
    if len(seen) != teacher.num_labels:
        raise DistilError(
            f"The teacher has {teacher.num_labels} output classes but {data.source} has {len(seen)} labels "
            f"({seen}). Student and teacher must predict the same label set."
        )
    raise DistilError(
        f"The teacher's output classes are unnamed and the labels of {data.source} are names whose id order nothing "
        f"fixes, so which teacher class means which label cannot be known: teacher classes in id order "
        f"[{', '.join(unnamed)}] vs data labels [{', '.join(seen)}] (sorted here, which need not be the teacher's "
        "order; a wrong guess makes the teacher's soft targets contradict the labels). Give the data's label names "
        f"in the teacher's id order with label_order (CLI: --label-order {','.join(seen)} would say LABEL_0 is "
        f"{seen[0]}; the teacher's model card or training data tells), or use data that fixes the ids (a `datasets` "
        "ClassLabel column, or integer labels that are the class ids)."
    )


def _explicit_order(order: list[str], seen: list[str], teacher: TeacherLabels | None, source: str) -> list[str]:
    """Check a user-given label order against the data and the teacher, and return it."""
    order = [str(name).strip() for name in order]
    duplicates = sorted({name for name in order if order.count(name) > 1})
    if not order or "" in order or duplicates:
        raise DistilError(
            f"label_order {order} must list each label name once (duplicates: {duplicates}), in the teacher's id "
            "order, e.g. --label-order entailment,neutral,contradiction."
        )
    missing = [label for label in seen if label not in order]
    if missing:
        raise DistilError(
            f"label_order {order} lacks labels {missing} that {source} uses. List every label, in the teacher's id "
            "order."
        )
    if teacher is not None and len(order) != teacher.num_labels:
        raise DistilError(
            f"label_order names {len(order)} labels ({order}) but the teacher has {teacher.num_labels} output "
            "classes. Give one name per teacher class, in its id order."
        )
    if teacher is not None and teacher.names is not None and set(seen) <= set(teacher.names) \
            and order != teacher.names:
        raise DistilError(
            f"label_order {order} contradicts the teacher, which names its classes in id order {teacher.names}. "
            "Leave label_order out (the data is then mapped by the teacher's names) or correct it."
        )
    return order


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def prepare_classification(
    tokenizer, train_file, eval_file, max_length: int, teacher: TeacherLabels | None = None,
    text_columns: Sequence[str] | None = None, label_column: str = "label", dataset: str | None = None,
    dataset_config: str | None = None, train_split: str = "train", eval_split: str = "validation",
    label_order: Sequence[str] | None = None,
) -> TaskData:
    def read(path, split):
        if path is not None:
            return classification.read_classification(path, text_columns, label_column)
        if dataset is None:
            raise DistilError("Give train and eval files (.csv / .jsonl) or a `datasets` dataset name for classification.")
        return classification.load_classification_dataset(dataset, split, dataset_config, text_columns, label_column)

    train_data, eval_data = read(train_file, train_split), read(eval_file, eval_split)
    if (train_data.text_pairs is None) != (eval_data.text_pairs is None):
        raise DistilError("The train data has one text column and the eval data two (or the reverse). Use the same columns.")
    source = f"the training file {train_file}" if train_file is not None else f"the dataset {dataset}"
    names = resolve_label_order(DataLabels(train_data.labels, train_data.id_order, source), teacher, label_order)
    label_to_id = {name: i for i, name in enumerate(names)}
    train = classification.build_classification_features(train_data, tokenizer, label_to_id, max_length)
    evaluation = classification.build_classification_features(eval_data, tokenizer, label_to_id, max_length)

    def score(outputs):
        predicted = [int(np.argmax(row)) for row in outputs["logits"]]
        return classification.classification_scores(predicted, evaluation.labels), {}

    return TaskData(
        train=_columns(train, "labels"), eval=_columns(evaluation, "labels"), label_names=names, score=score,
        details={"num_train_examples": len(train_data), "num_eval_examples": len(eval_data),
                 "text_pair": train_data.text_pairs is not None},
    )


def prepare_ner(
    tokenizer, train_file, eval_file, max_length: int, teacher: TeacherLabels | None = None, scheme: str = "IOB1",
    label_order: Sequence[str] | None = None,
) -> TaskData:
    if train_file is None or eval_file is None:
        raise DistilError("NER needs a train file and an eval file in CoNLL format.")
    if scheme not in ner.SCHEMES:
        raise DistilError(f"Unknown NER tagging scheme {scheme!r}. Use one of {', '.join(ner.SCHEMES)}.")
    train_sentences, eval_sentences = ner.read_conll(train_file), ner.read_conll(eval_file)
    # CoNLL tags are plain strings: nothing in the file fixes their ids.
    names = resolve_label_order(DataLabels(ner.label_list(train_sentences), None, f"the training file {train_file}"),
                                teacher, label_order)
    label_to_id = {name: i for i, name in enumerate(names)}
    id_to_label = dict(enumerate(names))
    train = ner.build_ner_features(train_sentences, tokenizer, label_to_id, max_length)
    evaluation = ner.build_ner_features(eval_sentences, tokenizer, label_to_id, max_length)

    def score(outputs):
        predicted = [
            ner.word_tags(np.argmax(logits, axis=-1), word_ids, len(sentence.tokens), id_to_label)
            for logits, word_ids, sentence in zip(outputs["logits"], evaluation.word_ids, eval_sentences)
        ]
        metrics = ner.entity_scores([s.labels for s in eval_sentences], predicted, scheme)
        return metrics, {}

    return TaskData(
        train=_columns(train, "labels"), eval=_columns(evaluation, "labels"), label_names=names, score=score,
        details={"num_train_sentences": len(train_sentences), "num_eval_sentences": len(eval_sentences),
                 "scheme": scheme},
    )


def prepare_qa(
    tokenizer, train_file, eval_file, max_length: int, doc_stride: int = 128, max_query_length: int = 64,
    max_answer_length: int = 30, n_best_size: int = 20, null_score_diff_threshold: float = 0.0,
    version_2: bool | None = None,
) -> TaskData:
    if train_file is None or eval_file is None:
        raise DistilError("QA needs a train file and an eval file in SQuAD JSON format.")
    train_examples, train_v2 = qa.read_squad(train_file)
    eval_examples, eval_v2 = qa.read_squad(eval_file)
    if version_2 is None:
        version_2 = train_v2 or eval_v2
    elif not version_2 and (train_v2 or eval_v2):
        raise DistilError(
            "The QA data has unanswerable (SQuAD v2.0) questions but version_2 was turned off. Turn it on "
            "(the model then learns to predict no answer) or remove those questions."
        )
    train = qa.build_qa_features(train_examples, tokenizer, max_length, doc_stride, max_query_length, for_training=True)
    if len(train) == 0:
        raise DistilError(f"No training question in {train_file} has an answer found in its context.")
    evaluation = qa.build_qa_features(eval_examples, tokenizer, max_length, doc_stride, max_query_length)
    gold = qa.gold_answers(eval_examples)

    def score(outputs):
        predictions, nbest = qa.postprocess_qa_predictions(
            eval_examples, evaluation, outputs["start_logits"], outputs["end_logits"], version_2=version_2,
            n_best_size=n_best_size, max_answer_length=max_answer_length,
            null_score_diff_threshold=null_score_diff_threshold,
        )
        return squad_scores(gold, predictions, version_2=version_2), {"predictions.json": predictions}

    def columns(features: qa.QAFeatures) -> dict[str, list]:
        return {"input_ids": features.input_ids, "token_type_ids": features.token_type_ids,
                "start_positions": features.start_positions, "end_positions": features.end_positions}

    return TaskData(
        train=columns(train), eval=columns(evaluation), label_names=None, score=score,
        details={"version_2": version_2, "num_train_examples": len(train_examples), "num_train_features": len(train),
                 "num_eval_examples": len(eval_examples), "num_eval_features": len(evaluation)},
    )


def _columns(features, label_key: str) -> dict[str, list]:
    return {"input_ids": features.input_ids, "token_type_ids": features.token_type_ids, label_key: features.labels}

