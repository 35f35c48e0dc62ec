"""How well an embedding model does what users of embeddings ask of it: pure functions on embedding matrices.

Every function takes (N, H) matrices as numpy arrays or torch tensors (any float dtype; computed in float64) and
compares by cosine similarity. Two label-free measures compare a model with a reference model on the same texts
(hidden sizes may differ): do pairs of texts get the same similarity ranking, do texts get the same nearest
neighbours. Three need labels: STS pairs with gold scores, retrieval with graded relevance judgments, and
classification by k nearest neighbours.

Ties are handled the same way everywhere so that results are deterministic:
- Spearman correlations rank tied values by their average rank (the standard definition).
- Wherever items are ranked by similarity (nearest neighbours, retrieved documents, kNN voters), equal
  similarities are ordered by the lower index first. A model identical to the reference therefore makes the
  same choices at every tie and scores exactly 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from distil.tasks.classification import classification_scores

NEIGHBOURS_K = 10
NDCG_K = 10
MRR_K = 10
RECALL_KS = (1, 10, 100)
KNN_K = 10
QUERY_BLOCK = 256


def as_matrix(embeddings) -> np.ndarray:
    """float64 (N, H) numpy copy of a numpy array or torch tensor."""
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().float().cpu().numpy()
    matrix = np.asarray(embeddings, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"expected an (N, H) embedding matrix, got shape {matrix.shape}")
    return matrix


def cosine_matrix(a, b) -> np.ndarray:
    """(len(a), len(b)) cosine similarities; an all-zero row has similarity 0 to everything."""
    a, b = as_matrix(a), as_matrix(b)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def average_ranks(values) -> np.ndarray:
    """1-based ranks of `values`; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Start of each run of equal values in sorted order; each run gets the mean of its positions.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson of average ranks). NaN when either side is constant: a constant
    ranking agrees or disagrees with nothing."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denominator if denominator > 0 else math.nan


def similarity_agreement(model, reference) -> float:
    """Spearman between the model's and the reference's cosine similarities of every pair of texts (the upper
    triangle of both similarity matrices, N(N-1)/2 pairs): 1.0 = the same similarity ranking."""
    model, reference = as_matrix(model), as_matrix(reference)
    if len(model) != len(reference):
        raise ValueError(f"{len(model)} model embeddings but {len(reference)} reference embeddings")
    upper = np.triu_indices(len(model), k=1)
    return spearman(cosine_matrix(model, model)[upper], cosine_matrix(reference, reference)[upper])


def top_k(similarities: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) column indices of the k largest values per row, largest first; equal values lower index first."""
    order = np.argsort(-similarities, axis=1, kind="stable")  # stable: among equals, the lower index first
    return order[:, :k]


def nearest_neighbours(embeddings, k: int) -> np.ndarray:
    """(N, k) indices of each text's k most similar other texts (itself excluded)."""
    similarities = cosine_matrix(embeddings, embeddings)
    np.fill_diagonal(similarities, -np.inf)  # a text is never its own neighbour
    return top_k(similarities, k)


def neighbour_agreement(model, reference, k: int = NEIGHBOURS_K) -> float:
    """Mean over texts of |model's k nearest ∩ reference's k nearest| / k (self excluded; ties at the k-th
    place go to the lower index, on both sides alike)."""
    model, reference = as_matrix(model), as_matrix(reference)
    if len(model) != len(reference):
        raise ValueError(f"{len(model)} model embeddings but {len(reference)} reference embeddings")
    if not 1 <= k < len(model):
        raise ValueError(f"neighbour agreement@{k} needs more than k = {k} texts, got {len(model)}")
    mine, theirs = nearest_neighbours(model, k), nearest_neighbours(reference, k)
    shared = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(mine, theirs)]
    return float(np.mean(shared)) / k


def sts_spearman(first, second, gold_scores: Sequence[float]) -> float:
    """Spearman between the cosine of each pair (first[i], second[i]) and its gold similarity score."""
    first, second = as_matrix(first), as_matrix(second)
    if not len(first) == len(second) == len(gold_scores):
        raise ValueError(f"{len(first)} and {len(second)} embeddings for {len(gold_scores)} gold scores")
    first = first / np.maximum(np.linalg.norm(first, axis=1, keepdims=True), 1e-12)
    second = second / np.maximum(np.linalg.norm(second, axis=1, keepdims=True), 1e-12)
    return spearman((first * second).sum(axis=1), gold_scores)


