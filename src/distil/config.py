"""Training recipes: dataclasses read from YAML, overridable with `section.key=value` on the command line.

Every value is validated here, before any model is loaded, with messages that say what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from distil.errors import DistilError


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


@dataclass(frozen=True)
class Range:
    """The values a number may take; every bound is optional and NaN / infinity are never in range."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False              # low itself excluded
    high_open: bool = False             # high itself excluded

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        """`in [0, 1) (a finite number)`, `> 0 (a finite number)`, `a finite number`."""
        if self.low is not None and self.high is not None:
            bounds = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            return "a finite number"
        return f"{bounds} (a finite number)"


ANY_FINITE = Range()
POSITIVE = Range(0.0, low_open=True)
NON_NEGATIVE = Range(0.0)
PROBABILITY = Range(0.0, 1.0)
FRACTION = Range(0.0, 1.0, high_open=True)
OPEN_UNIT = Range(0.0, 1.0, low_open=True, high_open=True)

# The meaningful values of each float recipe key (lists: of each element). A float key not named here is still
# refused when it is NaN or infinite; loss.alpha_* weights are >= 0 (see float_range).
FLOAT_RANGES = {
    "loss.temperature": POSITIVE,
    "loss.jsd_beta": OPEN_UNIT,
    "loss.skew_alpha": FRACTION,
    "loss.uld_weight": NON_NEGATIVE,
    "loss.mlm_probability": OPEN_UNIT,
    "loss.mlm_smoothing": NON_NEGATIVE,
    "loss.mask_replace": PROBABILITY,
    "loss.on_policy_fraction": PROBABILITY,
    "loss.on_policy_temperature": POSITIVE,
    "loss.on_policy_top_p": Range(0.0, 1.0, low_open=True),
    "optim.lr": POSITIVE,
    "optim.betas": FRACTION,
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_fraction": FRACTION,
    "optim.max_grad_norm": NON_NEGATIVE,
    "optim.epochs": POSITIVE,
    "run.dropout": FRACTION,
}


def float_range(key: str) -> Range:
    """The range of the float recipe key `section.name`."""
    if key.startswith("loss.alpha_"):
        return FLOAT_RANGES.get(key, NON_NEGATIVE)
    return FLOAT_RANGES.get(key, ANY_FINITE)


