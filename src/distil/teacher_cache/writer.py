"""`distil cache-teacher`: run the teacher once over prepared data and write its sparse signals to a store.

Streaming: one shard (shard_size sequences) at a time, each written into memory-mapped .npy arrays under a
temporary name and renamed when complete, so RAM stays flat in the corpus size and a killed run loses at most the
shard it was writing. Resumable: a rerun with the same settings keeps the finished shards and writes the others
(byte-identical output: a sequence's draws depend only on the seed and its index). Multi-process: under torchrun /
accelerate launch, process r writes shards r, r + N, r + 2N, ...; the manifest is written once every shard is
there. See distil.teacher_cache.format for the layout.

A masked-LM teacher scores masked text, as it does beside a student: each sequence is masked on its own by the
training masker (distil.data.masking.build_masker, with the recipe's masking settings) and a generator seeded by
the store's seed and the sequence's index, and the masked input and targets are stored for training to reuse.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distil.data.dataset import TokenSequences, pad_batch, pad_id_of
from distil.data.masking import IGNORE_INDEX
from distil.errors import DistilError
from distil.disk_space import directory_bytes, disk_space_errors, reserve_space
from distil.outputs import check_output_dir, check_writable, human_size, output_lock, remove_stale_leftovers, \
    write_json_atomic, write_marker
from distil.teacher_cache import DEFAULT_STORE_FORMAT
from distil.teacher_cache import format as fmt
from distil.teacher_cache.signals import SEED_STRIDE, sequence_generator, sparse_signals

log = logging.getLogger(__name__)

HIDDEN_CHOICES = (None, "none", "last")
# Masks draw from their own stream, not the one of the sampled tail tokens (signals.sequence_generator).
MASK_STREAM = 1 << 62
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _process_group(rank: int | None, world: int | None):
    """(rank, world, barrier, is_distributed): given explicitly (tests, manual slicing), or from the launcher."""
    if rank is not None or world is not None:
        return int(rank or 0), int(world or 1), (lambda: None), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes, state.wait_for_everyone, True
    return 0, 1, (lambda: None), False


def _check_settings(k: int, sampled: int, temperature: float, proposal_temperature: float, batch_size: int,
                    shard_size: int, hidden_states, store_format: str) -> None:
    if k < 1:
        raise DistilError(f"--top-k must be at least 1, got {k}.")
    if sampled < 0:
        raise DistilError(f"--sampled must be 0 or more, got {sampled}.")
    if temperature <= 0 or proposal_temperature <= 0:
        raise DistilError(f"--temperature and --proposal-temperature must be > 0, got {temperature} and "
                          f"{proposal_temperature}. Use the temperature the recipe trains with (loss.temperature).")
    if batch_size < 1 or shard_size < 1:
        raise DistilError(f"--batch-size and --shard-size must be at least 1, got {batch_size} and {shard_size}.")
    if hidden_states not in HIDDEN_CHOICES:
        raise DistilError(f"--hidden-states must be none or last, got {hidden_states!r}.")
    if store_format not in fmt.STORE_FORMATS:
        raise DistilError(f"--format must be one of {', '.join(fmt.STORE_FORMATS)}, got {store_format!r}.")


def mask_generator(seed: int, sequence_index: int) -> torch.Generator:
    """The generator of one sequence's MLM masks: fixed by the store's seed and the sequence's index alone."""
    generator = torch.Generator()
    generator.manual_seed(MASK_STREAM + seed * SEED_STRIDE + sequence_index)
    return generator