def _dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain with linear gains: sum of gain_i / log2(i + 1), i = 1, 2, ... (trec_eval's
    ndcg_cut, as BEIR and MTEB report it)."""
    return float(sum(gain / math.log2(position + 2) for position, gain in enumerate(gains)))


def retrieval_scores(queries, corpus, relevance: Sequence[dict[int, float]], ndcg_k: int = NDCG_K,
                     mrr_k: int = MRR_K, recall_ks: Sequence[int] = RECALL_KS) -> dict:
    """nDCG@ndcg_k (graded), recall@k for each of recall_ks, and MRR@mrr_k of ranking `corpus` by cosine to
    each query, averaged over queries.

    relevance[q] maps corpus indices to relevance grades for query q; a grade above 0 is relevant, unjudged
    documents count as 0. Queries without any relevant document are left out (and counted). The ideal DCG
    ranks all judged documents of the query by grade.
    """
    queries, corpus = as_matrix(queries), as_matrix(corpus)
    if len(relevance) != len(queries):
        raise ValueError(f"{len(queries)} queries but relevance judgments for {len(relevance)}")
    depth = min(len(corpus), max(ndcg_k, mrr_k, *recall_ks))
    # Queries in blocks: a (queries x corpus) similarity matrix of a large corpus would not fit in memory.
    ranked = np.concatenate([top_k(cosine_matrix(queries[start:start + QUERY_BLOCK], corpus), depth)
                             for start in range(0, len(queries), QUERY_BLOCK)]) if len(queries) else np.zeros((0, depth), int)
    ndcg, mrr, recalls, used = [], [], {k: [] for k in recall_ks}, 0
    for q, judged in enumerate(relevance):
        relevant = {doc for doc, grade in judged.items() if grade > 0}
        if not relevant:
            continue
        used += 1
        gains = [max(float(judged.get(int(doc), 0.0)), 0.0) for doc in ranked[q]]
        ideal = _dcg(sorted((max(float(g), 0.0) for g in judged.values()), reverse=True)[:ndcg_k])
        ndcg.append(_dcg(gains[:ndcg_k]) / ideal)
        first_hit = next((rank for rank, doc in enumerate(ranked[q][:mrr_k], start=1) if int(doc) in relevant), None)
        mrr.append(1.0 / first_hit if first_hit else 0.0)
        for k in recall_ks:
            recalls[k].append(len(relevant & set(int(d) for d in ranked[q][:k])) / len(relevant))
    if used == 0:
        raise ValueError("no query has a relevant document (a grade above 0)")
    scores = {f"ndcg_at_{ndcg_k}": float(np.mean(ndcg)), f"mrr_at_{mrr_k}": float(np.mean(mrr))}
    scores.update({f"recall_at_{k}": float(np.mean(recalls[k])) for k in recall_ks})
    scores["queries"] = used
    scores["queries_without_relevant"] = len(relevance) - used
    return scores


def knn_predict(train, train_labels: Sequence, test, k: int = KNN_K) -> list:
    """Each test text's label by majority vote of its k most cosine-similar training texts.

    A tied vote goes to the tied label whose best voter is nearest (ranks first among the k), which is
    deterministic because the neighbours themselves are ordered with ties to the lower index.
    """
    train, test = as_matrix(train), as_matrix(test)
    if len(train) != len(train_labels):
        raise ValueError(f"{len(train)} training embeddings for {len(train_labels)} labels")
    if not 1 <= k <= len(train):
        raise ValueError(f"kNN with k = {k} needs at least k training texts, got {len(train)}")
    neighbours = top_k(cosine_matrix(test, train), k)
    predictions = []
    for row in neighbours:
        votes: dict = {}
        first_rank: dict = {}
        for rank, index in enumerate(row):
            label = train_labels[int(index)]
            votes[label] = votes.get(label, 0) + 1
            first_rank.setdefault(label, rank)
        predictions.append(min(votes, key=lambda label: (-votes[label], first_rank[label])))
    return predictions


def knn_classification(train, train_labels: Sequence, test, test_labels: Sequence, k: int = KNN_K) -> dict:
    """Accuracy and macro-F1 (distil.tasks.classification: per-label F1 over labels true or predicted, unweighted
    mean) of `knn_predict` on the test texts."""
    if len(test) != len(test_labels):
        raise ValueError(f"{len(test)} test embeddings for {len(test_labels)} labels")
    return {**classification_scores(knn_predict(train, train_labels, test, k), list(test_labels)), "k": k}
