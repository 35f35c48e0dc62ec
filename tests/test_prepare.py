import gzip
import json

import numpy as np
import pytest

from distil.cli import main
from distil.data import shards
from distil.data.prepare import prepare
from distil.errors import DistilError
from tiny_tokenizers import word_ids, word_level_tokenizer


def words(*ns):
    return " ".join(f"w{n}" for n in ns)


def read_split(root, split="train"):
    tokens, offsets = shards.open_split(root, split)
    return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


@pytest.fixture
def bert_tok(tmp_path):
    return word_level_tokenizer(tmp_path / "tok", n_words=50, family="bert")


def write(path, lines, gz=False):
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def test_framing_splitting_and_dropping(tmp_path, bert_tok):
    CLS, SEP, UNK = 2, 3, 1
    lines = [
        words(*range(12)),          # 12 body + 2 framing: kept
        words(*range(9)),           # 9 + 2 = 11 tokens: dropped as short (seed drops 11 or fewer)
        words(*range(10)),          # 10 + 2 = 12: kept
        words(*range(25)),          # max_length 12 -> body 10: chunks of 10, 10, 5 -> last one dropped
        "zz " * 7 + words(*range(5)),  # 7 unknown of 14 framed tokens = 50%: dropped
        "zz " * 6 + words(*range(6)),  # 6 unknown of 14: kept
        "",                         # empty: skipped
    ]
    src = write(tmp_path / "a.txt", lines)
    manifest = prepare([str(src)], str(bert_tok), str(tmp_path / "out"), max_length=12, progress=False)
    seqs = read_split(tmp_path / "out")
    body = lambda *ns: [CLS] + word_ids(words(*ns), 5) + [SEP]
    # max_length 12 leaves 10 body tokens per chunk.
    # line 1: chunks w0..w9 (kept) and w10 w11 (4 tokens: short); line 2: 11 tokens (short); line 3: kept;
    # line 4: w0..w9, w10..w19 (kept) and w20..w24 (7 tokens: short);
    # lines 5 and 6: first chunk holds 7 and 6 unknowns of 12 tokens (>= 50%: dropped), second chunk short.
    assert seqs == [body(*range(10)), body(*range(10)), body(*range(10)), body(*range(10, 20))]
    c = manifest["cleaning"]
    assert c["split_lines"] == 4 and c["extra_chunks"] == 5
    assert c["dropped_short"] == 5
    assert c["dropped_unknown"] == 2
    assert manifest["lines"] == {"read": 7, "empty": 1, "bad_skipped": 0}
    assert manifest["special_ids"]["prefix"] == [CLS] and manifest["special_ids"]["suffix"] == [SEP]
    assert UNK == manifest["special_ids"]["unk"]


def test_unknown_fraction_counts_framing(tmp_path, bert_tok):
    # 6 unknown of 14 framed tokens (43%) is kept; 7 of 14 (50%) is dropped, as in the seed.
    src = write(tmp_path / "a.txt", ["zz " * 6 + words(*range(6)), "zz " * 7 + words(*range(5))])
    manifest = prepare([str(src)], str(bert_tok), str(tmp_path / "out"), progress=False)
    seqs = read_split(tmp_path / "out")
    assert len(seqs) == 1 and seqs[0].count(1) == 6
    assert manifest["cleaning"]["dropped_unknown"] == 1


@pytest.mark.parametrize("family,prefix,suffix", [("roberta", [0], [2]), ("gpt2", [0], [0])])
def test_framing_comes_from_the_tokenizer(tmp_path, family, prefix, suffix):
    tok = word_level_tokenizer(tmp_path / "tok", n_words=30, family=family)
    n_specials = 5 if family == "roberta" else 2
    src = write(tmp_path / "a.txt", [words(*range(15))])
    prepare([str(src)], str(tok), str(tmp_path / "out"), progress=False)
    assert read_split(tmp_path / "out") == [prefix + word_ids(words(*range(15)), n_specials) + suffix]


