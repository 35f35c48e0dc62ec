"""SQuAD exact match / F1 against hand-worked examples."""

import math

import pytest

from distil.tasks.squad_metric import exact_match, f1, normalize_answer, squad_scores


def test_normalize_answer_removes_case_punctuation_articles_and_extra_space():
    assert normalize_answer("The  Quick, brown FOX!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    # Articles are whole words only: "theater" and "another" keep their letters.
    assert normalize_answer("the theater, another") == "theater another"
    # Punctuation is removed before articles, so "the-end" becomes "theend" (one word, kept).
    assert normalize_answer("the-end") == "theend"


def test_exact_match_after_normalisation():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "eiffel tower") == 0.0


def test_f1_token_overlap_by_hand():
    # pred tokens {cat, sat, on, mat}, gold {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7.
    assert f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # Repeated tokens count once per occurrence in both: overlap 1, P = 1/2, R = 1, F1 = 2/3.
    assert f1("paris paris", "Paris") == pytest.approx(2 / 3)
    assert f1("london", "paris") == 0.0


def test_f1_empty_answers_follow_the_v2_rule():
    assert f1("", "") == 1.0
    assert f1("the", "") == 1.0  # normalises to nothing
    assert f1("paris", "") == 0.0
    assert f1("", "paris") == 0.0


def test_v1_corpus_scores_take_the_best_gold_answer():
    gold = {"q1": ["Denver Broncos", "Broncos"], "q2": ["Broncos", "Denver Broncos team"]}
    predictions = {"q1": "the Broncos", "q2": "Denver Broncos"}
    # q1: exact on "Broncos". q2: EM 0; F1 vs "broncos" = 2/3, vs "denver broncos team" = 2*(1*2/3)/(5/3) = 0.8.
    scores = squad_scores(gold, predictions)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(90.0)
    assert scores["total"] == 2
    assert "HasAns_f1" not in scores


def test_missing_prediction_scores_zero():
    scores = squad_scores({"q1": ["x"], "q2": ["y"]}, {"q1": "x"})
    assert scores["exact_match"] == pytest.approx(50.0) and scores["f1"] == pytest.approx(50.0)


def test_v2_corpus_scores_with_has_answer_and_no_answer_breakdown():
    gold = {"a1": ["Paris"], "a2": ["Paris"], "n1": [], "n2": []}
    predictions = {"a1": "paris", "a2": "in Paris", "n1": "", "n2": "London"}
    # a1: EM 1 F1 1; a2: EM 0, F1 2/3; n1: 1, 1 (empty vs empty); n2: 0, 0.
    scores = squad_scores(gold, predictions, version_2=True)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert scores["HasAns_exact_match"] == pytest.approx(50.0)
    assert scores["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert scores["HasAns_total"] == 2
    assert scores["NoAns_exact_match"] == pytest.approx(50.0)
    assert scores["NoAns_f1"] == pytest.approx(50.0)
    assert scores["NoAns_total"] == 2
    assert not any(math.isnan(v) for v in scores.values())


def test_v2_gold_answers_that_normalise_to_nothing_count_as_no_answer():
    # A gold list whose only text is an article is treated like an empty gold list.
    scores = squad_scores({"q": ["The"]}, {"q": ""}, version_2=True)
    assert scores["exact_match"] == 100.0 and scores["NoAns_total"] == 1 and scores["HasAns_total"] == 0
