"""How the student is spread over processes: DDP (through accelerate) or FSDP2 (`fully_shard`), behind one face.

DDP keeps a full copy of student, gradients and optimizer state on every process and averages gradients. FSDP
shards each transformer block of the student (and, with `teacher.fsdp: shard`, of the frozen teacher) so that a
process holds 1/N of the parameters, gradients and optimizer state, gathering a block's parameters only while it
runs. FSDP is driven through `torch.distributed.fsdp.fully_shard` directly, the same code on CPU (gloo) and GPU
(NCCL): accelerate's own FSDP path needs CUDA. It is chosen by `run.fsdp: true` or by `accelerate launch
--use_fsdp` (which sets ACCELERATE_USE_FSDP). Both layouts average gradients over processes, so the loop scales
each micro-batch's share of the step loss by the process count either way.

fp16 (on a GPU) needs loss scaling: accelerate creates a GradScaler and its backward scales the loss. Under DDP
the optimizer accelerate prepared drives the scaler; under FSDP the optimizer is distil's own, so
FullyShardedDataParallel drives it: unscale before clipping, skip a step whose gradients hold an inf or NaN on
any process (the sharded gradients' check is reduced over the mesh), then update the scale. `step` says whether
the step was taken, in either layout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

from distil.errors import DistilError

log = logging.getLogger(__name__)


def fsdp_requested(config) -> bool:
    return bool(config.run.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    from distil.layer_copy import find_layer_list

    name, _ = find_layer_list(model)
    return list(model.get_submodule(name))


def _shard(model: torch.nn.Module, mixed_precision: str, reshard_after_forward: bool) -> None:
    """fully_shard every block, then the root (embeddings, final norm and output layer stay together, so tied
    input and output embeddings are one parameter)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Raised for every model whose outputs include views (hidden states); distil never changes them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for block in _blocks(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)


class DataParallel:
    """DDP through accelerate (a single process runs the model as it is)."""

    sharded = False

    def __init__(self, acc):
        self.acc = acc

    def prepare(self, models, trained: torch.nn.Module, build_optimizer):
        """(the module the loop calls, the optimizer): DDP-wrapped when there are several processes."""
        return self.acc.prepare(trained, build_optimizer(trained))

    def no_sync(self, module, last_micro: bool):
        return contextlib.nullcontext() if last_micro else self.acc.no_sync(module)

    def clip_grad_norm(self, module, max_norm: float) -> float:
        """The norm of the unscaled gradients (accelerate unscales them first under fp16), clipped to max_norm."""
        return float(self.acc.clip_grad_norm_(module.parameters(), max_norm))

    def step(self, optimizer) -> bool:
        """The optimizer step; under fp16 accelerate's prepared optimizer drives the scaler. Whether it was taken."""
        optimizer.step()
        return not getattr(optimizer, "step_was_skipped", False)

    def full_student(self, models):
        """The student with all its weights, on the main process (None elsewhere), for save_pretrained."""
        return models.student if self.acc.is_main_process else None


class FullyShardedDataParallel:
    """FSDP2: the student sharded and trained; the teacher sharded too (frozen, no optimizer state) or replicated."""

    sharded = True

    def __init__(self, acc, config):
        self.acc = acc
        self.config = config
        # Set by accelerate for fp16 on a GPU; acc.backward scales the loss with it, the steps here drive it.
        self.scaler = acc.scaler
        self.optimizer = None
        if not torch.distributed.is_initialized():
            raise DistilError(
                "run.fsdp needs a distributed launch: run under torchrun (torchrun --nproc_per_node N -m distil train "
                "RECIPE run.fsdp=true) or accelerate launch --use_fsdp. A single process has nothing to shard."
            )

    def prepare(self, models, trained: torch.nn.Module, build_optimizer):
        """Shard the models in place (the student's trained module, and the teacher unless it is replicated), then
        build the optimizer over the sharded parameters: each process keeps the state of its own shard."""
        mixed = self.config.run.mixed_precision
        if mixed == "fp16" and self.scaler is None:
            # accelerate runs fp16 only where it scales the loss (not on CPU, where it keeps float32): unscaled fp16
            # gradients would underflow, so the shards compute in float32 there too, as under DDP.
            mixed = "no"
        _shard(trained, mixed, reshard_after_forward=True)
        if self.config.teacher.fsdp == "shard":
            for teacher in models.teacher_models:
                _shard(teacher, mixed, reshard_after_forward=True)
        # Loaded on the host (training.models.load_models): only each process's shards move to its device.
        for model in {id(m): m for m in (models.student, *models.teacher_models)}.values():
            model.to(self.acc.device)
        log.info("FSDP: student%s sharded over %d processes (each block, then the root)",
                 " and teacher" if self.config.teacher.fsdp == "shard" else "", self.acc.num_processes)
        self.optimizer = build_optimizer(trained)
        return trained, self.optimizer

    def no_sync(self, module, last_micro: bool):
        @contextlib.contextmanager
        def gradient_sync():
            # Accumulating micro-batches keep their gradients unreduced; the last one reduce-scatters the sum.
            module.set_requires_gradient_sync(last_micro)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        return gradient_sync()

    def clip_grad_norm(self, module, max_norm: float) -> float:
        """The norm of the unscaled gradients (inf when a process holds an overflow), clipped to max_norm."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # once per step: step() then leaves them as they are
        norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def step(self, optimizer) -> bool:
        """The optimizer step, through the loss scaler under fp16 (skipped, on every process, when a gradient
        holds an inf or NaN; the scale backs off then, and grows after a run of finite steps). Whether it was
        taken."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # update() lowers the scale exactly when the step was skipped

    def full_student(self, models):
        """Gather the sharded student into a plain model on the main process (None elsewhere). A collective:
        every process calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        trained, student = models.student_trained, models.student
        gathered = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.acc.is_main_process:
            return None
        prefix = "" if trained is student else student.base_model_prefix + "."
        state = {prefix + key: value for key, value in gathered.items()}
        if prefix:  # the untrained head of a hidden-states-only run was never sharded
            state.update({k: v for k, v in student.state_dict().items() if not k.startswith(prefix)})
        plain = type(student)(student.config)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        plain.tie_weights()
        untied = [k for k in missing if k not in _tied_keys(plain)]
        if untied or unexpected:
            raise RuntimeError(f"gathering the FSDP student lost weights: missing {untied}, unexpected {unexpected}")
        return plain


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (a tied output layer)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied


def held_megabytes(models, optimizer) -> dict[str, float]:
    """What this process holds of the models' state (its shards under FSDP): teacher and student parameters, the
    student's gradients and its optimizer state, in MB."""
    def local(tensor) -> int:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return tensor.numel() * tensor.element_size()

    def unique(module):
        return {id(p): p for p in module.parameters()}.values()

    optimizer = getattr(optimizer, "optimizer", optimizer)
    state = sum(local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    student = list(unique(models.student))
    return {"teacher_parameters_mb": sum(local(p) for t in models.teacher_models for p in unique(t)) / 2**20,
            "student_parameters_mb": sum(local(p) for p in student) / 2**20,
            "student_gradients_mb": sum(local(p.grad) for p in student if p.grad is not None) / 2**20,
            "optimizer_state_mb": state / 2**20}


def make_parallel(acc, config):
    return FullyShardedDataParallel(acc, config) if fsdp_requested(config) else DataParallel(acc)
