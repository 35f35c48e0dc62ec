"""`distil evaluate`: compare a teacher, its students and baselines in one table.

For every model, in the order given (the first is the one the others are measured against, normally the
teacher): held-out LM quality on fixed targets, hidden-state fidelity to a reference model, parameters and
weights on disk, CPU (and GPU) latency and throughput, and, with a labelled task, accuracy and macro-F1
after identical fine-tuning; for embedding models, agreement with the first model's embeddings and scores on
labelled embedding tasks (embedding_quality). Every number also appears as a ratio to the first model's. The
pieces live in distil.evaluation; this module runs them one model at a time, except speed: the base models are
kept (on CPU) and timed together in interleaved rounds, so that load on the machine hits every model alike.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import tempfile
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.evaluation import embedding_quality, lm_quality, retention, speed, table
from distil.loading import check_exists, load_tokenizer
from distil.outputs import check_output_dir, check_writable, remove_stale_leftovers, write_json_atomic

log = logging.getLogger(__name__)

_GENERIC_NAMES = {"student", "model", "final", "output", "teacher"}


def parse_model_specs(specs: list[str]) -> list[tuple[str, str]]:
    """'NAME=PATH' or 'PATH' -> (name, path); unnamed models are called after their last path components."""
    if not specs:
        raise DistilError("Give at least one model to evaluate (the first one is the reference for the ratios).")
    parsed = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name and "/" not in name and not Path(spec).exists():
            parsed.append((name, path))
        else:
            parsed.append(("", spec))
    named = []
    for name, path in parsed:
        if not name:
            parts = Path(path.rstrip("/")).parts
            name = parts[-1] if parts else path
            if name.lower() in _GENERIC_NAMES and len(parts) > 1:
                name = f"{parts[-2]}/{parts[-1]}"
        named.append((name, path))
    names = [n for n, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DistilError(f"Two models would be called {duplicates[0]!r}. Name them: NAME=PATH (e.g. teacher=runs/t).")
    return named


def _devices(devices: list[str] | None) -> list[str]:
    if devices is None:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        if device not in ("cpu", "cuda"):
            raise DistilError(f"Unknown speed device {device!r}. Use cpu and/or cuda.")
        if device == "cuda" and not torch.cuda.is_available():
            raise DistilError("Speed on cuda was asked for, but torch sees no GPU here. Leave cuda out.")
    return list(devices)


def _check_output(output: str | None, overwrite: bool) -> None:
    if output is None:
        return
    path = Path(output)
    if path.is_dir():
        raise DistilError(f"The output {path} is a directory. Give a file name such as results.json.")
    if path.exists() and not overwrite:
        raise DistilError(f"{path} already exists. Nothing was changed. Pass --overwrite to replace it, or choose another file.")
    if path.exists() and not _written_by_evaluate(path):
        raise DistilError(
            f"--overwrite would replace {path}, which is not a result of distil evaluate (a JSON object with settings, "
            "models and markdown). Nothing was changed; --overwrite only replaces distil's own results. Give another "
            "--output file, or move that file away yourself and run again."
        )
    check_writable(path)
    remove_stale_leftovers(path)


def _written_by_evaluate(path: Path) -> bool:
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(written, dict) and isinstance(written.get("settings"), dict)
            and isinstance(written.get("models"), list) and isinstance(written.get("markdown"), str))


def _check_task_output_dir(task_output_dir: str | None, named: list[tuple[str, str]], seeds: list[int]) -> None:
    """Each fine-tune replaces its folder under --task-output-dir; refuse now, not after the LM evaluation, when
    one of them holds anything distil did not write."""
    if task_output_dir is None:
        return
    for index, (name, _path) in enumerate(named):
        for seed in seeds:
            check_output_dir(Path(task_output_dir) / retention._folder_name(index, name) / f"seed-{seed}", overwrite=True,
                             flag="--task-output-dir")


def evaluate(
    models: list[str],
    data: list[str] | None = None,
    split: str = "heldout",
    max_sequences: int = 256,
    max_length: int = 128,
    batch_size: int = 16,
    mask_seed: int = 0,
    mlm_probability: float = 0.15,
    reference: str | None = None,
    speed_test: bool = True,
    devices: list[str] | None = None,
    seq_length: int = 128,
    speed_batch_size: int = 32,
    warmup: int = 3,
    repeats: int = 10,
    cpu_threads: int | None = None,
    task_train: str | None = None,
    task_eval: str | None = None,
    seeds: int = 1,
    first_seed: int = 42,
    task_epochs: int = 3,
    task_lr: float = 5e-5,
    task_batch_size: int = 32,
    task_max_length: int = 128,
    text_columns: list[str] | None = None,
    label_column: str = "label",
    task_output_dir: str | None = None,
    sts: str | None = None,
    retrieval: str | None = None,
    classification: list[str] | None = None,
    mteb: list[str] | None = None,
    neighbours_k: int = 10,
    knn_k: int = 10,
    output: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate `models` (paths, hub ids or NAME=PATH); print a Markdown table and return the results.

    data: one prepared directory (its `split` is read) or text files. The result (also written as JSON to
    `output`) holds per model "lm", "fidelity", "size", "architecture", "speed", "downstream", "embedding"
    (distil.evaluation.embedding_quality: agreement with the first model's embeddings on `data`, and the
    labelled `sts` / `retrieval` / `classification` files and `mteb` tasks), "notes", then
    "speed_check" (do identical architectures time alike?), "ratios" to the first model and "markdown".
    """
    named = parse_model_specs(models)
    # Every name is checked before the first model is evaluated: a typo in the last one must not cost the rest.
    for name, path in named + ([("reference", reference)] if reference else []):
        check_exists(path, f"model {name}" if name != "reference" else "reference model")
    _check_output(output, overwrite)
    speed_devices = _devices(devices) if speed_test else []
    if bool(task_train) != bool(task_eval):
        raise DistilError("Give both --task-train and --task-eval (labelled .csv / .jsonl files), or neither.")
    if seeds < 1:
        raise DistilError(f"--seeds must be at least 1, got {seeds}.")
    if task_train:
        _check_task_output_dir(task_output_dir, named, [first_seed + i for i in range(seeds)])
    if reference and not data:
        raise DistilError("--reference compares hidden states on held-out text; give the text with --data.")
    if not 0 < mlm_probability < 1:
        raise DistilError(f"--mlm-probability must be in (0, 1), got {mlm_probability}.")
    if cpu_threads is not None and cpu_threads < 1:
        raise DistilError(f"--threads must be at least 1, got {cpu_threads}.")
    embedding_tasks = embedding_quality.load_tasks(sts, retrieval, classification, mteb, neighbours_k, knn_k)
    with _torch_threads(cpu_threads):
        lm_device = "cuda" if torch.cuda.is_available() else "cpu"

        text = lm_quality.load_heldout(data, split, max_sequences, max_length) if data else None
        reference_pooled, fidelity_texts = None, None
        if reference:
            ref_name, ref_path = parse_model_specs([reference])[0]
            tokenizers = [load_tokenizer(ref_path)] + [load_tokenizer(path) for _, path in named]
            fidelity_texts = lm_quality.texts_for_fidelity(text, tokenizers)
            if fidelity_texts is None:
                raise DistilError(
                    f"The prepared data in {data[0]} was made with a tokenizer none of the models uses, so its sentences "
                    "cannot be decoded for the hidden-state comparison. Give the raw text files with --data instead."
                )
            ref = lm_quality.load_eval_model(ref_name, ref_path, lm_device)
            reference_pooled = lm_quality.mean_pooled_states(ref.base, ref.tokenizer, fidelity_texts, max_length,
                                                             batch_size, lm_device)
            del ref
            gc.collect()

        bpb_texts = None
        if text is not None:
            bpb_texts = lm_quality.texts_for_bits_per_byte(
                text, [] if text.lines is not None else [load_tokenizer(path) for _, path in named])
        results = []
        speed_bases: list[torch.nn.Module] = []  # timed together after the loop
        for name, path in named:
            log.info("evaluating %s (%s)", name, path)
            model = lm_quality.load_eval_model(name, path, lm_device)
            limit = speed.max_positions(model.base)
            if limit is not None and (text is not None or reference_pooled is not None) and max_length > limit:
                raise DistilError(f"--max-length {max_length} exceeds the {limit} positions of {name}. Use {limit} or less.")
            entry: dict = {"name": name, "path": path, "kind": model.kind, "lm": None, "fidelity": None}
            if text is not None and model.kind is not None:
                entry["lm"] = _lm_scores(model, text, batch_size, mask_seed, mlm_probability, lm_device)
            if text is not None and entry["lm"] is None and model.kind is not None:
                model.notes.append(f"LM quality skipped: the prepared data in {data[0]} uses another tokenizer's ids")
            if bpb_texts and model.kind == "clm":  # tokenizer-independent: measured whatever the data's ids
                entry["lm"] = {**(entry["lm"] or {}), **lm_quality.causal_lm_bits_per_byte(
                    model.lm, model.tokenizer, bpb_texts, max_length, batch_size, lm_device)}
            if reference_pooled is not None:
                pooled = lm_quality.mean_pooled_states(model.base, model.tokenizer, fidelity_texts, max_length,
                                                       batch_size, lm_device)
                if pooled.shape == reference_pooled.shape:
                    entry["fidelity"] = lm_quality.hidden_fidelity(pooled, reference_pooled)
                else:
                    model.notes.append(f"hidden-state cosine skipped: hidden size {pooled.shape[1]} differs from the "
                                       f"reference's {reference_pooled.shape[1]}")
            entry["size"] = {"params": speed.count_parameters(model.base), "disk_bytes": speed.weights_on_disk(path)}
            if entry["size"]["disk_bytes"] is None:
                model.notes.append("size on disk unknown (not a local directory or file)")
            entry["architecture"] = speed.architecture_fingerprint(model.base)
            entry["speed"] = {}
            if speed_devices:
                speed.check_speed_settings([model.base], seq_length, speed_batch_size, warmup, repeats)
                speed_bases.append(model.base.to("cpu"))  # off the GPU until every model is timed
            entry["notes"] = model.notes
            results.append(entry)
            del model
            gc.collect()
        speed_check = None
        if speed_devices:
            timings, speed_check = speed.compare_speeds([e["name"] for e in results], speed_bases, speed_devices,
                                                        seq_length, speed_batch_size, warmup, repeats)
            for entry, timing in zip(results, timings):
                entry["speed"] = timing
            del speed_bases
            gc.collect()

        heldout_texts = None
        if text is not None:
            heldout_texts = fidelity_texts or lm_quality.texts_for_fidelity(text, [load_tokenizer(p) for _, p in named])
        embedded = embedding_quality.evaluate_embeddings(named, heldout_texts, embedding_tasks, max_length, batch_size,
                                                         lm_device)
        for entry, (scores, note) in zip(results, embedded):
            entry["embedding"] = scores
            if note:
                entry["notes"].append(note)
            if scores is not None and text is not None and heldout_texts is None:
                entry["notes"].append("embedding agreement skipped: the prepared data's ids match no model's tokenizer")

        task_settings = None
        if task_train:
            seed_list = [first_seed + i for i in range(seeds)]
            settings = {"epochs": task_epochs, "lr": task_lr, "batch_size": task_batch_size, "max_length": task_max_length,
                        "text_columns": text_columns, "label_column": label_column}
            with tempfile.TemporaryDirectory(prefix="distil-evaluate-") as scratch:
                downstream = retention.fine_tune_all(named, task_train, task_eval, task_output_dir or scratch, seed_list,
                                                     settings, progress)
            for entry, scores in zip(results, downstream):
                entry["downstream"] = scores
            task_settings = {"train_file": str(task_train), "eval_file": str(task_eval), "seeds": seed_list,
                             "kept_in": task_output_dir, **settings}

        summary = {
            "settings": {
                "data": text.source if text else None, "max_sequences": max_sequences, "max_length": max_length,
                "mask_seed": mask_seed, "mlm_probability": mlm_probability, "mask_replace": list(lm_quality.EVAL_MASK_REPLACE),
                "reference": reference,
                "speed": {"seq_length": seq_length, "batch_size": speed_batch_size, "warmup": warmup, "repeats": repeats,
                          "devices": speed_devices, "cpu_threads": torch.get_num_threads(),
                          "method": "interleaved rounds"} if speed_devices else None,
                "task": task_settings,
                "embedding": {**embedding_tasks.settings, "heldout_texts": len(heldout_texts) if heldout_texts else None}
                if any(scores is not None for scores, _ in embedded) else None,
            },
            "models": results,
            "speed_check": speed_check,
        }
        flats = [table.flat_metrics(m) for m in results]
        summary["ratios"] = [{"name": m["name"], **r} for m, r in zip(results, table.ratios_to_first(flats))]
        summary["markdown"] = table.results_markdown(summary)
        print(summary["markdown"])
        _record_in_model_cards(named, flats, summary, task_train is not None)
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(output, summary)
        return summary