def _masking_settings(mlm_probability: float | None, mlm_smoothing: float | None,
                      mask_replace: Sequence[float] | None, seed: int) -> dict:
    """The masking of an MLM teacher's store: the given settings, the recipe defaults (loss.*) for the others."""
    from distil.config import LossConfig

    defaults = LossConfig()
    probability = float(defaults.mlm_probability if mlm_probability is None else mlm_probability)
    smoothing = float(defaults.mlm_smoothing if mlm_smoothing is None else mlm_smoothing)
    replace = [float(p) for p in (defaults.mask_replace if mask_replace is None else mask_replace)]
    if not 0 < probability < 1:
        raise DistilError(f"--mlm-probability must be in (0, 1), got {probability}. Use the recipe's "
                          "loss.mlm_probability.")
    if smoothing < 0:
        raise DistilError(f"--mlm-smoothing must be >= 0, got {smoothing}. Use the recipe's loss.mlm_smoothing.")
    if len(replace) != 3 or any(p < 0 for p in replace) or abs(sum(replace) - 1) > 1e-6:
        raise DistilError(f"--mask-replace must be three probabilities (mask, keep, random) that sum to 1, got "
                          f"{replace}. Use the recipe's loss.mask_replace.")
    return {"seed": seed, "mlm_probability": probability, "mlm_smoothing": smoothing, "mask_replace": replace,
            "per_sequence": True}


def _store_masker(masking: dict, data: str, manifest: dict, vocab: int, tokenizer):
    """The masker training builds for these settings (build_masker), over the store's vocabulary."""
    from distil.config import TrainConfig
    from distil.data.masking import build_masker

    config = TrainConfig()
    config.loss.mlm_probability = masking["mlm_probability"]
    config.loss.mlm_smoothing = masking["mlm_smoothing"]
    config.loss.mask_replace = list(masking["mask_replace"])
    return build_masker(config, data, manifest, vocab, tokenizer)


