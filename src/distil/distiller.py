"""`distil train`: the distillation loop, top to bottom.

One optimizer step = `gradient_accumulation` micro-steps. Each micro-step reads one global batch (every
process computes the same sequence of global batches and keeps its own rows), draws the MLM targets
from a generator seeded by the micro-step index (so a resumed or re-sharded run draws the same masks),
runs the frozen teacher without gradients, the student with them, and backpropagates this process's
share of the weighted global-mean losses. One small all-reduce per optimizer step carries the loss
values for logging, the NaN check and the stop flag, so every process decides the same thing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distil import checkpoint as ckpt
from distil import losses
from distil.config import TrainConfig, dump_config
from distil.data.dataset import GlobalBatchSampler, TokenSequences, pad_id_of
from distil.data.masking import MLMMasker, mask_probabilities
from distil.data import shards
from distil.errors import DistilError
from distil.fused_head import output_projection, projection_bypassed
from distil.metrics_log import MetricsLog
from distil.objective import (build_batch, compute_terms, forward, fused_logit_terms, global_share, term_spec_from,
                              weighted_total)
from distil.outputs import atomic_output_dir, write_json_atomic
from distil.train_setup import (build_optimizer, build_scheduler, freeze_embeddings, layer_pairs, load_models,
                                student_source)

log = logging.getLogger(__name__)

FINAL_STUDENT = "student"
MASK_SEED_STRIDE = 1_000_003


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
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
        log.warning("Received %s: saving a checkpoint at the end of this step, then stopping "
                    "(press Ctrl-C again to stop at once).", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # A rank that dies must not leave the others waiting forever at a collective.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.run.collective_timeout_s))
    # Without a GPU, accelerate only sets up gloo data parallelism (torchrun on CPU) when told cpu=True.
    on_cpu = not torch.cuda.is_available()
    try:
        return Accelerator(mixed_precision=config.run.mixed_precision, kwargs_handlers=[timeout], cpu=on_cpu)
    except ValueError as exc:
        raise DistilError(f"Mixed precision {config.run.mixed_precision!r} is not available here: {exc}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: Path, config: TrainConfig, is_main: bool) -> Path | None:
    """Decide between a fresh start and a resume; returns the checkpoint to resume from, if any."""
    finished = (run_dir / FINAL_STUDENT / "config.json").exists()
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
    if config.run.overwrite:
        if is_main and run_dir.exists():
            shutil.rmtree(run_dir)
        return None
    if config.run.resume not in ("auto", "never"):
        return Path(config.run.resume)
    if finished:
        raise DistilError(
            f"{run_dir} already holds a finished run (its student is in {run_dir / FINAL_STUDENT}). Nothing was changed. "
            "Pass run.overwrite=true to start over there, or choose another run.output_dir."
        )
    if has_checkpoints:
        if config.run.resume == "never":
            raise DistilError(
                f"{run_dir} holds checkpoints of an unfinished run and run.resume=never. Use run.resume=auto to continue "
                "it, or run.overwrite=true to start over."
            )
        found = ckpt.find_resumable(run_dir)
        if found is None:
            raise DistilError(f"{run_dir} holds checkpoints but none is complete. Start over with run.overwrite=true.")
        return found
    if run_dir.exists() and any(p.name not in ("student-init", "tensorboard", "metrics.jsonl", "recipe.yaml")
                                for p in run_dir.iterdir()):
        raise DistilError(
            f"{run_dir} exists and holds files that are not a distil run. Choose another run.output_dir "
            "or pass run.overwrite=true."
        )
    return None


def _masker(config: TrainConfig, data_dir: str, manifest: dict, vocab_size: int, tokenizer) -> MLMMasker:
    if tokenizer.mask_token_id is None:
        raise DistilError(
            "The recipe is masked-LM but the tokenizer has no mask token. Use a causal-LM recipe (alpha_clm) "
            "for decoder models, or a tokenizer with [MASK] / <mask>."
        )
    counts = shards.load_token_counts(data_dir)
    # A model vocabulary padded beyond the tokenizer gets zero counts for the padding ids.
    padded = np.zeros(vocab_size, dtype=np.int64)
    padded[: min(len(counts), vocab_size)] = counts[:vocab_size]
    specials = [i for i in manifest["special_ids"]["all"] if i < vocab_size]
    never = specials + list(range(len(counts), vocab_size))
    probs = mask_probabilities(padded, never, smoothing=config.loss.mlm_smoothing)
    return MLMMasker(probs, tokenizer.mask_token_id, never, vocab_size, config.loss.mlm_probability,
                     tuple(config.loss.mask_replace))


def train(config: TrainConfig) -> dict:
    """Run (or resume) a distillation described by `config`; returns a summary of the finished run."""
    acc = make_accelerator(config)
    rank, world, is_main, device = acc.process_index, acc.num_processes, acc.is_main_process, acc.device
    run_dir = Path(config.run.output_dir)
    resume_from = prepare_run_dir(run_dir, config, is_main)
    acc.wait_for_everyone()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "recipe.yaml")
    seed_everything(config.run.seed)

    student_dir = student_source(config, run_dir, is_main, acc.wait_for_everyone)
    models = load_models(config, student_dir, device)
    pairs = layer_pairs(config, models.student.config, models.teacher.config, models.init_record)
    spec = term_spec_from(config, pairs)
    frozen = freeze_embeddings(models.student, config.run.freeze_position_embeddings,
                               config.run.freeze_token_type_embeddings)

    train_data = TokenSequences(config.data.path, "train", config.data.max_length)
    manifest = train_data.manifest
    heldout = None
    if manifest["splits"].get("heldout", {}).get("sequences", 0) > 0:
        heldout = TokenSequences(config.data.path, "heldout", config.data.max_length)
    pad_id = pad_id_of(manifest)
    vocab_size = models.student.get_input_embeddings().num_embeddings
    masker = _masker(config, config.data.path, manifest, vocab_size, models.tokenizer) if spec.needs_masking else None
    global_batch = config.data.batch_size * world
    sampler = GlobalBatchSampler(train_data.lengths, global_batch, seed=config.run.seed,
                                 group_by_length=config.data.group_by_length)
    accum = config.accumulation_steps(world)
    total_steps = config.optim.max_steps or max(1, math.ceil(config.optim.epochs * sampler.batches_per_epoch() / accum))

    trained = models.student_trained
    optimizer = build_optimizer(trained, config)
    scheduler = build_scheduler(optimizer, total_steps, config.optim.warmup_fraction)
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, models.student, optimizer, rank)
        step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        sampler.load_state_dict(state["sampler"])
        scheduler.load_state_dict(state["scheduler"])
        log.info("Resuming from %s (step %d of %d)", resume_from, step, total_steps)
    trained_wrapped, optimizer = acc.prepare(trained, optimizer)
    if resume_from is not None and acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])

    metrics = MetricsLog(run_dir, is_main, config.run.tensorboard, resume_step=step)
    if is_main and step == 0:
        _log_start(config, models, train_data, total_steps, global_batch, accum, world, frozen, pairs, spec)
    fused = fused_projections(config, models, spec)
    generator = torch.Generator(device=device)
    batches = iter(sampler)
    term_names = list(spec.weights)
    bar = tqdm(total=total_steps, initial=step, desc="distil", disable=not (is_main and config.run.progress),
               dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    run_start = time.perf_counter() - elapsed_before
    stopped_early = False

    def save(at_step: int) -> None:
        state = {"tokens_seen": tokens_seen, "elapsed_s": time.perf_counter() - run_start,
                 "sampler": sampler.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                 "total_steps": total_steps, "world_size": world}
        ckpt.save_checkpoint(run_dir, at_step, models.student, optimizer.optimizer if hasattr(optimizer, "optimizer")
                             else optimizer, state, rank, is_main, acc.wait_for_everyone, config.run.keep_checkpoints)

    with StopFlag() as stop:
        while step < total_steps:
            step_values = torch.zeros(len(term_names), device=device)
            step_tokens = 0
            for micro in range(accum):
                indices = next(batches)
                generator.manual_seed(config.run.seed * MASK_SEED_STRIDE + step * accum + micro)
                batch = build_batch([train_data[i] for i in indices], pad_id, spec.objective, masker, generator,
                                    rank, world, device)
                last_micro = micro == accum - 1
                with (contextlib.nullcontext() if last_micro else acc.no_sync(trained_wrapped)):
                    try:
                        loss, shares = _micro_step(acc, models, trained_wrapped, spec, batch, fused)
                    except torch.OutOfMemoryError:
                        raise DistilError(_oom_message(config, models, step)) from None
                    acc.backward(loss * (world / accum))
                step_values += torch.stack([shares[n].float() for n in term_names]) / accum
                step_tokens += batch.global_tokens

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
                grad_norm = acc.clip_grad_norm_(trained_wrapped.parameters(), config.optim.max_grad_norm)
            else:
                grad_norm = None
            optimizer.step()
            scheduler.step()
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
                metrics.write(step, "heldout", evaluate_heldout(acc, models, spec, heldout, masker, config, pad_id))
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
    if stopped_early:
        metrics.close()
        return summary
    final_eval = evaluate_heldout(acc, models, spec, heldout, masker, config, pad_id) if heldout is not None else {}
    if final_eval:
        metrics.write(step, "heldout", final_eval)
    metrics.close()
    if is_main:
        _save_student(run_dir, config, models, summary, final_eval)
        log.info("Finished: student saved to %s", run_dir / FINAL_STUDENT)
    acc.wait_for_everyone()
    summary["heldout"] = final_eval
    summary["student_dir"] = str(run_dir / FINAL_STUDENT)
    return summary


def fused_projections(config: TrainConfig, models, spec) -> tuple | None:
    """(student projection, teacher projection or None) when the fused head can replace the output layers."""
    if not (config.run.fused_head and spec.needs_logits):
        return None
    s_proj = output_projection(models.student)
    t_proj = output_projection(models.teacher) if spec.needs_teacher_logits else None
    if s_proj is None or (spec.needs_teacher_logits and t_proj is None):
        log.info("The output layer is not a plain linear projection; using the unfused logit losses.")
        return None
    return s_proj, t_proj


def _micro_step(acc, models, trained_wrapped, spec, batch, fused) -> tuple[torch.Tensor, dict]:
    """Forward both models; returns (this process's weighted loss, {term: detached global share})."""
    if fused is None:
        t_logits = t_hidden = None
        # no_grad rather than inference_mode: teacher outputs feed the loss, whose backward saves them.
        with torch.no_grad(), acc.autocast():
            if spec.needs_teacher:  # a student-only baseline (alpha_mlm alone) skips the teacher
                t_logits, t_hidden = forward(models.teacher, batch, spec.needs_hidden)
        s_logits, s_hidden = forward(trained_wrapped, batch, spec.needs_hidden)
        shares = global_share(compute_terms(spec, batch, s_logits, s_hidden, t_logits, t_hidden))
        return weighted_total(shares, spec.weights), {k: v.detach() for k, v in shares.items()}
    s_proj, t_proj = fused
    t_states = t_hidden = None
    with torch.no_grad(), acc.autocast():
        with projection_bypassed(models.teacher, t_proj) if t_proj is not None else contextlib.nullcontext():
            if spec.needs_teacher:
                t_states, t_hidden = forward(models.teacher, batch, spec.needs_hidden)
    with projection_bypassed(models.student, s_proj):
        s_states, s_hidden = forward(trained_wrapped, batch, spec.needs_hidden)
    total, shares = fused_logit_terms(spec, batch, s_states, t_states if t_proj is not None else None, s_proj, t_proj)
    if spec.needs_hidden:
        hidden = global_share(compute_terms(spec, batch, None, s_hidden, None, t_hidden, only=("cos", "hidden_mse")))
        total = total + weighted_total(hidden, spec.weights)
        shares.update({k: v.detach() for k, v in hidden.items()})
    return total, shares


@torch.no_grad()
def evaluate_heldout(acc, models, spec, heldout: TokenSequences, masker, config: TrainConfig, pad_id: int) -> dict:
    """Student and teacher losses on fixed held-out batches with fixed masks: comparable across steps and runs."""
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    global_batch = config.data.batch_size * world
    if len(heldout) < global_batch:
        return {}
    sampler = GlobalBatchSampler(heldout.lengths, global_batch, seed=0, group_by_length=False, shuffle=False)
    batches = sampler.epoch_batches(0)[: config.run.eval_batches]
    student = models.student_trained
    was_training = student.training
    student.eval()
    generator = torch.Generator(device=device)
    names = ["student_" + spec.objective, "teacher_" + spec.objective, "kd"] + [h for h in ("cos", "hidden_mse")
                                                                               if h in spec.weights]
    sums = torch.zeros(len(names), device=device)
    has = torch.zeros(len(names), device=device)
    started, tokens = time.perf_counter(), 0
    for index, indices in enumerate(batches):
        generator.manual_seed(12345 + index)
        batch = build_batch([heldout[i] for i in indices], pad_id, spec.objective, masker, generator, rank, world, device)
        tokens += batch.global_tokens
        with acc.autocast():
            t_logits, t_hidden = forward(models.teacher, batch, spec.needs_hidden)
            s_logits, s_hidden = forward(student, batch, spec.needs_hidden)
        own = losses.causal_lm_loss if spec.objective == "clm" else losses.masked_lm_loss
        values: dict[str, tuple] = {}
        if s_logits is not None:
            values["student_" + spec.objective] = (own(s_logits, batch.labels), batch.local_targets, batch.global_targets)
        if t_logits is not None:
            values["teacher_" + spec.objective] = (own(t_logits, batch.labels), batch.local_targets, batch.global_targets)
        if s_logits is not None and t_logits is not None:
            values["kd"] = (losses.soft_target_kl(s_logits, t_logits, spec.temperature, batch.attention_mask.bool()),
                            batch.local_tokens, batch.global_tokens)
        hidden = {k: v for k, v in compute_terms(spec, batch, s_logits, s_hidden, t_logits, t_hidden).items()
                  if k in ("cos", "hidden_mse")} if spec.needs_hidden else {}
        shares = global_share({**values, **hidden})
        for i, name in enumerate(names):
            if name in shares:
                sums[i] += shares[name].float()
                has[i] += 1.0 / world
    if was_training:
        student.train()
    sums = acc.reduce(sums, reduction="sum").tolist()
    has = acc.reduce(has, reduction="sum").tolist()
    result = {name: total / count for name, total, count in zip(names, sums, has) if count > 0}
    if spec.objective == "clm":
        for who in ("student", "teacher"):
            if f"{who}_clm" in result:
                result[f"{who}_perplexity"] = math.exp(min(result[f"{who}_clm"], 50.0))
    result["batches"] = len(batches)
    result["tokens_per_s"] = tokens / max(time.perf_counter() - started, 1e-9)
    return result


def _oom_message(config: TrainConfig, models, step: int) -> str:
    return (
        f"Out of memory at step {step + 1} with data.batch_size={config.data.batch_size} (teacher "
        f"{config.teacher.path}, {sum(p.numel() for p in models.teacher.parameters()) / 1e6:.0f}M parameters; student "
        f"{sum(p.numel() for p in models.student.parameters()) / 1e6:.0f}M). Try data.batch_size="
        f"{max(1, config.data.batch_size // 2)} with optim.gradient_accumulation={config.accumulation_steps(1) * 2} "
        "(same effective batch), run.mixed_precision=bf16 with teacher.dtype=bfloat16, or data.max_length=256."
    )


def _log_start(config, models, train_data, total_steps, global_batch, accum, world, frozen, pairs, spec) -> None:
    n_teacher = sum(p.numel() for p in models.teacher.parameters())
    n_student = sum(p.numel() for p in models.student.parameters())
    log.info("teacher %s: %.1fM parameters%s", config.teacher.path, n_teacher / 1e6,
             "" if models.teacher_has_head else " (no LM head: hidden-state losses only)")
    log.info("student: %.1fM parameters (%.0f%% of the teacher)", n_student / 1e6, 100 * n_student / max(1, n_teacher))
    log.info("data: %d sequences; %d processes x batch %d x accumulation %d = %d sequences per step; %d steps",
             len(train_data), world, config.data.batch_size, accum, global_batch * accum, total_steps)
    log.info("losses: %s; temperature %.1f%s", ", ".join(f"{k}={v}" for k, v in spec.weights.items()),
             spec.temperature, f"; hidden pairs (student, teacher) {pairs}" if spec.needs_hidden else "")
    if frozen:
        log.info("frozen: %s", ", ".join(frozen))


def _save_student(run_dir: Path, config: TrainConfig, models, summary: dict, final_eval: dict) -> None:
    student = models.student
    for key, value in models.original_dropout.items():
        setattr(student.config, key, value)
    with atomic_output_dir(run_dir / FINAL_STUDENT, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        models.tokenizer.save_pretrained(tmp)
        record = dict(models.init_record or {})
        record.update({"distilled_from": config.teacher.path, "recipe": config.name or None,
                       "steps": summary["steps"], "tokens_seen": summary["tokens_seen"], "heldout": final_eval})
        write_json_atomic(tmp / "distil_init.json", record)
        (tmp / "README.md").write_text(_model_card(config, models, summary, final_eval), encoding="utf-8")


def _model_card(config, models, summary, final_eval) -> str:
    n_student = sum(p.numel() for p in models.student.parameters())
    lines = [
        f"# Student distilled from {config.teacher.path}", "",
        f"Made with `distil train` ({config.name or 'custom recipe'}): {summary['steps']} optimizer steps, "
        f"{summary['tokens_seen']:,} tokens, {n_student / 1e6:.1f}M parameters.", "",
        "Load it with plain transformers:", "", "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "model = AutoModel.from_pretrained(PATH); tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", "",
        "Losses: " + ", ".join(f"{k}={v}" for k, v in term_spec_from(config, []).weights.items())
        + f", temperature {config.loss.temperature}.", "",
    ]
    if final_eval:
        lines += ["Held-out evaluation at the end of training:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final_eval.items()]
    return "\n".join(lines) + "\n"
