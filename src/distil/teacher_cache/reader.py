"""Reading a teacher-signal store: a batch's sparse teacher targets, position by position, from memory-mapped shards.

Only the rows of the sequences asked for are read; nothing else of the store enters RAM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distil.errors import DistilError
from distil.teacher_signal.signals import LOG_FLOOR, SparseSignals
from distil.teacher_cache import format as fmt


class TeacherStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = fmt.read_store_manifest(self.root)
        m = self.manifest
        self.k, self.sampled, self.temperature = int(m["k"]), int(m["sampled"]), float(m["temperature"])
        self.layout = fmt.layout_of(m)
        self.store_format = self.layout.store_format
        self.hidden_states = m.get("hidden_states")
        self.masking = m.get("masking")   # an MLM teacher's store: each sequence's masked input and targets
        self.shard_size = int(m["shard_size"])
        self.sequences = int(m["data"]["sequences"])
        # Written for a student of another tokenizer: rows at the student's positions, flagged where carried.
        self.student_tokenizer = m.get("student_tokenizer")
        self._shards: dict[int, dict] = {}

    @property
    def teacher_dir(self) -> Path:
        return self.root / fmt.TEACHER_DIR

    def _shard(self, index: int) -> dict:
        shard = self._shards.get(index)
        if shard is None:
            path = self.root / fmt.shard_name(index)
            names = ["offsets", *self.layout.arrays()]
            if self.hidden_states:
                names.append("hidden")
            if self.masking:
                names += list(fmt.MASK_ARRAYS)
            if self.student_tokenizer:
                names.append(fmt.CARRIED)
            try:
                shard = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}
                digest = fmt.masks_digest(path) if self.masking else None
            except (OSError, ValueError) as exc:
                raise DistilError(f"The teacher-signal store {self.root} is damaged: {path.name} cannot be read "
                                  f"({exc}). Write it again with distil cache-teacher --overwrite.") from None
            entry = self.manifest["shards"][index]
            problem = fmt.shard_problem(shard, self.layout, int(entry["sequences"]))
            if problem:
                raise DistilError(f"The teacher-signal store {self.root} is damaged: {path.name} does not match its "
                                  f"manifest ({problem}); it may come from another store. Write it again with "
                                  "distil cache-teacher --overwrite.")
            if self.masking and digest != self.manifest["shards"][index].get("masks_digest"):
                raise DistilError(f"The teacher-signal store {self.root} is damaged: the masks of {path.name} are not "
                                  "the ones it was written with (their digest differs from the manifest's), so the "
                                  "student's inputs would not be those the teacher scored. Write it again with "
                                  "distil cache-teacher --overwrite.")
            self._shards[index] = shard
        return shard

    def lengths(self) -> np.ndarray:
        """Positions stored for each sequence, (sequences,) int64."""
        parts = [np.diff(self._shard(i)["offsets"]) for i in range(len(self.manifest["shards"]))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def rows_of(self, sequence: int, count: int) -> tuple[dict, slice]:
        """(the shard's arrays, rows of its first `count` positions) of prepared sequence `sequence`."""
        if not 0 <= sequence < self.sequences:
            raise DistilError(f"Sequence {sequence} is not in the teacher-signal store {self.root} "
                              f"({self.sequences} sequences).")
        shard = self._shard(sequence // self.shard_size)
        local = sequence % self.shard_size
        start, stop = int(shard["offsets"][local]), int(shard["offsets"][local + 1])
        if count > stop - start:
            raise DistilError(f"Sequence {sequence} has {count} positions in this batch but {stop - start} in the "
                              f"teacher-signal store {self.root}: the store was written for other data.")
        return shard, slice(start, start + count)

    def masks(self, sequence: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(masked input ids int64, target flags bool) of the first `count` positions of `sequence`: what the
        teacher scored, for the student to see."""
        if not self.masking:
            raise DistilError(f"The teacher-signal store {self.root} holds no MLM masks (its teacher is "
                              f"{self.manifest['objective']}).")
        shard, rows = self.rows_of(sequence, count)
        return (np.asarray(shard["mlm_input"][rows], dtype=np.int64),
                np.asarray(shard["mlm_target"][rows]).astype(bool))

    def carried(self, sequences: list[int], counts: list[int]) -> np.ndarray:
        """(sum of counts,) bool: which of the first counts[i] positions of each of `sequences` carry a teacher row
        (a store written for a student of another tokenizer)."""
        if not self.student_tokenizer:
            raise DistilError(f"The teacher-signal store {self.root} was written for the teacher's own tokenizer: it "
                              "has no student positions to carry. Write one with distil cache-teacher "
                              "--student-tokenizer.")
        parts = [np.asarray(shard[fmt.CARRIED][rows]).astype(bool)
                 for shard, rows in (self.rows_of(int(s), int(c)) for s, c in zip(sequences, counts))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def targets(self, sequences: list[int], counts: list[int], want_hidden: bool = False,
                device: torch.device | None = None, keep: np.ndarray | None = None) -> SparseSignals:
        """The sparse targets of the first counts[i] positions of each of `sequences`, rows concatenated in order
        (the row-major order of a right-padded batch's real positions); only the rows where `keep` (one bool per
        such row) is true when given. Rows are chosen before decoding: a store for a student of another tokenizer
        leaves the rows of uncarried positions empty, which no packed format decodes."""
        pieces: dict[str, list] = {}
        for sequence, count in zip(sequences, counts):
            shard, rows = self.rows_of(int(sequence), int(count))
            for name, array in shard.items():
                if name not in ("offsets", fmt.CARRIED, *fmt.MASK_ARRAYS) and (name != "hidden" or want_hidden):
                    pieces.setdefault(name, []).append(np.asarray(array[rows]))
        arrays = {name: np.concatenate(parts) for name, parts in pieces.items()}
        if keep is not None:
            arrays = {name: array[keep] for name, array in arrays.items()}
        if not arrays:  # no rows at all
            arrays = {name: np.zeros((0, *shape), dtype) for name, (shape, dtype) in self.layout.arrays().items()}
        return sparse_targets(arrays, self.layout, want_hidden, device)


def sparse_targets(arrays: dict[str, np.ndarray], layout: fmt.StoreLayout, want_hidden: bool = False,
                   device: torch.device | None = None) -> SparseSignals:
    """The training path's sparse signals from the stored rows of some positions (name -> rows of each array of
    `layout`, and `hidden` when wanted), whatever the store's format."""
    signals = fmt.decode_signals(arrays, layout)
    log_rest = signals["log_rest"].clamp_min(LOG_FLOOR)
    top_logp = signals["top_logp"]
    # Quantised top-k probabilities renormalised to 1 - rest: the k + 1 buckets sum to 1 exactly.
    top_logp = top_logp - torch.logsumexp(top_logp, dim=1, keepdim=True) \
        + torch.log1p(-log_rest.exp().clamp_max(1 - 1e-6)).unsqueeze(1)

    def on_device(name: str) -> torch.Tensor | None:
        return None if signals[name] is None else signals[name].to(device)

    hidden = None
    if want_hidden and "hidden" in arrays:
        hidden = torch.from_numpy(np.asarray(arrays["hidden"], dtype=np.float32)).to(device)
    return SparseSignals(top_ids=on_device("top_ids"), top_logp=top_logp.to(device), log_rest=log_rest.to(device),
                         sample_ids=on_device("sample_ids"), sample_logp=on_device("sample_logp"),
                         sample_logw=on_device("sample_logw"), hidden=hidden)
