"""Fine-tune a student on a task, optionally distilling from a teacher already fine-tuned on it.

This is DistilBERT's "second step": the student (a base or MLM checkpoint, given a fresh task
head) learns from the task labels and, when a teacher is given, from the teacher's softened
outputs on the same inputs (see task_losses). Without a teacher it is plain fine-tuning, used to
measure how much of the teacher's downstream score a student keeps when both are fine-tuned the
same way.

The loop is plain PyTorch: AdamW with linear warm-up then linear decay, gradient clipping, one
evaluation per epoch. Training losses go to metrics.jsonl as they are made; the final model,
tokenizer, eval_results.json and task_config.json are written together into the output directory
(via a temporary directory, so a failed run leaves nothing half-written).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distil.recipe_checks import ANY_FINITE, FRACTION, NON_NEGATIVE, POSITIVE, check_number
from distil.errors import DistilError
from distil.loading import load_model, load_tokenizer
from distil.outputs import atomic_output_dir, check_output_dir, locks_output, write_json_atomic
from distil.tasks import task_data
from distil.tasks.task_losses import qa_distillation_loss, qa_task_loss, task_distillation_loss, task_loss
from distil.training.optimisation import linear_warmup_decay

log = logging.getLogger(__name__)

TASKS = ("classification", "ner", "qa")
DEFAULT_MAX_LENGTH = {"classification": 128, "ner": 128, "qa": 384}
# A fixed text tokenized by both tokenizers: same vocabulary but different normalisation (say,
# lowercasing) would still feed the teacher different ids than the student.
_TOKENIZER_PROBE = "Hello World! Naïve café, 1984 - O'Neill's résumé: ünïcode 東京 and [MASK] tokens."


def _auto_class(task: str):
    import transformers

    return {
        "classification": transformers.AutoModelForSequenceClassification,
        "ner": transformers.AutoModelForTokenClassification,
        "qa": transformers.AutoModelForQuestionAnswering,
    }[task]


@locks_output("task")
def run_task(
    task: str,
    student: str,
    train_file: str | Path | None,
    eval_file: str | Path | None,
    output_dir: str | Path,
    teacher: str | None = None,
    alpha_ce: float = 0.5,
    alpha_task: float = 0.5,
    temperature: float = 2.0,
    epochs: int = 3,
    lr: float = 5e-5,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    max_length: int | None = None,
    doc_stride: int = 128,
    max_query_length: int = 64,
    max_answer_length: int = 30,
    n_best_size: int = 20,
    null_score_diff_threshold: float = 0.0,
    version_2: bool | None = None,
    ner_scheme: str = "IOB1",
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    label_order: Sequence[str] | str | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    max_steps: int | None = None,
    log_every: int = 50,
    seed: int = 42,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Fine-tune (or task-distil, with `teacher`) `student` on `task`; return the final eval metrics.

    Metrics: classification {"accuracy", "macro_f1"}; ner {"precision", "recall", "f1", "accuracy", ...}
    (fractions); qa {"exact_match", "f1", "total"} in percent (+ HasAns_/NoAns_ for SQuAD v2.0);
    all with "eval_loss" (the student's task cross-entropy on the eval set).

    `label_order` (classification, ner): the data's label names in the teacher's id order (a list, or
    one comma-separated string), needed when the teacher's classes are unnamed (LABEL_0...) and the
    data's labels are names nothing orders; see task_data.resolve_label_order.
    """
    if label_order is not None and task == "qa":
        raise DistilError("label_order applies to classification and ner, not qa (it predicts positions). Leave it out.")
    _check_arguments(task, teacher, alpha_ce, alpha_task, temperature, epochs, lr, batch_size, warmup_fraction,
                     max_steps, log_every)
    _check_floats(weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                  null_score_diff_threshold=null_score_diff_threshold)
    if max_length is not None and max_length < 1:
        raise DistilError(f"max_length must be at least 1 token, got {max_length} (leave it out for the default: "
                          f"{DEFAULT_MAX_LENGTH.get(task, 128)} for {task}).")
    check_output_dir(output_dir, overwrite)  # fail now, not after training
    max_length = max_length or DEFAULT_MAX_LENGTH[task]
    device = resolve_device(device)

    tokenizer = load_tokenizer(student)
    _check_room_for_text(task, tokenizer, max_length)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DistilError(f"The tokenizer of {student} has neither a padding nor an end-of-text token, so batches "
                              "cannot be padded. Save the tokenizer with a pad token.")
        # GPT-style tokenizers have no pad token; their end-of-text token pads (attention masks hide it).
        tokenizer.pad_token = tokenizer.eos_token
    teacher_labels, teacher_model = None, None
    if teacher is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(teacher), student, teacher)
        # Loaded before the data: a teacher without a trained head is the first thing to report, and
        # its class names (config.id2label) fix the label ids.
        teacher_model = load_teacher(task, teacher)
        if task != "qa":
            teacher_labels = task_data.TeacherLabels.from_config(teacher_model.config)

    if task == "classification":
        data = task_data.prepare_classification(
            tokenizer, train_file, eval_file, max_length, teacher_labels, text_columns, label_column, dataset,
            dataset_config, train_split, eval_split, label_order)
    elif task == "ner":
        data = task_data.prepare_ner(tokenizer, train_file, eval_file, max_length, teacher_labels, ner_scheme,
                                     label_order)
    else:
        data = task_data.prepare_qa(tokenizer, train_file, eval_file, max_length, doc_stride, max_query_length,
                                    max_answer_length, n_best_size, null_score_diff_threshold, version_2)

    # Seeded here, so the student's fresh head depends on the seed alone, not on what was loaded before.
    _seed_everything(seed)
    student_model = load_student(task, student, data.label_names).to(device)
    if student_model.config.pad_token_id is None:
        student_model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    teacher_model = teacher_model.to(device) if teacher_model is not None else None
    for name, model in (("student", student_model), ("teacher", teacher_model)):
        if model is not None:
            _check_length_fits(model, max_length, name)

    settings = {
        "task": task, "student": student, "teacher": teacher, "alpha_ce": alpha_ce, "alpha_task": alpha_task,
        "temperature": temperature, "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length,
        "warmup_fraction": warmup_fraction, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm,
        "max_steps": max_steps, "seed": seed, "train_file": _str(train_file), "eval_file": _str(eval_file),
        "dataset": dataset, "dataset_config": dataset_config, "label_names": data.label_names,
        "label_order": label_order.split(",") if isinstance(label_order, str) else _list(label_order), **data.details,
    }
    if task == "qa":
        settings.update(doc_stride=doc_stride, max_query_length=max_query_length, max_answer_length=max_answer_length,
                        n_best_size=n_best_size, null_score_diff_threshold=null_score_diff_threshold)
    log.info("task %s: %d training rows, %d eval rows, %s", task, len(data.train["input_ids"]),
             len(data.eval["input_ids"]), "distilling from " + teacher if teacher else "no teacher (plain fine-tuning)")

    with atomic_output_dir(output_dir, overwrite, command="task") as tmp:
        metrics = _train(
            task, student_model, teacher_model, data, tokenizer.pad_token_id, tmp / "metrics.jsonl",
            alpha_ce=alpha_ce, alpha_task=alpha_task, temperature=temperature, epochs=epochs, lr=lr,
            batch_size=batch_size, eval_batch_size=eval_batch_size or 2 * batch_size, warmup_fraction=warmup_fraction,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, max_steps=max_steps, log_every=log_every,
            seed=seed, device=device, progress=progress, extra_dir=tmp,
        )
        student_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "eval_results.json", metrics)
        write_json_atomic(tmp / "task_config.json", settings)
    log.info("task %s done: %s -> %s", task, json.dumps(metrics), output_dir)
    return metrics


