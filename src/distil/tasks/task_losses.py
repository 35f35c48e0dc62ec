"""The task-distillation objective: soft targets from a fine-tuned teacher mixed with the task's labels.

    total = alpha_ce * T^2 * KL(teacher_T || student_T) + alpha_task * CE(student, labels)

with `*_T = softmax(logits / T)`. The KL term is averaged over the rows that carry a label (a
sentence for classification, a first sub-token for NER, the whole window for QA), so padding and
continuation sub-tokens neither teach nor dilute. For QA, as in the original DistilBERT SQuAD
script, the objective is computed for the start logits and for the end logits and the two are
averaged.
"""

from __future__ import annotations

from torch import Tensor

from distil.losses import masked_lm_loss, soft_target_kl


def task_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    alpha_ce: float,
    alpha_task: float,
    ignore_index: int = -100,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, {"kd", "task"}) for logits (..., C) and labels (...); rows labelled `ignore_index` are skipped.

    "kd" already includes the T^2 factor; "task" is the mean cross-entropy over labelled rows.
    Both are float32; a batch with no labelled row gives zeros that stay in the graph.
    """
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(student_logits.shape)} "
            "without its last (class) dimension."
        )
    labelled = labels != ignore_index
    kd = soft_target_kl(student_logits, teacher_logits, temperature, mask=labelled)
    task = masked_lm_loss(student_logits, labels, ignore_index=ignore_index)
    return alpha_ce * kd + alpha_task * task, {"kd": kd, "task": task}


def task_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain fine-tuning: (CE over labelled rows, {"task": same}). Used when there is no teacher."""
    task = masked_lm_loss(logits, labels, ignore_index=ignore_index)
    return task, {"task": task}


def qa_distillation_loss(
    student_start: Tensor,
    student_end: Tensor,
    teacher_start: Tensor,
    teacher_end: Tensor,
    start_positions: Tensor,
    end_positions: Tensor,
    temperature: float,
    alpha_ce: float,
    alpha_task: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean over start and end of `task_distillation_loss`; logits (B, L), positions (B,)."""
    start_total, start_parts = task_distillation_loss(
        student_start, teacher_start, start_positions, temperature, alpha_ce, alpha_task)
    end_total, end_parts = task_distillation_loss(
        student_end, teacher_end, end_positions, temperature, alpha_ce, alpha_task)
    parts = {name: (start_parts[name] + end_parts[name]) / 2 for name in start_parts}
    return (start_total + end_total) / 2, parts


def qa_task_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor, end_positions: Tensor
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain QA fine-tuning: mean of the start and end cross-entropies."""
    task = (masked_lm_loss(start_logits, start_positions) + masked_lm_loss(end_logits, end_positions)) / 2
    return task, {"task": task}
