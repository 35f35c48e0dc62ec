"""Reading one-sequence-per-line text files: plain, gzipped, or JSON lines.

Lines are decoded strictly as UTF-8 so that a wrong encoding is reported with its file and line
instead of silently turning into replacement characters in the training data.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from distil.errors import DistilError

SUPPORTED = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz", ".gz", ".text")


@dataclass
class ReadStats:
    lines: int = 0
    empty: int = 0
    bad: int = 0
    bytes_done: int = 0
    bad_examples: list[str] = field(default_factory=list)


def check_input_files(paths: list[str]) -> list[Path]:
    """Fail early, before any work, on inputs that are missing, empty, or binary."""
    if not paths:
        raise DistilError("No input files were given. Pass one or more text files (one sequence per line).")
    checked = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise DistilError(f"The input file {path} does not exist. Check the path (and that the shell expanded any wildcard).")
        if path.is_dir():
            raise DistilError(f"The input {path} is a directory. Pass the text files inside it, e.g. {path}/*.txt.")
        if path.stat().st_size == 0:
            raise DistilError(f"The input file {path} is empty. Remove it from the inputs or point to the right file.")
        with _open_binary(path) as fh:
            try:
                head = fh.read(8192)
            except GZIP_DAMAGE as exc:
                raise damaged_gzip_error(path, _lines_before_damage(path), exc) from None
            except OSError as exc:
                raise DistilError(
                    f"The input file {path} cannot be read ({exc}). Check its permissions and the disk."
                ) from None
        if b"\x00" in head:
            raise DistilError(
                f"The input file {path} looks binary (it contains NUL bytes), not text. "
                "distil prepare reads UTF-8 text with one sequence per line (.txt, .txt.gz, .jsonl)."
            )
        if not head.strip():
            raise DistilError(f"The input file {path} holds only whitespace. Remove it from the inputs.")
        checked.append(path)
    return checked


def _open_binary(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _is_jsonl(path: Path) -> bool:
    suffixes = path.suffixes
    return ".jsonl" in suffixes or (".json" in suffixes and suffixes[-1] == ".gz")


class _RawPosition:
    """Bytes of the file on disk consumed so far (compressed bytes for .gz), for an honest progress bar."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw

    def __call__(self) -> int:
        return self.raw.tell()


def iter_lines(path: Path, stats: ReadStats, text_field: str = "text", skip_bad_lines: bool = False) -> Iterator[str]:
    """Yield the non-empty text sequences of one file, counting empty and skipped lines in `stats`."""
    jsonl = _is_jsonl(path)
    with open(path, "rb") as raw:
        fh = gzip.open(raw, "rb") if path.suffix == ".gz" else raw
        position = _RawPosition(raw)
        counted = 0  # bytes of this file already in stats.bytes_done (added as deltas: sources may be interleaved)
        lineno = 0
        lines = enumerate(fh, start=1)
        while True:
            try:
                lineno, line = next(lines)
            except StopIteration:
                break
            except GZIP_DAMAGE as exc:
                raise damaged_gzip_error(path, lineno, exc) from None
            stats.lines += 1
            if lineno % 4096 == 0:
                stats.bytes_done += position() - counted
                counted = position()
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                _bad_line(stats, skip_bad_lines, path, lineno,
                          f"is not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})",
                          "Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or")
                continue
            if "\x00" in text:
                _bad_line(stats, skip_bad_lines, path, lineno, "contains NUL bytes (binary data)", "Remove it, or")
                continue
            if jsonl:
                text = _json_text(text, path, lineno, text_field, stats, skip_bad_lines)
                if text is None:
                    continue
            text = text.strip()
            if not text:
                stats.empty += 1
                continue
            yield text
        stats.bytes_done += position() - counted


def _json_text(line: str, path: Path, lineno: int, text_field: str, stats: ReadStats, skip: bool) -> str | None:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        _bad_line(stats, skip, path, lineno, f"is not valid JSON ({exc.msg})", "Fix the line, or")
        return None
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise DistilError(
            f"{path}:{lineno} has no field {text_field!r} (it has: {keys}). "
            f"Pass --text-field with the name of the field that holds the text."
        )
    value = record[text_field]
    if not isinstance(value, str):
        _bad_line(stats, skip, path, lineno, f"has a non-string {text_field!r} field", "Fix the line, or")
        return None
    return value


GZIP_DAMAGE = (EOFError, gzip.BadGzipFile, zlib.error)


def damaged_gzip_error(path: Path, lines_read: int, exc: BaseException) -> DistilError:
    """One paragraph for a .gz file that is cut short or corrupted, saying how far reading got."""
    text = str(exc)
    if isinstance(exc, EOFError):
        problem = "it ends before its compressed data does (a truncated file: an interrupted download or copy?)"
    elif "CRC check failed" in text:
        problem = "its CRC checksum does not match its content (the data is corrupted)"
    elif "Not a gzipped file" in text:
        problem = "it is not gzip data (a wrong .gz extension?)"
    else:
        problem = f"its compressed data is damaged ({text})"
    return DistilError(
        f"The input file {path} is damaged: {problem}; reading stopped after line {lines_read:,}. Nothing was "
        f"written. Get an intact copy (`gzip -t {path}` checks one), or leave the file out of the inputs."
    )


def _lines_before_damage(path: Path) -> int:
    lines = 0
    try:
        with gzip.open(path, "rb") as fh:
            for _ in fh:
                lines += 1
    except GZIP_DAMAGE:
        pass
    return lines


def _bad_line(stats: ReadStats, skip: bool, path: Path, lineno: int, problem: str, remedy: str) -> None:
    record_bad(stats, skip, f"{path}:{lineno}", problem, f"{remedy} pass --skip-bad-lines to skip such lines")


def record_bad(stats: ReadStats, skip: bool, where: str, problem: str, remedy: str) -> None:
    """Stop at a bad line or row, or (with --skip-bad-lines) count it and keep the first few for the report."""
    if not skip:
        raise DistilError(f"{where} {problem}. Nothing was written. {remedy} (they are counted and reported).")
    stats.bad += 1
    if len(stats.bad_examples) < 5:
        stats.bad_examples.append(f"{where} {problem}")


def input_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)
