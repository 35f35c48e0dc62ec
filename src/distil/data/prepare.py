"""`distil prepare`: text files -> framed, cleaned token ids in memory-mapped shards + token counts.

The seed pickled a Python list of arrays (RAM grows with the corpus) and tokenized one line at a time.
Here lines stream through the Rust tokenizer in large batches (it uses every core and releases the GIL,
so the next batch is encoded while this one is framed), framing/splitting/filtering is vectorised in
numpy, and ids are appended to flat files. Memory stays flat in corpus size and output is byte-identical
for identical inputs.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from distil.data import shards
from distil.data.sources import plan_sources, source_summary
from distil.data.textfiles import ReadStats
from distil.errors import DistilError
from distil.disk_space import directory_bytes, disk_space_errors
from distil.outputs import atomic_output_dir, locks_output, write_json_atomic

log = logging.getLogger(__name__)

LENGTH_HISTOGRAM_CAP = 1 << 16


@dataclass(frozen=True)
class Framing:
    """The special tokens a sequence starts and ends with, taken from the tokenizer itself."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.suffix)


def framing_for(tokenizer) -> Framing:
    """What the tokenizer adds around one sequence; end-of-text on both sides when it adds nothing.

    BERT-family tokenizers add [CLS] ... [SEP] and RoBERTa-family <s> ... </s> on their own. GPT-2-family
    tokenizers add nothing; like the seed, such sequences are framed with the end-of-text token on both
    sides so that the model sees document boundaries.
    """
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    if bare and framed and len(framed) > len(bare):
        start = next(i for i in range(len(framed)) if framed[i : i + len(bare)] == bare)
        prefix, suffix = tuple(framed[:start]), tuple(framed[start + len(bare):])
    else:
        prefix, suffix = (), ()
    boundary = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if not prefix and not suffix and boundary is None:
        raise DistilError(
            "The tokenizer adds no special tokens and has neither a beginning- nor an end-of-text token, so "
            "sequences cannot be framed. Use a tokenizer with [CLS]/[SEP], <s>/</s> or an end-of-text token."
        )
    if not prefix and boundary is not None:
        prefix = (boundary,)
    if not suffix and end is not None:
        suffix = (end,)
    return Framing(prefix, suffix)


@dataclass
class SplitWriter:
    """Appends framed sequences of one split to its token and offset files."""

    root: Path
    split: str
    dtype: np.dtype
    vocab_size: int
    count_tokens: bool
    sequences: int = 0
    tokens: int = 0
    length_hist: np.ndarray = field(default_factory=lambda: np.zeros(LENGTH_HISTOGRAM_CAP, dtype=np.int64))
    counts: np.ndarray | None = None

    def __post_init__(self):
        self._tokens = open(shards.tokens_path(self.root, self.split), "wb")
        self._offsets = open(shards.offsets_path(self.root, self.split), "wb")
        self._offsets.write(np.zeros(1, dtype="<i8").tobytes())
        if self.count_tokens:
            self.counts = np.zeros(self.vocab_size, dtype=np.int64)

    def write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        if len(lengths) == 0:
            return
        self._tokens.write(ids.astype(self.dtype, copy=False).tobytes())
        ends = self.tokens + np.cumsum(lengths, dtype=np.int64)
        self._offsets.write(ends.astype("<i8").tobytes())
        self.tokens = int(ends[-1])
        self.sequences += len(lengths)
        self.length_hist += np.bincount(np.minimum(lengths, LENGTH_HISTOGRAM_CAP - 1), minlength=LENGTH_HISTOGRAM_CAP)
        if self.counts is not None:
            self.counts += np.bincount(ids, minlength=self.vocab_size)[: self.vocab_size]

    def close(self) -> dict:
        self._tokens.close()
        self._offsets.close()
        return {"sequences": self.sequences, "tokens": self.tokens, **_length_stats(self.length_hist)}


