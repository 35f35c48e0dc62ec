"""Reading prepared data for training: memory-mapped sequences, length-grouped global batches, padding.

Distributed runs draw *global* batches (per-process batch x number of processes) from one seeded order that
every process computes identically. Each process reads only the few sequences of the current global batch,
never the corpus. Knowing the whole global batch lets every process draw the same MLM masks and normalise
losses by global token counts, so results do not depend on how many processes share the work: 2 processes
with batch B compute what 1 process with batch 2B computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distil.data import shards
from distil.errors import DistilError


class TokenSequences:
    """One split of a prepared directory as an indexable collection of int64 id arrays."""

    def __init__(self, root: str | Path, split: str = "train", max_length: int | None = None):
        self.root = Path(root)
        self.split = split
        self.manifest = shards.read_manifest(root)
        self.tokens, self.offsets = shards.open_split(root, split)
        # Lengths are the only per-sequence array held in RAM: 4 bytes a sequence.
        self.lengths = np.diff(self.offsets).astype(np.int32)
        self.max_length = max_length
        # Sequences end with the tokenizer's closing tokens ([SEP], </s>, end-of-text); a cut keeps them, as
        # prepare does for long lines, so a truncated sequence is still framed as the model was trained.
        self.suffix = np.asarray(self.manifest["special_ids"].get("suffix", []), dtype=np.int64)
        if max_length is not None:
            framing = len(self.manifest["special_ids"].get("prefix", [])) + len(self.suffix)
            if max_length <= framing:
                raise DistilError(
                    f"A maximum length of {max_length} leaves no room for text in {self.root}: its sequences carry "
                    f"{framing} framing tokens. Use a larger max_length (data.max_length / --max-length)."
                )
            np.minimum(self.lengths, max_length, out=self.lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        start, length = int(self.offsets[index]), int(self.lengths[index])
        full = int(self.offsets[index + 1]) - start
        if length == full or len(self.suffix) == 0:
            return np.asarray(self.tokens[start : start + length], dtype=np.int64)
        keep = len(self.suffix)
        body = self.tokens[start : start + length - keep]
        closing = self.tokens[start + full - keep : start + full]
        return np.concatenate([body, closing]).astype(np.int64)


@dataclass
class SamplerState:
    epoch: int = 0
    batch_in_epoch: int = 0


class GlobalBatchSampler:
    """Yields lists of sequence indices, one list per global batch, identical on every process.

    With `group_by_length` (the seed's default) sequences are shuffled, cut into windows of
    `group_window` batches, sorted by length inside each window and the resulting batches shuffled:
    batches hold sequences of similar length (little padding) while the order stays random.
    Without it, batches are plain slices of a shuffled order. Incomplete final batches are dropped,
    so every process sees the same number of batches and none waits at the end of an epoch.
    """

    def __init__(self, lengths: np.ndarray, global_batch_size: int, seed: int = 0, group_by_length: bool = True,
                 group_window: int = 64, shuffle: bool = True):
        if global_batch_size < 1:
            raise DistilError(f"The batch size must be at least 1, got {global_batch_size}.")
        if len(lengths) < global_batch_size:
            raise DistilError(
                f"The data holds {len(lengths)} sequences, fewer than one global batch of {global_batch_size} "
                "(batch_size x number of processes). Use more data or a smaller batch_size."
            )
        self.lengths = lengths
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_window = group_window
        self.shuffle = shuffle
        self.state = SamplerState()

    def batches_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch_size

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All global batches of one epoch, shape (n_batches, global_batch_size)."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        usable = self.batches_per_epoch() * self.global_batch_size
        if self.group_by_length:
            window = self.global_batch_size * self.group_window
            for start in range(0, n, window):
                chunk = order[start : start + window]
                # Stable sort on a shuffled chunk: ties stay in random order.
                order[start : start + window] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches = order[:usable].reshape(-1, self.global_batch_size)
            if self.shuffle:
                batches = batches[rng.permutation(len(batches))]
            return batches
        return order[:usable].reshape(-1, self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.state = SamplerState(epoch=epoch, batch_in_epoch=0)

    def __iter__(self):
        """Continue from the current state; advances the state as batches are consumed."""
        while True:
            batches = self.epoch_batches(self.state.epoch)
            while self.state.batch_in_epoch < len(batches):
                batch = batches[self.state.batch_in_epoch]
                self.state.batch_in_epoch += 1
                yield batch.tolist()
            self.set_epoch(self.state.epoch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "batch_in_epoch": self.state.batch_in_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. A position counts batches, and the order of an epoch's sequences
        depends on the batch size (length-grouping windows, batch shuffling): it only means the same place for the
        same global batch size, so another size is refused (a resume checks this earlier, with advice)."""
        recorded = state.get("global_batch_size", self.global_batch_size)  # older checkpoints: not recorded
        if int(recorded) != self.global_batch_size:
            raise ValueError(f"a sampler position in batches of {recorded} sequences cannot continue with batches "
                             f"of {self.global_batch_size}")
        self.state = SamplerState(epoch=int(state["epoch"]), batch_in_epoch=int(state["batch_in_epoch"]))


def pad_batch(sequences: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids, attention_mask), both int64."""
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def local_rows(global_size: int, rank: int, world_size: int) -> slice:
    """This process's rows of a global batch: strided, so every process gets a mix of lengths."""
    return slice(rank, global_size, world_size)


def pad_id_of(manifest: dict) -> int:
    special = manifest["special_ids"]
    for key in ("pad", "eos", "sep"):
        if special.get(key) is not None:
            return int(special[key])
    return 0

