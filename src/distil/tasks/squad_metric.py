"""SQuAD v1.1 / v2.0 evaluation: exact match and token-overlap F1, as the official scripts define them.

Answers are compared after normalisation (lowercase, punctuation removed, the articles a/an/the
removed, whitespace collapsed). A prediction is scored against every gold answer and keeps the
best. For v2.0 an unanswerable question has the single gold answer "" and only an empty
prediction scores on it; the corpus scores are then also split into HasAns and NoAns parts.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall on normalised answers (a bag of tokens).

    When either side normalises to nothing, the score is 1.0 only if both do (the v2.0 rule; for
    v1.1 gold answers are never empty, so it agrees with the v1.1 script there).
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers_for_scoring(answers: Sequence[str]) -> list[str]:
    """The gold answers a prediction is scored against: the non-empty ones, or [""] for no answer."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def best_over_golds(metric, prediction: str, answers: Sequence[str]) -> float:
    """The best `metric(prediction, gold)` over the gold answers."""
    return max(metric(prediction, gold) for gold in gold_answers_for_scoring(answers))


def squad_scores(
    gold: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    version_2: bool = False,
) -> dict[str, float]:
    """Corpus scores in percent: {"exact_match", "f1", "total"} and, for v2.0, HasAns_*/NoAns_* parts.

    `gold` maps question id -> gold answer texts (empty for an unanswerable v2.0 question);
    `predictions` maps question id -> predicted text. A question without a prediction scores 0,
    as in the v1.1 script; predictions for unknown ids are ignored.
    """
    missing = [qid for qid in gold if qid not in predictions]
    if missing:
        log.warning("%d of %d questions have no prediction; they score 0 (first: %s)", len(missing), len(gold), missing[0])
    em_by_id: dict[str, float] = {}
    f1_by_id: dict[str, float] = {}
    for qid, answers in gold.items():
        if qid not in predictions:
            em_by_id[qid] = f1_by_id[qid] = 0.0
            continue
        em_by_id[qid] = best_over_golds(exact_match, predictions[qid], answers)
        f1_by_id[qid] = best_over_golds(f1, predictions[qid], answers)

    scores = _percentages(list(gold), em_by_id, f1_by_id, prefix="")
    if version_2:
        has_answer = [qid for qid, answers in gold.items() if any(normalize_answer(a) for a in answers)]
        answered = set(has_answer)
        no_answer = [qid for qid in gold if qid not in answered]
        scores.update(_percentages(has_answer, em_by_id, f1_by_id, prefix="HasAns_"))
        scores.update(_percentages(no_answer, em_by_id, f1_by_id, prefix="NoAns_"))
    return scores


def _percentages(qids: list[str], em_by_id: dict[str, float], f1_by_id: dict[str, float], prefix: str) -> dict:
    total = len(qids)
    if total == 0:
        return {f"{prefix}total": 0}
    return {
        f"{prefix}exact_match": 100.0 * sum(em_by_id[q] for q in qids) / total,
        f"{prefix}f1": 100.0 * sum(f1_by_id[q] for q in qids) / total,
        f"{prefix}total": total,
    }
