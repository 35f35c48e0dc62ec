"""CoNLL reading, label alignment to sub-tokens, and entity-level scores against hand-computed values."""

from pathlib import Path

import pytest
from transformers import BertTokenizer

from distil.errors import DistilError
from distil.tasks.ner import (
    IGNORE_INDEX, NERSentence, align_labels, build_ner_features, entity_scores, get_entities, label_list, read_conll,
    word_tags,
)
from distil.tasks.task_data import TeacherLabels, prepare_ner

VOCAB = Path(__file__).parent / "data" / "tasks" / "vocab.txt"


@pytest.fixture(scope="module")
def tokenizer():
    words = VOCAB.read_text(encoding="utf-8").split()
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def test_read_conll_skips_docstart_uses_the_last_column_and_splits_on_blank_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "John NNP B-NP B-PER\nlives VBZ B-VP O\n\n\n"
        "Paris NNP B-NP B-LOC\n"          # last sentence without a closing blank line
    )
    sentences = read_conll(path)
    assert [(s.tokens, s.labels) for s in sentences] == [(["John", "lives"], ["B-PER", "O"]), (["Paris"], ["B-LOC"])]
    assert label_list(sentences) == ["B-LOC", "B-PER", "O"]


def test_read_conll_rejects_lines_without_a_label(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("John B-PER\nlives\n")
    with pytest.raises(DistilError, match="Line 2"):
        read_conll(path)


def test_align_labels_marks_only_first_sub_tokens():
    # [CLS] john lives in ber ##lin [SEP]
    assert align_labels([None, 0, 1, 2, 3, 3, None], [5, 6, 7, 8]) == [IGNORE_INDEX, 5, 6, 7, 8, IGNORE_INDEX, IGNORE_INDEX]


def test_build_ner_features_and_word_tags_round_trip(tokenizer):
    labels = ["B-LOC", "B-PER", "O"]
    to_id = {name: i for i, name in enumerate(labels)}
    sentence = NERSentence(["John", "lives", "in", "Berlin"], ["B-PER", "O", "O", "B-LOC"])
    features = build_ner_features([sentence], tokenizer, to_id, max_length=16)
    assert tokenizer.convert_ids_to_tokens(features.input_ids[0].tolist()) == [
        "[CLS]", "john", "lives", "in", "ber", "##lin", "[SEP]"]
    assert features.labels[0].tolist() == [IGNORE_INDEX, 1, 2, 2, 0, IGNORE_INDEX, IGNORE_INDEX]
    # Predictions on continuation sub-tokens do not matter; the first sub-token decides the word's tag.
    predicted = [2, 1, 2, 2, 0, 1, 2]
    assert word_tags(predicted, features.word_ids[0], 4, dict(enumerate(labels))) == ["B-PER", "O", "O", "B-LOC"]
    # A sentence cut by max_length: the words that did not fit are tagged O.
    cut = build_ner_features([sentence], tokenizer, to_id, max_length=4)
    assert word_tags([2, 1, 2, 2], cut.word_ids[0], 4, dict(enumerate(labels))) == ["B-PER", "O", "O", "O"]
    with pytest.raises(DistilError, match="not among"):
        build_ner_features([NERSentence(["x"], ["B-MISC"])], tokenizer, to_id)


def test_iob1_lenient_chunking_starts_entities_at_stray_i_tags():
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "I-ORG"]
    assert get_entities(tags, "IOB1") == [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 5, 6)]


def test_iob2_strict_chunking_ignores_stray_i_tags():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "B-ORG", "I-ORG"]
    assert get_entities(tags, "IOB2") == [("PER", 0, 1), ("LOC", 4, 4), ("ORG", 6, 7)]
    assert get_entities(tags, "IOB1") == [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 5, 5), ("ORG", 6, 7)]


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "O"]]
    # gold entities 4, predicted 3, correct 2 (PER 0-1 in sentence 0, ORG 0 in sentence 1).
    scores = entity_scores(gold, predicted)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(4 / 7)
    assert scores["accuracy"] == pytest.approx(5 / 7)
    assert (scores["num_gold_entities"], scores["num_predicted_entities"], scores["num_correct_entities"]) == (4, 3, 2)


def test_entity_scores_need_exact_span_and_type():
    # Span too short, and right span with wrong type: no credit for either.
    scores = entity_scores([["B-PER", "I-PER", "B-LOC"]], [["B-PER", "O", "B-ORG"]])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)
    # IOB1 and IOB2 tags for the same entities score the same in lenient mode.
    assert entity_scores([["I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]])["f1"] == 1.0


def test_label_order_ner_tags_need_the_teachers_names_or_label_order(tokenizer, tmp_path):
    """CoNLL tags are strings with no id order of their own: an unnamed teacher (LABEL_0...) could
    mean any order, so it is refused unless label_order says which; a named teacher maps by name."""
    path = tmp_path / "train.txt"
    path.write_text("John B-PER\nlives O\nin O\nBerlin B-LOC\n")
    word_labels = ["B-PER", "O", "O", "B-LOC"]
    with pytest.raises(DistilError) as refused:
        prepare_ner(tokenizer, path, path, 16, TeacherLabels(3, None))
    assert "[LABEL_0, LABEL_1, LABEL_2] vs data labels [B-LOC, B-PER, O]" in str(refused.value)
    for teacher, order in ((TeacherLabels(3, None), ["O", "B-PER", "B-LOC"]),
                           (TeacherLabels(4, ["O", "B-LOC", "B-MISC", "B-PER"]), None)):
        data = prepare_ner(tokenizer, path, path, 16, teacher, label_order=order)
        names = order or teacher.names
        assert data.label_names == names
        # [CLS] john lives in ber ##lin [SEP]: labels on first sub-tokens, in the resolved ids.
        ids = [names.index(label) for label in word_labels]
        assert data.train["labels"][0].tolist() == [IGNORE_INDEX, *ids, IGNORE_INDEX, IGNORE_INDEX]