def test_uint32_round_trip_above_65535(tmp_path):
    tok = word_level_tokenizer(tmp_path / "tok", n_words=70000, family="bert")
    line = words(69990, 69994, 65531, 1, 2, 3, 4, 5, 6, 7, 65530, 69999)
    src = write(tmp_path / "a.txt.gz", [line], gz=True)
    manifest = prepare([str(src)], str(tok), str(tmp_path / "out"), progress=False)
    assert manifest["token_dtype"] == "<u4"
    assert read_split(tmp_path / "out") == [[2] + word_ids(line, 5) + [3]]
    counts = shards.load_token_counts(tmp_path / "out")
    assert counts.shape == (70005,) and counts[70004] == 1 and counts[2] == 1 and counts.sum() == 14


def test_small_vocab_uses_uint16(tmp_path, bert_tok):
    src = write(tmp_path / "a.txt", [words(*range(20))])
    manifest = prepare([str(src)], str(bert_tok), str(tmp_path / "out"), progress=False)
    assert manifest["token_dtype"] == "<u2"
    assert (tmp_path / "out" / "train.tokens.bin").stat().st_size == 22 * 2


def test_token_counts_and_heldout_fraction(tmp_path, bert_tok):
    rng = np.random.default_rng(1)
    lines = [words(*rng.integers(0, 50, size=rng.integers(10, 30))) for _ in range(400)]
    src = write(tmp_path / "a.txt", lines)
    manifest = prepare([str(src)], str(bert_tok), str(tmp_path / "out"), heldout_fraction=0.2, batch_size=37,
                       progress=False)
    train, heldout = read_split(tmp_path / "out"), read_split(tmp_path / "out", "heldout")
    assert len(train) + len(heldout) == 400
    assert 50 < len(heldout) < 110
    counts = shards.load_token_counts(tmp_path / "out")
    expected = np.bincount(np.concatenate([np.array(s) for s in train]), minlength=55)
    np.testing.assert_array_equal(counts, expected)
    assert manifest["splits"]["train"]["tokens"] == sum(map(len, train))
    # The same seed picks the same held-out lines whatever the batch size.
    prepare([str(src)], str(bert_tok), str(tmp_path / "out2"), heldout_fraction=0.2, batch_size=400, progress=False)
    assert read_split(tmp_path / "out2", "heldout") == heldout


