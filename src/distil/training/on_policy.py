"""On-policy distillation (GKD, Agarwal et al. 2024): for a fraction lambda of the optimizer steps the student
writes the text it is distilled on.

On such a step (drawn from run.seed and the step number alone, so a resumed run draws the same steps) every
sequence of the step batch is cut to a prompt (its first `loss.on_policy_prefix` tokens, never its closing
token), the student continues it (KV-cached `transformers` generation, in eval mode and without gradients, up to
`loss.on_policy_max_new_tokens` tokens or its end-of-text), and the teacher scores prompt + continuation in the
ordinary step. The soft-target divergence (loss.divergence; logit MSE too) is taken only at the positions that
produced the student's own tokens; the prompt positions are no soft targets. The causal-LM loss is off on these
steps (logged as 0): its targets would be the student's own samples, which teach it nothing it did not already
believe. Hidden-state and attention terms, when the recipe has them, compare the two models on the whole
generated rows, as on any step.

Sampling is greedy decoding of scores perturbed with Gumbel noise (argmax(scores / T + G) is a draw from
softmax(scores / T)), restricted to the top-p nucleus and by nothing else: the student checkpoint's own
generation_config (repetition penalty, top-k, banned or suppressed tokens, minimum length, ...) is set aside
while it writes. Each row's noise comes from its own generator seeded by (run.seed, step, row of the step
batch): a row's continuation does not depend on which other rows it is generated with, so neither on how the
step is split between processes and accumulation steps (up to the float rounding of batched forwards). Every
process generates its own rows (those build_step deals it), one micro-batch at a time, and the rows are then
gathered, so that every process holds the whole step batch and the step's normalising counts
(objective.build_step) are those of all generated rows.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from distil.errors import DistilError

log = logging.getLogger(__name__)

STREAM = 0x6F6E_706F  # keeps these draws apart from every other stream seeded by run.seed


class OnPolicyRows(list):
    """A step batch of prompt + student continuation rows; prompt_lengths[i] is row i's prompt length."""

    def __init__(self, rows, prompt_lengths):
        super().__init__(rows)
        self.prompt_lengths = [int(n) for n in prompt_lengths]


