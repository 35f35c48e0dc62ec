"""Dynamic masked-language-model masking, run on the training device.

Targets are drawn per batch, not fixed at data preparation, so each epoch sees different masks.
Following XLM and the original DistilBERT code, target positions are sampled in proportion to a
smoothed inverse token frequency, count ** -0.7, which masks rare tokens more often than their
share of the text would. Every random draw goes through an optional `torch.Generator`, so a seed
reproduces the masks exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from distil.data import shards
from distil.errors import DistilError

__all__ = ["mask_probabilities", "MLMMasker", "causal_lm_labels", "IGNORE_INDEX"]

IGNORE_INDEX = -100
"""Label of positions that carry no loss (what the cross-entropy losses skip)."""


def mask_probabilities(
    token_counts: Sequence[int] | np.ndarray | Tensor,
    special_ids: Sequence[int],
    smoothing: float = 0.7,
) -> Tensor:
    """Per-token masking weights, (V,) float32 summing to 1.

    p[t] is proportional to max(count[t], 1) ** -smoothing, so rarer tokens weigh more; unseen
    tokens count as seen once. Special ids get 0. `smoothing=0` is uniform over non-special tokens.
    """
    counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"token_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}.")
    if bool((counts < 0).any()):
        raise ValueError("token_counts must not be negative.")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0 (0 = uniform, 0.7 = XLM), got {smoothing}.")
    vocab_size = counts.numel()
    bad = [i for i in special_ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"special ids {bad} are outside the vocabulary of size {vocab_size}.")
    weights = counts.clamp(min=1.0).pow(-smoothing)
    weights[list(special_ids)] = 0.0
    total = weights.sum()
    if total <= 0:
        raise ValueError("every token is special; nothing could ever be masked.")
    return (weights / total).to(torch.float32)


class MLMMasker:
    """Chooses MLM targets for a batch and corrupts them (mask / keep / random token).

    `token_probs` (V,) weighs each token id (see `mask_probabilities`); special ids always get
    weight 0 here whatever it says. Per call, ceil(mlm_probability * real tokens) targets are
    drawn without replacement over all real positions of the batch, with weight
    token_probs[input_id]. Each target becomes the mask token, stays, or becomes a random
    non-special token with probabilities `mask_replace`.
    """

    def __init__(
        self,
        token_probs: Tensor | Sequence[float] | np.ndarray,
        mask_token_id: int,
        special_ids: Sequence[int],
        vocab_size: int,
        mlm_probability: float = 0.15,
        mask_replace: tuple[float, float, float] = (0.8, 0.1, 0.1),
    ) -> None:
        probs = torch.as_tensor(np.asarray(token_probs), dtype=torch.float32).clone()
        if probs.dim() != 1 or probs.numel() != vocab_size:
            raise ValueError(
                f"token_probs must have one entry per vocabulary id ({vocab_size}), "
                f"got shape {tuple(probs.shape)}."
            )
        if bool((probs < 0).any()) or not bool(torch.isfinite(probs).all()):
            raise ValueError("token_probs must be finite and non-negative.")
        special = sorted(set(int(i) for i in special_ids))
        bad = [i for i in special if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"special ids {bad} are outside the vocabulary of size {vocab_size}.")
        if not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary of size {vocab_size}.")
        if not 0.0 < mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {mlm_probability}.")
        replace = torch.tensor(mask_replace, dtype=torch.float32)
        if replace.shape != (3,) or bool((replace < 0).any()) or abs(float(replace.sum()) - 1.0) > 1e-6:
            raise ValueError(
                f"mask_replace must be three non-negative probabilities (mask, keep, random) "
                f"summing to 1, got {mask_replace}."
            )

        is_special = torch.zeros(vocab_size, dtype=torch.bool)
        is_special[special] = True
        probs[is_special] = 0.0
        replacement_ids = torch.nonzero(~is_special).flatten()
        if replacement_ids.numel() == 0:
            raise ValueError("every token is special; there is nothing to mask or to substitute.")

        self.mask_token_id = int(mask_token_id)
        self.special_ids = special
        self.vocab_size = int(vocab_size)
        self.mlm_probability = float(mlm_probability)
        self.mask_replace = tuple(float(p) for p in mask_replace)
        self._cpu = (probs, replacement_ids, replace)
        self._by_device: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _tensors(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        # Moved once per device and kept: the call runs every step on the training device.
        if device not in self._by_device:
            self._by_device[device] = tuple(t.to(device) for t in self._cpu)  # type: ignore[assignment]
        return self._by_device[device]

    def target_count(self, n_real_tokens: int) -> int:
        """ceil(mlm_probability * n_real_tokens), robust to float error (0.15 * 100 -> 15, not 16)."""
        return math.ceil(round(self.mlm_probability * n_real_tokens, 6))

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return (masked_input_ids, labels); labels hold the original id at targets, -100 elsewhere.

        All work happens on `input_ids.device`; `generator`, when given, must live on that device.
        """
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                f"{tuple(input_ids.shape)}."
            )
        device = input_ids.device
        probs, replacement_ids, replace = self._tensors(device)
        real = attention_mask.to(device=device, dtype=torch.bool)
        flat_ids = input_ids.reshape(-1)
        weights = (probs[flat_ids] * real.reshape(-1)).contiguous()

        # One host transfer for both counts: multinomial needs the sample count as a Python int.
        n_real, n_eligible = torch.stack([real.sum(), (weights > 0).sum()]).tolist()
        n_targets = min(self.target_count(int(n_real)), int(n_eligible))

        masked = flat_ids.clone()
        labels = torch.full_like(flat_ids, IGNORE_INDEX)
        if n_targets == 0:
            return masked.view(input_ids.shape), labels.view(input_ids.shape)

        targets = torch.multinomial(weights, n_targets, replacement=False, generator=generator)
        originals = flat_ids[targets]
        # 0 = mask token, 1 = keep the original, 2 = random non-special token.
        action = torch.multinomial(replace, n_targets, replacement=True, generator=generator)
        random_tokens = replacement_ids[
            torch.randint(
                replacement_ids.numel(), (n_targets,), generator=generator, device=device
            )
        ]
        new_tokens = torch.where(
            action == 0,
            torch.full_like(originals, self.mask_token_id),
            torch.where(action == 1, originals, random_tokens.to(originals.dtype)),
        )
        masked[targets] = new_tokens
        labels[targets] = originals
        return masked.view(input_ids.shape), labels.view(input_ids.shape)


