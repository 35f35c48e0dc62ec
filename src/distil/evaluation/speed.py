"""Size and speed of a model: parameter counts, weights on disk, latency and throughput.

Counts and timings are of the base transformer (embeddings + layers, no LM or task head), so a teacher
saved without a head and a student saved with one are compared on the same parts. Timings run under
torch.inference_mode on a fixed sequence length with seeded random ids: warm-up calls first (allocator,
kernels, caches), then `repeats` timed calls, of which the median is reported (robust to a stray slow call).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from distil.errors import DistilError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds taken by each of `repeats` calls of fn(), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)  # GPU calls return before the work is done
        timings.append(time.perf_counter() - start)
    return timings


def measure_speed(model: torch.nn.Module, device: str | torch.device = "cpu", seq_length: int = 128,
                  batch_size: int = 32, warmup: int = 3, repeats: int = 10, seed: int = 0) -> dict:
    """Latency at batch 1 and throughput at `batch_size`, both at `seq_length` tokens; medians of `repeats` runs."""
    if seq_length < 1 or batch_size < 1 or warmup < 0 or repeats < 1:
        raise DistilError(
            f"Speed settings must be positive: seq_length {seq_length}, batch_size {batch_size}, repeats {repeats} "
            f"(and warmup {warmup} >= 0)."
        )
    limit = max_positions(model)
    if limit is not None and seq_length > limit:
        raise DistilError(f"The speed sequence length {seq_length} exceeds the model's {limit} positions. Use {limit} or less.")
    device = torch.device(device)
    model.eval().to(device)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    single = torch.randint(0, vocab, (1, seq_length), generator=generator).to(device)
    batch = torch.randint(0, vocab, (batch_size, seq_length), generator=generator).to(device)

    def run(ids: torch.Tensor):
        mask = torch.ones_like(ids)
        return lambda: model(input_ids=ids, attention_mask=mask)

    with torch.inference_mode():
        latency = time_calls(run(single), warmup, repeats, device)
        batched = time_calls(run(batch), warmup, repeats, device)
    batch_median = statistics.median(batched)
    return {
        "device": device.type, "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "seq_length": seq_length, "batch_size": batch_size, "warmup": warmup, "repeats": repeats,
        "latency_ms": 1000 * statistics.median(latency), "latency_ms_runs": [1000 * t for t in latency],
        "batch_ms_runs": [1000 * t for t in batched], "sequences_per_s": batch_size / batch_median,
        "tokens_per_s": batch_size * seq_length / batch_median,
    }
