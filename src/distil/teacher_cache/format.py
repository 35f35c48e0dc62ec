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
    The teacher's signals, in one of the store formats (`store_format`, --format):
    float16 / compact:
    top_ids.npy      (positions, k) uint16 (vocabularies < 65,536) or int32, by decreasing probability
    top_logp.npy     (positions, k) float16 log-probabilities at the store's temperature     [float16]
                     (float32 in the float32 format: exact, for tests and stores that must equal the live teacher)
    head_logp.npy    (positions, 8) float16: the 8 most probable tokens' log-probabilities    [compact]
    tail_poly.npy    (positions, 4) float32: a cubic in log(rank + 1) through the other k - 8  [compact]
    log_rest.npy     (positions,) float16 log of the mass outside the top-k
    sample_ids.npy / sample_logp.npy / sample_logw.npy   (positions, k') draws from the tail with log p and the
                     importance log-weight (with --sampled)
    packed / packed4 (distil.teacher_cache.packing):
    top_ids_sorted.npy     (positions, bytes) uint8: the top-k ids as a sorted set (Elias-Fano), their log-
                           probabilities' codes in the same order (the reader sorts them back by probability);
    top_ids_packed.npy     or, where that is smaller (k near 1), the ids in b = ceil(log2 vocabulary) bits each
    top_logp_codes.npy     (positions, ceil(k q / 8)) uint8: q-bit codes (q = 8 or 4) of each log-probability's
                           distance below a per-position anchor, in per-position steps
    logp_scale.npy         (positions, 2 or 3) float16: anchor, step of the top-k, step of the draws
    log_rest.npy           (positions,) float16, as above
    sample_ids_packed.npy / sample_logp_codes.npy          the draws, coded as the top-k; their importance
                           log-weights log(R / k') are not stored but recomputed (proposal temperature 1; another
                           proposal stores sample_logw.npy in float16)
    hidden.npy       (positions, hidden) float16 last hidden state (with --hidden-states last)
    mlm_input.npy    (positions,) ids: the masked input the teacher scored (masked-LM teachers only)
    mlm_target.npy   (positions,) uint8: 1 at the sequence's MLM targets (masked-LM teachers only)
    carried.npy      (positions,) uint8: 1 where the position carries a teacher row (a store written for a student
                     of another tokenizer, `student_tokenizer` in the manifest; the other rows hold no signal)
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distil.data import shards as data_shards
from distil.errors import DistilError
from distil.teacher_cache import STORE_FORMATS, packing

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # 1: float16 and compact only; packed formats were added in 2
KIND = "distil-teacher-cache"
PLAN, MANIFEST, TEACHER_DIR = "plan.json", "manifest.json", "teacher"
COMPACT_HEAD, COMPACT_DEGREE = 8, 3
# Settings that must be equal for a rerun to resume (the rest of the plan is derived from them).
PLAN_KEYS = ("format_version", "teacher", "vocab_size", "tokenizer_fingerprint", "objective", "k", "sampled",
             "temperature", "proposal_temperature", "seed", "split", "data", "ids_dtype", "store_format",
             "hidden_states", "hidden_size", "shard_size", "masking", "student_tokenizer")
CARRIED = "carried"
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


def store_format_for(requested: str, k: int) -> str:
    """compact needs more tokens than its exact head and curve hold; a smaller k is stored as float16."""
    return requested if requested != "compact" or k > COMPACT_HEAD + COMPACT_DEGREE + 1 else "float16"


def encode_logprobs(top_logp: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """The arrays that store (P, k) log-probabilities sorted by decreasing value in format `fmt`."""
    if fmt in ("float16", "float32"):
        return {"top_logp": top_logp.astype(fmt)}
    basis = _compact_basis(top_logp.shape[1])
    tail = top_logp[:, COMPACT_HEAD:].astype(np.float64)
    coefs = np.linalg.lstsq(basis, tail.T, rcond=None)[0].T
    return {"head_logp": top_logp[:, :COMPACT_HEAD].astype(np.float16), "tail_poly": coefs.astype(np.float32)}


def decode_logprobs(arrays: dict, fmt: str, k: int) -> torch.Tensor:
    """(P, k) float32 log-probabilities from what `encode_logprobs` stored (arrays: name -> array of P rows)."""
    if fmt in ("float16", "float32"):
        return torch.from_numpy(np.asarray(arrays["top_logp"], dtype=np.float32))
    head = torch.from_numpy(np.asarray(arrays["head_logp"], dtype=np.float32))
    coefs = torch.from_numpy(np.asarray(arrays["tail_poly"], dtype=np.float32))
    basis = torch.from_numpy(_compact_basis(k).astype(np.float32))
    return torch.cat([head, coefs @ basis.T], dim=1)


PACKED_LOGPROB_BITS = {"packed": 8, "packed4": 4}


@dataclass(frozen=True)
class StoreLayout:
    """What a store's signal arrays are: its format, k, k', vocabulary, and whether the draws' weights are stored."""

    store_format: str
    k: int
    sampled: int
    vocab_size: int
    ids_dtype: str
    proposal_temperature: float = 1.0

    @property
    def packed(self) -> bool:
        return self.store_format in PACKED_LOGPROB_BITS

    @property
    def sorted_ids(self) -> bool:
        """Packed top-k ids are stored as a sorted set (Elias-Fano) wherever that is smaller than fixed-width ids."""
        return self.packed and packing.elias_fano_width(self.k, self.vocab_size) < packing.packed_width(
            self.k, packing.id_bits(self.vocab_size))

    @property
    def weights_stored(self) -> bool:
        """With the tail itself as proposal every weight is R / k' (signals.sparse_signals): no need to store it."""
        return not self.packed or self.proposal_temperature != 1.0

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape of one row, dtype) of every signal array of a shard."""
        k, draws, f16 = self.k, self.sampled, np.dtype("<f2")
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        if self.packed:
            ib, qb, u8 = packing.id_bits(self.vocab_size), PACKED_LOGPROB_BITS[self.store_format], np.dtype("u1")
            if self.sorted_ids:
                out["top_ids_sorted"] = ((packing.elias_fano_width(k, self.vocab_size),), u8)
            else:
                out["top_ids_packed"] = ((packing.packed_width(k, ib),), u8)
            out["top_logp_codes"] = ((packing.packed_width(k, qb),), u8)
            out["logp_scale"] = ((3 if draws else 2,), f16)
            if draws:
                out["sample_ids_packed"] = ((packing.packed_width(draws, ib),), u8)
                out["sample_logp_codes"] = ((packing.packed_width(draws, qb),), u8)
        else:
            ids = np.dtype(self.ids_dtype)
            out["top_ids"] = ((k,), ids)
            if self.store_format in ("float16", "float32"):
                out["top_logp"] = ((k,), f16 if self.store_format == "float16" else np.dtype("<f4"))
            else:
                out["head_logp"] = ((COMPACT_HEAD,), f16)
                out["tail_poly"] = ((COMPACT_DEGREE + 1,), np.dtype("<f4"))
            if draws:
                out.update(sample_ids=((draws,), ids), sample_logp=((draws,), f16))
        out["log_rest"] = ((), f16)
        if draws and self.weights_stored:
            out["sample_logw"] = ((draws,), f16)
        return out

    def bytes_per_position(self) -> int:
        return sum(dtype.itemsize * math.prod(shape) for shape, dtype in self.arrays().values())


def store_format_of(manifest: dict) -> str:
    """The store format of a plan or manifest (stores of format version 1 named it `logprobs`)."""
    return manifest.get("store_format") or manifest.get("logprobs") or "float16"


def layout_of(manifest: dict) -> StoreLayout:
    return StoreLayout(store_format_of(manifest), int(manifest["k"]), int(manifest["sampled"]),
                       int(manifest["vocab_size"]), manifest["ids_dtype"],
                       float(manifest.get("proposal_temperature", 1.0)))


def encode_signals(layout: StoreLayout, top_ids: np.ndarray, top_logp: np.ndarray, log_rest: np.ndarray,
                   sample_ids: np.ndarray | None = None, sample_logp: np.ndarray | None = None,
                   sample_logw: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The rows of every signal array (`layout.arrays()`) for the signals of some positions (numpy, one row each)."""
    out: dict[str, np.ndarray] = {"log_rest": np.asarray(log_rest).astype(np.float16)}
    draws = layout.sampled
    if layout.packed:
        ib, qb = packing.id_bits(layout.vocab_size), PACKED_LOGPROB_BITS[layout.store_format]
        anchor = packing.float16_at_least(top_logp[:, 0])
        top_codes, top_step = packing.quantise_below(top_logp, anchor, qb)
        if layout.sorted_ids:   # the codes follow their ids into increasing id order
            order = np.argsort(top_ids, axis=1, kind="stable")
            top_codes = np.take_along_axis(top_codes, order, axis=1)
            out["top_ids_sorted"] = packing.elias_fano_pack(np.take_along_axis(np.asarray(top_ids), order, axis=1),
                                                            layout.vocab_size)
        else:
            out["top_ids_packed"] = packing.pack_bits(top_ids, ib)
        out["top_logp_codes"] = packing.pack_bits(top_codes, qb)
        scale = [anchor, top_step]
        if draws:
            sample_codes, sample_step = packing.quantise_below(sample_logp, anchor, qb)
            out["sample_ids_packed"] = packing.pack_bits(sample_ids, ib)
            out["sample_logp_codes"] = packing.pack_bits(sample_codes, qb)
            scale.append(sample_step)
        out["logp_scale"] = np.stack(scale, axis=1).astype(np.float16)
    else:
        ids = np.dtype(layout.ids_dtype)
        out["top_ids"] = np.asarray(top_ids).astype(ids)
        out.update(encode_logprobs(np.asarray(top_logp), layout.store_format))
        if draws:
            out["sample_ids"] = np.asarray(sample_ids).astype(ids)
            out["sample_logp"] = np.asarray(sample_logp).astype(np.float16)
    if draws and layout.weights_stored:
        out["sample_logw"] = np.asarray(sample_logw).astype(np.float16)
    return out


def decode_signals(arrays: dict, layout: StoreLayout) -> dict[str, torch.Tensor | None]:
    """top_ids, top_logp (as stored, not renormalised), log_rest, sample_ids, sample_logp, sample_logw (None without
    draws) of the rows in `arrays` (name -> the rows of each of `layout.arrays()`), as int64 / float32 tensors."""
    k, draws = layout.k, layout.sampled
    log_rest = np.asarray(arrays["log_rest"], dtype=np.float32)
    out: dict[str, torch.Tensor | None] = {"log_rest": torch.from_numpy(log_rest)}
    if layout.packed:
        ib, qb = packing.id_bits(layout.vocab_size), PACKED_LOGPROB_BITS[layout.store_format]
        scale = np.asarray(arrays["logp_scale"], dtype=np.float32)
        top_codes = packing.unpack_bits(arrays["top_logp_codes"], k, qb)
        if layout.sorted_ids:   # back to decreasing probability (equal codes: increasing id)
            ids = packing.elias_fano_unpack(arrays["top_ids_sorted"], k, layout.vocab_size)
            order = np.argsort(top_codes, axis=1, kind="stable")
            top_codes, ids = np.take_along_axis(top_codes, order, axis=1), np.take_along_axis(ids, order, axis=1)
        else:
            ids = packing.unpack_bits(arrays["top_ids_packed"], k, ib)
        out["top_ids"] = torch.from_numpy(ids)
        out["top_logp"] = torch.from_numpy(packing.dequantise_below(top_codes, scale[:, 0], scale[:, 1]))
        if draws:
            sample_codes = packing.unpack_bits(arrays["sample_logp_codes"], draws, qb)
            out["sample_ids"] = torch.from_numpy(packing.unpack_bits(arrays["sample_ids_packed"], draws, ib))
            out["sample_logp"] = torch.from_numpy(packing.dequantise_below(sample_codes, scale[:, 0], scale[:, 2]))
    else:
        out["top_ids"] = torch.from_numpy(np.asarray(arrays["top_ids"], dtype=np.int64))
        out["top_logp"] = decode_logprobs(arrays, layout.store_format, k)
        if draws:
            out["sample_ids"] = torch.from_numpy(np.asarray(arrays["sample_ids"], dtype=np.int64))
            out["sample_logp"] = torch.from_numpy(np.asarray(arrays["sample_logp"], dtype=np.float32))
    if not draws:
        out.update(sample_ids=None, sample_logp=None, sample_logw=None)
    elif layout.weights_stored:
        out["sample_logw"] = torch.from_numpy(np.asarray(arrays["sample_logw"], dtype=np.float32))
    else:
        out["sample_logw"] = (out["log_rest"] - math.log(draws)).unsqueeze(1).expand(-1, draws).contiguous()
    return out


def shard_problem(arrays: dict[str, np.ndarray], layout: StoreLayout, sequences: int) -> str | None:
    """What makes a shard's arrays (name -> array, with `offsets`) differ from what the manifest describes, or None."""
    offsets = arrays["offsets"]
    if offsets.ndim != 1 or len(offsets) != sequences + 1 or (len(offsets) and offsets[0] != 0) \
            or np.any(np.diff(offsets) < 0):
        return f"its offsets do not describe {sequences} sequences"
    rows = int(offsets[-1])
    for name, (shape, dtype) in layout.arrays().items():
        array = arrays[name]
        if array.dtype != dtype or array.shape != (rows, *shape):
            return (f"{name}.npy is {array.dtype} {array.shape}, where the manifest's format "
                    f"({layout.store_format}, k={layout.k}, k'={layout.sampled}) needs {dtype} {(rows, *shape)}")
    return None


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
    if manifest.get("kind") != KIND or manifest.get("format_version") not in READABLE_VERSIONS:
        raise DistilError(f"{root} holds a teacher-signal store of format {manifest.get('format_version')}; this "
                          f"distil reads formats {', '.join(map(str, READABLE_VERSIONS))}. Write it again with distil "
                          "cache-teacher --overwrite.")
    if store_format_of(manifest) not in STORE_FORMATS:
        raise DistilError(f"{root} holds a teacher-signal store in the format {store_format_of(manifest)!r}, which "
                          f"this distil does not know (it reads {', '.join(STORE_FORMATS)}). Use the distil that "
                          "wrote it, or write it again with distil cache-teacher --overwrite.")
    return manifest