def test_reruns_are_byte_identical(tmp_path, bert_tok):
    rng = np.random.default_rng(0)
    lines = [words(*rng.integers(0, 50, size=rng.integers(5, 40))) for _ in range(300)]
    src = write(tmp_path / "a.jsonl", [json.dumps({"text": l}) for l in lines])
    for out in ("r1", "r2"):
        prepare([str(src)], str(bert_tok), str(tmp_path / out), heldout_fraction=0.1, max_length=20, progress=False)
    files = sorted(p.name for p in (tmp_path / "r1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "r2").iterdir())
    for name in files:
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes(), name


def test_jsonl_text_field(tmp_path, bert_tok):
    src = write(tmp_path / "a.jsonl", [json.dumps({"body": words(*range(12))})])
    prepare([str(src)], str(bert_tok), str(tmp_path / "out"), text_field="body", progress=False)
    assert len(read_split(tmp_path / "out")) == 1
    with pytest.raises(DistilError, match="--text-field"):
        prepare([str(src)], str(bert_tok), str(tmp_path / "out2"), progress=False)


def test_heldout_file(tmp_path, bert_tok):
    train = write(tmp_path / "train.txt", [words(*range(12))] * 3)
    held = write(tmp_path / "held.txt", [words(*range(20, 34))])
    prepare([str(train)], str(bert_tok), str(tmp_path / "out"), heldout_files=[str(held)], progress=False)
    assert len(read_split(tmp_path / "out")) == 3
    assert read_split(tmp_path / "out", "heldout") == [[2] + word_ids(words(*range(20, 34)), 5) + [3]]


# --- bad input: clear message, non-zero exit, nothing half-written -------------------------------------------

def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_missing_and_empty_inputs(tmp_path, bert_tok, capsys):
    code, err = run_cli(["prepare", str(tmp_path / "nope.txt"), "--tokenizer", str(bert_tok), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty.txt").write_text("")
    code, err = run_cli(["prepare", str(tmp_path / "empty.txt"), "--tokenizer", str(bert_tok), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "is empty" in err
    assert not (tmp_path / "o").exists()


def test_binary_input(tmp_path, bert_tok, capsys):
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 10)
    code, err = run_cli(["prepare", str(tmp_path / "bin.txt"), "--tokenizer", str(bert_tok), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "binary" in err


def test_non_utf8_reports_file_and_line_and_can_skip(tmp_path, bert_tok, capsys):
    good = words(*range(12)).encode()
    (tmp_path / "latin.txt").write_bytes(good + b"\n" + b"caf\xe9 " + good + b"\n" + good + b"\n")
    args = ["prepare", str(tmp_path / "latin.txt"), "--tokenizer", str(bert_tok), "-o", str(tmp_path / "o")]
    code, err = run_cli(args, capsys)
    assert code == 2 and "latin.txt:2" in err and "UTF-8" in err and "--skip-bad-lines" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))
    code, _ = run_cli(args + ["--skip-bad-lines"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["lines"]["bad_skipped"] == 1
    assert len(read_split(tmp_path / "o")) == 2


def test_bad_tokenizer_path(tmp_path, capsys):
    src = write(tmp_path / "a.txt", [words(*range(12))])
    code, err = run_cli(["prepare", str(src), "--tokenizer", str(tmp_path / "missing"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "notatok").mkdir()
    (tmp_path / "notatok" / "readme.txt").write_text("hello")
    code, err = run_cli(["prepare", str(src), "--tokenizer", str(tmp_path / "notatok"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "tokenizer" in err.lower() and "Traceback" not in err


def test_refuses_finished_output_without_overwrite(tmp_path, bert_tok, capsys):
    src = write(tmp_path / "a.txt", [words(*range(12))])
    args = ["prepare", str(src), "--tokenizer", str(bert_tok), "-o", str(tmp_path / "o")]
    assert run_cli(args, capsys)[0] == 0
    before = (tmp_path / "o" / "train.tokens.bin").read_bytes()
    write(tmp_path / "a.txt", [words(*range(30, 45))])
    code, err = run_cli(args, capsys)
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "o" / "train.tokens.bin").read_bytes() == before
    assert run_cli(args + ["--overwrite"], capsys)[0] == 0
    assert (tmp_path / "o" / "train.tokens.bin").read_bytes() != before


def test_nothing_left_when_all_lines_are_dropped(tmp_path, bert_tok, capsys):
    src = write(tmp_path / "a.txt", [words(1, 2, 3)])
    code, err = run_cli(["prepare", str(src), "--tokenizer", str(bert_tok), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "No training sequences" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family,prefix,suffix", [("bert", [2], [3]), ("gpt2", [0], [0])])
def test_max_length_truncation_keeps_the_closing_token(tmp_path, family, prefix, suffix):
    """data.max_length (train) and --max-length (evaluate) cut inside the framing, as prepare does for long lines:
    a truncated [CLS] ... [SEP] keeps its [SEP], and GPT-2's end-of-text stays last."""
    from distil.data.dataset import TokenSequences
    from distil.evaluation.lm_quality import load_heldout

    tok = word_level_tokenizer(tmp_path / "tok", n_words=50, family=family)
    text = write(tmp_path / "in.txt", [words(*range(20)), words(*range(5, 10))] * 8)
    prepare([str(text)], str(tok), str(tmp_path / "out"), heldout_fraction=0.5, progress=False, min_length=3)
    full = TokenSequences(tmp_path / "out", "train")
    cut = TokenSequences(tmp_path / "out", "train", max_length=8)
    for i in range(len(full)):
        whole, short = full[i].tolist(), cut[i].tolist()
        if len(whole) <= 8:
            assert short == whole
        else:
            assert short == whole[:8 - len(suffix)] + suffix and short[:len(prefix)] == prefix
    assert any(len(full[i]) > 8 for i in range(len(full)))
    heldout = load_heldout([str(tmp_path / "out")], max_length=8)
    assert all(seq[-len(suffix):].tolist() == suffix and len(seq) <= 8 for seq in heldout.sequences)
    with pytest.raises(DistilError, match="leaves no room for text"):
        TokenSequences(tmp_path / "out", "train", max_length=2)
