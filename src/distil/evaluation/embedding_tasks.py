"""Labelled embedding tasks a user brings as files: STS pairs, a retrieval collection, a classification set.

Formats (every text file UTF-8):
- STS pairs: .tsv / .csv with a header row, or .jsonl (one object per line); fields sentence1, sentence2 and
  score (any number; only its order matters, as Spearman is computed).
- Retrieval: a directory in the BEIR layout: corpus.jsonl ({"_id", "text", optional "title"}), queries.jsonl
  ({"_id", "text"}) and qrels/test.tsv (or qrels.tsv): a header row, then query-id, corpus-id, score
  (a whole-number relevance grade; 0 = judged not relevant).
- Classification: .tsv / .csv / .jsonl with text and label fields; either two files (train, test) or one
  file with a split field whose values are train and test.
A malformed file raises a DistilError naming the file, the line and what was expected.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from distil.errors import DistilError

TABLE_SUFFIXES = {".tsv": "\t", ".csv": ","}
JSON_SUFFIXES = {".jsonl", ".json"}


@dataclass
class StsPairs:
    source: str
    first: list[str]
    second: list[str]
    scores: list[float]


@dataclass
class RetrievalTask:
    source: str
    query_ids: list[str]
    queries: list[str]
    corpus_ids: list[str]
    corpus: list[str]
    relevance: list[dict[int, float]]  # per query: corpus index -> grade


@dataclass
class ClassificationTask:
    source: str
    train_texts: list[str]
    train_labels: list[str]
    test_texts: list[str]
    test_labels: list[str]


def read_rows(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, row) for every record of a .tsv / .csv (header row) or .jsonl file."""
    if not path.is_file():
        raise DistilError(f"The {what} file {path} does not exist. Give a .tsv, .csv or .jsonl file.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DistilError(f"{path} is not UTF-8 text ({exc}). Save the {what} file as UTF-8.") from None
    rows: list[tuple[int, dict]] = []
    if suffix in TABLE_SUFFIXES:
        reader = csv.DictReader(text.splitlines(), delimiter=TABLE_SUFFIXES[suffix])
        for row in reader:
            if None in row:  # more cells than header columns
                raise DistilError(f"Line {reader.line_num} of {path} has more fields than its header "
                                  f"({', '.join(reader.fieldnames or [])}). Fix that line (a stray "
                                  f"{'tab' if suffix == '.tsv' else 'comma'} in a text needs quoting).")
            rows.append((reader.line_num, row))
    elif suffix in JSON_SUFFIXES:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DistilError(f"Line {number} of {path} is not valid JSON ({exc.msg}). Write one JSON object "
                                  f"per line.") from None
            if not isinstance(row, dict):
                raise DistilError(f"Line {number} of {path} is not a JSON object. Write one object per line.")
            rows.append((number, row))
    else:
        raise DistilError(f"Unknown {what} format {path.suffix!r} ({path}). Use .tsv, .csv or .jsonl.")
    if not rows:
        raise DistilError(f"The {what} file {path} holds no rows.")
    return rows


def _text(row: dict, field: str, path: Path, number: int, expected: str) -> str:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DistilError(f"Line {number} of {path} has no {field!r}. Each row needs {expected}.")
    return str(value)


def _number(row: dict, field: str, path: Path, number: int, expected: str) -> float:
    raw = _text(row, field, path, number, expected)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DistilError(f"Line {number} of {path}: {field} {raw!r} is not a finite number. Each row needs {expected}.")
    return value


def load_sts(path: str | Path) -> StsPairs:
    """STS pairs with gold similarity scores."""
    path = Path(path)
    expected = "sentence1, sentence2 and a numeric score"
    pairs = StsPairs(str(path), [], [], [])
    for number, row in read_rows(path, "STS pairs"):
        pairs.first.append(_text(row, "sentence1", path, number, expected))
        pairs.second.append(_text(row, "sentence2", path, number, expected))
        pairs.scores.append(_number(row, "score", path, number, expected))
    if len(pairs.scores) < 2:
        raise DistilError(f"{path} holds one pair; a rank correlation needs at least two. Give more pairs.")
    return pairs


def _id_texts(path: Path, what: str) -> tuple[list[str], list[str]]:
    expected = '"_id" and "text"' + (' (and optionally "title")' if what == "corpus" else "")
    if path.suffix.lower() != ".jsonl":
        raise DistilError(f"The retrieval {what} must be a .jsonl file, got {path}.")
    ids, texts, seen = [], [], set()
    for number, row in read_rows(path, f"retrieval {what}"):
        identifier = _text(row, "_id", path, number, expected)
        if identifier in seen:
            raise DistilError(f"Line {number} of {path} repeats the _id {identifier!r}. Every _id must be unique.")
        seen.add(identifier)
        text = _text(row, "text", path, number, expected)
        title = str(row.get("title") or "").strip()
        ids.append(identifier)
        texts.append(f"{title} {text}" if title else text)  # BEIR's convention: title, then text
    return ids, texts


def load_retrieval(directory: str | Path) -> RetrievalTask:
    """A BEIR-layout directory: corpus.jsonl, queries.jsonl, qrels/test.tsv (or qrels.tsv)."""
    root = Path(directory)
    if not root.is_dir():
        raise DistilError(f"The retrieval directory {root} does not exist. Give a directory with corpus.jsonl, "
                          "queries.jsonl and qrels/test.tsv (the BEIR layout).")
    corpus_ids, corpus = _id_texts(root / "corpus.jsonl", "corpus")
    query_ids, queries = _id_texts(root / "queries.jsonl", "queries")
    qrels = next((p for p in (root / "qrels" / "test.tsv", root / "qrels.tsv") if p.is_file()), None)
    if qrels is None:
        raise DistilError(f"{root} has no qrels/test.tsv (nor qrels.tsv). Add the relevance judgments: a header row, "
                          "then query-id, corpus-id, score per line, tab-separated.")
    corpus_index = {identifier: i for i, identifier in enumerate(corpus_ids)}
    query_index = {identifier: i for i, identifier in enumerate(query_ids)}
    relevance: list[dict[int, float]] = [{} for _ in query_ids]
    expected = "query-id, corpus-id and a whole-number score (tab-separated, after a header row)"
    lines = qrels.read_text(encoding="utf-8-sig").splitlines()
    for number, line in enumerate(lines[1:], start=2):  # line 1 is the header
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != 3:
            raise DistilError(f"Line {number} of {qrels} has {len(cells)} tab-separated fields; it needs {expected}.")
        query, document, grade = (c.strip() for c in cells)
        if query not in query_index:
            raise DistilError(f"Line {number} of {qrels} names query {query!r}, which {root / 'queries.jsonl'} lacks. "
                              "Every judged query must be in queries.jsonl.")
        if document not in corpus_index:
            raise DistilError(f"Line {number} of {qrels} names document {document!r}, which {root / 'corpus.jsonl'} "
                              "lacks. Every judged document must be in corpus.jsonl.")
        try:
            value = int(grade)
        except ValueError:
            raise DistilError(f"Line {number} of {qrels}: score {grade!r} is not a whole number. It needs {expected}.") from None
        relevance[query_index[query]][corpus_index[document]] = float(value)
    judged = [i for i, grades in enumerate(relevance) if any(g > 0 for g in grades.values())]
    if not judged:
        raise DistilError(f"{qrels} gives no query a relevant document (a score above 0). Add relevance judgments.")
    # Queries nobody judged say nothing about retrieval; they are not embedded at all.
    return RetrievalTask(str(root), [query_ids[i] for i in judged], [queries[i] for i in judged], corpus_ids, corpus,
                         [relevance[i] for i in judged])


def _labelled(path: Path, with_split: bool) -> list[tuple[str, str, str | None]]:
    expected = "text and label" + (" and split (train or test)" if with_split else "")
    rows = []
    for number, row in read_rows(path, "classification"):
        text = _text(row, "text", path, number, expected)
        label = _text(row, "label", path, number, expected)
        split = None
        if with_split:
            split = _text(row, "split", path, number, expected).strip().lower()
            if split not in ("train", "test"):
                raise DistilError(f"Line {number} of {path}: split {split!r} is neither train nor test. Each row needs "
                                  f"{expected}.")
        rows.append((text, label, split))
    return rows


def load_classification(files: list[str]) -> ClassificationTask:
    """Two files (train, test), or one file whose rows carry split = train / test."""
    if len(files) not in (1, 2):
        raise DistilError(f"Give one classification file with a split field, or two (train, test); got {len(files)}.")
    paths = [Path(f) for f in files]
    if len(paths) == 2:
        train, test = _labelled(paths[0], False), _labelled(paths[1], False)
    else:
        rows = _labelled(paths[0], True)
        train, test = [r for r in rows if r[2] == "train"], [r for r in rows if r[2] == "test"]
    source = " -> ".join(str(p) for p in paths)
    if not train or not test:
        raise DistilError(f"The classification data {source} needs both training and test rows "
                          f"(got {len(train)} and {len(test)}).")
    return ClassificationTask(source, [t for t, _, _ in train], [label for _, label, _ in train],
                              [t for t, _, _ in test], [label for _, label, _ in test])
