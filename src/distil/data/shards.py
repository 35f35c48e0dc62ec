"""The on-disk format of prepared data, shared by the writer (prepare) and the readers (dataset, evaluate).

A prepared directory holds, per split (`train`, `heldout`):
  <split>.tokens.bin   all sequences' token ids back to back, uint16 (vocab < 65,536) or uint32
  <split>.offsets.bin  int64, n_sequences + 1 entries; sequence i is tokens[offsets[i]:offsets[i+1]]
and once:
  token_counts.npy     int64 (vocab_size,), occurrences of each id in the train split (for smoothed masking)
  manifest.json        tokenizer identity, special ids, counts, length statistics, format version

Raw little-endian arrays rather than pickles: memory-mapped, readable from any language, safe to load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from distil.errors import DistilError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.npy"
SPLITS = ("train", "heldout")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<u4")


def tokens_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.tokens.bin"


def offsets_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.offsets.bin"


def vocabulary_fingerprint(tokenizer) -> str:
    """A hash of the token -> id table, so data can be matched to a tokenizer whatever its name or path."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise DistilError(
            f"{root} is not a prepared data directory (it has no {MANIFEST}). Create one with "
            f"`distil prepare FILES --tokenizer TOKENIZER --output-dir {root}`."
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DistilError(
            f"{root} was prepared with data format {manifest.get('format_version')}, this distil reads format "
            f"{FORMAT_VERSION}. Run distil prepare again on the text."
        )
    return manifest


def open_split(root: str | Path, split: str) -> tuple[np.memmap, np.ndarray]:
    """Memory-map one split: (tokens, offsets). Nothing is read into RAM until indexed."""
    root = Path(root)
    manifest = read_manifest(root)
    info = manifest["splits"].get(split)
    if info is None or info["sequences"] == 0:
        raise DistilError(
            f"{root} has no {split!r} split. Prepare it with --heldout FRACTION or --heldout-file FILE."
            if split == "heldout" else f"{root} has no {split!r} sequences."
        )
    dtype = np.dtype(manifest["token_dtype"])
    tokens = np.memmap(tokens_path(root, split), dtype=dtype, mode="r")
    offsets = np.memmap(offsets_path(root, split), dtype="<i8", mode="r")
    if len(offsets) != info["sequences"] + 1 or offsets[-1] != len(tokens):
        raise DistilError(f"The {split} files in {root} do not match its manifest (truncated copy?). Prepare the data again.")
    return tokens, offsets


def load_token_counts(root: str | Path) -> np.ndarray:
    return np.load(Path(root) / TOKEN_COUNTS, allow_pickle=False)