def _length_stats(hist: np.ndarray) -> dict:
    total = int(hist.sum())
    if total == 0:
        return {"length_min": 0, "length_max": 0, "length_mean": 0.0, "length_p50": 0, "length_p95": 0}
    nonzero = np.nonzero(hist)[0]
    cdf = np.cumsum(hist)
    lengths = np.arange(len(hist))
    return {
        "length_min": int(nonzero[0]),
        "length_max": int(nonzero[-1]),
        "length_mean": round(float((hist * lengths).sum() / total), 3),
        "length_p50": int(np.searchsorted(cdf, 0.5 * total)),
        "length_p95": int(np.searchsorted(cdf, 0.95 * total)),
    }


@dataclass
class CleaningStats:
    sequences_in: int = 0
    split_lines: int = 0
    extra_chunks: int = 0
    dropped_short: int = 0
    dropped_unknown: int = 0


def frame_and_clean(
    ids_per_line: list[list[int]],
    framing: Framing,
    max_length: int,
    min_length: int,
    unk_id: int | None,
    max_unk_fraction: float,
    stats: CleaningStats,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut long lines into chunks, frame every chunk, drop short and mostly-unknown ones (vectorised).

    Returns the framed ids back to back and the length of each kept sequence.
    """
    body_max = max_length - framing.size
    line_lens = np.fromiter(map(len, ids_per_line), dtype=np.int64, count=len(ids_per_line))
    # chain.from_iterable feeds numpy from C; a generator expression would run Python bytecode per token.
    flat = np.fromiter(itertools.chain.from_iterable(ids_per_line), dtype=np.int64, count=int(line_lens.sum()))
    stats.sequences_in += len(line_lens)

    # Chunking: a line of L body tokens becomes ceil(L / body_max) chunks, the last one possibly short.
    n_chunks = np.maximum(1, -(-line_lens // body_max))
    long_lines = n_chunks > 1
    stats.split_lines += int(long_lines.sum())
    stats.extra_chunks += int((n_chunks - 1).sum())
    line_starts = np.cumsum(line_lens) - line_lens
    chunk_line = np.repeat(np.arange(len(line_lens)), n_chunks)
    chunk_rank = np.arange(len(chunk_line)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    body_starts = line_starts[chunk_line] + chunk_rank * body_max
    body_lens = np.minimum(body_max, line_lens[chunk_line] - chunk_rank * body_max)
    framed_lens = body_lens + framing.size

    keep = framed_lens >= min_length
    stats.dropped_short += int((~keep).sum())
    if unk_id is not None and len(flat):
        is_unk = np.concatenate(([0], np.cumsum(flat == unk_id)))
        unk_per_chunk = is_unk[body_starts + body_lens] - is_unk[body_starts]
        too_unknown = keep & (unk_per_chunk >= max_unk_fraction * framed_lens)
        stats.dropped_unknown += int(too_unknown.sum())
        keep &= ~too_unknown
    body_starts, body_lens, framed_lens = body_starts[keep], body_lens[keep], framed_lens[keep]

    out_starts = np.cumsum(framed_lens) - framed_lens
    out = np.empty(int(framed_lens.sum()), dtype=np.int64)
    for j, tok in enumerate(framing.prefix):
        out[out_starts + j] = tok
    for j, tok in enumerate(framing.suffix):
        out[out_starts + len(framing.prefix) + body_lens + j] = tok
    # Gather every body token: position k inside chunk c goes from flat[body_starts[c] + k]
    # to out[out_starts[c] + len(prefix) + k].
    total_body = int(body_lens.sum())
    within = np.arange(total_body) - np.repeat(np.cumsum(body_lens) - body_lens, body_lens)
    out[np.repeat(out_starts + len(framing.prefix), body_lens) + within] = flat[np.repeat(body_starts, body_lens) + within]
    return out, framed_lens


# The tokenizer's time per character grows with the length of the text it is given (about 3x from a few KB to
# MBs, measured) and one text is encoded on one thread: a multi-MB line took ~40x longer per byte than the same
# text as many lines. Lines longer than LONG_LINE_CHARS are therefore encoded as pieces of about PIECE_CHARS,
# cut where the tokenizer's pre-tokenizer splits anyway, and their ids put back together.
LONG_LINE_CHARS = 1 << 14
PIECE_CHARS = 1 << 13
_SPACE_BEFORE_WORD = re.compile(r" (?=\S)")
# Spaces of every kind the pre-tokenizers treat differently: runs, punctuation, digits, accents, CJK, specials.
_CUT_PROBE = ("Hello  world, it's 2024: naïve café costs $3.50 -- don't   stop!  東京 and [MASK] tokens; e-mail "
              "x@y.z 12345678 done.\tTabs\tand UPPER lower MiXeD. ") * 4


def split_at_spaces(text: str, piece_chars: int) -> list[str]:
    """`text` in pieces of at most about `piece_chars` characters, each cut just before a space that is followed by
    a word (the last space of a run), so the next piece starts with " word" as the pre-tokenizer would see it. A
    stretch without such a space stays whole."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        at = text.rfind(" ", start + 1, start + piece_chars)
        while at > start and text[at + 1].isspace():
            at = text.rfind(" ", start + 1, at)
        if at <= start:
            match = _SPACE_BEFORE_WORD.search(text, start + piece_chars)
            if match is None:
                break
            at = match.start()
        pieces.append(text[start:at])
        start = at
    pieces.append(text[start:])
    return pieces


def _encode_batch(encoder, texts: list[str]) -> list[list[int]]:
    return [enc.ids for enc in encoder.encode_batch(texts, add_special_tokens=False)]


def encode_lines(encoder, lines: list[str], piece_chars: int | None) -> list[list[int]]:
    """Token ids of each line; lines longer than LONG_LINE_CHARS are encoded in pieces (see split_at_spaces)."""
    if piece_chars is None or all(len(line) <= LONG_LINE_CHARS for line in lines):
        return _encode_batch(encoder, lines)
    texts, owners = [], []
    for index, line in enumerate(lines):
        pieces = split_at_spaces(line, piece_chars) if len(line) > LONG_LINE_CHARS else [line]
        texts.extend(pieces)
        owners.extend([index] * len(pieces))
    ids: list[list[int]] = [[] for _ in lines]
    for owner, piece_ids in zip(owners, _encode_batch(encoder, texts)):
        ids[owner].extend(piece_ids)
    return ids


def cuts_are_exact(encoder) -> bool:
    """Whether text cut by split_at_spaces encodes to the same ids as the whole text. True for tokenizers whose
    pre-tokenizer splits at spaces (BERT's, byte-level BPE, Metaspace); not for one that prepends a marker to every
    text it is given, or has no pre-tokenizer at all (merges may then cross spaces)."""
    whole = _encode_batch(encoder, [_CUT_PROBE])[0]
    cut = [i for ids in _encode_batch(encoder, split_at_spaces(_CUT_PROBE, 8)) for i in ids]
    return cut == whole


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _resolve_max_length(tokenizer, max_length: int | None, framing: Framing) -> int:
    if max_length is None:
        model_max = getattr(tokenizer, "model_max_length", None) or 512
        max_length = int(min(model_max, 512))
    if max_length <= framing.size:
        raise DistilError(
            f"--max-length {max_length} leaves no room for text once the {framing.size} framing tokens are added. "
            "Use a larger value (BERT-style models usually take 512)."
        )
    return max_length


def _apply_thread_count(threads: int | None) -> None:
    # The Rust tokenizer sizes its thread pool from these on first use.
    if threads is not None:
        if threads < 1:
            raise DistilError(f"--threads must be at least 1, got {threads}.")
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def _expected_output_bytes(tmp: Path, plan, stats: ReadStats) -> int | None:
    """The size of the whole output, extrapolated from what was written for the share of the input read so far."""
    total, done = plan.progress_total, plan.position(stats)
    if not total or not done:
        return None
    return int(directory_bytes(tmp) * total / min(done, total))


@locks_output("prepare")
def prepare(
    inputs: list[str] | None = None,
    tokenizer: str | None = None,
    output_dir: str | None = None,
    heldout_fraction: float = 0.0,
    heldout_files: list[str] | None = None,
    max_length: int | None = None,
    min_length: int = 12,
    max_unk_fraction: float = 0.5,
    text_field: str = "text",
    skip_bad_lines: bool = False,
    batch_size: int = 2000,
    threads: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    streaming: bool = False,
    heldout_split: str | None = None,
    mix: list[str] | None = None,
) -> dict:
    """Tokenize `inputs` (text files), a `dataset` or a weighted `mix` of sources (see distil.data.sources) into
    `output_dir`; returns the manifest (also written as manifest.json)."""
    if tokenizer is None or output_dir is None:
        raise TypeError("prepare() needs tokenizer and output_dir")
    from distil.loading import load_tokenizer

    heldout_files = list(heldout_files or [])
    if not 0.0 <= heldout_fraction < 1.0:
        raise DistilError(f"--heldout must be a fraction in [0, 1), got {heldout_fraction}.")
    if heldout_fraction and heldout_files:
        raise DistilError("Give either --heldout FRACTION or --heldout-file FILE, not both.")
    if not 0.0 < max_unk_fraction <= 1.0:
        raise DistilError(f"--max-unk-fraction must be in (0, 1], got {max_unk_fraction}.")
    if batch_size < 1:
        raise DistilError(f"--batch-size must be at least 1, got {batch_size}.")
    plan = plan_sources(inputs, heldout_files, heldout_fraction, dataset=dataset, dataset_config=dataset_config,
                        split=split, streaming=streaming, heldout_split=heldout_split, mix=mix, text_field=text_field,
                        skip_bad_lines=skip_bad_lines, seed=seed)
    _apply_thread_count(threads)

    tok = load_tokenizer(tokenizer)
    framing = framing_for(tok)
    max_length = _resolve_max_length(tok, max_length, framing)
    vocab_size = len(tok)
    dtype = shards.token_dtype(vocab_size)
    encoder = tok.backend_tokenizer
    encoder.no_truncation()
    encoder.no_padding()
    unk_id = tok.unk_token_id

    started = time.perf_counter()
    read_stats = ReadStats()
    cleaning = CleaningStats()
    rng = np.random.default_rng(seed)

    piece_chars = PIECE_CHARS if cuts_are_exact(encoder) else None
    if piece_chars is None:
        log.info("This tokenizer reads text cut at spaces differently from whole text: long lines are tokenized whole.")

    def encode(batch: list[str]) -> list[list[int]]:
        return encode_lines(encoder, batch, piece_chars)

    with atomic_output_dir(output_dir, overwrite, command="prepare") as tmp, \
            disk_space_errors(tmp, lambda: _expected_output_bytes(tmp, plan, read_stats), partial=tmp):
        writers = {
            "train": SplitWriter(tmp, "train", dtype, vocab_size, count_tokens=True),
            "heldout": SplitWriter(tmp, "heldout", dtype, vocab_size, count_tokens=False),
        }
        bar = tqdm(total=plan.progress_total, unit=plan.progress_unit, unit_scale=True, desc="prepare",
                   disable=not progress, smoothing=0.1)
        with ThreadPoolExecutor(max_workers=1) as pool:
            for source in plan.sources:
                lines = source.lines(read_stats)
                pending = None
                # Pipeline: the Rust tokenizer encodes batch k+1 (GIL released) while numpy frames batch k.
                for batch in _batches(lines, batch_size):
                    future = pool.submit(encode, batch)
                    if pending is not None:
                        _write_batch(pending.result(), source.split, writers, framing, max_length, min_length, unk_id,
                                     max_unk_fraction, heldout_fraction, rng, cleaning)
                    pending = future
                    bar.update(plan.position(read_stats) - bar.n)
                if pending is not None:
                    _write_batch(pending.result(), source.split, writers, framing, max_length, min_length, unk_id,
                                 max_unk_fraction, heldout_fraction, rng, cleaning)
                bar.update(plan.position(read_stats) - bar.n)
        bar.close()
        split_stats = {name: w.close() for name, w in writers.items()}
        if split_stats["train"]["sequences"] == 0 and heldout_fraction > 0 and split_stats["heldout"]["sequences"]:
            raise DistilError(
                f"No training sequences were left: the held-out draw (--heldout {heldout_fraction}) kept "
                f"{split_stats['heldout']['sequences']} sequences of the {read_stats.lines} lines read apart, and the "
                f"rest (if any) was dropped by cleaning ({cleaning.dropped_short} shorter than --min-length "
                f"{min_length}, {cleaning.dropped_unknown} mostly unknown tokens). Lower --heldout (0.01 keeps 1% of "
                "the lines apart) or give more text."
            )
        if split_stats["train"]["sequences"] == 0:
            raise DistilError(
                f"No training sequences were left after cleaning ({read_stats.lines} lines read, "
                f"{cleaning.dropped_short} shorter than --min-length {min_length}, {cleaning.dropped_unknown} mostly unknown "
                "tokens). Check the input text and tokenizer, or lower --min-length."
            )
        np.save(tmp / shards.TOKEN_COUNTS, writers["train"].counts, allow_pickle=False)
        manifest = {
            "format_version": shards.FORMAT_VERSION,
            "tokenizer": {
                "name_or_path": tokenizer,
                "class": type(tok).__name__,
                "vocab_fingerprint": shards.vocabulary_fingerprint(tok),
            },
            "vocab_size": vocab_size,
            "token_dtype": dtype.str,
            "special_ids": {
                "prefix": list(framing.prefix), "suffix": list(framing.suffix),
                "pad": tok.pad_token_id, "unk": tok.unk_token_id, "mask": tok.mask_token_id,
                "bos": tok.bos_token_id, "eos": tok.eos_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id,
                "all": sorted(set(tok.all_special_ids)),
            },
            "max_length": max_length,
            "min_length": min_length,
            "max_unk_fraction": max_unk_fraction,
            "heldout": plan.heldout_manifest(heldout_fraction, seed),
            "inputs": plan.inputs,
            "lines": {"read": read_stats.lines, "empty": read_stats.empty, "bad_skipped": read_stats.bad},
            "cleaning": vars(cleaning),
            "splits": split_stats,
            **plan.extra_manifest(),
        }
        write_json_atomic(tmp / shards.MANIFEST, manifest)
    elapsed = time.perf_counter() - started
    _report(manifest, read_stats, elapsed, output_dir)
    return manifest


def _write_batch(ids_per_line, split, writers, framing, max_length, min_length, unk_id, max_unk_fraction,
                 heldout_fraction, rng, cleaning) -> None:
    if split == "train" and heldout_fraction > 0:
        to_heldout = rng.random(len(ids_per_line)) < heldout_fraction
        groups = [("heldout", [x for x, h in zip(ids_per_line, to_heldout) if h]),
                  ("train", [x for x, h in zip(ids_per_line, to_heldout) if not h])]
    else:
        groups = [(split, ids_per_line)]
    for name, group in groups:
        if group:
            ids, lengths = frame_and_clean(group, framing, max_length, min_length, unk_id, max_unk_fraction, cleaning)
            writers[name].write(ids, lengths)


def _report(manifest: dict, read_stats: ReadStats, elapsed: float, output_dir: str) -> None:
    c, s = manifest["cleaning"], manifest["splits"]
    rate = read_stats.lines / elapsed if elapsed > 0 else float("inf")
    lines = [
        f"prepared {output_dir} in {elapsed:.1f} s: {read_stats.lines:,} lines read ({rate:,.0f} lines/s), "
        f"{read_stats.empty:,} empty, {read_stats.bad:,} bad lines skipped",
        f"  {c['split_lines']:,} long lines split into {c['extra_chunks']:,} extra chunks (max length {manifest['max_length']}); "
        f"dropped {c['dropped_short']:,} short (< {manifest['min_length']} tokens) and {c['dropped_unknown']:,} mostly-unknown",
    ]
    for split, info in s.items():
        if info["sequences"]:
            lines.append(f"  {split}: {info['sequences']:,} sequences, {info['tokens']:,} tokens, "
                         f"mean length {info['length_mean']}, max {info['length_max']}")
    lines.extend(source_summary(manifest))
    for example in read_stats.bad_examples:
        lines.append(f"  skipped: {example}")
    print("\n".join(lines))