def _masked_sequences(chosen: list[int], data: TokenSequences, masker,
                      seed: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(input, target flags) of each chosen sequence: masked on its own by `masker`, or clean without one."""
    out = []
    for index in chosen:
        ids = torch.as_tensor(np.asarray(data[index], dtype=np.int64)).unsqueeze(0)
        if masker is None:
            out.append((ids[0].numpy(), None))
            continue
        masked, labels = masker(ids, torch.ones_like(ids), generator=mask_generator(seed, index))
        out.append((masked[0].numpy(), (labels[0] != IGNORE_INDEX).numpy()))
    return out


def _load_teacher(teacher: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from distil.loading import load_config, load_model, load_tokenizer
    from distil.model_kinds import head_missing, is_bidirectional, is_causal

    config = load_config(teacher)
    if is_bidirectional(config):
        objective, auto = "mlm", AutoModelForMaskedLM
    elif is_causal(config):
        objective, auto = "clm", AutoModelForCausalLM
    else:
        raise DistilError(f"Cannot tell whether the teacher {teacher} ({config.model_type}) is an encoder with an MLM "
                          "head or a causal decoder, so its output distribution cannot be cached.")
    tokenizer = load_tokenizer(teacher)
    model, info = load_model(teacher, auto, dtype=DTYPES[dtype])
    if head_missing(info):
        raise DistilError(f"The teacher {teacher} has no {'MLM' if objective == 'mlm' else 'LM'} head (its checkpoint "
                          "holds only the encoder), so its output distribution would be a random head's. Cache a "
                          "teacher with its head (distil fit-head gives a headless encoder one).")
    return model.eval().requires_grad_(False), tokenizer, objective, config


def _copy_teacher_files(teacher: str, model, tokenizer, target: Path) -> None:
    """The teacher's config and tokenizer (and a sentence-transformers pooling config) beside the signals."""
    from distil.loading import resolve_source

    target.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    source = Path(resolve_source(teacher))
    if source.is_dir():
        for entry in source.iterdir():
            if entry.name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
                shutil.copy2(entry, target / entry.name)
            elif entry.is_dir() and entry.name.split("_", 1)[-1] in ("Pooling", "Normalize"):
                shutil.copytree(entry, target / entry.name, dirs_exist_ok=True)


def _same_plan(a: dict, b: dict) -> list[str]:
    return [key for key in fmt.PLAN_KEYS if a.get(key) != b.get(key)]


def _prepare_output(root: Path, plan: dict, overwrite: bool) -> bool:
    """Make `root` ready for `plan`; returns whether it resumes an unfinished store with the same settings."""
    if root.exists() and not root.is_dir():
        raise DistilError(f"The output path {root} exists and is a file, not a directory. Choose another --output.")
    check_writable(root)
    existing_plan = fmt.read_json(root / fmt.PLAN) if root.is_dir() else None
    finished = (root / fmt.MANIFEST).exists()
    if existing_plan is not None and not finished and not overwrite:
        differing = _same_plan(existing_plan, plan)
        if differing:
            raise DistilError(
                f"{root} holds an unfinished teacher-signal store written with other settings ({', '.join(differing)} "
                "differ). Nothing was changed. Run the command it was started with to finish it, or pass --overwrite "
                "to start over with these settings."
            )
        return True
    if root.is_dir() and any(root.iterdir()):
        if finished and not overwrite:
            raise DistilError(f"{root} already holds a finished teacher-signal store. Nothing was changed. Pass "
                              "--overwrite to write it again, or choose another --output.")
        check_output_dir(root, overwrite)  # refuses what distil did not write, even with --overwrite
        shutil.rmtree(root)
    remove_stale_leftovers(root)
    root.mkdir(parents=True, exist_ok=True)
    write_marker(root, "cache-teacher")
    return False


def _write_shard(index: int, root: Path, data: TokenSequences, model, plan: dict, pad_id: int, batch_size: int,
                 device: torch.device, bar, masker=None, retokenizer=None) -> None:
    final = root / fmt.shard_name(index)
    remove_stale_leftovers(final)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    size = plan["shard_size"]
    first, stop = index * size, min(len(data), (index + 1) * size)
    lengths = data.lengths[first:stop].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    rows = int(offsets[-1])
    k, sampled, layout = plan["k"], plan["sampled"], fmt.layout_of(plan)
    id_dtype = np.dtype(plan["ids_dtype"])
    shapes = {name: ((rows, *shape), dtype) for name, (shape, dtype) in layout.arrays().items()}
    want_hidden = plan["hidden_states"] == "last"
    if want_hidden:
        shapes["hidden"] = ((rows, plan["hidden_size"]), np.float16)
    if masker is not None:
        shapes.update(mlm_input=((rows,), id_dtype), mlm_target=((rows,), np.uint8))
    if retokenizer is not None:
        shapes[fmt.CARRIED] = ((rows,), np.uint8)
    arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
              for name, (shape, dtype) in shapes.items()}
    for name in shapes:  # on a full disk, a write through a memory map kills the process (SIGBUS): fail here instead
        reserve_space(tmp / f"{name}.npy")
    vocab = plan["vocab_size"]
    order = sorted(range(first, stop), key=lambda i: (-int(data.lengths[i]), i))  # similar lengths batched
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        inputs = _masked_sequences(chosen, data, masker, plan["seed"])
        if retokenizer is not None:
            _write_aligned(chosen, inputs, retokenizer, model, plan, device, arrays, offsets, first, layout)
            bar.update(len(chosen))
            continue
        ids, mask = pad_batch([masked for masked, _ in inputs], pad_id)
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=want_hidden,
                        return_dict=True)
        logits = out.logits[..., :vocab]
        for row, seq in enumerate(chosen):
            n, at = int(data.lengths[seq]), int(offsets[seq - first])
            where = slice(at, at + n)
            signals = sparse_signals(logits[row, :n].float().cpu(), k, plan["temperature"], sampled,
                                     sequence_generator(plan["seed"], seq), plan["proposal_temperature"])
            encoded = fmt.encode_signals(layout, signals.top_ids.numpy(), signals.top_logp.numpy(),
                                         signals.log_rest.numpy(), signals.sample_ids.numpy(),
                                         signals.sample_logp.numpy(), signals.sample_logw.numpy())
            for name, value in encoded.items():
                arrays[name][where] = value
            if want_hidden:
                arrays["hidden"][where] = out.hidden_states[-1][row, :n].float().cpu().numpy()
            if masker is not None:
                arrays["mlm_input"][where] = inputs[row][0].astype(id_dtype)
                arrays["mlm_target"][where] = inputs[row][1]
        bar.update(len(chosen))
    for array in arrays.values():
        array.flush()
    del arrays
    np.save(tmp / "offsets.npy", offsets, allow_pickle=False)
    os.replace(tmp, final)


