"""MTEB tasks (the `mteb` library, 2.x) on distil's embeddings: hub tasks by name, or a local STS task built from
a user's pairs file. Both run through `run_tasks`, so a local task exercises the very code a hub task uses.

Importing this module needs `mteb` (pip install 'distil[mteb]'); `distil.evaluation.evaluate` imports it only
when --mteb is given. Each task reports its own main score (e.g. cosine Spearman for STS, nDCG@10 for
retrieval), averaged over its evaluation splits and subsets.
"""

from __future__ import annotations

import logging

import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder

from distil.errors import DistilError
from distil.evaluation.embedding_tasks import StsPairs
from distil.sentence_embeddings import SentenceEncoder

log = logging.getLogger(__name__)


class DistilEncoder(AbsEncoder):
    """An MTEB encoder whose embeddings are distil's `SentenceEncoder.encode` (the same numbers every other
    embedding metric in `distil evaluate` sees). No prompts: the models distil makes have none."""

    mteb_model_meta = None  # mteb then names the model as unknown and compares by cosine

    def __init__(self, encoder: SentenceEncoder, batch_size: int = 32):
        self.encoder = encoder
        self.batch_size = batch_size

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        return self.encoder.encode(texts, self.batch_size).numpy()


class LocalSTSTask(AbsTaskSTS):
    """An MTEB STS task over pairs read from the user's file (distil.evaluation.embedding_tasks.load_sts). mteb
    reads a task's metadata from its class, so `local_sts_task` makes one class per pairs file."""

    pairs: StsPairs

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        self.dataset = DatasetDict({"test": Dataset.from_dict(
            {"sentence1": self.pairs.first, "sentence2": self.pairs.second, "score": self.pairs.scores})})
        self.data_loaded = True


def local_sts_task(pairs: StsPairs, name: str = "LocalSTS") -> LocalSTSTask:
    metadata = TaskMetadata(
        name=name, type="STS", main_score="cosine_spearman", category="t2t", modalities=["text"],
        description=f"STS pairs from {pairs.source}", reference=None,
        dataset={"path": pairs.source, "revision": "local"}, eval_splits=["test"], eval_langs=["eng-Latn"],
        date=None, domains=None, task_subtypes=None, license=None, annotations_creators=None, dialect=None,
        sample_creation=None, bibtex_citation=None,
    )
    task_class = type(name, (LocalSTSTask,), {"metadata": metadata, "pairs": pairs,
                                              "min_score": min(pairs.scores), "max_score": max(pairs.scores)})
    return task_class()


def hub_tasks(names: list[str]) -> list:
    """The MTEB tasks called `names`, their data loaded now (from the hub, or its local cache), so that an
    unreachable hub or a wrong name stops the evaluation before any model is run."""
    import mteb

    tasks = []
    for name in names:
        try:
            task = mteb.get_task(name)
        except (KeyError, ValueError) as exc:
            raise DistilError(f"mteb knows no task {name!r} ({exc}). Give MTEB task names such as STSBenchmark or "
                              "SciFact (python -c \"import mteb; print(mteb.get_tasks())\" lists them).") from None
        try:
            task.load_data()
        except Exception as exc:  # noqa: BLE001 - offline, gated, or missing: every cause means the same to the user
            raise DistilError(
                f"Could not load the data of the MTEB task {name} from the Hugging Face hub ({type(exc).__name__}: "
                f"{str(exc)[:200]}). MTEB tasks download their data: run where the hub is reachable (or its "
                "datasets are in the local cache), or leave --mteb out and use --sts / --retrieval / "
                "--classification with your own files."
            ) from None
        tasks.append(task)
    return tasks


def run_tasks(encoder: SentenceEncoder, tasks: list, batch_size: int = 32) -> dict[str, dict]:
    """{task name: {"main_score_name", "main_score", "scores"}} of one model on `tasks` (no result cache:
    every call encodes afresh)."""
    import mteb

    model = DistilEncoder(encoder, batch_size)
    results = {}
    for task in tasks:
        outcome = mteb.evaluate(model, task, cache=None, show_progress_bar=False, overwrite_strategy="always")
        task_result = outcome.task_results[0]
        splits = {split: [dict(subset) for subset in subsets] for split, subsets in task_result.scores.items()}
        results[task.metadata.name] = {"main_score_name": task.metadata.main_score,
                                       "main_score": float(task_result.get_score()), "scores": splits}
    return results
