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
        self.logprobs = m["logprobs"]
        self.hidden_states = m.get("hidden_states")
        self.masking = m.get("masking")   # an MLM teacher's store: each sequence's masked input and targets
        self.shard_size = int(m["shard_size"])
        self.sequences = int(m["data"]["sequences"])
        self._shards: dict[int, dict] = {}

    @property
    def teacher_dir(self) -> Path:
        return self.root / fmt.TEACHER_DIR

    def _shard(self, index: int) -> dict:
        shard = self._shards.get(index)
        if shard is None:
            path = self.root / fmt.shard_name(index)
            names = ["offsets", "top_ids", "log_rest", *fmt.logprob_arrays(self.logprobs)]
            if self.sampled:
                names += ["sample_ids", "sample_logp", "sample_logw"]
            if self.hidden_states:
                names.append("hidden")
            if self.masking:
                names += list(fmt.MASK_ARRAYS)
            try:
                shard = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}
                digest = fmt.masks_digest(path) if self.masking else None
            except (OSError, ValueError) as exc:
                raise DistilError(f"The teacher-signal store {self.root} is damaged: {path.name} cannot be read "
                                  f"({exc}). Write it again with distil cache-teacher --overwrite.") from None
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

    def targets(self, sequences: list[int], counts: list[int], want_hidden: bool = False,
                device: torch.device | None = None) -> SparseSignals:
        """The sparse targets of the first counts[i] positions of each of `sequences`, rows concatenated in order
        (the row-major order of a right-padded batch's real positions)."""
        pieces: dict[str, list] = {}
        for sequence, count in zip(sequences, counts):
            shard, rows = self.rows_of(int(sequence), int(count))
            for name, array in shard.items():
                if name not in ("offsets", *fmt.MASK_ARRAYS) and (name != "hidden" or want_hidden):
                    pieces.setdefault(name, []).append(np.asarray(array[rows]))
        arrays = {name: np.concatenate(parts) for name, parts in pieces.items()}
        n = sum(int(c) for c in counts)
        if not arrays:  # no rows at all
            arrays = {"top_ids": np.zeros((0, self.k), np.int64), "log_rest": np.zeros(0, np.float32),
                      "top_logp": np.zeros((0, self.k), np.float32)}
        top_logp = fmt.decode_logprobs(arrays, self.logprobs if n else "float16", self.k)
        log_rest = torch.from_numpy(arrays["log_rest"].astype(np.float32)).clamp_min(LOG_FLOOR)
        # Quantised top-k probabilities renormalised to 1 - rest: the k + 1 buckets sum to 1 exactly.
        top_logp = top_logp - torch.logsumexp(top_logp, dim=1, keepdim=True) \
            + torch.log1p(-log_rest.exp().clamp_max(1 - 1e-6)).unsqueeze(1)

        def tensor(name, dtype=torch.float32):
            if name not in arrays:
                return None
            return torch.from_numpy(arrays[name].astype(np.int64 if dtype == torch.int64 else np.float32)).to(device)

        return SparseSignals(top_ids=tensor("top_ids", torch.int64), top_logp=top_logp.to(device),
                             log_rest=log_rest.to(device), sample_ids=tensor("sample_ids", torch.int64),
                             sample_logp=tensor("sample_logp"), sample_logw=tensor("sample_logw"),
                             hidden=tensor("hidden") if want_hidden else None)
