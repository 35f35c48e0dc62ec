"""Named-entity recognition: CoNLL reading, word-to-sub-token label alignment, entity-level scores.

Training labels sit on the first sub-token of each word; the other sub-tokens and the special
tokens get -100 and are ignored by the loss. Predictions are read back the same way: a word's tag
is the prediction at its first sub-token.

Scores are entity-level (as seqeval computes them): a predicted entity counts only if its span
and type both match a gold entity exactly; precision, recall and F1 are micro-averaged over all
entities of the corpus.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distil.errors import DistilError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TOKENIZE_CHUNK = 1000  # sentences per tokenizer call
SCHEMES = ("IOB1", "IOB2")


@dataclass
class NERSentence:
    tokens: list[str]
    labels: list[str]


@dataclass
class NERFeatures:
    """One row per sentence; `word_ids[i][t]` is the word of token t (None for special tokens)."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: list[np.ndarray]
    word_ids: list[list[int | None]]

    def __len__(self) -> int:
        return len(self.input_ids)


def read_conll(path: str | Path) -> list[NERSentence]:
    """Read CoNLL-style data: one token per line, its label in the last column, sentences separated
    by blank lines; -DOCSTART- lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"The NER data file {path} does not exist. Give a CoNLL file (token ... label per line).")
    sentences: list[NERSentence] = []
    tokens: list[str] = []
    labels: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line_number, line in enumerate(fh, start=1):
            columns = line.split()
            if not columns or columns[0] == "-DOCSTART-":
                if tokens:
                    sentences.append(NERSentence(tokens, labels))
                    tokens, labels = [], []
                continue
            if len(columns) < 2:
                raise DistilError(
                    f"Line {line_number} of {path} has one column ({line.strip()!r}); CoNLL lines need a token and "
                    "its label in the last column, separated by whitespace. Blank lines separate sentences."
                )
            tokens.append(columns[0])
            labels.append(columns[-1])
    if tokens:
        sentences.append(NERSentence(tokens, labels))
    if not sentences:
        raise DistilError(f"The NER data file {path} holds no sentences.")
    return sentences


def label_list(sentences: Sequence[NERSentence]) -> list[str]:
    """The labels used in `sentences`, sorted. CoNLL fixes no id order: task_data.resolve_label_order
    takes the teacher's names or an explicit label_order, and this sorted list only without a teacher."""
    return sorted({label for s in sentences for label in s.labels})


def align_labels(word_ids: Sequence[int | None], word_label_ids: Sequence[int]) -> list[int]:
    """Per-token labels: the word's label on its first sub-token, IGNORE_INDEX elsewhere."""
    aligned, previous = [], None
    for word in word_ids:
        aligned.append(word_label_ids[word] if word is not None and word != previous else IGNORE_INDEX)
        previous = word
    return aligned


def build_ner_features(
    sentences: Sequence[NERSentence], tokenizer, label_to_id: Mapping[str, int], max_length: int = 128
) -> NERFeatures:
    """Tokenize pre-split words and align their labels. Words cut off by `max_length` get no label."""
    unknown = sorted({label for s in sentences for label in s.labels if label not in label_to_id})
    if unknown:
        raise DistilError(
            f"NER labels {unknown} are not among the model's labels {sorted(label_to_id)}. "
            "The evaluation data must use the training data's (or the teacher's) label set."
        )
    features = NERFeatures([], [], [], [])
    truncated = 0
    # Chunks bound the Python lists the tokenizer returns; rows are kept as compact arrays.
    for begin in range(0, len(sentences), TOKENIZE_CHUNK):
        chunk = sentences[begin:begin + TOKENIZE_CHUNK]
        encoded = tokenizer([s.tokens for s in chunk], is_split_into_words=True, truncation=True,
                            max_length=max_length, return_token_type_ids=True)
        for row, sentence in enumerate(chunk):
            word_ids = encoded.word_ids(row)
            label_ids = [label_to_id[label] for label in sentence.labels]
            last_word = max((w for w in word_ids if w is not None), default=-1)
            truncated += last_word < len(sentence.tokens) - 1
            features.input_ids.append(np.asarray(encoded["input_ids"][row], dtype=np.int32))
            features.token_type_ids.append(np.asarray(encoded["token_type_ids"][row], dtype=np.int8))
            features.labels.append(np.asarray(align_labels(word_ids, label_ids), dtype=np.int32))
            features.word_ids.append(list(word_ids))
    if truncated:
        log.warning("%d of %d sentences are longer than max_length %d tokens; their last words are predicted O",
                    truncated, len(sentences), max_length)
    return features


