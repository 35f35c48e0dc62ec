"""Training recipes: dataclasses read from YAML, overridable with `section.key=value` on the command line.

Every value is validated as it is read (distil.recipe_checks), before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from distil.errors import DistilError
from distil.recipe_checks import closest_hint, validate


@dataclass
class TeacherConfig:
    path: str = ""                      # hub id, save_pretrained directory, or .gguf file
    dtype: str = "auto"                 # float32 | bfloat16 | float16 | auto (float32 on CPU, bf16 on GPUs that have it)
    tokenizer: str | None = None        # defaults to the teacher's own
    fsdp: str = "shard"                 # under FSDP: shard (frozen, resharded after each forward) | replicate
    cache: str | None = None            # a teacher-signal store (distil cache-teacher): train from it, no teacher loaded


@dataclass
class StudentConfig:
    path: str | None = None             # a save_pretrained directory, e.g. written by `distil init-student`
    layers: list[int] | None = None     # or: build the student from these teacher layers when training starts
    num_layers: int | None = None       # or: this many teacher layers, spread keeping the first and last
    architecture: str = "auto"          # auto | distilbert | same (see distil init-student)
    config: str | None = None           # or: a config.json / directory to start from random weights


@dataclass
class DataConfig:
    path: str = ""                      # a directory written by `distil prepare`
    batch_size: int = 5                 # sequences per process per micro-step
    group_by_length: bool = True        # batch sequences of similar length (less padding)
    max_length: int | None = None       # truncate longer sequences (None: as prepared)


@dataclass
class LossConfig:
    objective: str = "auto"             # auto (from the teacher: encoder -> mlm, decoder -> clm) | mlm | clm
                                        # | embedding (a sentence encoder: no LM head, clean text, no logit terms)
    temperature: float = 2.0
    alpha_ce: float = 0.5               # soft-target divergence (loss.divergence, forward KL by default) * T^2
    divergence: str = "forward_kl"      # forward_kl | reverse_kl | jsd | skew_kl | skew_reverse_kl | tvd
                                        # | uld | hybrid: across tokenizers (a teacher of another vocabulary)
    uld_weight: float = 1.0             # hybrid: weight of its ULD part (the tokens the vocabularies do not share)
    jsd_beta: float = 0.5               # jsd: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    skew_alpha: float = 0.1             # skew_kl: KL(p || alpha p + (1 - alpha) q); skew_reverse_kl likewise
    alpha_mlm: float = 0.0              # masked-LM cross-entropy on the student
    alpha_clm: float = 0.0              # causal-LM cross-entropy on the student (shifted)
    alpha_mse: float = 0.0              # MSE between student and teacher logits
    alpha_cos: float = 0.0              # cosine distance between hidden states (see hidden_layers)
    alpha_hidden_mse: float = 0.0       # MSE between hidden states (see hidden_layers)
    hidden_layers: Any = "mapped"       # "last" | "mapped" | [[student_layer, teacher_layer], ...] (0 = embeddings)
    hidden_teacher: Any = None          # with several teachers: the one (name or index) whose hidden states and
                                        # self-attention the representation terms compare with
    alpha_relation: float = 0.0         # MiniLMv2 self-attention relations (Q-Q, K-K, V-V KL); widths may differ
    relation_layers: Any = None         # [student_layer, teacher_layer] (1-based blocks); None: MiniLMv2's choice,
                                        # student's last vs the teacher's last (base-size), or its layer
                                        # round(21/24 n) for teachers of >= 24 layers (21 of 24, large-size)
    relation_heads: int | None = None   # relation heads Q/K/V are re-split into; None: the teacher's head count
    alpha_attention: float = 0.0        # attention maps of mapped layers (same head counts only), pre-dropout
    attention_layers: Any = None        # [[student_layer, teacher_layer], ...] (1-based); None: hidden_layers' pairs
    attention_loss: str = "kl"          # kl: KL(teacher || student) of attention distributions (MiniLMv1/MobileBERT)
                                        # | mse_probs: squared error of the distributions, summed over keys
                                        # | mse_scores: MSE of the pre-softmax scores, masked keys left out (TinyBERT)
    hidden_projection: str = "auto"     # auto (a learned linear map student -> teacher width when widths differ) |
                                        # linear (always learned) | none (widths must match); dropped at the end
    alpha_sentence_mse: float = 0.0     # MSE between pooled sentence embeddings of student and teacher
    alpha_sentence_cos: float = 0.0     # cosine distance between pooled sentence embeddings
    pooling: str = "auto"               # auto (the teacher's sentence-transformers pooling, else mean) | mean | cls
                                        # | last | max
    normalize_embeddings: Any = "auto"  # auto (as the teacher's sentence-transformers config) | true | false
    restrict_ce_to_mask: bool = False   # soft-target loss only on masked positions (MLM)
    mlm_probability: float = 0.15
    mlm_smoothing: float = 0.7          # masking probability of a token ~ count^-smoothing (rare tokens favoured)
    mask_replace: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # mask / keep / random
    # On-policy distillation (GKD; training/on_policy.py): on this fraction (lambda) of the steps the student
    # continues prompts cut from the step's sequences and is distilled on its own tokens (causal, live teacher).
    on_policy_fraction: float = 0.0
    on_policy_prefix: int = 16          # prompt: each sequence's first tokens (never its closing token)
    on_policy_max_new_tokens: int = 32  # the student's continuation, stopped earlier at its end-of-text
    on_policy_temperature: float = 1.0  # the student's sampling temperature (not loss.temperature)
    on_policy_top_p: float = 1.0        # nucleus sampling (1: the whole distribution)

    def alphas(self) -> dict[str, float]:
        """Every loss weight of the recipe, by key (alpha_ce, alpha_mlm, ...)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("alpha_")}

    def weights(self) -> dict[str, float]:
        """The terms the recipe uses, by term name (ce, mlm, clm, mse, cos, hidden_mse, relation, ...), with their
        non-zero weights."""
        return {key.removeprefix("alpha_"): float(value) for key, value in self.alphas().items() if value > 0}


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.0           # never applied to biases and norm weights
    warmup_fraction: float = 0.05       # linear warm-up over this fraction of the steps, then linear decay to 0
    max_grad_norm: float = 5.0
    gradient_accumulation: int = 1      # micro-steps per optimizer step; or
    effective_batch_size: int | None = None  # sequences per optimizer step: sets the accumulation from the
                                             # batch size and the number of processes (the paper used ~4,000)
    max_steps: int | None = None        # optimizer steps; or
    epochs: float = 3.0                 # passes over the training data when max_steps is None


