"""Embedding quality in `distil evaluate`: every embedding model's sentence embeddings, scored label-free against
the first model (the reference) on the held-out text, and on the labelled files the user gives.

Which models are embedding models: a sentence-transformers directory embeds with its own pooling (Pooling,
Dense, Normalize, as `distil.sentence_embeddings` reads them). A plain `transformers` directory (a student
straight from `distil init-student`) embeds the way the first model does when the first is a sentence-transformers
model, as the sentence losses of `distil train` and the embedding benchmark treat it. With neither, models are
embedded by mean pooling only when labelled embedding files or MTEB tasks are asked for; otherwise no model
is an embedding model and this part is skipped.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

import numpy as np

from distil.errors import DistilError
from distil.evaluation import embedding_metrics as metrics
from distil.evaluation.embedding_tasks import (ClassificationTask, RetrievalTask, StsPairs, load_classification,
                                               load_retrieval, load_sts)
from distil.sentence_embeddings import SentenceEncoder, SentencePooling, teacher_pooling

log = logging.getLogger(__name__)

PAIR_SAMPLE = 2000   # pairs whose cosines are kept in the results, for the report's scatter plot
PAIR_SAMPLE_SEED = 0


@dataclass
class EmbeddingTasks:
    """The labelled tasks of one evaluation, read (and checked) before any model is loaded."""

    sts: StsPairs | None = None
    retrieval: RetrievalTask | None = None
    classification: ClassificationTask | None = None
    mteb: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool(self.sts or self.retrieval or self.classification or self.mteb)


def load_tasks(sts: str | None = None, retrieval: str | None = None, classification: list[str] | None = None,
               mteb_tasks: list[str] | None = None, neighbours_k: int = metrics.NEIGHBOURS_K,
               knn_k: int = metrics.KNN_K) -> EmbeddingTasks:
    """Read the user's files and the MTEB tasks' data now: a malformed file or an unreachable hub must not
    cost the evaluation of every model first."""
    if neighbours_k < 1 or knn_k < 1:
        raise DistilError(f"--neighbours-k ({neighbours_k}) and --knn-k ({knn_k}) must be at least 1.")
    tasks = EmbeddingTasks(settings={"neighbours_k": neighbours_k, "knn_k": knn_k})
    if sts:
        tasks.sts = load_sts(sts)
        tasks.settings["sts"] = {"file": str(sts), "pairs": len(tasks.sts.scores)}
    if retrieval:
        tasks.retrieval = load_retrieval(retrieval)
        tasks.settings["retrieval"] = {"directory": str(retrieval), "queries": len(tasks.retrieval.queries),
                                       "corpus": len(tasks.retrieval.corpus)}
    if classification:
        tasks.classification = load_classification(classification)
        if knn_k > len(tasks.classification.train_texts):
            raise DistilError(f"--knn-k {knn_k} exceeds the {len(tasks.classification.train_texts)} training rows of "
                              f"{tasks.classification.source}. Use a smaller k or more training rows.")
        tasks.settings["classification"] = {"files": tasks.classification.source,
                                            "train": len(tasks.classification.train_texts),
                                            "test": len(tasks.classification.test_texts)}
    if mteb_tasks:
        try:
            from distil.evaluation import mteb_tasks as mteb_runner
        except ImportError:
            raise DistilError("--mteb needs the mteb package, which is not installed. Install it: "
                              "pip install 'distil[mteb]'") from None
        tasks.mteb = mteb_runner.hub_tasks(list(mteb_tasks))
        tasks.settings["mteb"] = list(mteb_tasks)
    return tasks


def embedding_poolings(paths: list[str], labelled: bool) -> tuple[list[SentencePooling | None], list[str]]:
    """Each model's pooling (None: not an embedding model here) and, per model, a note on where it came from."""
    own = [teacher_pooling(path) for path in paths]
    fallback = own[0] if own and own[0] is not None else (SentencePooling("mean") if labelled else None)
    poolings, notes = [], []
    for pooling in own:
        if pooling is not None:
            poolings.append(pooling)
            notes.append("")
        elif fallback is not None:
            poolings.append(SentencePooling(fallback.mode, fallback.normalize, fallback.max_seq_length,
                                            source="the first model's"))
            how = f"{fallback.mode} pooling{', normalised' if fallback.normalize else ''}"
            whose = "the first model's" if own[0] is not None else "no sentence-transformers model given, so plain"
            notes.append(f"embedded with {whose} {how} (it has no sentence-transformers config)")
        else:
            poolings.append(None)
            notes.append("")
    return poolings, notes