def _record_in_model_cards(named: list[tuple[str, str]], flats: list[dict], summary: dict, with_task: bool) -> None:
    """Students made by distil get these results in their model card (model-index), measured against the first
    model (the teacher). Speed ratios the speed check found untrustworthy are left out."""
    from distil.model_card import add_evaluation

    doubtful = set((summary.get("speed_check") or {}).get("untrustworthy_ratios") or [])
    for (name, path), flat, ratios in zip(named[1:], flats[1:], summary["ratios"][1:]):
        if Path(path).is_dir():
            kept = {k: v for k, v in ratios.items() if k not in doubtful}
            data = ((summary.get("settings") or {}).get("data") or "").split(", ")[0] or None
            if add_evaluation(path, name, flat, kept, named[0][0], "text-classification" if with_task else None,
                              summary["markdown"], data):
                log.info("recorded the evaluation of %s in its model card %s", name, Path(path) / "README.md")


@contextlib.contextmanager
def _torch_threads(count: int | None):
    """CPU threads for the whole evaluation (timings included), restored afterwards."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _lm_scores(model: lm_quality.EvalModel, text: lm_quality.HeldoutText, batch_size: int, mask_seed: int,
               mlm_probability: float, device: str) -> dict | None:
    found = lm_quality.sequences_for(text, model.tokenizer)
    if found is None:
        return None
    sequences, counts = found
    pad_id = lm_quality.pad_id_for(model.tokenizer)
    if model.kind == "mlm":
        targets = lm_quality.fixed_mlm_targets(sequences, model.tokenizer, counts, mask_seed, mlm_probability)
        scores = lm_quality.masked_lm_scores(model.lm, targets, pad_id, batch_size, device)
        scores["targets_digest"] = lm_quality.targets_digest(targets)
        return scores
    return lm_quality.causal_lm_scores(model.lm, sequences, pad_id, batch_size, device)