@dataclass
class RunConfig:
    output_dir: str = "runs/distil"
    seed: int = 56
    mixed_precision: str = "no"         # no | bf16 | fp16
    freeze_position_embeddings: bool = False
    freeze_token_type_embeddings: bool = False
    dropout: float | None = None        # override the student's dropout (0 for exact-reproduction tests)
    log_every: int = 10                 # optimizer steps between training log lines
    eval_every: int = 500               # optimizer steps between held-out evaluations (0: only at the end)
    eval_batches: int = 20              # held-out global batches per evaluation
    checkpoint_every: int = 1000        # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3
    resume: str = "auto"                # auto (continue the run in output_dir if any) | never | a checkpoint directory
    overwrite: bool = False             # start over in an output_dir that holds a finished run
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # trackers (accelerate's): tensorboard,
                                        # wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive, swanlab; none: []
    progress: bool = True
    fsdp: bool = False                  # shard student (and teacher) with FSDP2; also set by accelerate launch --use_fsdp
    fused_head: bool = True             # output layer + logit losses in row chunks (no tokens x vocab tensors)
    collective_timeout_s: int = 1800    # a process waiting longer than this at a collective fails instead of hanging


@dataclass
class TrainConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Several teachers, mixed per position in probability space (training.sources.mixture): each a mapping of
    # path and/or cache, weight (default 1), temperature (default loss.temperature) and name (default its place,
    # 0, 1, ...). teacher.dtype, teacher.tokenizer and teacher.fsdp apply to each; teacher.path / cache stay unset.
    teachers: list = field(default_factory=list)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    name: str = ""
    description: str = ""

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step: given, or derived from the effective batch size."""
        if self.optim.effective_batch_size is None:
            return self.optim.gradient_accumulation
        per_micro_step = self.data.batch_size * world_size
        return max(1, round(self.optim.effective_batch_size / per_micro_step))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


STUDENT_SOURCES = ("path", "layers", "num_layers", "config")


def _set_fields(obj, values: dict, where: str) -> None:
    names = [f.name for f in fields(obj)]
    for key, value in values.items():
        if key not in names:
            raise DistilError(f"Unknown recipe key {where}{key!r}.{closest_hint(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DistilError(f"Recipe key {where}{key} must be a mapping of settings, got {value!r}.")
            _set_fields(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, value)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise DistilError(f"Override {text!r} is not of the form key=value (for example loss.temperature=4 or run.seed=1).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    if value == "None":  # Python's spelling of YAML's null (data.max_length=None), meant as null
        value = None
    return key.strip().split("."), value


def read_recipe_file(recipe: str | Path, what: str, where: str, shape: str) -> dict:
    """A YAML file's top-level mapping, or a one-paragraph DistilError that says what is wrong with the file."""
    path = Path(recipe)
    if not path.exists():
        raise DistilError(f"The {what} {path} does not exist. {where}")
    if path.is_dir():
        raise DistilError(f"The {what} {path} is a directory, not a YAML file. {where}")
    try:
        raw = path.read_bytes()
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        values = yaml.safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise DistilError(f"The {what} {path} is not a text file (it looks binary). {where}") from None
    except OSError as exc:
        raise DistilError(f"The {what} {path} cannot be read: {exc.strerror}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DistilError(f"The {what} {path} is not valid YAML{at}: {problem}. Fix the file there.") from None
    if not isinstance(values, dict):
        raise DistilError(f"The {what} {path} must be {shape}, not {type(values).__name__}.")
    return values


def load_config(recipe: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe, apply `a.b=value` overrides, validate, and return the TrainConfig."""
    config = TrainConfig()
    if recipe is not None:
        values = read_recipe_file(recipe, "recipe", "Recipes live in recipes/*.yaml; pass one of them or your own.",
                                  "a mapping of sections (teacher, student, data, loss, optim, run)")
        _set_fields(config, values, "")
    for text in overrides or []:
        keys, value = parse_override(text)
        if len(keys) == 2 and keys[0] == "student" and keys[1] in STUDENT_SOURCES and value is not None:
            # A student given on the command line replaces the recipe's way of making one (path, layers,
            # num_layers or config), e.g. `student.path=` a directory from distil init-student.
            for other in STUDENT_SOURCES:
                setattr(config.student, other, None)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _set_fields(config, nested, "")
    validate(config)
    return config


def dump_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
