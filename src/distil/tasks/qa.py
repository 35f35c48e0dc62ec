"""Extractive question answering on SQuAD-format data: reading, windowed features, span post-processing.

A question and its context are tokenized together (question first, context second). A context
longer than the window is cut into overlapping windows ("features"): consecutive windows share
`doc_stride` context tokens, so an answer near a cut is whole in at least one of them. Each
feature is labelled with the token positions of the answer's first and last tokens, or with the
[CLS] position when the answer is not inside that window or the question has no answer (v2.0).

Post-processing turns per-token start/end logits back into answer text per question: the best
scoring span (start logit + end logit) over all windows of the question, limited to spans inside
the context no longer than `max_answer_length` tokens; for v2.0 the empty answer wins when the
null score ([CLS] start + [CLS] end) beats the best span by more than a threshold.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distil.errors import DistilError

log = logging.getLogger(__name__)

TOKENIZE_CHUNK = 1000  # questions per tokenizer call


@dataclass
class QAExample:
    """One question about one context. `answers`/`answer_starts` are parallel; empty when unanswerable."""

    qid: str
    question: str
    context: str
    answers: list[str] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)
    is_impossible: bool = False


@dataclass
class QAFeatures:
    """Tokenized windows, one row per window. `offsets[i]` is an (L, 2) array of each token's (start, end)
    characters in the context, (-1, -1) for tokens outside it (question, specials); it is kept for
    evaluation features only."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    example_index: list[int]
    offsets: list[np.ndarray]
    cls_index: list[int]
    start_positions: list[int]
    end_positions: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def read_squad(path: str | Path) -> tuple[list[QAExample], bool]:
    """Read a SQuAD v1.1 or v2.0 JSON file. Returns (examples, version_2).

    The file is v2.0 when its "version" says so or any question is marked is_impossible.
    """
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"The QA data file {path} does not exist. Give a SQuAD-format JSON file (train-v1.1.json style).")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DistilError(f"The QA data file {path} is not valid JSON ({exc}). Give a SQuAD-format JSON file.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise DistilError(
            f"The QA data file {path} has no top-level \"data\" list. SQuAD format is "
            '{"version": ..., "data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]}.'
        )
    examples: list[QAExample] = []
    seen: set[str] = set()
    for article in raw["data"]:
        for paragraph in article.get("paragraphs", []):
            if "context" not in paragraph or "qas" not in paragraph:
                raise DistilError(f"A paragraph in {path} lacks \"context\" or \"qas\". Each paragraph needs both.")
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                if "id" not in qa or "question" not in qa:
                    raise DistilError(
                        f"A question in {path} lacks \"id\" or \"question\". Each entry of \"qas\" needs both.")
                qid = str(qa["id"])
                if qid in seen:
                    raise DistilError(f"The question id {qid} appears twice in {path}. Question ids must be unique.")
                seen.add(qid)
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else qa.get("answers", [])
                examples.append(QAExample(
                    qid=qid,
                    question=qa["question"],
                    context=context,
                    answers=[a["text"] for a in answers],
                    answer_starts=[int(a["answer_start"]) for a in answers],
                    is_impossible=impossible or not answers,
                ))
    if not examples:
        raise DistilError(f"The QA data file {path} holds no questions.")
    version_2 = str(raw.get("version", "")).lstrip("v").startswith("2") or any(e.is_impossible for e in examples)
    return examples, version_2


def answer_char_span(example: QAExample) -> tuple[int, int] | None:
    """(start, end) characters of the first gold answer in the context, or None when unanswerable.

    When `answer_start` does not point at the answer text (off-by-a-few offsets occur in
    hand-made data), the occurrence of the text nearest to it is used; None if the text is absent.
    """
    if example.is_impossible or not example.answers:
        return None
    text, start = example.answers[0], example.answer_starts[0]
    if example.context[start:start + len(text)] == text:
        return start, start + len(text)
    occurrences = [i for i in range(len(example.context)) if example.context.startswith(text, i)]
    if not occurrences or not text:
        return None
    nearest = min(occurrences, key=lambda i: abs(i - start))
    return nearest, nearest + len(text)


