"""SQuAD reading, windowed features with start/end labels, and span post-processing on hand-set logits."""

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import BertTokenizer

from distil.errors import DistilError
from distil.tasks.qa import QAExample, answer_char_span, build_qa_features, postprocess_qa_predictions, read_squad

VOCAB = Path(__file__).parent / "data" / "tasks" / "vocab.txt"
CONTEXT = "John lives in Berlin. Mary works in Paris."


@pytest.fixture(scope="module")
def tokenizer():
    words = VOCAB.read_text(encoding="utf-8").split()
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def example(qid, question, answer=None, context=CONTEXT):
    if answer is None:
        return QAExample(qid, question, context, [], [], is_impossible=True)
    return QAExample(qid, question, context, [answer], [context.index(answer)])


def tokens(tokenizer, features, row):
    return tokenizer.convert_ids_to_tokens(features.input_ids[row].tolist())


def test_read_squad_v2_with_impossible_questions(tmp_path):
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "a", "question": "Who works in Paris?", "answers": [{"text": "Mary", "answer_start": 22}],
         "is_impossible": False},
        {"id": "b", "question": "Who lives in Rome?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "John", "answer_start": 0}]},
    ]}]}]}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    examples, version_2 = read_squad(path)
    assert version_2
    assert [(e.qid, e.answers, e.answer_starts, e.is_impossible) for e in examples] == [
        ("a", ["Mary"], [22], False), ("b", [], [], True)]