def _check_arguments(task, teacher, alpha_ce, alpha_task, temperature, epochs, lr, batch_size, warmup_fraction,
                     max_steps, log_every) -> None:
    if task not in TASKS:
        raise DistilError(f"Unknown task {task!r}. Choose one of {', '.join(TASKS)}.")
    _check_floats(temperature=temperature, alpha_ce=alpha_ce, alpha_task=alpha_task, lr=lr,
                  warmup_fraction=warmup_fraction)
    if alpha_ce + alpha_task == 0:
        raise DistilError("alpha_ce and alpha_task are both 0, so there is nothing to learn. Give one a positive weight.")
    if teacher is None and alpha_task == 0:
        raise DistilError("alpha_task is 0 and there is no teacher, so there is nothing to learn: without --teacher "
                          "the task loss is the only one. Give alpha_task a positive weight, or pass --teacher.")
    if epochs < 1 or batch_size < 1 or log_every < 1 or (max_steps is not None and max_steps < 1):
        raise DistilError(
            f"epochs ({epochs}), batch_size ({batch_size}), log_every ({log_every}) and max_steps ({max_steps}) must be "
            "at least 1."
        )


# The meaningful values of the task's float options, checked like a training recipe's (distil.recipe_checks.Range).
TASK_FLOAT_RANGES = {
    "temperature": POSITIVE, "alpha_ce": NON_NEGATIVE, "alpha_task": NON_NEGATIVE, "lr": POSITIVE,
    "warmup_fraction": FRACTION, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
    "null_score_diff_threshold": ANY_FINITE,
}


