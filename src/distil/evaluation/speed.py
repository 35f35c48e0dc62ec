"""Size and speed of a model: parameter counts, weights on disk, latency and throughput.

Counts and timings are of the base transformer (embeddings + layers, no LM or task head), so a teacher
saved without a head and a student saved with one are compared on the same parts. Timings run under
torch.inference_mode on a fixed sequence length with seeded random ids.

All models of one evaluation are timed together in interleaved rounds (A B C A B C ...: every round times
each model once), after warm-up rounds (allocator, kernels, caches). Timing one model after the other lets a
burst of load on a shared machine land on one model only, which once made two copies of one architecture
come out 3.5x apart; interleaved, a burst slows every model of that round alike. Per model the median of
the rounds is reported with its spread, and speed-ups are ratios of medians. Models with an identical
architecture must run equally fast; when their medians still differ by more than `SAME_ARCHITECTURE_TOLERANCE`
the machine was too busy and the device's speed ratios are marked as not trustworthy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from distil.errors import DistilError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
# Two models with one architecture whose medians differ by more than this (slower / faster - 1) were timed on
# a machine too busy for the ratios to mean anything.
SAME_ARCHITECTURE_TOLERANCE = 0.20
# Config entries that name, label or describe a model without changing the computation of its base model.
# dtype is left out because the parameters' own dtypes are part of the fingerprint.
CONFIG_KEYS_NOT_ARCHITECTURE = frozenset({
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures", "id2label",
    "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params", "dtype", "torch_dtype",
    "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "_attn_implementation_autoset",
})
# The medians compared by the same-architecture check: (result key, what it is in a message).
CHECKED_MEDIANS = (("latency_ms", "batch-1 latency"), ("batch_ms", "throughput-batch time"))


def count_parameters(model: torch.nn.Module) -> dict:
    """total, embedding (lookup tables: words, positions, token types) and non_embedding parameters.

    Shared (tied) tensors count once.
    """
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    embedding_ids: set[int] = set()
    embedding = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            for param in module.parameters(recurse=False):
                if id(param) not in embedding_ids:
                    embedding_ids.add(id(param))
                    embedding += param.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def weights_on_disk(path: str) -> int | None:
    """Bytes of the weight files of a local model (a directory or one .gguf file); None for hub ids."""
    from distil.loading import resolve_source

    location = Path(resolve_source(path)).expanduser()
    if location.is_file():
        return location.stat().st_size
    if not location.is_dir():
        return None
    files = [p for p in location.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
             and not p.name.startswith(("optimizer", "training_args", "scheduler", "rng_state"))]
    return sum(p.stat().st_size for p in files) if files else None


def max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def architecture_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of what decides a model's speed: its class, its config without names and labels, and the
    name, shape and dtype of every parameter. Equal for a student before and after training."""
    config = getattr(model, "config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    described = {
        "class": type(model).__name__,
        "config": {k: v for k, v in settings.items() if k not in CONFIG_KEYS_NOT_ARCHITECTURE},
        "parameters": [(name, list(p.shape), str(p.dtype)) for name, p in model.named_parameters()],
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued GPU work (GPU calls return before it is done); nothing to wait for on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_timings(calls: Sequence[Callable[[], object]], warmup: int, rounds: int,
                        clock: Callable[[], float] = time.perf_counter,
                        synchronize: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Per call, the `clock` time (seconds) of each of `rounds` rounds, after `warmup` untimed rounds.

    Every round runs each call once, in the order given, so calls[0] calls[1] ... calls[0] calls[1] ...
    """
    for _ in range(warmup):
        for call in calls:
            call()
    synchronize()
    timings: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, durations in zip(calls, timings):
            start = clock()
            call()
            synchronize()
            durations.append(clock() - start)
    return timings


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds taken by each of `repeats` calls of fn(), after `warmup` untimed ones."""
    return interleaved_timings([fn], warmup, repeats, synchronize=_synchronizer(torch.device(device)))[0]


def duration_summary(seconds: Sequence[float]) -> dict:
    """Median, quartiles, min and max in milliseconds, and two spreads relative to the median:
    iqr_relative = (q3 - q1) / median and range_relative = (max - min) / median."""
    ms = [1000 * s for s in seconds]
    median = statistics.median(ms)
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0], ms[0], ms[0])
    low, high = min(ms), max(ms)
    return {
        "median_ms": median, "q1_ms": q1, "q3_ms": q3, "min_ms": low, "max_ms": high,
        "iqr_relative": (q3 - q1) / median if median > 0 else 0.0,
        "range_relative": (high - low) / median if median > 0 else 0.0,
    }


