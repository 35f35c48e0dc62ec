"""fp16 loss scaling in every parallel layout: the gradients that clipping and the optimizer see are unscaled, a
step whose gradients hold an inf or NaN (on any process) is skipped everywhere, and the scale is updated.

accelerate creates its GradScaler only on an accelerator (on CPU, fp16 runs in float32 without one), so these
tests give a CPU Accelerator the scaler a GPU run would have (torch.amp.GradScaler("cpu") runs the same
unscale / skip / update arithmetic) and drive one step the way the training loop does: accelerate's backward
(which scales the loss), parallel.clip_grad_norm, parallel.step.
"""

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch

from tiny_models import VOCAB_SIZE, tiny_llama
from train_fixtures import free_port

LR = 0.1
SCALE = 2.0 ** 16


def _accelerator_with_scaler():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    acc = Accelerator(mixed_precision="fp16", cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    return acc


def _parallel(acc, fsdp: bool):
    from distil.training.parallel import make_parallel

    config = SimpleNamespace(run=SimpleNamespace(fsdp=fsdp, mixed_precision="no"),
                             teacher=SimpleNamespace(fsdp="replicate"))
    return make_parallel(acc, config)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _full(model):
    """Every parameter whole (gathered from the shards under FSDP: a collective)."""
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]


def _scaled_steps(acc, parallel, rank: int, world: int, max_grad_norm: float, poisoned_rank: int = 0) -> None:
    """Three optimizer steps of the loop's sequence, checked against plain float32 SGD on an unsharded copy:
    a finite step (taken, with the unscaled gradient norm and update), a step with an inf gradient on
    `poisoned_rank` only (skipped on every process, scale halved), and a finite step again (taken)."""
    student = tiny_llama(num_layers=2, seed=5).train()
    reference = copy.deepcopy(student)
    ids = torch.randint(3, VOCAB_SIZE, (2 * world, 10), generator=torch.Generator().manual_seed(0))
    models = SimpleNamespace(student=student, teacher_models=[student])
    module, optimizer = parallel.prepare(models, student, lambda m: torch.optim.SGD(m.parameters(), lr=LR))
    if not parallel.sharded:
        acc.native_amp = True  # as on a GPU, for unscaling; set after prepare so the forward stays float32
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)

    def reference_step():
        reference_optimizer.zero_grad(set_to_none=True)
        # Each process's mean loss, averaged over processes (what DDP and FSDP average the gradients to).
        (sum(_loss(reference, ids[r::world]) for r in range(world)) / world).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm or math.inf)
        reference_optimizer.step()
        return float(norm)

    def scaled_step(poison: bool = False):
        optimizer.zero_grad(set_to_none=True)
        acc.backward(_loss(module, ids[rank::world]))
        if poison and rank == poisoned_rank:
            grad = next(module.parameters()).grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("inf")
        norm = parallel.clip_grad_norm(module, max_grad_norm) if max_grad_norm > 0 else None
        return norm, parallel.step(optimizer)

    expected_norm = reference_step()
    norm, taken = scaled_step()
    if max_grad_norm > 0:
        assert norm == pytest.approx(expected_norm, rel=1e-5)  # the unscaled norm, not x 65536
        assert expected_norm > max_grad_norm  # so clipping acted on it
    assert taken
    for got, want in zip(_full(student), reference.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert acc.scaler.get_scale() == SCALE

    before = [p.clone() for p in _full(student)]
    norm, taken = scaled_step(poison=True)
    assert not taken
    if norm is not None:
        assert not math.isfinite(norm)
    for got, was in zip(_full(student), before):
        assert torch.equal(got, was)  # no process moved its shard
    assert acc.scaler.get_scale() == SCALE / 2  # backed off after the overflow

    reference_step()
    norm, taken = scaled_step()
    assert taken and acc.scaler.get_scale() == SCALE / 2
    for got, want in zip(_full(student), reference.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])
def test_fsdp_fp16_data_parallel_scaler_unscales_and_skips(max_grad_norm):
    """One process (DDP's path through accelerate's prepared optimizer)."""
    acc = _accelerator_with_scaler()
    _scaled_steps(acc, _parallel(acc, fsdp=False), 0, 1, max_grad_norm)


def _fsdp_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    acc = _accelerator_with_scaler()  # starts the gloo process group, as under torchrun
    try:
        for max_grad_norm in (0.5, 0.0):
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
            _scaled_steps(acc, _parallel(acc, fsdp=True), rank, world, max_grad_norm, poisoned_rank=1)
        # fp16 where accelerate has no scaler (CPU): the shards compute in float32, as accelerate does under DDP.
        acc.scaler = None
        parallel = _parallel(acc, fsdp=True)
        parallel.config.run.mixed_precision = "fp16"
        student = tiny_llama(num_layers=2, seed=5)
        module, _ = parallel.prepare(SimpleNamespace(student=student, teacher_models=[student]), student,
                                     lambda m: torch.optim.SGD(m.parameters(), lr=LR))
        assert module(input_ids=torch.tensor([[5, 6, 7]])).logits.dtype == torch.float32
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_fp16_sharded_scaler_unscales_and_skips_on_every_process():
    """Two gloo processes under FSDP2: clipping sees the unscaled norm, the update is plain SGD's, and an inf in
    one process's shard of the gradient skips the step on both (and halves the scale on both)."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, free_port()), nprocs=2, join=True)
