"""Per-task data preparation for `run_task`: read files, fix the label order, tokenize, and score.

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


def resolve_label_order(data_labels: Sequence[str], teacher: TeacherLabels | None, order: Callable) -> list[str]:
    """Label names in id order: the teacher's when it names its labels (its logits fix the order),
    else the training data's labels ordered by `order`."""
    ours = order(set(data_labels))
    if teacher is None:
        return ours
    if teacher.names is None:
        if teacher.num_labels != len(ours):
            raise DistilError(
                f"The teacher has {teacher.num_labels} output classes but the training data has {len(ours)} labels "
                f"({ours}). Student and teacher must predict the same label set."
            )
        log.warning("The teacher's labels are unnamed (LABEL_0...); assuming they follow the sorted order %s", ours)
        return ours
    unknown = sorted(set(ours) - set(teacher.names))
    if unknown:
        raise DistilError(
            f"The training data has labels {unknown} that the teacher does not predict (teacher labels: "
            f"{teacher.names}). Student and teacher must share the label set; use the teacher's training data."
        )
    return list(teacher.names)


def prepare_classification(
    tokenizer, train_file, eval_file, max_length: int, teacher: TeacherLabels | None = None,
    text_columns: Sequence[str] | None = None, label_column: str = "label", dataset: str | None = None,
    dataset_config: str | None = None, train_split: str = "train", eval_split: str = "validation",
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
    names = resolve_label_order(train_data.labels, teacher, classification.sorted_labels)
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
) -> TaskData:
    if train_file is None or eval_file is None:
        raise DistilError("NER needs a train file and an eval file in CoNLL format.")
    if scheme not in ner.SCHEMES:
        raise DistilError(f"Unknown NER tagging scheme {scheme!r}. Use one of {', '.join(ner.SCHEMES)}.")
    train_sentences, eval_sentences = ner.read_conll(train_file), ner.read_conll(eval_file)
    names = resolve_label_order(ner.label_list(train_sentences), teacher, sorted)
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