def sampled_pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random subset of the text pairs (i < j), the same for every model, for plotting."""
    upper = np.triu_indices(count, k=1)
    if len(upper[0]) <= PAIR_SAMPLE:
        return upper
    chosen = np.sort(np.random.default_rng(PAIR_SAMPLE_SEED).choice(len(upper[0]), PAIR_SAMPLE, replace=False))
    return upper[0][chosen], upper[1][chosen]


def evaluate_embeddings(named: list[tuple[str, str]], heldout_texts: list[str] | None, tasks: EmbeddingTasks,
                        max_length: int, batch_size: int, device: str) -> list[tuple[dict | None, str]]:
    """Per model: (its embedding scores or None, a note), measured against the first model."""
    poolings, notes = embedding_poolings([path for _, path in named], tasks.labelled)
    if poolings[0] is None:
        return [(None, "") for _ in named]
    if heldout_texts is not None and len(heldout_texts) < 3:
        raise DistilError(f"The held-out text gave {len(heldout_texts)} texts; embedding agreement needs at least 3.")
    neighbours_k = min(tasks.settings["neighbours_k"], len(heldout_texts) - 1) if heldout_texts else None
    pairs = sampled_pairs(len(heldout_texts)) if heldout_texts else None
    reference = None
    results = []
    for (name, path), pooling, note in zip(named, poolings, notes):
        if pooling is None:
            results.append((None, "embedding metrics skipped: no sentence-transformers config and the first model's "
                                  "pooling does not apply"))
            continue
        log.info("embedding %s", name)
        encoder = SentenceEncoder(path, pooling, max_length, device)
        scores: dict = {"pooling": {"mode": pooling.mode, "normalize": pooling.normalize}}
        if heldout_texts:
            embeddings = encoder.encode(heldout_texts, batch_size)
            reference = embeddings if reference is None else reference
            scores["similarity_spearman"] = metrics.similarity_agreement(embeddings, reference)
            scores["neighbour_agreement"] = metrics.neighbour_agreement(embeddings, reference, neighbours_k)
            scores["neighbours_k"] = neighbours_k
            scores["texts"] = len(heldout_texts)
            cosines = metrics.cosine_matrix(embeddings, embeddings)[pairs]
            scores["sampled_pair_cosines"] = [round(float(c), 5) for c in cosines]
        scores.update(_labelled_scores(encoder, tasks, batch_size))
        results.append((scores, note))
        del encoder
        gc.collect()
    return results


def _labelled_scores(encoder: SentenceEncoder, tasks: EmbeddingTasks, batch_size: int) -> dict:
    scores: dict = {}
    if tasks.sts:
        first, second = encoder.encode(tasks.sts.first, batch_size), encoder.encode(tasks.sts.second, batch_size)
        scores["sts_spearman"] = metrics.sts_spearman(first, second, tasks.sts.scores)
    if tasks.retrieval:
        task = tasks.retrieval
        scores["retrieval"] = metrics.retrieval_scores(encoder.encode(task.queries, batch_size),
                                                       encoder.encode(task.corpus, batch_size), task.relevance)
    if tasks.classification:
        task = tasks.classification
        scores["knn"] = metrics.knn_classification(encoder.encode(task.train_texts, batch_size), task.train_labels,
                                                   encoder.encode(task.test_texts, batch_size), task.test_labels,
                                                   tasks.settings["knn_k"])
    if tasks.mteb:
        from distil.evaluation import mteb_tasks as mteb_runner

        scores["mteb"] = mteb_runner.run_tasks(encoder, tasks.mteb, batch_size)
    return scores
