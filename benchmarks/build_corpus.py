"""Build the shipped demo corpus (data/demo) and the tokenizer benchmark corpus (benchmarks/corpus).

Usage:
    python benchmarks/build_corpus.py demo    # Jane Austen novels -> data/demo/{train,heldout}.txt.gz
    python benchmarks/build_corpus.py bench   # Debian documentation -> benchmarks/corpus/english-{1x,5x}.txt

Both fetch Debian packages with `apt-get download` into benchmarks/corpus/cache (git-ignored) and unpack them with
`dpkg-deb -x`. Only the standard library plus the apt-get, dpkg-deb, gzip and groff programs are used, so the
repository never depends on R or on any extra Python package. Output is one paragraph per line, deterministic.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / "benchmarks" / "corpus" / "cache"
DEMO_DIR = REPO_ROOT / "data" / "demo"
BENCH_DIR = REPO_ROOT / "benchmarks" / "corpus"

# ---------------------------------------------------------------------------------------------------------------
# Debian packages


def fetch_package(name: str) -> tuple[Path, str]:
    """Download (once) and unpack a Debian package into the cache; return (unpacked root, version)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    debs = sorted(CACHE_DIR.glob(f"{name}_*.deb"))
    if not debs:
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                sys.exit(f"error: `{tool}` not found. This builder needs a Debian/Ubuntu system with apt.")
        result = subprocess.run(["apt-get", "download", name], cwd=CACHE_DIR, capture_output=True, text=True)
        debs = sorted(CACHE_DIR.glob(f"{name}_*.deb"))
        if result.returncode != 0 or not debs:
            sys.exit(f"error: `apt-get download {name}` failed:\n{result.stderr.strip()}\n"
                     "Run `apt-get update` (Debian 12 'bookworm' sources) and try again.")
    deb = debs[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    root = CACHE_DIR / "unpacked" / deb.stem
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (root / ".complete").touch()
    print(f"  package {name} {version} ({deb.stat().st_size / 1e6:.1f} MB .deb)")
    return root, version


# ---------------------------------------------------------------------------------------------------------------
# R lazy-load database reader (just enough of R's XDR serialization format for character vectors and lists)

_R_NIL, _R_REF, _R_SYMBOL, _R_PAIRLIST, _R_CHARSXP = 254, 255, 1, 2, 9
_R_LOGICAL, _R_INTEGER, _R_REAL, _R_STRING, _R_LIST = 10, 13, 14, 16, 19
_R_LATIN1_FLAG = 1 << 2  # in the "levels" bits of a CHARSXP


class _RUnserializer:
    """Decodes one R object serialized in XDR (big-endian) format, version 2 or 3."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR-format R serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self._int(), self._int()  # writer R version, minimal reader R version
        if version == 3:
            encoding_length = self._int()  # followed by the native encoding name
            self.pos += encoding_length

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self) -> object:
        """Return str/None for strings, list for vectors (names dropped), ('sym', name), or a dict for pairlists."""
        flags = self._int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attributes, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == _R_NIL:
            return None
        if kind == _R_REF:
            return self.refs[(flags >> 8) - 1]
        if kind == _R_SYMBOL:
            symbol = ("sym", self.read())
            self.refs.append(symbol)
            return symbol
        if kind == _R_CHARSXP:
            length = self._int()
            if length == -1:
                return None  # NA_character_
            raw = self.data[self.pos:self.pos + length]
            self.pos += length
            return raw.decode("latin-1" if levels & _R_LATIN1_FLAG else "utf-8")
        if kind in (_R_STRING, _R_LIST):
            values = [self.read() for _ in range(self._int())]
        elif kind in (_R_LOGICAL, _R_INTEGER, _R_REAL):
            length = self._int()
            code, size = ("i", 4) if kind != _R_REAL else ("d", 8)
            values = list(struct.unpack_from(f">{length}{code}", self.data, self.pos))
            self.pos += size * length
        elif kind == _R_PAIRLIST:
            if has_attributes:
                self.read()  # attributes of a pairlist node: none that matter here
            tag = self.read() if has_tag else None
            head, tail = self.read(), self.read()
            return {"tag": tag, "value": head, "next": tail}
        else:
            raise ValueError(f"unsupported R object type {kind}")
        attributes = self.read() if has_attributes else None
        names = _r_names(attributes)
        return dict(zip(names, values)) if names else values


def _r_names(attributes: object) -> list[str] | None:
    """The `names` attribute from an attribute pairlist, if present."""
    while isinstance(attributes, dict):
        if attributes["tag"] == ("sym", "names"):
            return attributes["value"]
        attributes = attributes["next"]
    return None


def read_r_lazyload_db(rdx_path: Path, rdb_path: Path) -> dict[str, object]:
    """Read every variable of an R lazy-load database (the `.rdx` index + zlib-compressed `.rdb` records)."""
    index = _RUnserializer(gzip.decompress(rdx_path.read_bytes())).read()
    if index["compressed"] != [1]:
        raise ValueError(f"{rdb_path}: only zlib-compressed lazy-load databases are supported")
    database = rdb_path.read_bytes()
    variables = {}
    for name, (offset, length) in index["variables"].items():
        record = database[offset:offset + length]
        (expected_size,) = struct.unpack(">I", record[:4])
        payload = zlib.decompress(record[4:])
        if len(payload) != expected_size:
            raise ValueError(f"{rdb_path}: record {name!r} has the wrong size")
        variables[name] = _RUnserializer(payload).read()
    return variables


# ---------------------------------------------------------------------------------------------------------------
# Demo corpus: Jane Austen

AUSTEN_TRAIN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey")
AUSTEN_HELDOUT_NOVEL = "persuasion"
AUSTEN_HELDOUT_CHAPTERS = 12  # Volume I of Persuasion: about 6% of the size of the training text
_CHAPTER_HEADING = re.compile(r"(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\.?")
_VOLUME_HEADING = re.compile(r"VOLUME\s+[IVX]+")
_END_OF_NOVEL = {"THE END", "FINIS", "Finis", "A NOTE ON THE TEXT"}  # the last one starts a modern editor's note
_ITALICS = re.compile(r"_([^_]+)_")


def novel_chapters(lines: list[str | None]) -> list[list[str]]:
    """Split a novel's wrapped lines into chapters of one-line paragraphs (title page, headings and notes dropped)."""
    chapters: list[list[str]] = []
    block: list[str] = []
    for line in [*lines, ""]:
        if line and line.strip():
            block.append(line.strip())
            continue
        if not block:
            continue
        paragraph = " ".join(" ".join(block).split())
        block = []
        if paragraph in _END_OF_NOVEL:
            break
        if _CHAPTER_HEADING.fullmatch(paragraph):
            chapters.append([])
        elif not chapters or _VOLUME_HEADING.fullmatch(paragraph):
            continue  # title page, or a volume heading between chapters
        elif paragraph.startswith("[") and paragraph.endswith("]"):
            continue  # bracketed editorial notes such as "[End volume one of this edition. ...]"
        elif not any(char.isalpha() for char in paragraph):
            continue  # scene breaks such as "* * * * *"
        else:
            chapters[-1].append(_ITALICS.sub(r"\1", paragraph))
    return chapters


def write_gzip_deterministic(path: Path, lines: list[str]) -> None:
    """Write lines as UTF-8 through `gzip -n -9` (no name or timestamp in the header), atomically."""
    if shutil.which("gzip") is None:
        sys.exit("error: `gzip` not found. Install gzip and try again.")
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    compressed = subprocess.run(["gzip", "-n", "-9", "-c"], input=text, capture_output=True, check=True).stdout
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(compressed)
    os.replace(temporary, path)


def build_demo() -> None:
    """Rebuild data/demo/train.txt.gz and heldout.txt.gz from the janeaustenr Debian package."""
    root, _ = fetch_package("r-cran-janeaustenr")
    data_dir = root / "usr/lib/R/site-library/janeaustenr/data"
    novels = read_r_lazyload_db(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
    chapters = {name: novel_chapters(lines) for name, lines in novels.items()}
    train = [paragraph for name in AUSTEN_TRAIN_NOVELS for chapter in chapters[name] for paragraph in chapter]
    train_set = set(train)
    heldout_all = [p for chapter in chapters[AUSTEN_HELDOUT_NOVEL][:AUSTEN_HELDOUT_CHAPTERS] for p in chapter]
    # Short lines such as '"Yes."' occur in several novels; keep the held-out set strictly unseen.
    heldout = [paragraph for paragraph in heldout_all if paragraph not in train_set]
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train", train), ("heldout", heldout)):
        path = DEMO_DIR / f"{name}.txt.gz"
        write_gzip_deterministic(path, lines)
        raw_size = sum(len(line.encode("utf-8")) + 1 for line in lines)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"  {path.relative_to(REPO_ROOT)}: {len(lines)} lines, {raw_size / 1e6:.2f} MB uncompressed, "
              f"{path.stat().st_size / 1e6:.2f} MB gzip, sha256 {digest}")
    for name in (*AUSTEN_TRAIN_NOVELS, AUSTEN_HELDOUT_NOVEL):
        print(f"  {name}: {len(chapters[name])} chapters")
    print(f"  dropped {len(heldout_all) - len(heldout)} held-out lines that also occur in train")


# ---------------------------------------------------------------------------------------------------------------
# Benchmark corpus: English from Debian documentation

TARGET_1X_BYTES = 23_700_000  # the seed benchmark corpus: 121k lines, 23.7 MB
_STOPWORDS = frozenset("the a an of to and in is are be that this for with it as or by on".split())


def looks_like_prose(paragraph: str) -> bool:
    """Keep sentences of English; drop code, tables, headings and other-language text."""
    words = paragraph.split()
    if len(paragraph) < 40 or len(words) < 6:
        return False
    visible = paragraph.replace(" ", "")
    letters = sum(1 for char in visible if "a" <= char.lower() <= "z")
    if letters < 0.75 * len(visible):
        return False
    return sum(1 for word in words if word.lower() in _STOPWORDS) >= 2


def blank_line_blocks(lines: list[str]) -> Iterator[list[str]]:
    """Group lines into blocks separated by blank lines."""
    block: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []


_RST_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_RST_LINK = re.compile(r"`([^`]*)`__?")
_RST_TARGET = re.compile(r"(\S)\s+<[^<>]*>$")  # "title <target>" in a role or link: keep the title
_RST_INLINE = re.compile(r"``(.*?)``|\*\*(.*?)\*\*|\*(\S.*?)\*|\|(\S.*?)\|_?")
_RST_BULLET = re.compile(r"^\s*(?:[-*+]|#\.|\d+[.)]|\(\w\)|:[\w ]+:)\s+")
_RST_LITERAL_DIRECTIVE = re.compile(r"\.\.\s+(code-block|code|sourcecode|literalinclude|highlight|kernel-doc|"
                                    r"doctest|testcode|productionlist|toctree|raw|csv-table|list-table|table|"
                                    r"only|graphviz|math|flat-table)::")


def rst_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of reStructuredText with directives, literal blocks, tables and inline markup removed."""
    skip_indent = None  # indentation deeper than this belongs to a literal block or directive body
    for block in blank_line_blocks(text.splitlines()):
        indent = len(block[0]) - len(block[0].lstrip())
        if skip_indent is not None and indent > skip_indent:
            continue
        skip_indent = None
        first = block[0].strip()
        if first.startswith(".."):
            if _RST_LITERAL_DIRECTIVE.match(first) or first.endswith("::") and not first.startswith(".. note"):
                skip_indent = indent
            continue
        if block[-1].rstrip().endswith("::"):
            skip_indent = indent
        if first[:1] in "+|=>" or any(set(line.strip()) <= set("=-~^*#+`'\"_:. ") for line in block):
            continue  # tables, doctests, and headings (underlined titles)
        paragraph = " ".join(_RST_BULLET.sub("", line).strip() for line in block)
        paragraph = _RST_ROLE.sub(lambda m: _RST_TARGET.sub(r"\1", m.group(1)), paragraph)
        paragraph = _RST_LINK.sub(lambda m: _RST_TARGET.sub(r"\1", m.group(1)), paragraph)
        paragraph = _RST_INLINE.sub(lambda m: next(g for g in m.groups() if g is not None), paragraph)
        paragraph = paragraph.rstrip(":") + ("." if paragraph.endswith("::") else "")
        yield " ".join(paragraph.split())


_POD_CODE = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+|[A-Z]<([^<>]*)>")
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_code(match: re.Match) -> str:
    inner = match.group(1) if match.group(1) is not None else match.group(2)
    code = match.group(0)[0]
    if code == "E":
        return _POD_ESCAPES.get(inner, "")
    if code in "XZ":
        return ""  # index entries and zero-width markers
    if code == "L":
        return inner.split("|", 1)[0] if "|" in inner else inner.strip('"/')
    return inner


def pod_paragraphs(text: str) -> Iterator[str]:
    """Ordinary (non-command, non-verbatim) paragraphs of Perl POD with formatting codes removed."""
    in_begin_block = False
    for block in blank_line_blocks(text.splitlines()):
        first = block[0]
        if first.startswith("=begin"):
            in_begin_block = True
        if first.startswith("=end"):
            in_begin_block = False
        if in_begin_block or first.startswith(("=", " ", "\t")):
            continue
        paragraph = " ".join(" ".join(block).split())
        for _ in range(4):  # formatting codes nest, e.g. C<< L<foo> >>
            paragraph = _POD_CODE.sub(_pod_code, paragraph)
        yield paragraph


class _HtmlParagraphs(html.parser.HTMLParser):
    """Collects the text of <p> elements, skipping anything inside <pre>, <code> blocks and tables."""

    _SKIPPED = frozenset({"pre", "table", "script", "style"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._parts: list[str] | None = None
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIPPED:
            self._skip_depth += 1
        elif tag == "p" and self._skip_depth == 0:
            self._flush()
            self._parts = []

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag == "p":
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._parts is not None and self._skip_depth == 0:
            self._parts.append(data)

    def _flush(self) -> None:
        if self._parts is not None:
            self.paragraphs.append(" ".join("".join(self._parts).split()))
        self._parts = None


def html_paragraphs(text: str) -> Iterator[str]:
    parser = _HtmlParagraphs()
    parser.feed(text)
    parser.close()
    parser._flush()
    yield from parser.paragraphs


def manpage_paragraphs(roff: str) -> Iterator[str]:
    """Render a man page with groff on one very long line per paragraph, without hyphenation or formatting."""
    rendered = subprocess.run(["groff", "-man", "-t", "-Tutf8", "-rLL=5000n", "-rHY=0", "-P-cbou"],
                              input=roff.encode("utf-8"), capture_output=True, check=True).stdout.decode("utf-8")
    for line in rendered.splitlines():
        yield " ".join(line.split())


def _read_text(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


BenchSource = tuple[str, Callable[[Path], list[Path]], Callable[[str], Iterator[str]]]
BENCH_SOURCES: list[BenchSource] = [
    ("python3.11-doc",
     lambda root: sorted((root / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt")), rst_paragraphs),
    ("linux-doc-6.1",
     lambda root: sorted(p for p in (root / "usr/share/doc/linux-doc-6.1/Documentation").rglob("*.rst.gz")
                         if "translations" not in p.parts), rst_paragraphs),
    ("postgresql-doc-15",
     lambda root: sorted((root / "usr/share/doc/postgresql-doc-15/html").glob("*.html")), html_paragraphs),
    ("perl-doc", lambda root: sorted((root / "usr/share/perl").rglob("*.pod")), pod_paragraphs),
    ("manpages", lambda root: sorted((root / "usr/share/man").rglob("*.gz")), manpage_paragraphs),
]


def bench_documents() -> list[list[list[str]]]:
    """For each source package, its documents (sorted by path), each a list of English paragraphs."""
    if shutil.which("groff") is None:
        sys.exit("error: `groff` not found (needed to render man pages). Install groff-base and try again.")
    sources = []
    for package, list_files, to_paragraphs in BENCH_SOURCES:
        root, _ = fetch_package(package)
        documents = [[p for p in to_paragraphs(_read_text(path)) if looks_like_prose(p)] for path in list_files(root)]
        documents = [document for document in documents if document]
        size = sum(len(p.encode("utf-8")) + 1 for document in documents for p in document)
        print(f"    {len(documents)} documents, {size / 1e6:.1f} MB of prose")
        sources.append(documents)
    return sources


def interleave_unique(sources: list[list[list[str]]]) -> Iterator[str]:
    """Paragraphs taking one document from each source in turn (so every prefix mixes all sources), no repeats."""
    seen: set[str] = set()
    for position in range(max(len(documents) for documents in sources)):
        for documents in sources:
            if position < len(documents):
                for paragraph in documents[position]:
                    if paragraph not in seen:
                        seen.add(paragraph)
                        yield paragraph


def take_bytes(paragraphs: Iterator[str], budget: int) -> list[str]:
    """Leading paragraphs up to (and including the one crossing) `budget` bytes of UTF-8 with newlines."""
    taken, size = [], 0
    for paragraph in paragraphs:
        if size >= budget:
            break
        taken.append(paragraph)
        size += len(paragraph.encode("utf-8")) + 1
    return taken


def write_text(path: Path, lines: list[str]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(line + "\n" for line in lines)
    os.replace(temporary, path)


def build_bench() -> None:
    """Write benchmarks/corpus/english-1x.txt (~23.7 MB) and english-5x.txt (five times the size)."""
    sources = bench_documents()
    unique = list(interleave_unique(sources))
    unique_size = sum(len(p.encode("utf-8")) + 1 for p in unique)
    print(f"  {len(unique)} unique paragraphs, {unique_size / 1e6:.1f} MB available")
    one_x = take_bytes(iter(unique), TARGET_1X_BYTES)
    if unique_size >= 5 * TARGET_1X_BYTES:
        five_x, how = take_bytes(iter(unique), 5 * TARGET_1X_BYTES), "unique text"
    else:
        five_x, how = one_x * 5, "english-1x.txt repeated five times (not enough unique text)"
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    for name, lines in (("english-1x.txt", one_x), ("english-5x.txt", five_x)):
        path = BENCH_DIR / name
        write_text(path, lines)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"  {path.relative_to(REPO_ROOT)}: {len(lines)} lines, {path.stat().st_size / 1e6:.1f} MB, "
              f"sha256 {digest}")
    print(f"  english-5x.txt is {how}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", choices=["demo", "bench"], help="demo: data/demo; bench: benchmarks/corpus")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"building the {args.corpus} corpus (downloads cached in {CACHE_DIR.relative_to(REPO_ROOT)})")
    if args.corpus == "demo":
        build_demo()
    else:
        build_bench()
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
