"""`distil prepare` from `datasets` datasets, from weighted mixes, and on damaged .gz input.

Every dataset route is checked against the same text prepared from a .txt file: the shards, token counts and
counts in the manifest must be byte-for-byte the same.
"""

import gzip
import json
import shutil
import time
import zlib

import datasets
import numpy as np
import pytest

from distil.cli import main
from distil.data import hf_datasets, shards
from distil.data.mixing import parse_mix
from distil.data.prepare import prepare
from distil.errors import DistilError
from tiny_tokenizers import word_ids, word_level_tokenizer

CLS, SEP = 2, 3


def words(*ns):
    return " ".join(f"w{n}" for n in ns)


def body(*ns):
    return [CLS] + word_ids(words(*ns), 5) + [SEP]


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    # Non-streaming load_dataset builds an Arrow cache; keep it out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()


@pytest.fixture
def bert_tok(tmp_path):
    return word_level_tokenizer(tmp_path / "tok", n_words=50, family="bert")


def corpus(n=120, seed=3):
    """Rows of varied length (long ones are cut, short ones dropped), some unknown words, an empty and a padded row."""
    rng = np.random.default_rng(seed)
    rows = [words(*rng.integers(0, 50, size=rng.integers(4, 45))) for _ in range(n)]
    rows[5] = ""
    rows[9] = "   " + words(*range(14)) + "  "
    rows[11] = "zz " * 9 + words(*range(5))
    return rows


def write_text(path, lines):
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