def _check_floats(**values) -> None:
    for name, value in values.items():
        check_number(f"The task option {name} (--{name.replace('_', '-')})", value, TASK_FLOAT_RANGES[name])


def _check_room_for_text(task: str, tokenizer, max_length: int) -> None:
    """Classification and NER windows hold the tokenizer's special tokens and at least one token of text (QA
    checks its own room: question, context and stride)."""
    if task == "qa":
        return
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= specials:
        raise DistilError(f"max_length {max_length} leaves no room for text: the tokenizer adds {specials} special "
                          f"tokens to every sequence. Use a larger --max-length (the default for {task} is "
                          f"{DEFAULT_MAX_LENGTH[task]}).")


def resolve_device(device: str | None) -> torch.device:
    """The device to train on (default: cuda when torch sees a GPU), refused when torch cannot use it here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DistilError(f"Unknown device {device!r}. Use cpu, cuda or cuda:N (or leave --device out).") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DistilError(f"--device {device} was asked for, but torch sees no GPU here (torch "
                              f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}). Use --device cpu, "
                              "or leave --device out to use a GPU when there is one.")
        if resolved.index is not None and resolved.index >= count:
            raise DistilError(f"--device {device} names GPU {resolved.index}, but torch sees {count} GPU(s) here "
                              f"(cuda:0 to cuda:{count - 1}).")
    return resolved


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _list(values) -> list | None:
    return None if values is None else list(values)


def _str(path) -> str | None:
    return None if path is None else str(path)


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    """Task distillation feeds one set of token ids to both models, so their tokenizers must agree."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        only_student = len(student_vocab.keys() - teacher_vocab.keys())
        only_teacher = len(teacher_vocab.keys() - student_vocab.keys())
        moved = sum(1 for tok, i in student_vocab.items() if tok in teacher_vocab and teacher_vocab[tok] != i)
        raise DistilError(
            f"The student ({student}) and teacher ({teacher}) use different vocabularies ({len(student_vocab)} vs "
            f"{len(teacher_vocab)} tokens: {only_student} only in the student's, {only_teacher} only in the teacher's, "
            f"{moved} with different ids). Task distillation feeds the same token ids to both models, so they must "
            "share a tokenizer: pair a student with a teacher of its own family (e.g. distilbert-base-uncased with a "
            "fine-tuned bert-base-uncased)."
        )
    if student_tokenizer(_TOKENIZER_PROBE)["input_ids"] != teacher_tokenizer(_TOKENIZER_PROBE)["input_ids"]:
        raise DistilError(
            f"The student ({student}) and teacher ({teacher}) tokenizers share a vocabulary but split text differently "
            "(e.g. one lowercases or strips accents and the other does not). Save the teacher's tokenizer with the "
            "student, or use a student and teacher built with the same tokenizer settings."
        )


