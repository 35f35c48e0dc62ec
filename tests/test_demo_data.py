"""Checks on the shipped demo corpus (data/demo) and on the parts of its builder that need no download."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import zlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "data" / "demo"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO_ROOT / "benchmarks" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_corpus = _load_builder()


def _read_lines(name: str) -> list[str]:
    raw = gzip.decompress((DEMO_DIR / name).read_bytes())
    text = raw.decode("utf-8")  # strict: raises on any invalid byte
    assert text.endswith("\n")
    return text[:-1].split("\n")


@pytest.fixture(scope="module")
def train() -> list[str]:
    return _read_lines("train.txt.gz")


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    return _read_lines("heldout.txt.gz")


def test_demo_files_exist() -> None:
    for name in ("train.txt.gz", "heldout.txt.gz", "README.md"):
        assert (DEMO_DIR / name).is_file(), name


def test_gzip_headers_carry_no_name_or_timestamp() -> None:
    for name in ("train.txt.gz", "heldout.txt.gz"):
        header = (DEMO_DIR / name).read_bytes()[:10]
        assert header[:3] == b"\x1f\x8b\x08"
        assert header[3] == 0, "no FNAME/FCOMMENT fields (built with gzip -n)"
        assert struct.unpack("<I", header[4:8])[0] == 0, "mtime is zero"


def test_line_counts_and_sizes(train: list[str], heldout: list[str]) -> None:
    assert len(train) > 8000
    assert len(heldout) > 400
    train_bytes = sum(len(line.encode("utf-8")) + 1 for line in train)
    heldout_bytes = sum(len(line.encode("utf-8")) + 1 for line in heldout)
    assert 2_000_000 < train_bytes < 4_000_000
    assert 0.03 < heldout_bytes / train_bytes < 0.10


def test_lines_are_clean_paragraphs(train: list[str], heldout: list[str]) -> None:
    for line in train + heldout:
        assert line, "no empty lines"
        assert line == " ".join(line.split()), f"whitespace not collapsed: {line[:60]!r}"
        assert not build_corpus._CHAPTER_HEADING.fullmatch(line), line


def test_expected_first_lines(train: list[str], heldout: list[str]) -> None:
    # Sense and Sensibility opens the training text; Persuasion (a novel absent from train) opens the held-out text.
    assert train[0].startswith("The family of Dashwood had long been settled in Sussex. Their estate was large,")
    assert heldout[0].startswith("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,")
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in " \
           "want of a wife." in train


def test_heldout_does_not_overlap_train(train: list[str], heldout: list[str]) -> None:
    assert not set(heldout) & set(train)


def test_novel_chapters_joins_paragraphs_and_drops_headings() -> None:
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "",
             "Emma Woodhouse, handsome,  clever,", "and _rich_.", "", "* * * * *", "",
             "[End volume one of this edition.", "Printed by T. and A. Constable]", "",
             "Chapter 2", "", "  \"Yes.\"  ", None, "FINIS", "", "A note after the end."]
    assert build_corpus.novel_chapters(lines) == [["Emma Woodhouse, handsome, clever, and rich."], ['"Yes."']]


def _xdr_int(value: int) -> bytes:
    return struct.pack(">i", value)


def _r_string(text: str | None, latin1: bool = False) -> bytes:
    if text is None:
        return _xdr_int(9) + _xdr_int(-1)
    levels = (1 << 2) if latin1 else (1 << 3)  # LATIN1 or UTF8 encoding flag
    raw = text.encode("latin-1" if latin1 else "utf-8")
    return _xdr_int(9 | levels << 12) + _xdr_int(len(raw)) + raw


class _RWriter:
    """Hand-written R XDR serializer for the few object types a lazy-load index uses."""

    def __init__(self) -> None:
        self.symbols: list[str] = []

    def header(self) -> bytes:
        return b"X\n" + _xdr_int(3) + _xdr_int(0x040201) + _xdr_int(0x030500) + _xdr_int(5) + b"UTF-8"

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:  # R writes later uses of a symbol as a back-reference
            return _xdr_int((self.symbols.index(name) + 1) << 8 | 255)
        self.symbols.append(name)
        return _xdr_int(1) + _r_string(name)

    def names_attribute(self, names: list[str]) -> bytes:
        return _xdr_int(2 | 1 << 10) + self.symbol("names") + self.strings(names) + _xdr_int(254)

    def strings(self, values: list[str | None]) -> bytes:
        return _xdr_int(16) + _xdr_int(len(values)) + b"".join(_r_string(value) for value in values)

    def named_list(self, items: dict[str, bytes]) -> bytes:
        body = _xdr_int(19 | 1 << 9) + _xdr_int(len(items)) + b"".join(items.values())
        return body + self.names_attribute(list(items))


def test_read_r_lazyload_db(tmp_path: Path) -> None:
    novel = _RWriter()
    novel_bytes = novel.header() + _xdr_int(16) + _xdr_int(4) + _r_string("It is a truth") + _r_string(None) \
        + _r_string("") + _r_string("café", latin1=True)
    record = struct.pack(">I", len(novel_bytes)) + zlib.compress(novel_bytes)
    (tmp_path / "Rdata.rdb").write_bytes(b"\x00" * 7 + record)  # the record need not start the file

    index = _RWriter()
    offsets = _xdr_int(13) + _xdr_int(2) + _xdr_int(7) + _xdr_int(len(record))
    index_bytes = index.header() + index.named_list({
        "variables": index.named_list({"prideprejudice": offsets}),
        "references": index.named_list({}),
        "compressed": _xdr_int(10) + _xdr_int(1) + _xdr_int(1),
    })
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index_bytes))
    assert index.symbols == ["names"]  # so the reader had to follow back-references

    variables = build_corpus.read_r_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert variables == {"prideprejudice": ["It is a truth", None, "", "café"]}
