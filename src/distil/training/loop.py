"""`distil train`: the distillation loop, top to bottom.

One optimizer step reads one step batch (processes x accumulation x batch sequences; every process computes the
same sequence of step batches), draws its MLM targets from a generator seeded by the step (so a resumed or
re-sharded run draws the same masks), and splits it into `accumulation` micro-batches of which each process keeps
its own rows. For each micro-batch the objective runs the frozen teacher and the student and returns this
micro-batch's share of the step's mean loss, which is backpropagated. One small all-reduce per optimizer step
carries the loss values for logging, the NaN check and the stop flag, so every process decides the same thing.
The loop knows no loss by name: which terms there are, and how they are computed, is the objective's business.
"""

from __future__ import annotations

import logging
import math
import resource
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distil.config import TrainConfig
from distil.data.dataset import GlobalBatchSampler, TokenSequences, pad_id_of
from distil.data.masking import build_masker
from distil.errors import DistilError
from distil.metrics_log import MetricsLog
from distil.outputs import check_writable, output_lock
from distil.training import checkpoint as ckpt
from distil.training.heldout import evaluate_heldout, heldout_batches
from distil.training.on_policy import OnPolicy
from distil.training.batches import build_step
from distil.training.objective import Objective, term_spec_from
from distil.training.sources.setup import source_from_config, teacher_stores
from distil.training.store_run import stored_masks_of
from distil.training.parallel import fsdp_requested, held_megabytes, make_parallel
from distil.training.projections import add_projections
from distil.training.recipe_changes import check_resume_recipe, check_resume_schedule
from distil.training.run_dir import FINAL_STUDENT, prepare_run_dir, save_student, start_run_dir
from distil.training.accelerator import make_accelerator, seed_everything
from distil.training.models import check_positions, freeze_embeddings, layer_pairs, load_models, student_projection
from distil.training.optimisation import build_optimizer, build_scheduler, schedule_shape
from distil.training.student_source import discarded_on_error, student_source

log = logging.getLogger(__name__)

MASK_SEED_STRIDE = 1_000_003


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        log.warning("Received %s: saving a checkpoint at the end of this step, then stopping "
                    "(press Ctrl-C again to stop at once).", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig) -> dict:
    """Run (or resume) a distillation described by `config`; returns a summary of the finished run."""
    config.run.fsdp = fsdp_requested(config)  # `accelerate launch --use_fsdp` says so in the environment
    acc = make_accelerator(config)
    # The main process holds the run directory's lock for the whole run (a second run there is refused).
    with output_lock(config.run.output_dir, "train", take=acc.is_main_process):
        return _train(config, acc)