def load_student(task: str, name_or_path: str, label_names: list[str] | None):
    """The student with a task head; a head the checkpoint lacks (or sized for other labels) starts fresh."""
    kwargs = {}
    if label_names is not None:
        _check_student_head_labels(name_or_path, task, label_names)
        kwargs = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                  "label2id": {name: i for i, name in enumerate(label_names)}, "ignore_mismatched_sizes": True}
    model, info = load_model(name_or_path, _auto_class(task), **kwargs)
    new = list(info.get("missing_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
    if new:
        log.info("student %s: %d weights start fresh (the task head): %s", name_or_path, len(new),
                 ", ".join(map(str, new[:8])))
    return model.float()


def _check_student_head_labels(name_or_path: str, task: str, label_names: list[str]) -> None:
    """A student already fine-tuned for this task keeps its head when the label count matches: its classes must
    then be the run's, in the run's order, or every logit would be read as another label."""
    from distil.loading import load_config

    config = load_config(name_or_path)
    if getattr(config, "architectures", None) is None or not any(
            a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in config.architectures):
        return  # a base or MLM checkpoint: the head starts fresh
    own = task_data.TeacherLabels.from_config(config)
    if own.num_labels != len(label_names) or own.names is None or own.names == list(label_names):
        return  # a head of another size starts fresh; unnamed or identical classes are kept as they are
    raise DistilError(
        f"The student {name_or_path} already has a trained {task} head for the classes {own.names} (in id order), "
        f"but this run's classes in id order are {list(label_names)}: the head would keep its weights and read every "
        "class as another. Start from the student's base (or MLM) checkpoint, or pass --label-order "
        f"{','.join(own.names)} if the data's labels are those."
    )


def load_teacher(task: str, name_or_path: str):
    """The fine-tuned teacher, frozen in eval mode; refused when its task head would be freshly initialised."""
    model, info = load_model(name_or_path, _auto_class(task))
    missing = list(info.get("missing_keys", []))
    if missing:
        raise DistilError(
            f"The teacher {name_or_path} has no trained {task} head: {len(missing)} weights would start random "
            f"({', '.join(map(str, missing[:4]))}). The teacher must already be fine-tuned on this task; fine-tune it "
            "first (run the task without a teacher) or use a published fine-tuned checkpoint."
        )
    model.float().eval()
    model.requires_grad_(False)
    return model


def _check_length_fits(model, max_length: int, who: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise DistilError(
            f"max_length {max_length} exceeds the {who}'s {limit} positions. Lower max_length to {limit} or less.")


def _model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, plus token_type_ids for models that have segment embeddings
    (BERT uses them to tell question from context; DistilBERT has none)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    if accepts and getattr(model.config, "type_vocab_size", 1) > 1:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def collate(columns: dict[str, list], rows: Sequence[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad the chosen rows to their longest length; per-token labels are padded with -100."""
    lengths = [len(columns["input_ids"][r]) for r in rows]
    width = max(lengths)
    batch: dict[str, torch.Tensor] = {}
    for key, values in columns.items():
        picked = [values[r] for r in rows]
        if isinstance(picked[0], (list, np.ndarray)):
            fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
            padded = np.full((len(rows), width), fill, dtype=np.int64)
            for i, row in enumerate(picked):
                padded[i, : len(row)] = row
            batch[key] = torch.from_numpy(padded)
        else:
            batch[key] = torch.tensor(picked, dtype=torch.long)
    batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {key: value.to(device) for key, value in batch.items()}


def _logits(task: str, output) -> tuple[torch.Tensor, ...]:
    return (output.start_logits, output.end_logits) if task == "qa" else (output.logits,)


def _loss(task: str, student_logits: tuple, teacher_logits: tuple | None, batch, temperature, alpha_ce, alpha_task):
    if task == "qa":
        positions = (batch["start_positions"], batch["end_positions"])
        if teacher_logits is None:
            return qa_task_loss(*student_logits, *positions)
        return qa_distillation_loss(*student_logits, *teacher_logits, *positions, temperature, alpha_ce, alpha_task)
    if teacher_logits is None:
        return task_loss(student_logits[0], batch["labels"])
    return task_distillation_loss(student_logits[0], teacher_logits[0], batch["labels"], temperature,
                                  alpha_ce, alpha_task)


def _optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Biases and LayerNorm weights (the 1-d parameters) are not decayed, as in BERT.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _train(task, student, teacher, data, pad_id, metrics_path: Path, *, alpha_ce, alpha_task, temperature, epochs, lr,
           batch_size, eval_batch_size, warmup_fraction, weight_decay, max_grad_norm, max_steps, log_every, seed,
           device, progress, extra_dir: Path) -> dict:
    num_rows = len(data.train["input_ids"])
    steps_per_epoch = math.ceil(num_rows / batch_size)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    optimizer = _optimizer(student, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(round(warmup_fraction * total_steps), total_steps))
    order = torch.Generator().manual_seed(seed)
    step, metrics, window = 0, {}, []
    bar = tqdm(total=total_steps, desc=f"{task} {'distil' if teacher is not None else 'fine-tune'}", disable=not progress)
    with open(metrics_path, "w", encoding="utf-8") as log_file:
        for epoch in range(1, epochs + 1):
            student.train()
            permutation = torch.randperm(num_rows, generator=order).tolist()
            for first in range(0, num_rows, batch_size):
                if step >= total_steps:
                    break
                batch = collate(data.train, permutation[first:first + batch_size], pad_id, device)
                teacher_logits = None
                if teacher is not None:
                    with torch.inference_mode():
                        teacher_logits = _logits(task, teacher(**_model_inputs(teacher, batch)))
                    # Inference-mode tensors cannot be saved for backward; a clone made outside is an ordinary tensor.
                    teacher_logits = tuple(t.clone() for t in teacher_logits)
                student_logits = _logits(task, student(**_model_inputs(student, batch)))
                loss, parts = _loss(task, student_logits, teacher_logits, batch, temperature, alpha_ce, alpha_task)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"step {step + 1}: the training loss is {loss.item()}; lower the learning rate.")
                loss.backward()
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
                lr_now = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.append({"loss": loss.item(), **{f"loss_{k}": v.item() for k, v in parts.items()}})
                bar.update(1)
                if step % log_every == 0 or step == total_steps:
                    line = {"step": step, "split": "train", "epoch": epoch,
                            **{k: sum(w[k] for w in window) / len(window) for k in window[0]}, "lr": lr_now}
                    log_file.write(json.dumps(line) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{line['loss']:.4f}")
                    window = []
            metrics, extra = evaluate(task, student, data, pad_id, eval_batch_size, device)
            log_file.write(json.dumps({"step": step, "split": "eval", "epoch": epoch, **metrics}) + "\n")
            log_file.flush()
            log.info("epoch %d (step %d) eval: %s", epoch, step, json.dumps(metrics))
            if step >= total_steps:
                break
    bar.close()
    for name, content in extra.items():
        write_json_atomic(extra_dir / name, content)
    return metrics


@torch.no_grad()
def evaluate(task: str, model, data, pad_id: int, batch_size: int, device) -> tuple[dict, dict]:
    """Run `model` over the eval rows; return (metrics with "eval_loss", extra files such as predictions.json)."""
    model.eval()
    columns = data.eval
    num_rows = len(columns["input_ids"])
    keys = ("start_logits", "end_logits") if task == "qa" else ("logits",)
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    loss_sum = 0.0
    for first in range(0, num_rows, batch_size):
        rows = list(range(first, min(first + batch_size, num_rows)))
        batch = collate(columns, rows, pad_id, device)
        logits = _logits(task, model(**_model_inputs(model, batch)))
        loss, _ = _loss(task, logits, None, batch, 1.0, 0.0, 1.0)
        loss_sum += loss.item() * len(rows)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for key, tensor in zip(keys, logits):
            values = tensor.float().cpu().numpy()
            if task == "classification":
                outputs[key].extend(values)
            else:
                outputs[key].extend(row[:n] for row, n in zip(values, lengths))
    metrics, extra = data.score(outputs)
    model.train()
    return {**metrics, "eval_loss": loss_sum / max(1, num_rows)}, extra
