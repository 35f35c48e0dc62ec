"""Language-model quality on held-out text, with prediction targets that are the same for every model and run.

Masked-LM models are scored on MLM targets drawn once per sequence by `MLMMasker` with a generator seeded
from (seed, sequence index): the targets depend only on the ids, the token counts and the seed, never on
the model, the batch size or the order models are evaluated in, so two students (or two runs) are scored
on exactly the same positions. Causal models are scored on next-token prediction (loss and perplexity).
Models without a usable LM head are skipped with a note; their hidden states can still be compared to a
reference model's (mean cosine of mean-pooled last hidden states on the same sentences).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from distil import losses
from distil.data import shards
from distil.data.dataset import TokenSequences, pad_batch
from distil.data.masking import IGNORE_INDEX, MLMMasker, causal_lm_labels, mask_probabilities
from distil.data.prepare import CleaningStats, frame_and_clean, framing_for
from distil.data.textfiles import ReadStats, check_input_files, iter_lines
from distil.errors import DistilError
from distil.loading import load_config, load_model, load_tokenizer

MASK_SEED_STRIDE = 1_000_003
# Only whole-[MASK] targets by default: with the training mix (10% kept, 10% random) part of the
# "accuracy" would be copying a visible token, which says little about what the model knows.
EVAL_MASK_REPLACE = (1.0, 0.0, 0.0)


# --- held-out text -----------------------------------------------------------------------------------------------

@dataclass
class HeldoutText:
    """Held-out text from a prepared directory (ids of one tokenizer) or from raw text files (lines)."""

    source: str
    max_sequences: int
    max_length: int
    min_length: int = 12
    lines: list[str] | None = None
    sequences: list[np.ndarray] | None = None
    token_counts: np.ndarray | None = None
    fingerprint: str | None = None


def load_heldout(data: list[str], split: str = "heldout", max_sequences: int = 256, max_length: int = 128,
                 min_length: int = 12) -> HeldoutText:
    """A `distil prepare` directory (its `split`), or text files read like `distil prepare` reads them."""
    if max_sequences < 1 or max_length < 4:
        raise DistilError(f"max_sequences ({max_sequences}) must be at least 1 and max_length ({max_length}) at least 4.")
    paths = [Path(p) for p in data]
    if len(paths) == 1 and paths[0].is_dir():
        root = paths[0]
        manifest = shards.read_manifest(root)
        split_data = TokenSequences(root, split, max_length)
        count = min(len(split_data), max_sequences)
        return HeldoutText(
            source=f"{root} ({split} split, first {count} sequences)", max_sequences=max_sequences,
            max_length=max_length, min_length=min_length, sequences=[split_data[i] for i in range(count)],
            token_counts=shards.load_token_counts(root), fingerprint=manifest["tokenizer"]["vocab_fingerprint"])
    if any(p.is_dir() for p in paths):
        raise DistilError(
            "Give either one prepared data directory (written by distil prepare) or text files, not a mix. "
            f"Directories given: {', '.join(str(p) for p in paths if p.is_dir())}."
        )
    lines: list[str] = []
    stats = ReadStats()
    # Lines shorter than min_length are dropped later; read a few times more than needed.
    for path in check_input_files([str(p) for p in paths]):
        for line in iter_lines(path, stats):
            lines.append(line)
            if len(lines) >= 4 * max_sequences:
                break
        if len(lines) >= 4 * max_sequences:
            break
    return HeldoutText(source=", ".join(str(p) for p in paths), max_sequences=max_sequences, max_length=max_length,
                       min_length=min_length, lines=lines)


def sequences_for(text: HeldoutText, tokenizer) -> tuple[list[np.ndarray], np.ndarray] | None:
    """(framed id sequences, token counts) in this tokenizer's ids; None when prepared data uses other ids."""
    if text.sequences is not None:
        if shards.vocabulary_fingerprint(tokenizer) != text.fingerprint:
            return None
        return text.sequences, text.token_counts
    encoder = tokenizer.backend_tokenizer
    encoder.no_truncation()
    encoder.no_padding()
    ids = [enc.ids for enc in encoder.encode_batch(text.lines, add_special_tokens=False)]
    flat, lengths = frame_and_clean(ids, framing_for(tokenizer), text.max_length, text.min_length,
                                    tokenizer.unk_token_id, 0.5, CleaningStats())
    sequences = np.split(flat, np.cumsum(lengths)[:-1])[: text.max_sequences] if len(lengths) else []
    if not sequences:
        raise DistilError(
            f"No held-out sequence of at least {text.min_length} tokens is left in {text.source}. Give longer text."
        )
    counts = np.bincount(np.concatenate(sequences), minlength=len(tokenizer))
    return sequences, counts