def _write_aligned(chosen: list[int], inputs: list, retokenizer, model, plan: dict, device, arrays: dict,
                   offsets: np.ndarray, first: int, layout) -> None:
    """The rows of `chosen` for a student of another tokenizer: at each student position that carries a teacher
    position (distil.cross_tokenizer.alignment), the teacher's signals there; the other rows stay empty and
    unflagged."""
    logits, teacher_position = retokenizer.teacher_logits(model, [ids.tolist() for ids, _ in inputs],
                                                          plan["vocab_size"], device)
    for row, seq in enumerate(chosen):
        at = int(offsets[seq - first])
        positions = teacher_position[row, : len(inputs[row][0])]
        carried = np.nonzero(positions >= 0)[0]
        arrays[fmt.CARRIED][at: at + len(positions)] = positions >= 0
        if not len(carried):
            continue
        signals = sparse_signals(logits[row, torch.as_tensor(positions[carried])].float().cpu(), plan["k"],
                                 plan["temperature"])
        encoded = fmt.encode_signals(layout, signals.top_ids.numpy(), signals.top_logp.numpy(),
                                     signals.log_rest.numpy())
        for name, value in encoded.items():
            arrays[name][at + carried] = value


def _store_bytes(root: Path, n_shards: int) -> int | None:
    """The size of the finished store, extrapolated from its finished shards (None before the first)."""
    finished = [p for p in root.glob("shard-*") if p.is_dir()]
    return int(sum(directory_bytes(p) for p in finished) * n_shards / len(finished)) if finished else None


def _shard_bytes(path: Path) -> tuple[int, int]:
    """(bytes of every array, bytes of the hidden states) of one shard."""
    total = hidden = 0
    for entry in path.iterdir():
        total += entry.stat().st_size
        if entry.name == "hidden.npy":
            hidden += entry.stat().st_size
    return total, hidden


def _finish(root: Path, plan: dict, n_shards: int) -> dict | None:
    """Write the manifest once every shard is complete; None while some are missing."""
    size = plan["shard_size"]
    missing = [i for i in range(n_shards) if not (root / fmt.shard_name(i)).is_dir()]
    if missing:
        return None
    total = hidden = 0
    shard_list = []
    for i in range(n_shards):
        path = root / fmt.shard_name(i)
        b, h = _shard_bytes(path)
        total, hidden = total + b, hidden + h
        entry = {"name": path.name, "first_sequence": i * size,
                 "sequences": min(plan["data"]["sequences"], (i + 1) * size) - i * size}
        if plan.get("masking"):
            entry["masks_digest"] = fmt.masks_digest(path)
        shard_list.append(entry)
    positions = plan["data"]["positions"]
    manifest = {**plan, "shards": shard_list, "bytes": total,
                "bytes_per_token": round(total / max(positions, 1), 2),
                "signal_bytes_per_token": round((total - hidden) / max(positions, 1), 2)}
    write_json_atomic(root / fmt.MANIFEST, manifest)
    return manifest


def _retokenizer(student_tokenizer: str | None, teacher_tokenizer, objective: str, sampled: int, data: str):
    """The student -> teacher tokenization of a store for a student of another tokenizer, or None."""
    if not student_tokenizer:
        return None
    from distil.checks import check_data_matches_tokenizer
    from distil.cross_tokenizer.retokenize import Retokenizer
    from distil.loading import load_tokenizer

    if objective != "clm":
        raise DistilError("--student-tokenizer aligns a causal teacher's next-token distributions by text; a masked-LM "
                          "teacher predicts masked tokens of its own tokenization, which a student of another "
                          "tokenizer does not share. Cache a causal teacher, or leave --student-tokenizer out.")
    if sampled:
        raise DistilError("--sampled draws tail tokens of the teacher's vocabulary, which the cross-vocabulary "
                          "divergences (uld, hybrid) do not compare. Leave --sampled out with --student-tokenizer.")
    tokenizer = load_tokenizer(student_tokenizer)
    check_data_matches_tokenizer(data, tokenizer, None)
    return Retokenizer(tokenizer, teacher_tokenizer)