def shard_files(root):
    """Every prepared file but the manifest, by name (shards and token counts)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != shards.MANIFEST}


def counts(manifest):
    return manifest["lines"], manifest["cleaning"], manifest["splits"]


def read_split(root, split="train"):
    tokens, offsets = shards.open_split(root, split)
    return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


OPTIONS = dict(max_length=20, heldout_fraction=0.2, batch_size=16, progress=False)


@pytest.fixture
def reference(tmp_path, bert_tok):
    """The corpus prepared from a .txt file: what every dataset route must reproduce."""
    src = write_text(tmp_path / "corpus.txt", corpus())
    manifest = prepare([str(src)], str(bert_tok), str(tmp_path / "ref"), **OPTIONS)
    assert manifest["splits"]["heldout"]["sequences"] > 0 and manifest["cleaning"]["split_lines"] > 0
    assert manifest["cleaning"]["dropped_short"] > 0 and manifest["cleaning"]["dropped_unknown"] > 0
    assert manifest["lines"]["empty"] == 1
    assert "dataset" not in manifest and "mix" not in manifest  # text-file manifests keep their old keys
    return tmp_path / "ref", manifest


def assert_same_as_reference(root, manifest, reference):
    ref_root, ref_manifest = reference
    assert shard_files(root) == shard_files(ref_root)
    assert counts(manifest) == counts(ref_manifest)


# --- datasets: each route gives the bytes of the same text through a .txt file ------------------------------------

@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_save_to_disk_matches_text_file(tmp_path, bert_tok, reference, streaming):
    ds = datasets.Dataset.from_dict({"id": list(range(120)), "text": corpus()})
    ds.save_to_disk(str(tmp_path / "saved"))
    manifest = prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "out"), dataset=str(tmp_path / "saved"),
                       streaming=streaming, **OPTIONS)
    assert_same_as_reference(tmp_path / "out", manifest, reference)
    assert manifest["inputs"] == []
    assert manifest["dataset"] == {
        "name_or_path": str(tmp_path / "saved"), "config": None, "split": "train", "loader": "load_from_disk",
        "streaming": streaming, "fingerprint": datasets.load_from_disk(str(tmp_path / "saved"))._fingerprint,
        "rows": None if streaming else 120, "text_field": "text",
    }


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "arrow"])
def test_dataset_data_files_match_text_file(tmp_path, bert_tok, reference, fmt, streaming):
    rows = corpus()
    if fmt == "csv":
        rows[5] = "   "  # an empty CSV cell reads as a missing value (refused); a blank one is an empty row
    ds = datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))})
    path = tmp_path / f"data.{fmt}"
    if fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "jsonl":
        ds.to_json(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    else:
        ds.save_to_disk(str(tmp_path / "arrow_dir"))
        shutil.copy(next((tmp_path / "arrow_dir").glob("*.arrow")), path)
    manifest = prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "out"), dataset=str(path),
                       streaming=streaming, **OPTIONS)
    assert_same_as_reference(tmp_path / "out", manifest, reference)
    expected_loader = {"jsonl": "json"}.get(fmt, fmt)
    assert manifest["dataset"]["loader"] == expected_loader and manifest["dataset"]["streaming"] is streaming
    assert manifest["dataset"]["rows"] == (None if streaming else 120)
    assert (manifest["dataset"]["fingerprint"] is None) == streaming


def test_dataset_reruns_are_byte_identical_manifest_included(tmp_path, bert_tok):
    datasets.Dataset.from_dict({"text": corpus()}).to_parquet(str(tmp_path / "d.parquet"))
    for out in ("r1", "r2"):
        prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / out), dataset=str(tmp_path / "d.parquet"), **OPTIONS)
    assert shard_files(tmp_path / "r1") == shard_files(tmp_path / "r2")
    assert (tmp_path / "r1" / "manifest.json").read_bytes() == (tmp_path / "r2" / "manifest.json").read_bytes()


def test_dataset_dict_split_and_rows_read_in_small_batches(tmp_path, bert_tok, reference, monkeypatch):
    # Reading 7 rows at a time: batch boundaries inside the corpus change nothing.
    monkeypatch.setattr(hf_datasets, "ROWS_PER_READ", 7)
    other = datasets.Dataset.from_dict({"text": [words(*range(15))] * 3})
    datasets.DatasetDict({"validation": other, "train": datasets.Dataset.from_dict({"text": corpus()})}).save_to_disk(
        str(tmp_path / "dd"))
    manifest = prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "out"), dataset=str(tmp_path / "dd"),
                       **OPTIONS)
    assert_same_as_reference(tmp_path / "out", manifest, reference)
    one = prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "val"), dataset=str(tmp_path / "dd"),
                  split="validation", progress=False)
    assert read_split(tmp_path / "val") == [body(*range(15))] * 3 and one["dataset"]["split"] == "validation"
    with pytest.raises(DistilError, match=r"no split 'test' \(its splits: validation, train\)"):
        prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), dataset=str(tmp_path / "dd"), split="test")


def test_dataset_heldout_split(tmp_path, bert_tok):
    train_rows, held_rows = corpus(60), corpus(15, seed=9)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": train_rows}),
        "validation": datasets.Dataset.from_dict({"text": held_rows}),
    }).save_to_disk(str(tmp_path / "dd"))
    # The same as the text prepared with --heldout-file.
    ref = prepare([str(write_text(tmp_path / "train.txt", train_rows))], str(bert_tok), str(tmp_path / "ref"),
                  heldout_files=[str(write_text(tmp_path / "held.txt", held_rows))], max_length=20, progress=False)
    for streaming in (False, True):
        out = tmp_path / f"out{streaming}"
        manifest = prepare(tokenizer=str(bert_tok), output_dir=str(out), dataset=str(tmp_path / "dd"),
                           heldout_split="validation", streaming=streaming, max_length=20, progress=False)
        assert shard_files(out) == shard_files(tmp_path / "ref") and counts(manifest) == counts(ref)
        assert manifest["heldout"] == {"fraction": 0.0, "files": [], "seed": 0, "split": "validation"}
        assert manifest["dataset"]["heldout"]["split"] == "validation"
        assert manifest["splits"]["heldout"]["sequences"] == ref["splits"]["heldout"]["sequences"] > 0
    with pytest.raises(DistilError, match="one of --heldout FRACTION, --heldout-file FILE and --heldout-split"):
        prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), dataset=str(tmp_path / "dd"),
                heldout_split="validation", heldout_fraction=0.1)
    with pytest.raises(DistilError, match="is the training split too"):
        prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), dataset=str(tmp_path / "dd"),
                heldout_split="train")
    with pytest.raises(DistilError, match="no split 'dev'"):
        prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), dataset=str(tmp_path / "dd"),
                heldout_split="dev")
    with pytest.raises(DistilError, match="--heldout-split takes the held-out split from --dataset"):
        prepare([str(tmp_path / "train.txt")], str(bert_tok), str(tmp_path / "o"), heldout_split="validation")
    assert not (tmp_path / "o").exists()


# --- datasets: mistakes ----------------------------------------------------------------------------------------------

def test_dataset_missing_text_field_names_the_columns(tmp_path, bert_tok):
    ds = datasets.Dataset.from_dict({"sentence": [words(*range(12))], "label": [0]})
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_json(str(tmp_path / "d.jsonl"))
    for source, streaming in ((tmp_path / "saved", False), (tmp_path / "d.jsonl", True)):
        with pytest.raises(DistilError, match=r"no column 'text' \(its columns: sentence, label\).*--text-field"):
            prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), dataset=str(source), streaming=streaming)
    manifest = prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), dataset=str(tmp_path / "saved"),
                       text_field="sentence", progress=False)
    assert read_split(tmp_path / "o") == [body(*range(12))] and manifest["dataset"]["text_field"] == "sentence"
    with pytest.raises(DistilError, match="column 'label' of the dataset .* holds int64 values, not text"):
        prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o2"), dataset=str(tmp_path / "saved"),
                text_field="label")


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_non_string_value_names_the_row(tmp_path, bert_tok, monkeypatch, streaming):
    monkeypatch.setattr(hf_datasets, "ROWS_PER_READ", 3)  # the bad row is in the third read
    rows = [words(*range(12))] * 7 + [None] + [words(*range(13))]
    datasets.Dataset.from_dict({"text": rows}).to_parquet(str(tmp_path / "d.parquet"))
    kwargs = dict(tokenizer=str(bert_tok), dataset=str(tmp_path / "d.parquet"), streaming=streaming, progress=False)
    with pytest.raises(DistilError, match=r"Row 7 \(counting from 0\) of the dataset .*d.parquet split 'train' has a "
                                          r"non-string 'text' value \(a missing value.*--skip-bad-lines"):
        prepare(output_dir=str(tmp_path / "o"), **kwargs)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))
    manifest = prepare(output_dir=str(tmp_path / "o"), skip_bad_lines=True, **kwargs)
    assert manifest["lines"] == {"read": 9, "empty": 0, "bad_skipped": 1}
    assert read_split(tmp_path / "o") == [body(*range(12))] * 7 + [body(*range(13))]


def test_dataset_paths_splits_and_options_refused_with_reasons(tmp_path, bert_tok):
    datasets.Dataset.from_dict({"text": [words(*range(12))]}).to_parquet(str(tmp_path / "d.parquet"))
    src = write_text(tmp_path / "a.txt", [words(*range(12))])
    cases = [
        (dict(dataset=str(tmp_path / "nope.parquet")), "dataset path .*nope.parquet does not exist"),
        (dict(dataset=str(tmp_path / "*.csv")), "matches no files"),
        (dict(dataset=str(tmp_path / "d.parquet"), split="validation"), "form one split, 'train'"),
        (dict(dataset=str(tmp_path / "d.parquet"), dataset_config="en"), "has no configurations"),
        (dict(dataset=str(src)), "Pass plain text .* as input files"),
        (dict(inputs=[str(src)], dataset=str(tmp_path / "d.parquet")), "one kind of input.*input files and --dataset"),
        (dict(inputs=[str(src)], streaming=True), "--streaming apply to --dataset"),
        (dict(), "No input was given"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DistilError, match=message):
            prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), **kwargs)
    assert not (tmp_path / "o").exists()


def test_dataset_hub_id_offline_fails_fast_and_clearly(tmp_path, bert_tok, capsys):
    assert datasets.config.HF_HUB_OFFLINE  # tests run offline (conftest)
    started = time.perf_counter()
    with pytest.raises(DistilError, match=r"'someone/some-corpus' is not a local path.*HF_HUB_OFFLINE.*save_to_disk"):
        prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), dataset="someone/some-corpus")
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "o").exists()


def test_dataset_hub_id_unreachable_is_found_in_one_look(tmp_path, bert_tok, monkeypatch):
    import huggingface_hub

    looks = []

    def unreachable(self, repo_id, **kwargs):
        looks.append((repo_id, kwargs.get("timeout")))
        raise OSError("[Errno -2] Name or service not known")

    def must_not_load(*args, **kwargs):
        raise AssertionError("load_dataset would retry for half a minute")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", must_not_load)
    with pytest.raises(DistilError, match=r"'someone/some-corpus' is not a local path, and the hub cannot be reached "
                                          r"from this machine \(\[Errno -2\] Name or service not known\)"):
        prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), dataset="someone/some-corpus")
    assert looks == [("someone/some-corpus", 10)]


# --- --mix ------------------------------------------------------------------------------------------------------------

def expected_mix_order(sizes, weights, seed):
    """The documented rule, written out: (source, line index) of every mixed line."""
    p = np.asarray(weights, dtype=float) / sum(weights)
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    u = np.random.default_rng([seed, 1]).random(10_000)
    taken, order = [0] * len(sizes), []
    for k in range(len(u)):
        i = int(np.sum(cdf <= u[k]))
        if taken[i] == sizes[i]:
            return order
        order.append((i, taken[i]))
        taken[i] += 1
    raise AssertionError("no source ran out")


@pytest.fixture
def two_sources(tmp_path):
    # Line j of source a is w0..w11 plus w(20+j); of source b w30..w42 plus w(j): every line is recognisable.
    a = write_text(tmp_path / "a.txt", [words(*range(12), 20 + j) for j in range(6)])
    b = write_text(tmp_path / "b.jsonl", [json.dumps({"text": words(*range(30, 43), j)}) for j in range(20)])
    return a, b


def mixed_line(source, j):
    return body(*range(12), 20 + j) if source == 0 else body(*range(30, 43), j)


def test_mix_follows_the_documented_rule(tmp_path, bert_tok, two_sources, capsys):
    a, b = two_sources
    manifest = prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "out"), mix=[f"{a}:0.5", f"{b}:0.5"],
                       seed=0, progress=False)
    order = expected_mix_order([6, 20], [0.5, 0.5], seed=0)
    assert read_split(tmp_path / "out") == [mixed_line(i, j) for i, j in order]
    # Seed 0, u < 0.5 picks a: the draws go b b b b a a b a b b a a a b b a ...; a's 6th line is taken at draw 13,
    # b gives 9 lines in all, and draw 16 picks a, which has none left: the mix is 15 lines.
    assert "".join("ab"[i] for i, _ in order) == "bbbbaababbaaabb"
    mix = manifest["mix"]
    assert [s["lines"] for s in mix["sources"]] == [6, 9] and mix["stopped_by"] == str(a) and mix["lines"] == 15
    assert [s["share"] for s in mix["sources"]] == [0.4, 0.6]
    assert [s["probability"] for s in mix["sources"]] == [0.5, 0.5]
    assert manifest["inputs"] == [str(a), str(b)]
    assert manifest["lines"]["read"] == 15
    out = capsys.readouterr().out
    assert f"mix (seed 0, stopped when {a} ran out): {a} 6 lines (40.0%, weight 0.5), {b} 9 lines (60.0%" in out


def test_mix_is_deterministic_and_weights_are_relative(tmp_path, bert_tok, two_sources):
    a, b = two_sources

    def run(out, weights, seed):
        return prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / out), seed=seed, heldout_fraction=0.25,
                       mix=[f"{a}:{weights[0]}", f"{b}:{weights[1]}"], batch_size=5, progress=False)

    first, again, scaled, other_seed = run("r1", (0.3, 0.7), 4), run("r2", (0.3, 0.7), 4), run("r3", (3, 7), 4), \
        run("r4", (0.3, 0.7), 5)
    # Same seed, same bytes (manifest included); weights 3:7 are the mix 0.3:0.7.
    assert shard_files(tmp_path / "r2") == shard_files(tmp_path / "r1")
    assert (tmp_path / "r2" / "manifest.json").read_bytes() == (tmp_path / "r1" / "manifest.json").read_bytes()
    assert again["mix"] == first["mix"] and shard_files(tmp_path / "r3") == shard_files(tmp_path / "r1")
    assert [s["probability"] for s in scaled["mix"]["sources"]] == [0.3, 0.7]
    assert [s["weight"] for s in scaled["mix"]["sources"]] == [3.0, 7.0]
    # The mixed lines are those of the rule; the held-out draw then splits them.
    for manifest, root, seed in ((first, tmp_path / "r1", 4), (other_seed, tmp_path / "r4", 5)):
        order = expected_mix_order([6, 20], [0.3, 0.7], seed)
        assert [s["lines"] for s in manifest["mix"]["sources"]] == [sum(i == k for i, _ in order) for k in (0, 1)]
        train, held = read_split(root), read_split(root, "heldout")
        assert held and sorted(train + held) == sorted(mixed_line(i, j) for i, j in order)
    assert expected_mix_order([6, 20], [0.3, 0.7], 4) != expected_mix_order([6, 20], [0.3, 0.7], 5)
    assert shard_files(tmp_path / "r4") != shard_files(tmp_path / "r1")


def test_mix_with_a_dataset_source(tmp_path, bert_tok, two_sources):
    a, _ = two_sources
    rows = [words(*range(30, 43), j) for j in range(20)]
    datasets.Dataset.from_dict({"text": rows}).to_parquet(str(tmp_path / "b.parquet"))
    for streaming in (False, True):
        out = tmp_path / f"out{streaming}"
        manifest = prepare(tokenizer=str(bert_tok), output_dir=str(out), mix=[f"{a}:1", f"{tmp_path / 'b.parquet'}:1"],
                           streaming=streaming, progress=False)
        order = expected_mix_order([6, 20], [1, 1], seed=0)
        assert read_split(out) == [mixed_line(i, j) for i, j in order]
        assert [s["lines"] for s in manifest["mix"]["sources"]] == [6, 9]
        assert manifest["mix"]["sources"][1]["dataset"]["loader"] == "parquet"
        assert manifest["mix"]["sources"][1]["dataset"]["streaming"] is streaming
    # A dataset listed before a text file: the same rule, sources numbered in the order given.
    manifest = prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "swapped"), progress=False,
                       mix=[f"{tmp_path / 'b.parquet'}:1", f"{a}:1"])
    order = expected_mix_order([20, 6], [1, 1], seed=0)
    assert read_split(tmp_path / "swapped") == [mixed_line(1 - i, j) for i, j in order]
    assert [s["lines"] for s in manifest["mix"]["sources"]] == [sum(i == k for i, _ in order) for k in (0, 1)]


def test_mix_bad_weights_are_refused(tmp_path, bert_tok, two_sources):
    a, b = two_sources
    cases = [
        ([str(a), f"{b}:0.5"], "has no weight"),
        ([f"{a}:half", f"{b}:0.5"], "'half' is not a number"),
        ([f"{a}:0", f"{b}:1"], "must be a positive number, got 0.0"),
        ([f"{a}:-0.5", f"{b}:1"], "must be a positive number, got -0.5"),
        ([f"{a}:inf", f"{b}:1"], "must be a positive number, got inf"),
        ([f"{a}:nan", f"{b}:1"], "must be a positive number, got nan"),
        ([f"{a}:0.5", f"{a}:0.5"], "lists .*a.txt twice"),
        ([f"{tmp_path / 'missing.txt'}:1", f"{b}:1"], "missing.txt does not exist"),
    ]
    for mix, message in cases:
        with pytest.raises(DistilError, match=message):
            prepare(tokenizer=str(bert_tok), output_dir=str(tmp_path / "o"), mix=mix)
    with pytest.raises(DistilError, match="one kind of input.*input files and --mix"):
        prepare([str(a)], str(bert_tok), str(tmp_path / "o"), mix=[f"{b}:1"])
    assert not (tmp_path / "o").exists()
    assert parse_mix(["C:/data/x.txt:2", ("y.txt", 1)]) == [("C:/data/x.txt", 2.0), ("y.txt", 1.0)]


# --- damaged .gz input: one paragraph naming the file and the line, exit 2, nothing written ---------------------------

def gz_corpus(n_lines):
    data = "".join(words(*range(12), j % 50) + "\n" for j in range(n_lines)).encode()
    return data, gzip.compress(data, mtime=0)


def one_error_paragraph(err):
    (line,) = [line for line in err.splitlines() if "distil prepare: error:" in line]  # the rest is the progress bar
    return line[line.index("distil prepare: error:"):]


def run_prepare_cli(src, bert_tok, out, capsys):
    code = main(["prepare", str(src), "--tokenizer", str(bert_tok), "-o", str(out)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("n_lines", [40, 3000])  # inside the first 8 KiB (checked up front) and far into the file
def test_bad_input_truncated_gz(tmp_path, bert_tok, capsys, n_lines):
    data, packed = gz_corpus(n_lines)
    cut = packed[: len(packed) // 2]
    complete_lines = zlib.decompressobj(31).decompress(cut).count(b"\n")
    assert 0 < complete_lines < n_lines
    src = tmp_path / "corpus.txt.gz"
    src.write_bytes(cut)
    code, err = run_prepare_cli(src, bert_tok, tmp_path / "o", capsys)
    assert code == 2 and "Traceback" not in err
    err = one_error_paragraph(err)
    assert f"{src} is damaged: it ends before its compressed data does (a truncated file" in err
    assert f"reading stopped after line {complete_lines:,}. Nothing was written." in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


@pytest.mark.parametrize("n_lines", [40, 3000])
def test_bad_input_gz_with_bad_crc(tmp_path, bert_tok, capsys, n_lines):
    data, packed = gz_corpus(n_lines)
    crc = int.from_bytes(packed[-8:-4], "little")
    src = tmp_path / "corpus.txt.gz"
    src.write_bytes(packed[:-8] + (crc ^ 1).to_bytes(4, "little") + packed[-4:])
    code, err = run_prepare_cli(src, bert_tok, tmp_path / "o", capsys)
    assert code == 2 and "Traceback" not in err
    err = one_error_paragraph(err)
    # The checksum is only known at the end: every line was read, and still nothing is written.
    assert f"{src} is damaged: its CRC checksum does not match its content" in err
    assert f"reading stopped after line {n_lines:,}. Nothing was written." in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_bad_input_intact_gz_still_reads(tmp_path, bert_tok, capsys):
    data, packed = gz_corpus(3000)
    (tmp_path / "corpus.txt.gz").write_bytes(packed)
    code, _ = run_prepare_cli(tmp_path / "corpus.txt.gz", bert_tok, tmp_path / "o", capsys)
    assert code == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["lines"]["read"] == 3000 and manifest["splits"]["train"]["sequences"] == 3000


def test_dataset_and_mix_from_the_command_line(tmp_path):
    """The CLI's --dataset / --mix reach prepare: a saved dataset gives the same tokens as its text file."""
    from datasets import Dataset

    from distil.cli import main
    from distil.data import shards
    from tiny_tokenizers import word_level_tokenizer

    tok = word_level_tokenizer(tmp_path / "tok", n_words=50, family="bert")
    lines = [" ".join(f"w{(i + k) % 50}" for k in range(14)) for i in range(30)]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    Dataset.from_dict({"text": lines}).save_to_disk(str(tmp_path / "ds"))
    assert main(["prepare", str(tmp_path / "in.txt"), "--tokenizer", str(tok), "-o", str(tmp_path / "a")]) == 0
    assert main(["prepare", "--dataset", str(tmp_path / "ds"), "--tokenizer", str(tok), "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "train.tokens.bin").read_bytes() == (tmp_path / "b" / "train.tokens.bin").read_bytes()
    assert main(["prepare", "--mix", f"{tmp_path / 'in.txt'}:0.5", f"{tmp_path / 'ds'}:0.5", "--tokenizer", str(tok),
                 "-o", str(tmp_path / "c")]) == 0
    assert shards.read_manifest(tmp_path / "c")["mix"]