def test_read_squad_v1_and_bad_files(tmp_path):
    v1 = {"version": "1.1", "data": [{"paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "a", "question": "q",
         "answers": [{"text": "Mary", "answer_start": 22}, {"text": "Mary", "answer_start": 22}]},
    ]}]}]}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    examples, version_2 = read_squad(tmp_path / "v1.json")
    assert not version_2 and examples[0].answers == ["Mary", "Mary"]

    v1["data"][0]["paragraphs"][0]["qas"].append(v1["data"][0]["paragraphs"][0]["qas"][0])
    (tmp_path / "dup.json").write_text(json.dumps(v1))
    with pytest.raises(DistilError, match="appears twice"):
        read_squad(tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text("{\"rows\": []}")
    with pytest.raises(DistilError, match="data"):
        read_squad(tmp_path / "bad.json")


def test_answer_start_off_by_a_few_characters_uses_the_nearest_occurrence():
    ex = QAExample("q", "?", "Paris is big. I love Paris.", ["Paris"], [19])  # true start of the second: 21
    assert answer_char_span(ex) == (21, 26)
    assert answer_char_span(QAExample("q", "?", "abc", ["zzz"], [0])) is None


def test_features_window_the_context_with_doc_stride_and_label_spans(tokenizer):
    examples = [example("q1", "Where does Mary work?", "Paris"), example("q3", "Who lives in Berlin?", "Berlin")]
    # 14 tokens: 3 specials + 5 or 6 question tokens leave 6 or 5 context tokens; windows share 3 of them.
    features = build_qa_features(examples, tokenizer, max_length=14, doc_stride=3)
    assert features.example_index == [0, 0, 0, 1, 1, 1, 1]
    assert tokens(tokenizer, features, 0)[7:] == ["john", "lives", "in", "ber", "##lin", ".", "[SEP]"]
    assert tokens(tokenizer, features, 1)[7:] == ["ber", "##lin", ".", "mary", "works", "in", "[SEP]"]
    assert tokens(tokenizer, features, 2)[7:] == ["mary", "works", "in", "paris", ".", "[SEP]"]
    # "paris" is token 10 of the third window only; the other windows point at [CLS].
    assert list(zip(features.start_positions[:3], features.end_positions[:3])) == [(0, 0), (0, 0), (10, 10)]
    # "Berlin" is two tokens (ber ##lin): whole in the first two windows, cut in the third, absent in the fourth.
    assert tokens(tokenizer, features, 5)[8:] == ["##lin", ".", "mary", "works", "in", "[SEP]"]
    assert list(zip(features.start_positions[3:], features.end_positions[3:])) == [(11, 12), (9, 10), (0, 0), (0, 0)]
    # Offsets exist for context tokens only (-1 elsewhere); training features do not keep them.
    assert features.offsets[0][:7].tolist() == [[-1, -1]] * 7 and features.offsets[0][7].tolist() == [0, 4]
    assert build_qa_features(examples, tokenizer, max_length=14, doc_stride=3, for_training=True).offsets == []


def test_impossible_questions_point_at_cls_and_unlocatable_answers_are_left_out_of_training(tokenizer):
    bad = QAExample("bad", "Who?", CONTEXT, ["Oslo"], [3])
    features = build_qa_features([example("n", "Who lives in Rome?"), bad], tokenizer, max_length=64, doc_stride=16,
                                 for_training=True)
    assert features.example_index == [0]
    assert (features.start_positions, features.end_positions) == ([0], [0])
    assert build_qa_features([bad], tokenizer, max_length=64, doc_stride=16).example_index == [0]  # kept for evaluation


def test_doc_stride_too_large_for_the_window_is_explained(tokenizer):
    with pytest.raises(DistilError, match="doc_stride 6 must be smaller"):
        build_qa_features([example("q1", "Where does Mary work?", "Paris")], tokenizer, max_length=14, doc_stride=6)


def logits_for(features, settings, baseline=-10.0):
    """Per-row start/end logits at `baseline`, with {(row, token): (start, end)} set by hand (None leaves one)."""
    starts = [np.full(len(ids), baseline) for ids in features.input_ids]
    ends = [np.full(len(ids), baseline) for ids in features.input_ids]
    for (row, token), (start, end) in settings.items():
        if start is not None:
            starts[row][token] = start
        if end is not None:
            ends[row][token] = end
    return starts, ends


@pytest.mark.parametrize("max_answer_length, expected, score", [
    (3, "Paris.", 16.0),
    (30, "John lives in Berlin. Mary", 18.0),
])
def test_postprocess_skips_question_spans_reversed_spans_and_too_long_spans(tokenizer, max_answer_length, expected, score):
    ex = [example("q2", "Who works in Paris?", "Paris")]
    features = build_qa_features(ex, tokenizer, max_length=64, doc_stride=16)
    # [CLS] who works in paris ? [SEP] john(7) lives in ber ##lin . mary(13) works in paris(16) .(17) [SEP]
    assert tokens(tokenizer, features, 0)[4] == "paris" and tokens(tokenizer, features, 0)[16] == "paris"
    starts, ends = logits_for(features, {
        (0, 4): (9.0, 9.0),     # the question's "paris": the best raw pair, but not in the context
        (0, 7): (9.5, None),    # "john" start
        (0, 16): (8.0, None),   # context "paris" start
        (0, 13): (None, 8.5),   # "mary" end: with start 16 the span is reversed (16.5, skipped)
        (0, 17): (None, 8.0),   # "." end
    })
    # Candidates: (7,13) 18.0 over 7 tokens; (7,17) 17.5 over 11 tokens; (16,17) 16.0 over 2 tokens.
    predictions, nbest = postprocess_qa_predictions(ex, features, starts, ends, max_answer_length=max_answer_length)
    assert predictions == {"q2": expected}
    assert nbest["q2"][0]["score"] == pytest.approx(score)
    assert all(c["text"] != "" and "?" not in c["text"] for c in nbest["q2"])


def test_postprocess_takes_the_best_window_where_doc_stride_windows_overlap(tokenizer):
    ex = [example("q2", "Who works in Paris?", "Mary")]
    features = build_qa_features(ex, tokenizer, max_length=14, doc_stride=3)
    assert tokens(tokenizer, features, 1)[10] == "mary" and tokens(tokenizer, features, 2)[7] == "mary"
    starts, ends = logits_for(features, {(1, 10): (3.0, 3.0), (2, 7): (5.0, 4.0), (2, 10): (2.0, 2.0)})
    # Padding after the window (longer logit rows) is ignored even where its logits are large.
    starts = [np.concatenate([row, [100.0, 100.0]]) for row in starts]
    ends = [np.concatenate([row, [100.0, 100.0]]) for row in ends]
    predictions, nbest = postprocess_qa_predictions(ex, features, starts, ends, n_best_size=3)
    assert predictions == {"q2": "Mary"}
    # Window 2: (7,7) "Mary" 5+4=9, (7,10) 5+2=7, (10,10) "Paris" 4; window 1: (10,10) "Mary" 3+3=6.
    top = [(c["text"], c["score"]) for c in nbest["q2"]]
    assert top == [("Mary", 9.0), ("Mary works in Paris", 7.0), ("Mary", 6.0)]
    assert nbest["q2"][0]["start_char"] == CONTEXT.index("Mary")


def test_postprocess_v2_null_answer_against_threshold(tokenizer):
    ex = [example("q2", "Who works in Paris?", "Mary")]
    features = build_qa_features(ex, tokenizer, max_length=64, doc_stride=16)
    starts, ends = logits_for(features, {(0, 0): (5.0, 5.0), (0, 13): (4.0, 4.0)})
    # null score 10, best span "Mary" 8: null wins when 10 - 8 = 2 > threshold.
    run = lambda **kw: postprocess_qa_predictions(ex, features, starts, ends, **kw)[0]["q2"]
    assert run(version_2=True) == ""
    assert run(version_2=True, null_score_diff_threshold=1.9) == ""
    assert run(version_2=True, null_score_diff_threshold=2.1) == "Mary"
    assert run(version_2=False) == "Mary"


def test_tokenizing_in_chunks_gives_the_same_features(tokenizer, monkeypatch):
    from distil.tasks import qa

    examples = [example("q1", "Where does Mary work?", "Paris"), example("q3", "Who lives in Berlin?", "Berlin"),
                example("n", "Who lives in Rome?")]
    whole = build_qa_features(examples, tokenizer, max_length=14, doc_stride=3)
    monkeypatch.setattr(qa, "TOKENIZE_CHUNK", 1)
    chunked = build_qa_features(examples, tokenizer, max_length=14, doc_stride=3)
    assert chunked.example_index == whole.example_index
    assert [ids.tolist() for ids in chunked.input_ids] == [ids.tolist() for ids in whole.input_ids]
    assert (chunked.start_positions, chunked.end_positions) == (whole.start_positions, whole.end_positions)