def word_tags(
    token_predictions: Sequence[int], word_ids: Sequence[int | None], num_words: int, id_to_label: Mapping[int, str],
    fill: str = "O",
) -> list[str]:
    """Per-word tags from per-token predicted ids (first sub-token of each word); `fill` for unseen words."""
    tags = [fill] * num_words
    previous = None
    for token, word in enumerate(word_ids):
        if word is not None and word != previous:
            tags[word] = id_to_label[int(token_predictions[token])]
        previous = word
    return tags


def _split_tag(tag: str) -> tuple[str, str]:
    """("B"|"I"|"E"|"S"|"O", type). A tag without a prefix is read as inside an entity of that type."""
    if tag in ("O", ""):
        return "O", ""
    if len(tag) > 2 and tag[0] in "BIES" and tag[1] in "-_":
        return tag[0], tag[2:]
    return "I", tag


def get_entities(tags: Sequence[str], scheme: str = "IOB1") -> list[tuple[str, int, int]]:
    """Entities as (type, first, last) word indices.

    IOB1 (lenient, seqeval's default mode; also right for IOB2 data): an entity starts at B-, or at
    I- after O or after a different type, and runs while I- of the same type follows. E-/S- tags
    (IOBES) end an entity. IOB2 (strict): an entity starts only at B- and runs over the I- of its
    type that follow; a stray I- belongs to no entity.
    """
    if scheme not in SCHEMES:
        raise DistilError(f"Unknown tagging scheme {scheme!r}. Use one of {', '.join(SCHEMES)}.")
    entities: list[tuple[str, int, int]] = []
    current: tuple[str, int] | None = None  # (type, first index) of the open entity
    for index, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = _split_tag(tag)
        if current is not None:
            continues = prefix == "I" and kind == current[0] if scheme == "IOB2" else (
                prefix in "IE" and kind == current[0])
            if not continues:
                entities.append((current[0], current[1], index - 1))
                current = None
        if prefix == "O":
            continue
        if current is None and (prefix == "B" or scheme == "IOB1"):
            current = (kind, index)
        if scheme == "IOB1" and prefix in "ES" and current is not None:
            entities.append((current[0], current[1], index))
            current = None
    return entities


def entity_scores(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], scheme: str = "IOB1"
) -> dict[str, float]:
    """Micro-averaged entity precision/recall/F1 (fractions in [0, 1]), token accuracy and counts."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    gold_entities, predicted_entities = set(), set()
    correct_tokens = total_tokens = 0
    for sentence, (gold_tags, predicted_tags) in enumerate(zip(gold, predicted)):
        if len(gold_tags) != len(predicted_tags):
            raise ValueError(f"sentence {sentence}: {len(gold_tags)} gold tags but {len(predicted_tags)} predicted")
        gold_entities.update((sentence, *e) for e in get_entities(gold_tags, scheme))
        predicted_entities.update((sentence, *e) for e in get_entities(predicted_tags, scheme))
        correct_tokens += sum(g == p for g, p in zip(gold_tags, predicted_tags))
        total_tokens += len(gold_tags)
    correct = len(gold_entities & predicted_entities)
    precision = correct / len(predicted_entities) if predicted_entities else 0.0
    recall = correct / len(gold_entities) if gold_entities else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": correct_tokens / total_tokens if total_tokens else 0.0,
        "num_gold_entities": len(gold_entities),
        "num_predicted_entities": len(predicted_entities),
        "num_correct_entities": correct,
    }