def is_on_policy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` (0-based) is on-policy: a draw with probability `fraction` that depends on
    the run's seed and the step only."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    return bool(np.random.default_rng([int(seed), int(step), STREAM]).random() < fraction)


def row_seed(seed: int, step: int, row: int) -> int:
    """The seed of one row's sampling noise: (run seed, step, index of the row in the step batch)."""
    return int(np.random.SeedSequence([int(seed), int(step), int(row), STREAM]).generate_state(1, np.uint64)[0] >> 1)


def own_rows(n: int, micro_batches: int, rank: int, world: int) -> list[list[int]]:
    """The step-batch rows this process keeps, per micro-batch: the same split as objective.build_step."""
    per_micro = n // micro_batches
    return [list(range(m * per_micro + rank, (m + 1) * per_micro, world)) for m in range(micro_batches)]


def prompt_of(sequence: np.ndarray, prefix: int) -> np.ndarray:
    """The first `prefix` tokens, never the sequence's last (its closing end-of-text), at least one."""
    return sequence[: max(1, min(prefix, len(sequence) - 1))]


def generated_targets(sequences, labels: torch.Tensor, target_mask: torch.Tensor, attention_mask: torch.Tensor):
    """(labels, target mask, kd mask) of a step batch: as given, with kd mask None, for teacher-forced rows; for
    on-policy rows (OnPolicyRows) no labels (no causal-LM targets), and as both the target and the kd mask the
    positions that produced a generated token (position j predicts token j + 1: prompt length - 1 to length - 2),
    so that the step's target counts are its generated tokens."""
    if not isinstance(sequences, OnPolicyRows):
        return labels, target_mask, None
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    lengths = attention_mask.sum(dim=1, keepdim=True)
    prompts = torch.tensor(sequences.prompt_lengths, device=attention_mask.device).unsqueeze(1)
    kd_mask = (positions >= prompts - 1) & (positions <= lengths - 2)
    return torch.full_like(labels, -100), kd_mask, kd_mask


class GumbelSampler:
    """A logits processor that turns greedy decoding into sampling at `temperature` within the top-p nucleus, with
    one noise generator per row (see the module docstring). Ids from `vocab_limit` on (padding rows of the
    output layer, which no tokenizer id names) are never drawn."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, vocab_limit: int | None,
                 device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature, self.top_p, self.vocab_limit = float(temperature), float(top_p), vocab_limit

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.vocab_limit is not None and self.vocab_limit < scores.shape[-1]:
            scores[:, self.vocab_limit:] = float("-inf")
        if self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            mass = ordered.softmax(dim=-1).cumsum(dim=-1)
            outside = (mass - ordered.softmax(dim=-1)) >= self.top_p  # the mass before it already reaches top_p
            scores = scores.scatter(1, order, ordered.masked_fill(outside, float("-inf")))
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        tiny = torch.finfo(torch.float32).tiny
        return scores - torch.log(-torch.log(u.clamp_(min=tiny)))


def generate(student: torch.nn.Module, prompts: list[np.ndarray], seeds: list[int], max_new_tokens: int,
             temperature: float, top_p: float, pad_id: int, eos_id: int | None, vocab_limit: int | None,
             device: torch.device, autocast=None) -> list[np.ndarray]:
    """prompt + the student's continuation of each prompt (up to and including its first end-of-text)."""
    from transformers import GenerationConfig, LogitsProcessorList

    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):  # left-padded: every row continues from the same column
        ids[i, longest - len(p):] = torch.from_numpy(p.astype(np.int64))
        mask[i, longest - len(p):] = 1
    settings = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1, use_cache=True,
                                pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)
    sampler = GumbelSampler(seeds, temperature, top_p, vocab_limit, device)
    # generate() fills every setting left unset here from the model's own generation_config (a checkpoint's
    # repetition_penalty, no_repeat_ngram_size, suppress_tokens, min_new_tokens, ...), each one a logits processor
    # that would run before the sampler: the draw would no longer be softmax(scores / T) and would differ by
    # checkpoint. A blank one stands in while the student writes; the library's remaining defaults are neutral
    # for greedy decoding (top_k and temperature act only when do_sample is on).
    own_settings, student.generation_config = student.generation_config, GenerationConfig()
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
            out = student.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   generation_config=settings, logits_processor=LogitsProcessorList([sampler]))
    finally:
        student.train(was_training)
        student.generation_config = own_settings
    new = out[:, longest:].cpu().numpy()
    rows = []
    for p, continuation in zip(prompts, new):
        if eos_id is not None:
            ends = np.flatnonzero(continuation == eos_id)
            continuation = continuation[: ends[0] + 1] if len(ends) else continuation
        rows.append(np.concatenate([p, continuation.astype(p.dtype)]))
    return rows


@dataclass
class OnPolicy:
    """Decides which steps are on-policy and writes their rows (see the module docstring)."""

    fraction: float
    prefix: int = 16
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    student: torch.nn.Module | None = None
    pad_id: int = 0
    eos_id: int | None = None
    vocab_limit: int | None = None
    device: torch.device | None = None
    rank: int = 0
    world: int = 1
    micro_batches: int = 1
    autocast: object = None

    @classmethod
    def from_config(cls, config, models, spec, pad_id: int, device, rank: int, world: int, micro_batches: int,
                    autocast=None) -> "OnPolicy":
        """The run's on-policy settings, checked against the models (refused with what to change)."""
        loss = config.loss
        policy = cls(fraction=float(loss.on_policy_fraction), prefix=int(loss.on_policy_prefix),
                     max_new_tokens=int(loss.on_policy_max_new_tokens), temperature=float(loss.on_policy_temperature),
                     top_p=float(loss.on_policy_top_p), seed=int(config.run.seed), student=models.student,
                     pad_id=int(pad_id), eos_id=getattr(models.tokenizer, "eos_token_id", None),
                     vocab_limit=len(models.tokenizer), device=device, rank=rank, world=world,
                     micro_batches=micro_batches, autocast=autocast)
        if policy.fraction > 0:
            check(config, models, spec)
        return policy

    def rows_for_step(self, step: int, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """The step batch to train on at step `step` (0-based): `sequences` as they are on a teacher-forced step;
        on an on-policy step, OnPolicyRows of prompts continued by the student."""
        if not is_on_policy_step(self.seed, step, self.fraction):
            return sequences
        prompts = [prompt_of(s, self.prefix) for s in sequences]
        mine: dict[int, np.ndarray] = {}
        for rows in own_rows(len(sequences), self.micro_batches, self.rank, self.world):
            if rows:
                written = generate(self.student, [prompts[i] for i in rows],
                                   [row_seed(self.seed, step, i) for i in rows], self.max_new_tokens,
                                   self.temperature, self.top_p, self.pad_id, self.eos_id, self.vocab_limit,
                                   self.device, self.autocast)
                mine.update(zip(rows, written))
        if self.world > 1:
            gathered: list = [None] * self.world
            torch.distributed.all_gather_object(gathered, mine)
            for part in gathered:
                mine.update(part)
        return OnPolicyRows([mine[i] for i in range(len(sequences))], [len(p) for p in prompts])

    def log_start(self) -> None:
        if self.fraction <= 0:
            return
        nucleus = f", top-p {self.top_p}" if self.top_p < 1 else ""
        log.info("on-policy: %.0f%% of the steps (drawn from run.seed and the step) are the student's own text: each "
                 "sequence's first %d tokens, continued by the student (up to %d tokens or its end-of-text, sampled "
                 "at temperature %.2f%s, KV-cached); the divergence is taken on its generated tokens only, the "
                 "causal-LM loss is off on those steps", 100 * self.fraction, self.prefix, self.max_new_tokens,
                 self.temperature, nucleus)


def check(config, models, spec) -> None:
    """What on-policy distillation needs beyond its own settings (those are checked with the recipe)."""
    if spec.objective != "clm":
        raise DistilError(
            f"loss.on_policy_fraction is set but the run is masked-LM (the teacher {config.teacher.path} is a "
            "bidirectional encoder): on-policy distillation needs a causal student that writes text and a causal "
            "teacher that scores it. Set loss.on_policy_fraction=0, or distil a decoder (GPT-2, Llama, ...)."
        )
    if getattr(config.teacher, "cache", None) or any(e.get("cache") for e in getattr(config, "teachers", [])):
        raise DistilError(
            "loss.on_policy_fraction is set with teacher.cache: the stored teacher signals cover the prepared text "
            "only and cannot score what the student writes. Use the live teacher (unset teacher.cache) for "
            "on-policy steps, or set loss.on_policy_fraction=0."
        )
    if config.run.fsdp:
        raise DistilError("loss.on_policy_fraction is not supported with FSDP yet (generation would need every "
                          "process in step); use DDP (run.fsdp=false) or set loss.on_policy_fraction=0.")
    if not spec.needs_teacher_logits:
        raise DistilError(
            "loss.on_policy_fraction is set but the recipe has no soft-target term: on-policy steps distil the "
            "teacher's distribution on the student's own tokens. Set loss.alpha_ce (or loss.alpha_mse) > 0."
        )
    from distil.training.models import too_short_for

    longest = config.loss.on_policy_prefix + config.loss.on_policy_max_new_tokens
    if (short := too_short_for(models, longest)) is not None:
        who, limit = short
        raise DistilError(
            f"On-policy rows hold up to loss.on_policy_prefix + loss.on_policy_max_new_tokens = {longest} "
            f"tokens, but the {who} has positions for {limit}. Lower them so that they add up to {limit} or less."
        )