def _truncated_questions(examples: Sequence[QAExample], tokenizer, max_query_length: int) -> list[str]:
    """Questions without leading spaces and cut to at most `max_query_length` tokens (at a token end)."""
    questions = [e.question.lstrip() for e in examples]
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    cut = []
    for question, offsets in zip(questions, encoded["offset_mapping"]):
        cut.append(question[: offsets[max_query_length - 1][1]] if len(offsets) > max_query_length else question)
    return cut


def build_qa_features(
    examples: Sequence[QAExample],
    tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    for_training: bool = False,
) -> QAFeatures:
    """Tokenize examples into overlapping windows with start/end labels (CLS index when not inside).

    With `for_training`, answerable questions whose answer text cannot be found in the context
    are left out (no correct target exists for them; they are counted in a warning), and
    offsets, which only post-processing needs, are not kept.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DistilError("QA features need a fast tokenizer (for character offsets). Save a tokenizer.json with the model.")
    if max_query_length < 1:
        raise DistilError(f"max_query_length must be at least 1, got {max_query_length}.")
    kept, unlocated = [], 0
    for index, example in enumerate(examples):
        if for_training and not example.is_impossible and answer_char_span(example) is None:
            unlocated += 1
            continue
        kept.append(index)
    if unlocated:
        log.warning("%d training questions left out: their answer text is not in the context", unlocated)
    features = QAFeatures([], [], [], [], [], [], [])
    # Tokenizing in chunks bounds the Python lists the tokenizer returns (SQuAD train is 88k questions).
    for begin in range(0, len(kept), TOKENIZE_CHUNK):
        chunk = kept[begin:begin + TOKENIZE_CHUNK]
        _add_windows(features, examples, chunk, tokenizer, max_length, doc_stride, max_query_length, for_training)
    return features


def _add_windows(features: QAFeatures, examples: Sequence[QAExample], chunk: list[int], tokenizer, max_length: int,
                 doc_stride: int, max_query_length: int, for_training: bool) -> None:
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    questions = _truncated_questions([examples[i] for i in chunk], tokenizer, max_query_length)
    longest_question = max(len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"])
    context_room = max_length - longest_question - specials
    if context_room < 1:
        raise DistilError(
            f"max_length {max_length} leaves no room for the context after the longest question ({longest_question} "
            f"tokens) and {specials} special tokens. Raise max_length or lower max_query_length."
        )
    if not 0 <= doc_stride < context_room:
        raise DistilError(
            f"doc_stride {doc_stride} must be smaller than the context tokens per window ({context_room} = max_length "
            f"{max_length} - longest question {longest_question} - {specials} special tokens). Lower doc_stride "
            "(e.g. to a third of max_length) or raise max_length."
        )
    encoded = tokenizer(
        questions,
        [examples[i].context for i in chunk],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=True,
    )
    for row, input_ids in enumerate(encoded["input_ids"]):
        example_index = chunk[encoded["overflow_to_sample_mapping"][row]]
        ids = np.asarray(input_ids, dtype=np.int32)
        offsets = np.asarray(encoded["offset_mapping"][row], dtype=np.int32).reshape(-1, 2)
        offsets[np.array([sequence != 1 for sequence in encoded.sequence_ids(row)], dtype=bool)] = -1
        cls_positions = np.flatnonzero(ids == tokenizer.cls_token_id) if tokenizer.cls_token_id is not None else []
        cls_index = int(cls_positions[0]) if len(cls_positions) else 0
        start, end = _token_span(offsets, answer_char_span(examples[example_index]), cls_index)
        features.input_ids.append(ids)
        features.token_type_ids.append(np.asarray(encoded["token_type_ids"][row], dtype=np.int8))
        features.example_index.append(example_index)
        if not for_training:
            features.offsets.append(offsets)
        features.cls_index.append(cls_index)
        features.start_positions.append(start)
        features.end_positions.append(end)


def _token_span(offsets: np.ndarray, span: tuple[int, int] | None, cls_index: int) -> tuple[int, int]:
    """Token positions of the first and last answer tokens, or (cls, cls) when not wholly in this window."""
    context = np.flatnonzero(offsets[:, 0] >= 0)
    if span is None or context.size == 0:
        return cls_index, cls_index
    start_char, end_char = span
    if offsets[context[0], 0] > start_char or offsets[context[-1], 1] < end_char:
        return cls_index, cls_index
    start_token = context[offsets[context, 0] <= start_char].max()
    end_token = context[offsets[context, 1] >= end_char].min()
    return int(start_token), int(end_token)


def postprocess_qa_predictions(
    examples: Sequence[QAExample],
    features: QAFeatures,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    version_2: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Answer text per question id from per-feature logits, and the n-best candidates behind it.

    Candidates pair one of the `n_best_size` highest start logits with one of the highest end
    logits of the same window; a pair counts only if both tokens are context tokens, end >= start
    and the span has at most `max_answer_length` tokens. Logits may be longer than a window's
    tokens (padding); positions past the window are ignored. For v2.0 the answer is "" when
    (null score - best span score) > `null_score_diff_threshold`, the null score being the lowest
    [CLS] start + end over the question's windows.
    """
    if len(features.offsets) != len(features):
        raise ValueError("these features were built for training (no offsets); build them with for_training=False")
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"{len(features)} features but {len(start_logits)} start / {len(end_logits)} end logit rows")
    by_example: dict[int, list[int]] = defaultdict(list)
    for row, example_index in enumerate(features.example_index):
        by_example[example_index].append(row)

    predictions: dict[str, str] = {}
    nbest: dict[str, list[dict]] = {}
    for example_index, example in enumerate(examples):
        candidates: list[dict] = []
        null_score = None
        for row in by_example.get(example_index, []):
            offsets = features.offsets[row]
            starts = np.asarray(start_logits[row], dtype=np.float64)[: len(offsets)]
            ends = np.asarray(end_logits[row], dtype=np.float64)[: len(offsets)]
            cls = features.cls_index[row]
            row_null = float(starts[cls] + ends[cls])
            null_score = row_null if null_score is None else min(null_score, row_null)
            # Stable sort so that ties resolve to the earlier token, the same on every run.
            top_starts = np.argsort(-starts, kind="stable")[:n_best_size]
            top_ends = np.argsort(-ends, kind="stable")[:n_best_size]
            for s in top_starts:
                for e in top_ends:
                    if offsets[s, 0] < 0 or offsets[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                        continue
                    start_char, end_char = int(offsets[s, 0]), int(offsets[e, 1])
                    candidates.append({
                        "text": example.context[start_char:end_char],
                        "score": float(starts[s] + ends[e]),
                        "start_logit": float(starts[s]),
                        "end_logit": float(ends[e]),
                        "start_char": int(start_char),
                    })
        candidates.sort(key=lambda c: c["score"], reverse=True)
        candidates = candidates[:n_best_size]
        best = candidates[0] if candidates else None
        if best is None:
            answer = ""
        elif version_2 and null_score is not None and null_score - best["score"] > null_score_diff_threshold:
            answer = ""
        else:
            answer = best["text"]
        predictions[example.qid] = answer
        if version_2 and null_score is not None:
            candidates = sorted(candidates + [{"text": "", "score": null_score}], key=lambda c: c["score"], reverse=True)
        nbest[example.qid] = candidates
    return predictions, nbest


def gold_answers(examples: Sequence[QAExample]) -> dict[str, list[str]]:
    """Question id -> gold answer texts, the input `squad_metric.squad_scores` expects."""
    return {e.qid: list(e.answers) for e in examples}