def _train(config: TrainConfig, acc) -> dict:
    rank, world, is_main, device = acc.process_index, acc.num_processes, acc.is_main_process, acc.device
    run_dir = Path(config.run.output_dir)
    check_writable(run_dir)
    resume_from = prepare_run_dir(run_dir, config, is_main)
    resumed_state = ckpt.read_state(resume_from) if resume_from is not None else None
    if resumed_state is not None:
        check_resume_recipe(run_dir, config, resumed_state, world)
    seed_everything(config.run.seed)

    # Every start-up check runs before the run directory is created or changed.
    train_data = TokenSequences(config.data.path, "train", config.data.max_length)
    manifest = train_data.manifest
    pad_id = pad_id_of(manifest)
    global_batch = config.data.batch_size * world
    heldout, eval_batches = None, []
    if manifest["splits"].get("heldout", {}).get("sequences", 0) > 0:
        heldout = TokenSequences(config.data.path, "heldout", config.data.max_length)
        eval_batches = heldout_batches(heldout, global_batch, config.run.eval_batches)
    accum = config.accumulation_steps(world)
    sampler = GlobalBatchSampler(train_data.lengths, global_batch * accum, seed=config.run.seed,
                                 group_by_length=config.data.group_by_length)
    total_steps = config.optim.max_steps or max(1, math.ceil(config.optim.epochs * sampler.batches_per_epoch()))
    schedule = schedule_shape(total_steps, config.optim.warmup_fraction)
    if resumed_state is not None:
        check_resume_schedule(resume_from, resumed_state, schedule, config)

    student_dir, student_init = student_source(config, run_dir, is_main, acc.wait_for_everyone)
    with discarded_on_error(student_init if is_main else None):
        models = load_models(config, student_dir, device)
        check_positions(models, max(int(train_data.lengths.max()), int(heldout.lengths.max()) if heldout else 0),
                        config)
        pairs = layer_pairs(config, models.student.config, models.teacher_config, models.init_record)
        spec = term_spec_from(config, models.objective, pairs, models.vocab_limit, models.sentence_pooling)
        source = source_from_config(config, models, spec, acc.autocast, train_data.lengths)  # models, stores, mixture
        add_projections(config, models, spec)  # learned width maps for the hidden terms, when widths differ
        vocab_size = models.student.get_input_embeddings().num_embeddings
        masker = build_masker(config, config.data.path, manifest, vocab_size, models.tokenizer) \
            if spec.needs_masking else None
        # On-policy steps (loss.on_policy_fraction): the student writes the step's text (training/on_policy.py).
        policy = OnPolicy.from_config(config, models, spec, pad_id, device, rank, world, accum, acc.autocast)
    stored_masks = stored_masks_of(teacher_stores(models), models.objective)  # each sequence's masks: the store's
    objective = Objective(spec, source, models.student, student_projection(config, models, spec), acc.autocast)
    frozen = freeze_embeddings(models.student, config.run.freeze_position_embeddings,
                               config.run.freeze_token_type_embeddings)

    parallel = make_parallel(acc, config)
    trained_wrapped, optimizer = parallel.prepare(models, models.student_trained,
                                                  lambda module: build_optimizer(module, config))
    trained = models.student_trained  # what is saved and evaluated (sharded in place under FSDP)
    raw_optimizer = getattr(optimizer, "optimizer", optimizer)
    scheduler = build_scheduler(raw_optimizer, total_steps, config.optim.warmup_fraction)
    acc.wait_for_everyone()
    if is_main:
        start_run_dir(run_dir, config, student_init)
    acc.wait_for_everyone()
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, models.student, trained, raw_optimizer, rank, parallel.sharded)
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        sampler.load_state_dict(state["sampler"])
        scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        log.info("Resuming from %s (step %d of %d)", resume_from, step, total_steps)

    metrics = MetricsLog(run_dir, acc, is_main, resume_step=step, project=config.name or run_dir.name,
                         hparams=config.to_dict())
    if is_main and step == 0:
        _log_start(config, models, source, train_data, total_steps, global_batch, accum, world, frozen, pairs, spec)
        policy.log_start()
    generator = torch.Generator(device=device)
    batches = iter(sampler)
    term_names = list(spec.weights)
    bar = tqdm(total=total_steps, initial=step, desc="distil", disable=not (is_main and config.run.progress),
               dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    run_start = time.perf_counter() - elapsed_before
    stopped_early = False
    held = None

    def save(at_step: int) -> None:
        state = {"tokens_seen": tokens_seen, "elapsed_s": time.perf_counter() - run_start,
                 "sampler": sampler.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                 "total_steps": total_steps, "schedule": schedule, "world_size": world}
        ckpt.save_checkpoint(run_dir, at_step, models.student, raw_optimizer, state, rank, is_main,
                             acc.wait_for_everyone, config.run.keep_checkpoints,
                             sharded_module=trained if parallel.sharded else None)

    def heldout_metrics() -> dict:
        return evaluate_heldout(acc, objective, trained, heldout, eval_batches, masker, pad_id, parallel.sharded)

    with StopFlag() as stop:
        while step < total_steps:
            generator.manual_seed(config.run.seed * MASK_SEED_STRIDE + step)
            indices = next(batches)
            sequences = policy.rows_for_step(step, [train_data[i] for i in indices])  # as read, or the student's
            step_masker = stored_masks.for_step(indices) if stored_masks is not None else masker
            micro_batches = build_step(sequences, pad_id, spec.objective, step_masker,
                                       generator, rank, world, device, micro_batches=accum, indices=indices)
            step_values = torch.zeros(len(term_names), device=device)
            for micro, batch in enumerate(micro_batches):
                with parallel.no_sync(trained_wrapped, last_micro=micro == accum - 1):
                    try:
                        loss, shares = objective(trained_wrapped, batch)
                    except torch.OutOfMemoryError:
                        raise DistilError(_oom_message(config, models, step)) from None
                    # Each share is already this micro-batch's part of the step mean; DDP and FSDP average
                    # gradients over processes, so scale by the process count to get their sum.
                    acc.backward(loss * world)
                step_values += torch.stack([shares[n].float() for n in term_names])
            step_tokens = micro_batches[0].step_tokens

            # One collective per step: loss values (for the log and the NaN check) and the stop flag.
            flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
            reduced = acc.reduce(torch.cat([step_values, flag]), reduction="sum").tolist()
            values = dict(zip(term_names, reduced[:-1]))
            bad = [n for n, v in values.items() if not math.isfinite(v)]
            if bad:
                raise DistilError(
                    f"Training stopped at step {step + 1}: loss term {bad[0]!r} is {values[bad[0]]} (all processes stopped "
                    "together; the last checkpoint is intact). Lower optim.lr, use bf16 instead of fp16, or check the data."
                )
            if config.optim.max_grad_norm > 0:
                grad_norm = parallel.clip_grad_norm(trained_wrapped, config.optim.max_grad_norm)
            else:
                grad_norm = None
            # Through the fp16 loss scaler when there is one: an overflowing step is skipped. The learning rate
            # stays a function of the step number (as on resume), so the schedule advances either way.
            taken = parallel.step(optimizer)
            scheduler.step()
            if held is None and taken:  # after the first update, when parameters, gradients and optimizer state all exist
                held = held_megabytes(models, optimizer)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            window_tokens += step_tokens
            bar.update(1)

            total = sum(spec.weights[n] * v for n, v in values.items())
            if step % config.run.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_start, 1e-9)
                row = {"loss": total, **{f"loss_{n}": v for n, v in values.items()},
                       "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s, "tokens_seen": tokens_seen,
                       "epoch": sampler.state.epoch + sampler.state.batch_in_epoch / max(1, sampler.batches_per_epoch()),
                       "elapsed_s": now - run_start}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                metrics.write(step, "train", row)
                bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tok_s:,.0f}")
                window_tokens, window_start = 0, now
            if heldout is not None and config.run.eval_every and step % config.run.eval_every == 0 and step < total_steps:
                metrics.write(step, "heldout", heldout_metrics())
            if reduced[-1] > 0:
                save(step)
                stopped_early = True
                log.warning("Stopped at step %d on request; checkpoint saved. Run the same command to resume.", step)
                break
            if config.run.checkpoint_every and step % config.run.checkpoint_every == 0 and step < total_steps:
                save(step)
    bar.close()
    summary = {"run_dir": str(run_dir), "steps": step, "total_steps": total_steps, "tokens_seen": tokens_seen,
               "stopped_early": stopped_early}
    if held is not None:
        held["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log.info("process %d holds %s", rank, ", ".join(f"{k} {v:,.0f}" for k, v in held.items()))
        summary["memory"] = held
    if stopped_early:  # a process that saw no signal itself was stopped by another's
        summary["stopped_by"] = signal.Signals(stop.signum or signal.SIGTERM).name
        metrics.close()
        return summary
    final_eval = heldout_metrics() if heldout is not None else {}
    if final_eval:
        metrics.write(step, "heldout", final_eval)
    metrics.close()
    whole = parallel.full_student(models)  # gathered from the shards under FSDP (every process takes part)
    if is_main:
        save_student(run_dir, config, models, whole, summary, final_eval)
        log.info("Finished: student saved to %s", run_dir / FINAL_STUDENT)
    acc.wait_for_everyone()
    summary["heldout"] = final_eval
    summary["student_dir"] = str(run_dir / FINAL_STUDENT)
    return summary


def _oom_message(config: TrainConfig, models, step: int) -> str:
    return (
        f"Out of memory at step {step + 1} with data.batch_size={config.data.batch_size} (teachers "
        f"{sum(p.numel() for t in models.teacher_models for p in t.parameters()) / 1e6:.0f}M parameters; student "
        f"{sum(p.numel() for p in models.student.parameters()) / 1e6:.0f}M). Try data.batch_size="
        f"{max(1, config.data.batch_size // 2)} with optim.gradient_accumulation={config.accumulation_steps(1) * 2} "
        "(same effective batch), run.mixed_precision=bf16 with teacher.dtype=bfloat16, or data.max_length=256."
    )


def _log_start(config, models, source, train_data, total_steps, global_batch, accum, world, frozen, pairs,
               spec) -> None:
    n_student = sum(p.numel() for p in models.student.parameters())
    n_teacher = sum(p.numel() for t in models.teacher_models for p in t.parameters())
    log.info("%s", source.describe())
    log.info("student: %.1fM parameters%s", n_student / 1e6,
             f" ({100 * n_student / n_teacher:.0f}% of the teacher)" if n_teacher else "")
    log.info("objective: %s; data: %d sequences; %d processes x batch %d x accumulation %d = %d sequences per step "
             "(every loss is a mean over the whole step); %d steps", spec.objective, len(train_data), world,
             config.data.batch_size, accum, global_batch * accum, total_steps)
    log.info("losses: %s; temperature %.1f%s", ", ".join(f"{k}={v}" for k, v in spec.weights.items()),
             spec.temperature, f"; hidden pairs (student, teacher) {pairs}" if spec.needs_hidden else "")
    if frozen:
        log.info("frozen: %s", ", ".join(frozen))
