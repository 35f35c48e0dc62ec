"""Sequence classification: labelled data from CSV / JSONL / a `datasets` dataset, features and scores.

Each row has one text (single-sentence tasks such as SST-2) or two (pair tasks such as MNLI) and
a label. Labels are kept as strings. A `datasets` ClassLabel column also brings its names in id
order (`ClassificationData.id_order`), which task_data keeps; plain files carry no order, so their
ids come from a teacher, an explicit order, or (with neither) the sorted label set (numbers sort as
numbers). The mapping is saved in the model config (id2label/label2id).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distil.errors import DistilError

# Column names tried, in order, when the caller does not name the text columns.
PAIR_COLUMNS = [("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"), ("text_a", "text_b")]
SINGLE_COLUMNS = ["text", "sentence"]
TOKENIZE_CHUNK = 1000  # rows per tokenizer call


@dataclass
class ClassificationData:
    texts: list[str]
    text_pairs: list[str] | None
    labels: list[str]
    # Label names in id order when the source fixes them (a ClassLabel column); None for plain files.
    id_order: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class ClassificationFeatures:
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _choose_text_columns(columns: Sequence[str], text_columns: Sequence[str] | None, source: str) -> list[str]:
    if text_columns:
        text_columns = list(text_columns)
        if not 1 <= len(text_columns) <= 2:
            raise DistilError(f"Give one text column (single sentence) or two (a pair), not {len(text_columns)}.")
        missing = [c for c in text_columns if c not in columns]
        if missing:
            raise DistilError(
                f"{source} has no column(s) {missing}; its columns are {list(columns)}. Fix the text column names.")
        return text_columns
    for pair in PAIR_COLUMNS:
        if all(c in columns for c in pair):
            return list(pair)
    for single in SINGLE_COLUMNS:
        if single in columns:
            return [single]
    raise DistilError(
        f"Could not tell which columns of {source} hold the text (columns: {list(columns)}). Name them with "
        "text_columns (one column, or two for sentence pairs)."
    )


def _rows_to_data(rows: Iterable[Mapping], columns: Sequence[str], text_columns, label_column: str, source: str,
                  label_names: Sequence[str] | None = None) -> ClassificationData:
    chosen = _choose_text_columns(columns, text_columns, source)
    if label_column not in columns:
        raise DistilError(
            f"{source} has no label column {label_column!r}; its columns are {list(columns)}. Name the label column.")
    data = ClassificationData([], [] if len(chosen) == 2 else None, [],
                              None if label_names is None else [str(name) for name in label_names])
    for number, row in enumerate(rows, start=1):
        label = row.get(label_column)
        if label is None or label == "" or (label_names is not None and int(label) < 0):
            raise DistilError(
                f"Row {number} of {source} has no label. Every row needs a label (unlabelled test splits, such as "
                "GLUE's, cannot be used for training or evaluation)."
            )
        data.texts.append("" if row.get(chosen[0]) is None else str(row[chosen[0]]))
        if data.text_pairs is not None:
            data.text_pairs.append("" if row.get(chosen[1]) is None else str(row[chosen[1]]))
        data.labels.append(label_names[int(label)] if label_names is not None else str(label))
    if not data.texts:
        raise DistilError(f"{source} holds no rows.")
    return data


def read_classification(
    path: str | Path, text_columns: Sequence[str] | None = None, label_column: str = "label"
) -> ClassificationData:
    """Read a .csv / .tsv (header row) or .jsonl / .json (one object per line, or a list) file."""
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"The classification data file {path} does not exist. Give a .csv, .tsv or .jsonl file.")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            columns = reader.fieldnames or []
    elif suffix in (".jsonl", ".json"):
        rows = _read_json_rows(path)
        columns = sorted({key for row in rows for key in row})
    else:
        raise DistilError(f"Unknown classification data format {path.suffix!r} ({path}). Use .csv, .tsv or .jsonl.")
    return _rows_to_data(rows, columns, text_columns, label_column, str(path))


def _read_json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DistilError(f"{path} is not valid JSON lines ({exc}). Write one JSON object per line.") from None
    if not all(isinstance(row, dict) for row in rows):
        raise DistilError(f"{path} must hold JSON objects (one per line), each with text and label fields.")
    return rows


def load_classification_dataset(
    name_or_dir: str, split: str, config_name: str | None = None, text_columns: Sequence[str] | None = None,
    label_column: str = "label",
) -> ClassificationData:
    """Load one split of a `datasets` dataset (hub name, or a directory written by save_to_disk).

    Integer labels of a ClassLabel column are turned into its label names, and the names in id
    order are kept as `id_order` (MNLI: entailment, neutral, contradiction = 0, 1, 2).
    """
    try:
        import datasets
    except ImportError:
        raise DistilError(
            f"Loading the dataset {name_or_dir!r} needs the `datasets` package, which is not installed. "
            "Install it (pip install datasets) or export the data to .csv / .jsonl files."
        ) from None
    source = f"dataset {name_or_dir}" + (f" ({config_name})" if config_name else "") + f" split {split}"
    try:
        if Path(name_or_dir).is_dir():
            loaded = datasets.load_from_disk(name_or_dir)
            dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(name_or_dir, config_name, split=split)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as exc:
        raise DistilError(f"Could not load {source}: {exc}. Check the name, configuration and split.") from None
    label_feature = dataset.features.get(label_column)
    label_names = list(label_feature.names) if hasattr(label_feature, "names") else None
    return _rows_to_data(dataset, list(dataset.column_names), text_columns, label_column, source, label_names)


def sorted_labels(labels: Iterable[str]) -> list[str]:
    """Distinct labels, numerically when all are integers ("2" before "10"), else as text. The id
    order only when nothing else fixes it (no teacher, no ClassLabel names, no explicit order)."""
    distinct = set(labels)
    if all(is_integer_label(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def is_integer_label(label: str) -> bool:
    """True for a label written as a plain integer ("0", "12", "-1"): such a label can be a class id."""
    try:
        return str(int(label)) == label
    except ValueError:
        return False


def build_classification_features(
    data: ClassificationData, tokenizer, label_to_id: Mapping[str, int], max_length: int = 128
) -> ClassificationFeatures:
    """Tokenize texts (pairs truncated longest-first) and map labels to ids."""
    unknown = sorted(set(data.labels) - set(label_to_id))
    if unknown:
        raise DistilError(
            f"Labels {unknown} are not among the model's labels {list(label_to_id)}. "
            "The evaluation data must use the training data's (or the teacher's) label set."
        )
    features = ClassificationFeatures([], [], [label_to_id[label] for label in data.labels])
    # Chunks bound the Python lists the tokenizer returns (MNLI has 393k pairs); rows are kept as arrays.
    for begin in range(0, len(data), TOKENIZE_CHUNK):
        end = begin + TOKENIZE_CHUNK
        pairs = data.text_pairs[begin:end] if data.text_pairs is not None else None
        encoded = tokenizer(data.texts[begin:end], pairs, truncation=True, max_length=max_length,
                            return_token_type_ids=True)
        features.input_ids.extend(np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"])
        features.token_type_ids.extend(np.asarray(ids, dtype=np.int8) for ids in encoded["token_type_ids"])
    return features


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    if len(predicted) != len(gold) or not gold:
        raise ValueError(f"need equally many predictions and gold labels, got {len(predicted)} and {len(gold)}")
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold)


def macro_f1(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in gold or predictions."""
    if len(predicted) != len(gold) or not gold:
        raise ValueError(f"need equally many predictions and gold labels, got {len(predicted)} and {len(gold)}")
    scores = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def classification_scores(predicted: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
    return {"accuracy": accuracy(predicted, gold), "macro_f1": macro_f1(predicted, gold)}