def check_speed_settings(models: Sequence[torch.nn.Module], seq_length: int, batch_size: int, warmup: int,
                         repeats: int) -> None:
    """DistilError unless the settings are positive and `seq_length` fits every model's positions."""
    if seq_length < 1 or batch_size < 1 or warmup < 0 or repeats < 1:
        raise DistilError(
            f"Speed settings must be positive: seq_length {seq_length}, batch_size {batch_size}, repeats {repeats} "
            f"(and warmup {warmup} >= 0)."
        )
    for model in models:
        limit = max_positions(model)
        if limit is not None and seq_length > limit:
            raise DistilError(f"The speed sequence length {seq_length} exceeds the model's {limit} positions. "
                              f"Use {limit} or less.")


def measure_speeds(models: Sequence[torch.nn.Module], device: str | torch.device = "cpu", seq_length: int = 128,
                   batch_size: int = 32, warmup: int = 3, repeats: int = 10, seed: int = 0,
                   clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Per model, latency at batch 1 and throughput at `batch_size`, both at `seq_length` tokens.

    Batch-1 calls of all models are timed in `repeats` interleaved rounds, then the batched calls likewise;
    each has `warmup` untimed rounds first. Medians and spreads are over the rounds. Every model is moved to
    `device` (all of them are there together).
    """
    check_speed_settings(models, seq_length, batch_size, warmup, repeats)
    device = torch.device(device)
    single_calls, batch_calls = [], []
    for model in models:
        model.eval().to(device)
        vocab = model.get_input_embeddings().num_embeddings
        generator = torch.Generator().manual_seed(seed)  # the same ids for every model of one vocabulary
        single = torch.randint(0, vocab, (1, seq_length), generator=generator).to(device)
        batch = torch.randint(0, vocab, (batch_size, seq_length), generator=generator).to(device)
        single_calls.append(_forward(model, single))
        batch_calls.append(_forward(model, batch))
    synchronize = _synchronizer(device)
    with torch.inference_mode():
        latencies = interleaved_timings(single_calls, warmup, repeats, clock, synchronize)
        batched = interleaved_timings(batch_calls, warmup, repeats, clock, synchronize)
    results = []
    for latency, batch_times in zip(latencies, batched):
        latency_stats, batch_stats = duration_summary(latency), duration_summary(batch_times)
        batch_median_s = batch_stats["median_ms"] / 1000
        results.append({
            "device": device.type, "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "seq_length": seq_length, "batch_size": batch_size, "warmup": warmup, "repeats": repeats,
            "interleaved_models": len(models),
            "latency_ms": latency_stats["median_ms"], "latency_ms_runs": [1000 * t for t in latency],
            "latency_stats": latency_stats,
            "batch_ms": batch_stats["median_ms"], "batch_ms_runs": [1000 * t for t in batch_times],
            "batch_stats": batch_stats,
            "sequences_per_s": batch_size / batch_median_s if batch_median_s > 0 else float("inf"),
            "tokens_per_s": batch_size * seq_length / batch_median_s if batch_median_s > 0 else float("inf"),
        })
    return results


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    mask = torch.ones_like(ids)
    return lambda: model(input_ids=ids, attention_mask=mask)


def measure_speed(model: torch.nn.Module, device: str | torch.device = "cpu", seq_length: int = 128,
                  batch_size: int = 32, warmup: int = 3, repeats: int = 10, seed: int = 0) -> dict:
    """`measure_speeds` of one model alone."""
    return measure_speeds([model], device, seq_length, batch_size, warmup, repeats, seed)[0]


def same_architecture_disagreements(names: Sequence[str], fingerprints: Sequence[str], timings: Sequence[dict],
                                    tolerance: float = SAME_ARCHITECTURE_TOLERANCE) -> list[dict]:
    """Pairs of models with one fingerprint whose median latency or batch time differ by more than
    `tolerance` (slower / faster - 1), with both medians in ms."""
    found = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if fingerprints[i] != fingerprints[j]:
                continue
            for key, what in CHECKED_MEDIANS:
                a, b = timings[i][key], timings[j][key]
                faster, slower = min(a, b), max(a, b)
                if faster <= 0:
                    continue
                difference = slower / faster - 1
                if difference > tolerance:
                    found.append({"models": [names[i], names[j]], "metric": key, "measures": what,
                                  "medians_ms": [a, b], "relative_difference": difference})
    return found


def disagreement_message(device: str, disagreement: dict) -> str:
    """One paragraph for the log and the table: which models, which median, how far apart, what to do."""
    first, second = disagreement["models"]
    a, b = disagreement["medians_ms"]
    device = {"cpu": "CPU", "cuda": "GPU"}.get(device, device)
    return (f"{device} speed is not trustworthy: {first} and {second} have an identical architecture, yet their median "
            f"{disagreement['measures']} differs by {100 * disagreement['relative_difference']:.0f}% "
            f"({a:.2f} ms vs {b:.2f} ms). The machine was busy while timing, so the {device} speed ratios mean little; "
            "rerun on an idle machine (or with fewer --threads).")


def compare_speeds(names: Sequence[str], models: Sequence[torch.nn.Module], devices: Sequence[str],
                   seq_length: int = 128, batch_size: int = 32, warmup: int = 3, repeats: int = 10,
                   tolerance: float = SAME_ARCHITECTURE_TOLERANCE,
                   clock: Callable[[], float] = time.perf_counter) -> tuple[list[dict], dict]:
    """Interleaved speed of all `models` on each device, and the check that identical architectures agree.

    Returns per model {device: measure_speeds result + "trustworthy"}, and the check: tolerance, the groups
    of models sharing an architecture, every disagreement (with its device and message), whether each
    device's timings are trustworthy, and the ratio keys that are not. Disagreements are logged as warnings.
    """
    fingerprints = [architecture_fingerprint(model) for model in models]
    groups: dict[str, list[str]] = {}
    for name, fingerprint in zip(names, fingerprints):
        groups.setdefault(fingerprint, []).append(name)
    check: dict = {"tolerance": tolerance, "same_architecture": [g for g in groups.values() if len(g) > 1],
                   "disagreements": [], "trustworthy": {}, "untrustworthy_ratios": []}
    per_model: list[dict] = [{} for _ in models]
    for device in devices:
        timings = measure_speeds(models, device, seq_length, batch_size, warmup, repeats, clock=clock)
        disagreements = same_architecture_disagreements(names, fingerprints, timings, tolerance)
        for disagreement in disagreements:
            disagreement["device"] = device
            disagreement["message"] = disagreement_message(device, disagreement)
            log.warning(disagreement["message"])
        trustworthy = not disagreements
        for result, timing in zip(per_model, timings):
            result[device] = {**timing, "trustworthy": trustworthy}
        check["trustworthy"][device] = trustworthy
        check["disagreements"] += disagreements
        if not trustworthy:
            check["untrustworthy_ratios"] += [f"{key}_{device}" for key in ("latency_ms", "sequences_per_s", "tokens_per_s")]
    return per_model, check
