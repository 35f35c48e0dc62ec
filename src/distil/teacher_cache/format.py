"""The on-disk format of a teacher-signal store, shared by the writer (`distil cache-teacher`) and the reader.

A store directory holds:
  plan.json        the settings it is being written with (teacher identity, k, k', temperature, data fingerprint,
                   dtypes, shard size); a rerun with other settings is refused, one with the same ones resumes
  manifest.json    plan.json plus the finished shards: written once every shard is complete (the store is usable
                   only then)
  teacher/         the teacher's config.json and tokenizer (training from the store loads no teacher weights)
  shard-NNNNN/     sequences [N * shard_size, (N + 1) * shard_size) of the prepared split, each a directory of
                   .npy arrays (memory-mapped when read), written as .shard-NNNNN.tmp-PID and renamed when complete:
    offsets.npy      int64 (sequences + 1,): sequence i of the shard is rows offsets[i]:offsets[i + 1]
    top_ids.npy      (positions, k) uint16 (vocabularies < 65,536) or int32, by decreasing probability
    top_logp.npy     (positions, k) float16 log-probabilities at the store's temperature     [logprobs: float16]
    head_logp.npy    (positions, 8) float16: the 8 most probable tokens' log-probabilities    [logprobs: compact]
    tail_poly.npy    (positions, 4) float32: a cubic in log(rank + 1) through the other k - 8  [logprobs: compact]
    log_rest.npy     (positions,) float16 log of the mass outside the top-k
    sample_ids.npy / sample_logp.npy / sample_logw.npy   (positions, k') draws from the tail with log p and the
                     importance log-weight (with --sampled)
    hidden.npy       (positions, hidden) float16 last hidden state (with --hidden-states last)
    mlm_input.npy    (positions,) ids: the masked input the teacher scored (masked-LM teachers only)
    mlm_target.npy   (positions,) uint8: 1 at the sequence's MLM targets (masked-LM teachers only)
One row per real position of every sequence, in order: the sequences are the prepared data's, as prepared (or cut
to the store's max_length as training cuts them).

A masked-LM teacher is run on masked text, as a live one is (it sees what the student sees): each sequence is
masked once, on its own, with the training masker and a generator seeded by the store's seed and the sequence's
index, and the masked input and its targets are stored (the manifest's `masking` holds the settings, each shard's
entry a digest of its two mask arrays). Training from the store gives the student these inputs and labels: the
masks are static per sequence. Storing them, rather than redrawing them from the seed at training time, keeps them
exact whatever torch version, device or random-number implementation trains from the store (3 bytes a position).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from distil.data import shards as data_shards
from distil.errors import DistilError

FORMAT_VERSION = 1
KIND = "distil-teacher-cache"
PLAN, MANIFEST, TEACHER_DIR = "plan.json", "manifest.json", "teacher"
LOGPROB_FORMATS = ("float16", "compact")
COMPACT_HEAD, COMPACT_DEGREE = 8, 3
# Settings that must be equal for a rerun to resume (the rest of the plan is derived from them).
PLAN_KEYS = ("format_version", "teacher", "vocab_size", "tokenizer_fingerprint", "objective", "k", "sampled",
             "temperature", "proposal_temperature", "seed", "split", "data", "ids_dtype", "logprobs",
             "hidden_states", "hidden_size", "shard_size", "masking")
MASK_ARRAYS = ("mlm_input", "mlm_target")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def data_fingerprint(data_dir: str | Path, split: str) -> str:
    """A hash of the prepared manifest and of the split's token and offset files: the exact sequences."""
    root = Path(data_dir)
    manifest = data_shards.read_manifest(root)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(manifest, sort_keys=True).encode("utf-8"))
    for path in (data_shards.offsets_path(root, split), data_shards.tokens_path(root, split)):
        with open(path, "rb") as fh:
            while block := fh.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def masks_digest(shard_dir: Path) -> str:
    """A hash of a shard's stored masks (masked inputs and targets), recorded in the manifest and checked on read."""
    digest = hashlib.blake2b(digest_size=16)
    for name in MASK_ARRAYS:
        array = np.load(Path(shard_dir) / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode("utf-8"))
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def config_hash(model_config) -> str:
    """A hash of a model configuration, without the fields that name where or with what it was saved."""
    values = {k: v for k, v in model_config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _compact_basis(k: int) -> np.ndarray:
    """(k - head, degree + 1) powers of x in [0, 1], x = log(rank + 1) rescaled over the tail's ranks."""
    ranks = np.arange(COMPACT_HEAD, k, dtype=np.float64)
    lo, hi = math.log(COMPACT_HEAD + 1), math.log(k)
    x = (np.log(ranks + 1) - lo) / max(hi - lo, 1e-12)
    return np.stack([x**d for d in range(COMPACT_DEGREE + 1)], axis=1)


def logprob_format_for(requested: str, k: int) -> str:
    """compact needs more tokens than its exact head and curve hold; a smaller k is stored as float16."""
    return requested if requested == "float16" or k > COMPACT_HEAD + COMPACT_DEGREE + 1 else "float16"


def encode_logprobs(top_logp: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """The arrays that store (P, k) log-probabilities sorted by decreasing value in format `fmt`."""
    if fmt == "float16":
        return {"top_logp": top_logp.astype(np.float16)}
    basis = _compact_basis(top_logp.shape[1])
    tail = top_logp[:, COMPACT_HEAD:].astype(np.float64)
    coefs = np.linalg.lstsq(basis, tail.T, rcond=None)[0].T
    return {"head_logp": top_logp[:, :COMPACT_HEAD].astype(np.float16), "tail_poly": coefs.astype(np.float32)}


def decode_logprobs(arrays: dict, fmt: str, k: int) -> torch.Tensor:
    """(P, k) float32 log-probabilities from what `encode_logprobs` stored (arrays: name -> array of P rows)."""
    if fmt == "float16":
        return torch.from_numpy(np.asarray(arrays["top_logp"], dtype=np.float32))
    head = torch.from_numpy(np.asarray(arrays["head_logp"], dtype=np.float32))
    coefs = torch.from_numpy(np.asarray(arrays["tail_poly"], dtype=np.float32))
    basis = torch.from_numpy(_compact_basis(k).astype(np.float32))
    return torch.cat([head, coefs @ basis.T], dim=1)


def logprob_arrays(fmt: str) -> tuple[str, ...]:
    return ("top_logp",) if fmt == "float16" else ("head_logp", "tail_poly")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DistilError(f"{path} cannot be read as JSON ({exc}). The store is damaged: write it again with "
                          "distil cache-teacher --overwrite.") from None


def read_store_manifest(store: str | Path) -> dict:
    """The manifest of a finished store, or a one-paragraph DistilError that says what is wrong."""
    root = Path(store)
    if not root.is_dir():
        raise DistilError(f"teacher.cache {root} does not exist or is not a directory. Write a teacher-signal store "
                          f"with `distil cache-teacher --teacher TEACHER --data DATA --output {root}`.")
    manifest = read_json(root / MANIFEST)
    if manifest is None:
        if (root / PLAN).exists():
            raise DistilError(f"The teacher-signal store {root} is unfinished (some shards were not written: the run "
                              "was stopped or some processes have not finished). Run the same distil cache-teacher "
                              "command again: finished shards are kept.")
        raise DistilError(f"{root} is not a teacher-signal store (it has no {MANIFEST}). Write one with "
                          f"`distil cache-teacher --teacher TEACHER --data DATA --output {root}`.")
    if manifest.get("kind") != KIND or manifest.get("format_version") != FORMAT_VERSION:
        raise DistilError(f"{root} holds a teacher-signal store of format {manifest.get('format_version')}; this "
                          f"distil reads format {FORMAT_VERSION}. Write it again with distil cache-teacher --overwrite.")
    return manifest