def cache_teacher(teacher: str, data: str, output: str, top_k: int = 128, sampled: int = 0, temperature: float = 2.0,
                  split: str = "train", batch_size: int = 8, max_length: int | None = None, overwrite: bool = False,
                  hidden_states: str | None = None, store_format: str | None = None, proposal_temperature: float = 1.0,
                  seed: int = 0, shard_size: int = 1024, dtype: str = "float32", progress: bool = True,
                  rank: int | None = None, world: int | None = None, mlm_probability: float | None = None,
                  mlm_smoothing: float | None = None, mask_replace: Sequence[float] | None = None,
                  logprobs: str | None = None, student_tokenizer: str | None = None) -> dict:
    """Write the teacher-signal store of `teacher` over split `split` of prepared `data` into `output`.

    `store_format` is one of format.STORE_FORMATS (`logprobs` is its earlier name; the default is
    format.DEFAULT_STORE_FORMAT).

    A masked-LM teacher scores each sequence masked with `mlm_probability`, `mlm_smoothing` and `mask_replace`
    (the recipe's loss.* settings, its defaults when not given), as training would mask it.

    `student_tokenizer`: the data was prepared with this tokenizer, another than the teacher's (a student of
    another vocabulary): each sequence's text is read by the teacher with its own tokenizer and the store keeps,
    at the student's positions that carry a teacher position, the teacher's signals there
    (distil.cross_tokenizer; `--format float32 --top-k` the teacher's vocabulary stores them exactly).

    Returns the manifest when the store is complete (this process wrote the last shards), else the plan with
    `"finished": False` (other processes, or slices given by rank/world, still have shards to write)."""
    from distil.loading import hidden_size_of, vocab_size_of
    from distil.checks import check_data_matches_tokenizer

    hidden_states = None if hidden_states in (None, "none") else hidden_states
    store_format = store_format or logprobs or DEFAULT_STORE_FORMAT
    _check_settings(top_k, sampled, temperature, proposal_temperature, batch_size, shard_size, hidden_states,
                    store_format)
    if dtype not in DTYPES:
        raise DistilError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    masking = _masking_settings(mlm_probability, mlm_smoothing, mask_replace, seed)  # used for masked-LM teachers
    rank, world, barrier, distributed = _process_group(rank, world)
    if not 0 <= rank < world:
        raise DistilError(f"Process {rank} of {world} does not exist: the rank must be in 0..{world - 1}.")
    sequences = TokenSequences(data, split, max_length)   # refuses a missing directory or split
    manifest = sequences.manifest
    model, tokenizer, objective, teacher_config = _load_teacher(teacher, dtype)
    retokenizer = _retokenizer(student_tokenizer, tokenizer, objective, sampled, data)
    if retokenizer is None:
        check_data_matches_tokenizer(data, tokenizer, model.config)
    vocab = min(vocab_size_of(model.config), len(tokenizer))  # padding rows of the output layer are no tokens
    if top_k > vocab or (sampled and top_k >= vocab):
        raise DistilError(f"--top-k {top_k} is too large for the teacher's {vocab}-token vocabulary"
                          f"{' (with --sampled, the tail outside the top-k must hold tokens to draw)' if sampled else ''}."
                          f" Use --top-k {vocab - 1 if sampled else vocab} or less.")
    lengths = sequences.lengths
    masking = masking if objective == "mlm" else None
    masker = _store_masker(masking, data, manifest, vocab, tokenizer) if masking else None
    plan = {
        "kind": fmt.KIND, "format_version": fmt.FORMAT_VERSION,
        # the hash of the configuration as training reads it from teacher.path (load_config), to compare
        "teacher": {"config_hash": fmt.config_hash(teacher_config), "model_type": model.config.model_type,
                    "num_hidden_layers": int(getattr(model.config, "num_hidden_layers", 0) or 0),
                    "hidden_size": hidden_size_of(model.config)},
        "teacher_path": str(teacher),
        "vocab_size": vocab, "tokenizer_fingerprint": manifest["tokenizer"]["vocab_fingerprint"],
        "objective": objective, "k": top_k, "sampled": sampled, "temperature": float(temperature),
        "proposal_temperature": float(proposal_temperature), "seed": seed, "split": split,
        "data": {"fingerprint": fmt.data_fingerprint(data, split), "max_length": max_length,
                 "sequences": len(sequences), "positions": int(lengths.sum())},
        "data_path": str(data),
        "ids_dtype": fmt.ids_dtype(vocab).str, "store_format": fmt.store_format_for(store_format, top_k),
        "log_rest_dtype": "float16", "sample_dtype": "float16",
        "hidden_states": hidden_states, "hidden_size": hidden_size_of(model.config) if hidden_states else None,
        "shard_size": shard_size, "masking": masking,
    }
    if retokenizer is not None:
        plan["student_tokenizer"] = str(student_tokenizer)
    root = Path(output)
    with output_lock(root, "cache-teacher", take=rank == 0):  # the other processes write shards beside it
        if rank == 0:
            resumed = _prepare_output(root, plan, overwrite)
            if not resumed:
                _copy_teacher_files(teacher, model, tokenizer, root / fmt.TEACHER_DIR)
                write_json_atomic(root / fmt.PLAN, plan)
        barrier()
        if rank != 0:
            existing = fmt.read_json(root / fmt.PLAN)
            if existing is None or _same_plan(existing, plan):
                raise DistilError(f"Process {rank} finds no plan for these settings in {root}: start every process with "
                                  "the same command (process 0 writes the plan).")
        n_shards = -(-len(sequences) // shard_size)
        mine = [i for i in range(rank, n_shards, world) if not (root / fmt.shard_name(i)).is_dir()]
        done = len(range(rank, n_shards, world)) - len(mine)
        if done:
            log.info("%s: %d of this process's shards are finished already and kept", root, done)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model.to(device)
        pad_id = pad_id_of(manifest)
        todo = sum(min(len(sequences), (i + 1) * shard_size) - i * shard_size for i in mine)
        started = time.perf_counter()
        with tqdm(total=todo, unit="seq", desc="cache-teacher", disable=not (progress and rank == 0),
                  dynamic_ncols=True) as bar:
            for index in mine:
                with disk_space_errors(root, lambda: _store_bytes(root, n_shards),
                                       partial=root / f".{fmt.shard_name(index)}.tmp-{os.getpid()}"):
                    _write_shard(index, root, sequences, model, plan, pad_id, batch_size, device, bar, masker,
                                 retokenizer)
        elapsed = time.perf_counter() - started
        barrier()
        if rank == 0 or not distributed:
            result = _finish(root, plan, n_shards)
        else:
            result = None
        barrier()
        if result is None and distributed:  # process 0 wrote the manifest
            result = fmt.read_json(root / fmt.MANIFEST)
        if result is None:
            log.info("%s: this process's %d shards are written; the store is finished when every process's are",
                     root, len(mine))
            return {**plan, "finished": False}
        log.info("teacher-signal store %s: %d sequences, %d positions, %s (%.1f bytes per token; %.1f without hidden "
                 "states), k=%d, k'=%d, T=%g, in %.1f s", root, len(sequences), plan["data"]["positions"],
                 human_size(result["bytes"]), result["bytes_per_token"], result["signal_bytes_per_token"], top_k, sampled,
                 temperature, elapsed)
        return {**result, "finished": True}
