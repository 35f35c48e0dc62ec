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


def test_small_inputs_heldout_that_takes_every_line_is_named(tmp_path, bert_tok):
    text = write(tmp_path / "c.txt", [words(*range(i, i + 14)) for i in range(30)])
    with pytest.raises(DistilError, match=r"No training sequences were left: the held-out draw \(--heldout 0.999\) "
                                          r"kept 30 sequences of the 30 lines read apart.*Lower --heldout"):
        prepare([str(text)], str(bert_tok), str(tmp_path / "out"), heldout_fraction=0.999, progress=False)
    assert not (tmp_path / "out").exists()


def _long_line(n_words: int, seed: int = 0) -> str:
    """One line of word-level tokens with single and double spaces between them."""
    rng = np.random.default_rng(seed)
    gaps = np.where(rng.random(n_words) < 0.2, "  ", " ")
    return "".join(f"w{w}{gap}" for w, gap in zip(rng.integers(0, 50, n_words), gaps)).strip()


def test_small_inputs_long_line_is_tokenized_in_bounded_pieces(tmp_path, bert_tok, monkeypatch):
    """A line of hundreds of KB reaches the tokenizer as pieces of at most ~PIECE_CHARS (its cost per character grows
    with the text's length, and one text is encoded on one thread), and gives exactly the whole line's ids."""
    from distil.data import prepare as prepare_module
    from distil.loading import load_tokenizer

    line = _long_line(60_000)
    assert len(line) > 20 * prepare_module.PIECE_CHARS
    encoder = load_tokenizer(str(bert_tok)).backend_tokenizer
    assert prepare_module.cuts_are_exact(encoder)
    calls = []
    real = prepare_module._encode_batch
    monkeypatch.setattr(prepare_module, "_encode_batch", lambda enc, texts: calls.append(list(map(len, texts)))
                        or real(enc, texts))
    short = words(1, 2, 3)
    ids = prepare_module.encode_lines(encoder, [short, line, short], prepare_module.PIECE_CHARS)
    assert len(calls) == 1 and len(calls[0]) > 20
    assert max(calls[0]) <= prepare_module.PIECE_CHARS + 1 and sum(calls[0]) == len(line) + 2 * len(short)
    assert ids[1] == encoder.encode(line, add_special_tokens=False).ids
    assert ids[0] == ids[2] == [n + 5 for n in (1, 2, 3)]


def test_small_inputs_long_line_prepares_the_same_shards_as_unsplit(tmp_path, bert_tok, monkeypatch):
    from distil.data import prepare as prepare_module

    text = write(tmp_path / "c.txt", [words(*range(20)), _long_line(5_000, seed=1), words(*range(5, 30))])
    prepare([str(text)], str(bert_tok), str(tmp_path / "pieces"), max_length=64, progress=False)
    monkeypatch.setattr(prepare_module, "LONG_LINE_CHARS", 10 ** 9)
    prepare([str(text)], str(bert_tok), str(tmp_path / "whole"), max_length=64, progress=False)
    for name in ("train.tokens.bin", "train.offsets.bin", "token_counts.npy", "manifest.json"):
        pieces, whole = (tmp_path / "pieces" / name).read_bytes(), (tmp_path / "whole" / name).read_bytes()
        assert pieces.replace(b"pieces", b"whole") == whole, name


def test_small_inputs_split_at_spaces_cuts_before_the_last_space_of_a_run():
    from distil.data.prepare import split_at_spaces

    assert split_at_spaces("aaaa bbbb   cccc dddd", 6) == ["aaaa", " bbbb  ", " cccc", " dddd"]
    assert "".join(split_at_spaces("x" * 50 + " y z", 10)) == "x" * 50 + " y z"
    assert split_at_spaces("x" * 50, 10) == ["x" * 50]  # nowhere to cut: whole


def test_small_inputs_tokenizer_that_reads_pieces_differently_gets_whole_lines():
    """A normalizer that prepends a marker to every text it is given would add one per piece: such a tokenizer is
    detected, and its long lines are encoded whole."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from distil.data.prepare import cuts_are_exact

    vocab = {"[UNK]": 0, "▁": 1, **{ch: i + 2 for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    prepending = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    prepending.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    prepending.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    assert not cuts_are_exact(prepending)