def texts_for_fidelity(text: HeldoutText, tokenizers: list) -> list[str] | None:
    """The same sentences for every model: raw lines, or prepared ids decoded by a tokenizer that matches them."""
    if text.lines is not None:
        return text.lines[: text.max_sequences]
    for tokenizer in tokenizers:
        if shards.vocabulary_fingerprint(tokenizer) == text.fingerprint:
            return [tokenizer.decode(seq.tolist(), skip_special_tokens=True) for seq in text.sequences]
    return None


# --- fixed targets -----------------------------------------------------------------------------------------------

def fixed_mlm_targets(sequences: list[np.ndarray], tokenizer, token_counts: np.ndarray, seed: int = 0,
                      mlm_probability: float = 0.15, smoothing: float = 0.0,
                      mask_replace: tuple[float, float, float] = EVAL_MASK_REPLACE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(masked ids, labels) per sequence; labels hold the original id at targets and -100 elsewhere.

    Each sequence is masked on its own with a generator seeded by (seed, index), so its targets do not
    depend on which other sequences share its batch. smoothing=0 masks every non-special token alike.
    """
    if tokenizer.mask_token_id is None:
        raise DistilError("The tokenizer has no mask token, so masked-LM targets cannot be drawn.")
    vocab = len(tokenizer)
    counts = np.zeros(vocab, dtype=np.int64)
    counts[: min(vocab, len(token_counts))] = np.asarray(token_counts)[:vocab]
    specials = sorted(set(int(i) for i in tokenizer.all_special_ids))
    probs = mask_probabilities(counts, specials, smoothing=smoothing)
    masker = MLMMasker(probs, tokenizer.mask_token_id, specials, vocab, mlm_probability, mask_replace)
    generator = torch.Generator()
    targets = []
    for index, seq in enumerate(sequences):
        generator.manual_seed(seed * MASK_SEED_STRIDE + index)
        ids = torch.as_tensor(np.asarray(seq, dtype=np.int64)).unsqueeze(0)
        masked, labels = masker(ids, torch.ones_like(ids), generator=generator)
        targets.append((masked[0], labels[0]))
    return targets


def targets_digest(targets: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    """A short hash of every masked input and label: equal digests mean identical targets."""
    digest = hashlib.sha256()
    for masked, labels in targets:
        digest.update(masked.numpy().astype("<i8").tobytes())
        digest.update(labels.numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]


# --- scoring -----------------------------------------------------------------------------------------------------

def _pad(rows: list[torch.Tensor], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch([r.numpy() if isinstance(r, torch.Tensor) else r for r in rows], fill)


@torch.inference_mode()
def masked_lm_scores(model, targets: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, batch_size: int = 16,
                     device: str | torch.device = "cpu") -> dict:
    """Token-weighted MLM cross-entropy and accuracy (argmax = original token) over all targets."""
    loss_sum, correct, count = 0.0, 0, 0
    for first in range(0, len(targets), batch_size):
        chunk = targets[first:first + batch_size]
        ids, mask = _pad([m for m, _ in chunk], pad_id)
        labels, _ = _pad([lab for _, lab in chunk], IGNORE_INDEX)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        labelled = labels != IGNORE_INDEX
        n = int(labelled.sum())
        if n == 0:
            continue
        loss_sum += float(losses.masked_lm_loss(logits, labels)) * n
        correct += int((logits[labelled].argmax(dim=-1) == labels[labelled]).sum())
        count += n
    if count == 0:
        raise DistilError("The held-out text gave no masked-LM targets (every token is special?). Give more text.")
    return {"mlm_loss": loss_sum / count, "mlm_accuracy": correct / count, "targets": count, "sequences": len(targets)}


@torch.inference_mode()
def causal_lm_scores(model, sequences: list[np.ndarray], pad_id: int, batch_size: int = 16,
                     device: str | torch.device = "cpu") -> dict:
    """Token-weighted next-token cross-entropy, perplexity = exp(loss), and next-token accuracy."""
    loss_sum, correct, count = 0.0, 0, 0
    for first in range(0, len(sequences), batch_size):
        rows = [torch.as_tensor(np.asarray(s, dtype=np.int64)) for s in sequences[first:first + batch_size]]
        ids, mask = _pad(rows, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        labels = causal_lm_labels(ids, mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
        predicted = labels[:, 1:] != IGNORE_INDEX
        n = int(predicted.sum())
        if n == 0:
            continue
        loss_sum += float(losses.causal_lm_loss(logits, labels)) * n
        correct += int((logits[:, :-1][predicted].argmax(dim=-1) == labels[:, 1:][predicted]).sum())
        count += n
    if count == 0:
        raise DistilError("The held-out text gave no next-token targets (sequences of one token?). Give longer text.")
    loss = loss_sum / count
    return {"clm_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "next_token_accuracy": correct / count,
            "targets": count, "sequences": len(sequences)}


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Negative log-likelihood of a text in nats -> bits per UTF-8 byte of that text."""
    return nll_nats / math.log(2) / n_bytes


def texts_for_bits_per_byte(text: HeldoutText, tokenizers: list) -> list[str] | None:
    """The held-out text every causal model is scored on in bits per byte: the raw lines, or the prepared
    sequences decoded by a tokenizer that matches their ids (None when none does)."""
    lines = texts_for_fidelity(text, tokenizers)
    return None if lines is None else [line for line in lines if line.strip()]


@torch.inference_mode()
def causal_lm_bits_per_byte(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 16,
                            device: str | torch.device = "cpu") -> dict:
    """Held-out bits per byte: the negative log-likelihood of every token of `texts`, in bits, over their UTF-8 bytes.

    A number that does not depend on the tokenizer, so models with different vocabularies compare. Each text is
    tokenized whole without special tokens; every one of its tokens is predicted, the first from the tokenizer's
    start-of-text framing (its BOS, or end-of-text for tokenizers such as GPT-2's that add none: what `distil prepare`
    puts before each sequence), which carries no text. The closing end-of-text token is not predicted (it is not
    text). Texts longer than `max_length` minus the framing are scored in consecutive windows, each opened by the
    framing again. Tokens mapped to the unknown token are scored as the tokenizer sees them (the unknown token),
    which understates the cost of text the vocabulary cannot spell.
    """
    from distil.data.prepare import framing_for

    prefix = [int(i) for i in framing_for(tokenizer).prefix]
    window = max_length - len(prefix)
    if window < 1:
        raise DistilError(f"max_length {max_length} leaves no room for text after the {len(prefix)} framing tokens.")
    encoder = tokenizer.backend_tokenizer
    encoder.no_truncation()
    encoder.no_padding()
    rows, n_bytes = [], 0
    for line, encoding in zip(texts, encoder.encode_batch(list(texts), add_special_tokens=False)):
        if not encoding.ids:
            continue
        n_bytes += len(line.encode("utf-8"))
        rows += [prefix + encoding.ids[i:i + window] for i in range(0, len(encoding.ids), window)]
    if n_bytes == 0:
        raise DistilError("The held-out text is empty, so bits per byte cannot be measured. Give text with --data.")
    nll, tokens = 0.0, 0
    pad_id = pad_id_for(tokenizer)
    for first in range(0, len(rows), batch_size):
        ids, mask = _pad([np.asarray(r, dtype=np.int64) for r in rows[first:first + batch_size]], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, len(prefix) - 1:-1].float()
        targets = ids[:, len(prefix):]
        scored = mask[:, len(prefix):].bool()
        token_nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll += float(token_nll[scored].double().sum())
        tokens += int(scored.sum())
    return {"bits_per_byte": bits_per_byte(nll, n_bytes), "bpb_bytes": n_bytes, "bpb_tokens": tokens,
            "bytes_per_token": n_bytes / tokens, "bpb_texts": len(texts)}


@torch.inference_mode()
def mean_pooled_states(base_model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 16,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, H) float32: each sentence's last hidden states averaged over its real tokens."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.bos_token
    pooled = []
    for first in range(0, len(texts), batch_size):
        enc = tokenizer(texts[first:first + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        hidden = base_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        pooled.append(((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)).cpu())
    return torch.cat(pooled)


def hidden_fidelity(pooled: torch.Tensor, reference: torch.Tensor) -> dict:
    """Cosine between a model's and the reference's pooled states, sentence by sentence."""
    if pooled.shape != reference.shape:
        raise ValueError(f"pooled states {tuple(pooled.shape)} and reference {tuple(reference.shape)} differ in shape")
    cosine = F.cosine_similarity(pooled, reference, dim=-1)
    return {"hidden_cosine": float(cosine.mean()), "hidden_cosine_min": float(cosine.min()),
            "sentences": int(cosine.numel())}


# --- loading -----------------------------------------------------------------------------------------------------

@dataclass
class EvalModel:
    """One model as evaluation uses it: `lm` scores text (None without a usable LM head); `base` gives
    hidden states, parameter counts and timings, so headless and headed models compare alike."""

    name: str
    path: str
    tokenizer: object
    base: torch.nn.Module
    lm: torch.nn.Module | None
    kind: str | None
    notes: list[str] = field(default_factory=list)


def lm_kind_of(config) -> str | None:
    """'mlm' for encoders with a masked-LM class, 'clm' for decoders, None otherwise."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "mlm"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "clm"
    return None


def untrained_head_reason(path: str) -> str | None:
    """Why a distil-made student's LM head holds no knowledge, or None.

    A student built from a teacher without an LM head gets a random head (distil_init.json says so); it
    stays random unless training used a logit loss (alpha_mlm / alpha_clm / alpha_ce / alpha_mse in the
    run's recipe.yaml next to the student).
    """
    folder = Path(path)
    record_path = folder / "distil_init.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("teacher_had_lm_head", True):
        return None
    if "steps" not in record:
        return "its LM head is random (built by distil init-student from a teacher without one, not trained since)"
    recipe_path = folder.parent / "recipe.yaml"
    if recipe_path.is_file():
        loss = (yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}).get("loss") or {}
        if all(float(loss.get(k) or 0.0) == 0.0 for k in ("alpha_mlm", "alpha_clm", "alpha_ce", "alpha_mse")):
            return ("its LM head was never trained (the teacher had none and the run in "
                    f"{folder.parent} used hidden-state losses only)")
    return None


def load_eval_model(name: str, path: str, device: str | torch.device = "cpu") -> EvalModel:
    """Load a model with its LM head when it has a trained one, else its base model only."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    config = load_config(path)
    tokenizer = load_tokenizer(path)
    kind = lm_kind_of(config)
    notes: list[str] = []
    if kind == "mlm" and tokenizer.mask_token_id is None:
        notes.append("LM quality skipped: the tokenizer has no mask token")
        kind = None
    if kind is None:
        model, _ = load_model(path, AutoModel, dtype=torch.float32)
        if not notes:
            notes.append(f"LM quality skipped: {config.model_type} has no language-model head class")
        return EvalModel(name, path, tokenizer, model.eval().to(device), None, None, notes)
    auto = AutoModelForMaskedLM if kind == "mlm" else AutoModelForCausalLM
    model, info = load_model(path, auto, dtype=torch.float32)
    model.eval().to(device)
    prefix = f"{model.base_model_prefix}."
    head_missing = [k for k in (info.get("missing_keys") or []) if not str(k).startswith(prefix)]
    reason = (f"the checkpoint has no LM head ({len(head_missing)} head weights missing, e.g. {sorted(head_missing)[0]})"
              if head_missing else untrained_head_reason(path))
    if reason:
        notes.append(f"LM quality skipped: {reason}")
        return EvalModel(name, path, tokenizer, model.base_model, None, None, notes)
    return EvalModel(name, path, tokenizer, model.base_model, model, kind, notes)


def pad_id_for(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id):
        if value is not None:
            return int(value)
    return 0
