"""Classification data reading (CSV / TSV / JSONL / datasets), label order, and scores by hand."""

import json
import sys
from pathlib import Path

import pytest
from transformers import BertTokenizer

from distil.errors import DistilError
from distil.tasks.classification import (
    accuracy, build_classification_features, classification_scores, load_classification_dataset, macro_f1,
    read_classification, sorted_labels,
)

VOCAB = Path(__file__).parent / "data" / "tasks" / "vocab.txt"


@pytest.fixture(scope="module")
def tokenizer():
    words = VOCAB.read_text(encoding="utf-8").split()
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def test_read_csv_single_sentence(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('sentence,label\n"good, fun movie",pos\nboring plot,neg\n')
    data = read_classification(path)
    assert (data.texts, data.text_pairs, data.labels) == (["good, fun movie", "boring plot"], None, ["pos", "neg"])


def test_read_tsv_pair_with_named_columns(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("a\tb\tgold\njohn lives in paris\the lives in rome\tno\n")
    data = read_classification(path, text_columns=["a", "b"], label_column="gold")
    assert (data.texts, data.text_pairs, data.labels) == (["john lives in paris"], ["he lives in rome"], ["no"])
    with pytest.raises(DistilError, match="no column"):
        read_classification(path, text_columns=["premise", "b"], label_column="gold")
    with pytest.raises(DistilError, match="label column"):
        read_classification(path, text_columns=["a", "b"])


def test_read_jsonl_pairs_found_by_column_name_and_integer_labels_sorted_as_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"premise": "p", "hypothesis": "h", "label": 10}, {"premise": "q", "hypothesis": "i", "label": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = read_classification(path)
    assert data.text_pairs == ["h", "i"] and data.labels == ["10", "2"]
    assert sorted_labels(data.labels) == ["2", "10"] and data.id_order is None
    assert sorted_labels(["pos", "neg", "neutral", "neg"]) == ["neg", "neutral", "pos"]
    assert sorted_labels(["1", "01"]) == ["01", "1"]  # "01" is no plain integer, so neither is read as a number


def test_rows_without_label_are_refused(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("text,label\ngood,\n")
    with pytest.raises(DistilError, match="Row 1"):
        read_classification(path)


def test_features_encode_pairs_with_segment_ids(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"sentence1": "john works", "sentence2": "he lives", "label": "yes"}) + "\n")
    data = read_classification(path)
    features = build_classification_features(data, tokenizer, {"no": 0, "yes": 1}, max_length=16)
    assert tokenizer.convert_ids_to_tokens(features.input_ids[0].tolist()) == [
        "[CLS]", "john", "works", "[SEP]", "he", "lives", "[SEP]"]
    assert features.token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert features.labels == [1]
    with pytest.raises(DistilError, match="not among"):
        build_classification_features(data, tokenizer, {"no": 0}, max_length=16)


def test_accuracy_and_macro_f1_by_hand():
    gold = [0, 0, 1, 1, 2]
    predicted = [0, 1, 1, 1, 0]
    # class 0: tp 1 fp 1 fn 1 -> 2/4; class 1: tp 2 fp 1 fn 0 -> 4/5; class 2: tp 0 fn 1 -> 0.
    assert accuracy(predicted, gold) == pytest.approx(3 / 5)
    assert macro_f1(predicted, gold) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert classification_scores([1, 1], [1, 1]) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_datasets_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DistilError, match="pip install datasets"):
        load_classification_dataset("glue", "train", "sst2")


def test_datasets_directory_with_class_label_names(tmp_path):
    import datasets  # a dev dependency: a missing package should fail here, not skip
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    dataset = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"sentence": ["good", "bad"], "label": [1, 0]}, features=features)})
    dataset.save_to_disk(str(tmp_path / "sst"))
    data = load_classification_dataset(str(tmp_path / "sst"), "train")
    assert (data.texts, data.labels) == (["good", "bad"], ["positive", "negative"])
    assert data.id_order == ["negative", "positive"]  # the ClassLabel's ids, kept for the label order
