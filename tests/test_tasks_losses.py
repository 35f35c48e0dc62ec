"""Task-distillation losses against hand-computed values and the original script's formulation."""

import math

import pytest
import torch
import torch.nn.functional as F

from distil.tasks.task_losses import qa_distillation_loss, qa_task_loss, task_distillation_loss, task_loss

# Student logits [0, 0] at T=2 give [1/2, 1/2]; teacher logits [2 ln 3, 0] at T=2 give [3/4, 1/4].
# KL(teacher || student) = 3/4 ln(3/2) + 1/4 ln(1/2); times T^2 = 4: 3 ln 1.5 + ln 0.5.
KD_BY_HAND = 3 * math.log(1.5) + math.log(0.5)
TEACHER_ROW = [2 * math.log(3), 0.0]


def test_classification_loss_by_hand():
    student = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.tensor([TEACHER_ROW])
    total, parts = task_distillation_loss(student, teacher, torch.tensor([0]), temperature=2.0, alpha_ce=0.5, alpha_task=0.5)
    assert parts["kd"].item() == pytest.approx(KD_BY_HAND, rel=1e-6)
    assert parts["task"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert total.item() == pytest.approx(0.5 * KD_BY_HAND + 0.5 * math.log(2), rel=1e-6)
    total.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_token_loss_averages_over_labelled_rows_only():
    # (batch 1, 3 tokens, 2 classes): token 1 is unlabelled and its wildly different logits must not count;
    # tokens 0 and 2 are the hand-worked row, so both terms equal the one-row values.
    student = torch.tensor([[[0.0, 0.0], [9.0, -9.0], [0.0, 0.0]]])
    teacher = torch.tensor([[TEACHER_ROW, [-9.0, 9.0], TEACHER_ROW]])
    labels = torch.tensor([[0, -100, 0]])
    total, parts = task_distillation_loss(student, teacher, labels, temperature=2.0, alpha_ce=0.25, alpha_task=0.75)
    assert parts["kd"].item() == pytest.approx(KD_BY_HAND, rel=1e-6)
    assert parts["task"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert total.item() == pytest.approx(0.25 * KD_BY_HAND + 0.75 * math.log(2), rel=1e-6)


def test_no_labelled_row_gives_zero_not_nan():
    student = torch.randn(1, 2, 3, requires_grad=True)
    total, parts = task_distillation_loss(student, torch.randn(1, 2, 3), torch.full((1, 2), -100), 2.0, 0.5, 0.5)
    assert total.item() == 0.0 and parts["kd"].item() == 0.0 and parts["task"].item() == 0.0
    total.backward()


def test_matches_the_original_scripts_formulation():
    # run_glue/run_squad_w_distillation: KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)) * T^2 mixed with CE.
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5) * 3
    labels = torch.randint(0, 5, (8,))
    temperature = 3.0
    reference_kd = F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                            reduction="batchmean") * temperature**2
    reference = 0.7 * reference_kd + 0.3 * F.cross_entropy(student, labels)
    total, _ = task_distillation_loss(student, teacher, labels, temperature, alpha_ce=0.7, alpha_task=0.3)
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)


def test_qa_loss_is_the_mean_over_start_and_end():
    # Start: the hand-worked row (kd = KD_BY_HAND, CE ln 2). End: teacher equals student (kd 0), CE ln 2.
    student_start, student_end = torch.zeros(1, 2), torch.zeros(1, 2)
    teacher_start, teacher_end = torch.tensor([TEACHER_ROW]), torch.zeros(1, 2)
    total, parts = qa_distillation_loss(student_start, student_end, teacher_start, teacher_end, torch.tensor([0]),
                                        torch.tensor([1]), temperature=2.0, alpha_ce=0.5, alpha_task=0.5)
    assert parts["kd"].item() == pytest.approx(KD_BY_HAND / 2, rel=1e-6)
    assert parts["task"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert total.item() == pytest.approx(0.5 * KD_BY_HAND / 2 + 0.5 * math.log(2), rel=1e-6)


def test_plain_fine_tuning_losses_are_cross_entropy():
    logits = torch.tensor([[0.0, math.log(3)]])  # softmax [1/4, 3/4]
    assert task_loss(logits, torch.tensor([1]))[0].item() == pytest.approx(-math.log(0.75), rel=1e-6)
    start, end = torch.tensor([[0.0, math.log(3)]]), torch.zeros(1, 2)
    qa_total, _ = qa_task_loss(start, end, torch.tensor([1]), torch.tensor([0]))
    assert qa_total.item() == pytest.approx((-math.log(0.75) + math.log(2)) / 2, rel=1e-6)