def check_number(name: str, value, allowed: Range, hint: str = "") -> float:
    """`value` as a float when it is a finite number in `allowed`, else a DistilError naming `name`."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not allowed.contains(number):
        raise DistilError(f"{name} must be {allowed.describe()}, got {value!r}.{hint}")
    return number


def _check_float_values(section, f: dataclasses.Field, where: str) -> None:
    """NaN and infinity are refused for every float key (they pass `<` and `>` checks unnoticed), and each key's
    range (FLOAT_RANGES) is enforced, before any other check reads the value."""
    key = f"{where}.{f.name}"
    value = getattr(section, f.name)
    if value is None:
        return
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    default = "null (unset)" if default is None else default
    why = " Loss weights must be >= 0 (0 leaves the term out)." if f.name.startswith("alpha_") else ""
    for element in value if isinstance(value, list) else [value]:
        check_number(f"Recipe key {key}" + (" (each element)" if isinstance(value, list) else ""), element,
                     float_range(key), f"{why} Fix it in the recipe or on the command line (the default is {default}).")


STUDENT_SOURCES = ("path", "layers", "num_layers", "config")


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else f" Known keys: {', '.join(options)}."


def _set_fields(obj, values: dict, where: str) -> None:
    names = [f.name for f in fields(obj)]
    for key, value in values.items():
        if key not in names:
            raise DistilError(f"Unknown recipe key {where}{key!r}.{_closest(key, names)}")
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


TEACHER_KEYS = ("path", "cache", "weight", "temperature", "name")


def _check_teachers(config: TrainConfig) -> None:
    """`teachers:` is a list of mappings, each naming a model or a store, with a weight >= 0 (some > 0) and a
    positive temperature or none."""
    if not isinstance(config.teachers, list):
        raise DistilError(f"Recipe key teachers must be a list of teachers, got {config.teachers!r}.")
    if config.teacher.path or config.teacher.cache:
        raise DistilError("The recipe sets both teacher.path / teacher.cache and teachers. Name one teacher under "
                          "teacher:, or every teacher under teachers: (teacher: then keeps dtype, tokenizer, fsdp).")
    for index, entry in enumerate(config.teachers):
        if not isinstance(entry, dict) or not (entry.get("path") or entry.get("cache")):
            raise DistilError(f"teachers[{index}] must be a mapping with a path (a model) or a cache (a teacher-signal "
                              f"store), got {entry!r}.")
        unknown = sorted(set(entry) - set(TEACHER_KEYS))
        if unknown:
            raise DistilError(f"Unknown key {unknown[0]!r} in teachers[{index}]; a teacher takes "
                              f"{', '.join(TEACHER_KEYS)}.")
        weight, temperature = entry.get("weight", 1.0), entry.get("temperature")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise DistilError(f"teachers[{index}].weight must be a number >= 0, got {weight!r}.")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or temperature <= 0):
            raise DistilError(f"teachers[{index}].temperature must be a positive number or null (the run's "
                              f"loss.temperature), got {temperature!r}.")
    if config.student.layers or config.student.num_layers:
        raise DistilError("student.layers / student.num_layers build the student from one teacher's layers, and the "
                          "recipe has several teachers. Build it once with distil init-student from the teacher of "
                          "your choice and set student.path.")
    if sum(float(e.get("weight", 1.0)) for e in config.teachers) <= 0:
        raise DistilError("Every teacher in teachers has weight 0. Give at least one a positive weight.")
    names = [str(e.get("name", i)) for i, e in enumerate(config.teachers)]
    if len(set(names)) < len(names):
        raise DistilError(f"Two teachers share a name ({', '.join(names)}). Give each its own name.")


def _check_type(section, name: str, kinds: tuple, where: str) -> None:
    value = getattr(section, name)
    if value == "None" and type(None) in kinds:  # `max_length: None` in a recipe means null, as on the command line
        setattr(section, name, None)
        return
    if value is None and type(None) in kinds:
        return
    # YAML gives ints where floats are meant (alpha: 5); accept them.
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        setattr(section, name, float(value))
        return
    # YAML 1.1 reads `no` as False and `123` as a number where a string field is meant.
    if kinds[0] is str and isinstance(value, (bool, int, float)):
        setattr(section, name, ("yes" if value else "no") if isinstance(value, bool) else str(value))
        return
    # YAML 1.1 reads 1e-3 (no dot) as a string; a number is clearly meant.
    if float in kinds and isinstance(value, str):
        try:
            setattr(section, name, float(value))
            return
        except ValueError:
            pass
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise DistilError(f"Recipe key {where}.{name} must be {expected}, got {value!r}.")


ELEMENT_KINDS = {"list[float]": float, "list[int]": int, "list[str]": str}


def _check_elements(section, name: str, annotation: str, where: str) -> None:
    """Elements of list keys are checked like scalar keys (`optim.betas=[a,b]` is refused, `[1, 0.98]` is fine)."""
    kind = next((k for prefix, k in ELEMENT_KINDS.items() if annotation.startswith(prefix)), None)
    if kind is None:
        return
    values = []
    for value in getattr(section, name):
        if kind is float and isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DistilError(f"Recipe key {where}.{name} must be a list of {kind.__name__}s, got {getattr(section, name)!r} "
                              f"({value!r} is not a {kind.__name__}).")
        values.append(value)
    setattr(section, name, values)


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


def validate(config: TrainConfig) -> None:
    # `run.report_to=wandb` on the command line, or `report_to: none` in a recipe.
    if isinstance(config.run.report_to, str):
        text = config.run.report_to.strip()
        config.run.report_to = [] if text in ("none", "") else [t.strip() for t in text.split(",") if t.strip()]
    for section_name in ("teacher", "student", "data", "loss", "optim", "run"):
        section = getattr(config, section_name)
        for f in fields(section):
            annotation = str(f.type)
            kinds: tuple = ()
            if annotation.startswith("float"):
                kinds = (float,)
            elif annotation.startswith("int"):
                kinds = (int,)
            elif annotation.startswith("bool"):
                kinds = (bool,)
            elif annotation.startswith("str"):
                kinds = (str,)
            elif annotation.startswith("list"):
                kinds = (list,)
            if not kinds:
                continue
            if "None" in annotation:
                kinds = kinds + (type(None),)
            _check_type(section, f.name, kinds, section_name)
            if kinds[0] is list and isinstance(getattr(section, f.name), list):
                _check_elements(section, f.name, annotation, section_name)
            if annotation.startswith(("float", "list[float]")):
                _check_float_values(section, f, section_name)

    if config.teachers:
        _check_teachers(config)
    elif not config.teacher.path and not config.teacher.cache:
        raise DistilError("The recipe names no teacher. Set teacher.path (a hub id such as bert-base-uncased, or a directory).")
    if not config.data.path:
        raise DistilError("The recipe names no data. Set data.path to a directory written by `distil prepare`.")
    s = config.student
    given = [k for k, v in (("path", s.path), ("layers", s.layers), ("num_layers", s.num_layers), ("config", s.config)) if v]
    if len(given) > 1:
        raise DistilError(f"Give the student one way only; the recipe sets student.{' and student.'.join(given)}.")
    if config.teacher.cache and not config.teacher.path and (s.layers or s.num_layers):
        raise DistilError("teacher.cache without teacher.path has no teacher weights to build the student from "
                          "(student.layers / student.num_layers). Build it once with distil init-student and set "
                          "student.path, or set teacher.path as well (its weights are read only to build the student).")
    if s.architecture not in ("auto", "distilbert", "same"):
        raise DistilError(f"student.architecture must be auto, distilbert or same, got {s.architecture!r}.")

    loss = config.loss
    alphas = loss.alphas()
    if not any(alphas.values()):
        raise DistilError("All loss weights are 0, so nothing would be learned. Set at least one of " + ", ".join(alphas) + ".")
    if loss.alpha_mlm > 0 and loss.alpha_clm > 0:
        raise DistilError("alpha_mlm and alpha_clm are both set: a run is either masked-LM (encoders) or causal-LM (decoders).")
    divergences = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "uld", "hybrid")
    if loss.divergence not in divergences:
        raise DistilError(f"loss.divergence must be one of {', '.join(divergences)}, got {loss.divergence!r}."
                          f"{_closest(str(loss.divergence), list(divergences))}")
    if len(loss.mask_replace) != 3 or abs(sum(loss.mask_replace) - 1) > 1e-6:
        raise DistilError(f"loss.mask_replace must be three probabilities (mask, keep, random) that sum to 1, got {loss.mask_replace}.")
    if not (loss.hidden_layers in ("last", "mapped") or _is_layer_pairs(loss.hidden_layers)):
        raise DistilError(
            f"loss.hidden_layers must be 'last', 'mapped' or a list of [student_layer, teacher_layer] pairs, got {loss.hidden_layers!r}."
        )
    if loss.relation_layers is not None and not (_is_block_pair(loss.relation_layers)
                                                 or _is_layer_pairs(loss.relation_layers, first=1)):
        raise DistilError(
            f"loss.relation_layers must be one [student_layer, teacher_layer] pair of layers counted from 1 (layer i is "
            f"block i; the embeddings have no attention), or a list of such pairs; got {loss.relation_layers!r}. "
            "Leave it unset for the default (the student's last layer against the teacher's last, or its upper-middle "
            "layer when the teacher is at least twice as deep)."
        )
    if loss.attention_layers is not None and not _is_layer_pairs(loss.attention_layers, first=1):
        raise DistilError(
            f"loss.attention_layers must be a list of [student_layer, teacher_layer] pairs of layers counted from 1, "
            f"got {loss.attention_layers!r}. Leave it unset to use the pairs of loss.hidden_layers."
        )
    if loss.relation_heads is not None and loss.relation_heads < 1:
        raise DistilError(f"loss.relation_heads must be at least 1, got {loss.relation_heads} (unset: the teacher's "
                          "head count).")
    if loss.attention_loss == "mse":
        raise DistilError("loss.attention_loss=mse is ambiguous: say mse_probs (squared error of the attention "
                          "probabilities, summed over keys; what mse used to compute) or mse_scores (MSE of the "
                          "pre-softmax scores, as TinyBERT).")
    if loss.attention_loss not in ("kl", "mse_probs", "mse_scores"):
        raise DistilError(f"loss.attention_loss must be kl, mse_probs or mse_scores, got {loss.attention_loss!r}.")
    if loss.hidden_projection not in ("auto", "linear", "none"):
        raise DistilError(f"loss.hidden_projection must be auto, linear or none, got {loss.hidden_projection!r}.")
    if loss.pooling not in ("auto", "mean", "cls", "last", "max"):
        raise DistilError(f"loss.pooling must be auto, mean, cls, last or max, got {loss.pooling!r}.")
    if loss.normalize_embeddings not in ("auto", True, False):
        raise DistilError(f"loss.normalize_embeddings must be auto, true or false, got {loss.normalize_embeddings!r}.")
    if loss.objective not in ("auto", "mlm", "clm", "embedding"):
        raise DistilError(f"loss.objective must be auto, mlm, clm or embedding, got {loss.objective!r} (auto: masked-LM "
                          "for encoder teachers such as BERT, causal-LM for decoders such as GPT-2 and Llama; "
                          "embedding: a sentence encoder distilled from hidden states, with no LM head).")
    if loss.objective == "embedding":
        _check_embedding_terms(loss)
        if config.teacher.cache:
            raise DistilError("teacher.cache is set with loss.objective=embedding: a teacher-signal store holds an LM "
                              "head's outputs on the text it scored (masked, for an encoder), and an embedding run "
                              "compares states on clean text with the live teacher. Unset teacher.cache.")
    # What can be checked without the teacher; `auto` is resolved and checked against it when training starts.
    if loss.objective == "mlm" and loss.alpha_clm > 0:
        raise DistilError("loss.objective is mlm but loss.alpha_clm is set: the causal-LM loss needs a causal objective. "
                          "Set loss.alpha_clm to 0 (use alpha_mlm) or loss.objective=clm.")
    if loss.objective == "clm" and loss.alpha_mlm > 0:
        raise DistilError("loss.objective is clm but loss.alpha_mlm is set: the masked-LM loss needs a masked objective. "
                          "Set loss.alpha_mlm to 0 (use alpha_clm) or loss.objective=mlm.")
    if loss.restrict_ce_to_mask and (loss.objective == "clm" or loss.alpha_clm > 0):
        raise DistilError("loss.restrict_ce_to_mask applies to masked-LM runs only; unset it for causal-LM recipes.")
    _check_on_policy(config)

    o = config.optim
    if len(o.betas) != 2:
        raise DistilError(f"optim.betas must be two numbers in [0, 1), got {o.betas}.")
    if o.effective_batch_size is not None and o.effective_batch_size < config.data.batch_size:
        raise DistilError(f"optim.effective_batch_size ({o.effective_batch_size}) must be at least data.batch_size "
                          f"({config.data.batch_size}).")
    if o.gradient_accumulation < 1 or (o.max_steps is not None and o.max_steps < 1):
        raise DistilError("optim.gradient_accumulation and optim.max_steps must be >= 1.")
    if config.data.batch_size < 1:
        raise DistilError(f"data.batch_size must be at least 1, got {config.data.batch_size}.")

    r = config.run
    if Path(r.output_dir).exists() and not Path(r.output_dir).is_dir():
        raise DistilError(f"run.output_dir {r.output_dir} is an existing file, not a directory. Choose another "
                          "run.output_dir (a new or a run directory).")
    unknown = [t for t in r.report_to if t not in TRACKERS]
    if unknown:
        raise DistilError(f"run.report_to names {unknown}, which are not trackers distil knows. Use any of "
                          f"{', '.join(TRACKERS)} (or none).")
    if r.mixed_precision not in ("no", "bf16", "fp16"):
        raise DistilError(f"run.mixed_precision must be no, bf16 or fp16, got {r.mixed_precision!r}.")
    if config.teacher.fsdp not in ("shard", "replicate"):
        raise DistilError(f"teacher.fsdp must be shard or replicate, got {config.teacher.fsdp!r}.")
    if config.teacher.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise DistilError(f"teacher.dtype must be auto, float32, bfloat16 or float16, got {config.teacher.dtype!r}.")
    if r.resume not in ("auto", "never") and not Path(r.resume).exists():
        raise DistilError(f"run.resume must be auto, never, or an existing checkpoint directory; {r.resume} does not exist.")
    for name in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "collective_timeout_s"):
        if getattr(r, name) < 0 or (name in ("log_every", "keep_checkpoints", "collective_timeout_s") and getattr(r, name) < 1):
            raise DistilError(f"run.{name} must be positive, got {getattr(r, name)}.")


LOGIT_KEYS = ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse")


def _check_embedding_terms(loss: LossConfig) -> None:
    """An embedding student has no LM head: what needs logits or masked text has nothing to act on."""
    for key in LOGIT_KEYS:
        value = getattr(loss, key)
        if value > 0:
            default = next(f.default for f in fields(LossConfig) if f.name == key)
            raise DistilError(
                f"loss.{key} is {value:g}{' (its default)' if value == default else ''} but loss.objective is embedding: "
                "the student is a sentence encoder with no LM head, so there are no logits to compare or to train. "
                f"Set loss.{key}: 0 and use the hidden-state, sentence or attention terms (alpha_cos, "
                "alpha_hidden_mse, alpha_sentence_cos, alpha_sentence_mse, alpha_relation, alpha_attention), or "
                "use loss.objective=mlm with a teacher that has an MLM head."
            )
    if loss.restrict_ce_to_mask:
        raise DistilError("loss.restrict_ce_to_mask is set with loss.objective=embedding, which has no soft-target "
                          "term and no masked tokens. Unset loss.restrict_ce_to_mask.")
    if loss.on_policy_fraction > 0:
        raise DistilError("loss.on_policy_fraction is set with loss.objective=embedding: on-policy distillation needs "
                          "a causal student that writes text. Set loss.on_policy_fraction=0.")


def _check_on_policy(config: TrainConfig) -> None:
    """The on-policy settings themselves; what they need of the models is checked at start (training/on_policy.py)."""
    loss = config.loss
    if loss.on_policy_prefix < 1 or loss.on_policy_max_new_tokens < 1:
        raise DistilError(f"loss.on_policy_prefix and loss.on_policy_max_new_tokens must be at least 1 (prompt and "
                          f"continuation lengths in tokens), got {loss.on_policy_prefix} and "
                          f"{loss.on_policy_max_new_tokens}.")
    if loss.on_policy_fraction > 0 and loss.objective == "mlm":
        raise DistilError("loss.on_policy_fraction is set with loss.objective=mlm: on-policy distillation needs a "
                          "causal student that writes text and a causal teacher that scores it.")
    if loss.on_policy_fraction > 0 and getattr(config.teacher, "cache", None):
        raise DistilError("loss.on_policy_fraction is set with teacher.cache: the stored teacher signals cover the "
                          "prepared text only and cannot score what the student writes. Use the live teacher "
                          "(unset teacher.cache), or set loss.on_policy_fraction=0.")


def _is_layer_pairs(value, first: int = 0) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_is_block_pair(p, first) for p in value)


def _is_block_pair(value, first: int = 1) -> bool:
    """[student_layer, teacher_layer], both integers >= first."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= first for i in value))


def dump_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
