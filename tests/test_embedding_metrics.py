"""Embedding metrics (distil.evaluation.embedding_metrics) against hand-computed cases, ties included; identical
models score 1.0."""

import math

import numpy as np
import pytest
import torch

from distil.evaluation import embedding_metrics as em

S = 1 / math.sqrt(2)


def test_embedding_metrics_average_ranks_share_ties():
    assert em.average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert em.average_ranks([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]
    assert em.average_ranks([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]


def test_embedding_metrics_spearman_with_ties_by_hand():
    # ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]; centred: [-1.5, 0, 0, 1.5] . [-1.5, -.5, .5, 1.5] = 4.5,
    # norms² 4.5 and 5 -> 4.5 / sqrt(22.5) = sqrt(0.9)
    assert em.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)
    assert em.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(em.spearman([1, 1, 1], [1, 2, 3]))  # a constant ranking agrees with nothing


def test_embedding_metrics_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 200).astype(float)  # many ties
    b = a + rng.integers(0, 4, 200)
    assert em.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_embedding_metrics_similarity_agreement_by_hand():
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])   # pair cosines (01, 02, 12) = 0, .707, .707 (tie)
    model = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]])       # 0, .894, .447
    # ranks [1, 2.5, 2.5] vs [1, 3, 2]: centred [-1, .5, .5] . [-1, 1, 0] = 1.5; norms² 1.5, 2 -> sqrt(3)/2
    assert em.similarity_agreement(model, reference) == pytest.approx(math.sqrt(3) / 2, abs=1e-12)


def test_embedding_metrics_identical_models_score_one():
    torch.manual_seed(0)
    embeddings = torch.randn(30, 8)
    assert em.similarity_agreement(embeddings, embeddings) == pytest.approx(1.0)
    assert em.neighbour_agreement(embeddings, embeddings, k=5) == 1.0
    # lengths do not matter (cosine), nor does the hidden size: a rotation into more dimensions is the same model
    scaled = embeddings * torch.rand(30, 1).add(0.5)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12))
    wider = torch.cat([embeddings, torch.zeros(30, 4)], dim=1) @ rotation
    assert em.similarity_agreement(scaled, embeddings) == pytest.approx(1.0)
    assert em.similarity_agreement(wider, embeddings) == pytest.approx(1.0)
    assert em.neighbour_agreement(wider.double(), embeddings.numpy(), k=5) == 1.0


def test_embedding_metrics_neighbour_agreement_with_ties_by_hand():
    # reference a, b, c, d = (1,0), (1,1), (0,1), (-1,0): b's nearest is a tie (a and c both at .707), so is the
    # 2nd nearest of c (a and d both at 0); ties go to the lower index.
    reference = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    model = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [-1.0, 0.0]])
    assert em.nearest_neighbours(reference, 1)[:, 0].tolist() == [1, 0, 1, 2]
    assert em.nearest_neighbours(model, 1)[:, 0].tolist() == [1, 2, 1, 2]
    assert em.neighbour_agreement(model, reference, k=1) == pytest.approx(3 / 4)
    # k = 2: reference {b,c} {a,c} {b,a} {c,b}; model {b,c} {c,a} {b,a} {c,b}: all shared
    assert em.neighbour_agreement(model, reference, k=2) == 1.0
    with pytest.raises(ValueError, match="needs more than k"):
        em.neighbour_agreement(model, reference, k=4)


def test_embedding_metrics_sts_spearman_by_hand():
    first = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    second = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])   # cosines 1, .707, 0, -1
    assert em.sts_spearman(first, second, [5.0, 4.0, 2.0, 0.0]) == pytest.approx(1.0)
    # gold with a tie: ranks [4, 2.5, 2.5, 1] vs cosine ranks [4, 3, 2, 1] -> sqrt(0.9), as above
    assert em.sts_spearman(first, second, [3.0, 1.0, 1.0, 0.0]) == pytest.approx(math.sqrt(0.9), abs=1e-12)


def test_embedding_metrics_retrieval_by_hand():
    corpus = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # query 0 ranks d0, d1, d2, d3; query 1 ranks d2, d1, then d0 and d3 tie at 0 -> d0 first (lower index)
    relevance = [{1: 2, 2: 1}, {3: 1, 0: 0}, {0: 0}]  # query 2 has no relevant document: left out
    scores = em.retrieval_scores(queries, corpus, relevance, recall_ks=(1, 2, 10))
    ndcg0 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 + 1 / math.log2(3))   # relevant at ranks 2, 3
    ndcg1 = (1 / math.log2(5)) / 1.0                                          # relevant at rank 4
    assert scores["ndcg_at_10"] == pytest.approx((ndcg0 + ndcg1) / 2, abs=1e-12)
    assert scores["mrr_at_10"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert scores["recall_at_1"] == 0.0
    assert scores["recall_at_2"] == pytest.approx((1 / 2 + 0) / 2)
    assert scores["recall_at_10"] == 1.0
    assert (scores["queries"], scores["queries_without_relevant"]) == (2, 1)
    # MRR is cut at its depth: query 1's hit at rank 4 counts 0 in MRR@3
    assert em.retrieval_scores(queries, corpus, relevance, mrr_k=3)["mrr_at_3"] == pytest.approx(1 / 4)


def test_embedding_metrics_retrieval_perfect_model_scores_one():
    torch.manual_seed(1)
    corpus = torch.randn(50, 16)
    scores = em.retrieval_scores(corpus[:20], corpus, [{i: 1} for i in range(20)])
    assert scores["ndcg_at_10"] == scores["mrr_at_10"] == scores["recall_at_1"] == 1.0


def test_embedding_metrics_knn_vote_tie_and_scores_by_hand():
    train = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, -1.0], [0.0, 1.0]])
    labels = ["a", "b", "a", "b"]
    test = np.array([[1.0, 0.0]])  # cosines .707, 1, .707, 0: nearest t1 (b), then t0 / t2 tied -> t0 (a)
    assert em.knn_predict(train, labels, test, k=1) == ["b"]
    assert em.knn_predict(train, labels, test, k=2) == ["b"]   # 1-1 vote: b's voter is nearer
    assert em.knn_predict(train, labels, test, k=3) == ["a"]   # 2-1
    # two test texts, k = 3: predictions a and b for gold b and b -> accuracy 1/2;
    # F1: a = 0 (never right), b = 2*1 / (2*1 + 0 + 1) = 2/3 -> macro (0 + 2/3) / 2
    result = em.knn_classification(train, labels, np.array([[1.0, 0.0], [0.0, 1.0]]), ["b", "b"], k=3)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["macro_f1"] == pytest.approx(1 / 3)


def test_embedding_metrics_knn_identical_texts_score_one():
    torch.manual_seed(2)
    train = torch.randn(12, 6)
    labels = [str(i % 3) for i in range(12)]
    result = em.knn_classification(train, labels, train, labels, k=1)
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0