def causal_lm_labels(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Labels for causal LM: the input ids with padded positions set to -100.

    Padding is found from the attention mask, not the pad id, because GPT-2 style tokenizers pad
    with the end-of-text token, which also appears as a real token.
    """
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
            f"{tuple(input_ids.shape)}."
        )
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def build_masker(config, data_dir: str, manifest: dict, vocab_size: int, tokenizer) -> MLMMasker:
    """The masker of a recipe (`config.loss`: mlm_probability, mlm_smoothing, mask_replace) for prepared data
    `data_dir`: its token counts weight the draw, special ids and ids beyond the tokenizer are never masked."""
    if tokenizer.mask_token_id is None:
        raise DistilError(
            "The recipe is masked-LM but the tokenizer has no mask token. Use a causal-LM recipe (alpha_clm) "
            "for decoder models, or a tokenizer with [MASK] / <mask>."
        )
    counts = shards.load_token_counts(data_dir)
    # A model vocabulary padded beyond the tokenizer gets zero counts for the padding ids.
    padded = np.zeros(vocab_size, dtype=np.int64)
    padded[: min(len(counts), vocab_size)] = counts[:vocab_size]
    specials = [i for i in manifest["special_ids"]["all"] if i < vocab_size]
    never = specials + list(range(len(counts), vocab_size))
    probs = mask_probabilities(padded, never, smoothing=config.loss.mlm_smoothing)
    return MLMMasker(probs, tokenizer.mask_token_id, never, vocab_size, config.loss.mlm_probability,
                     tuple(config.loss.mask_replace))
