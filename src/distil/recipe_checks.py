"""Every value of a training recipe checked before any model is loaded, with messages that say what to change:
types, numbers (finite, and in the range each key means), and the combinations of keys that cannot work together.
`Range` and `check_number` serve the other commands' numeric options too (fit-head, task). The checks take a
distil.config.TrainConfig (or its sections); they import nothing of it, since distil.config calls them."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path

from distil.errors import DistilError

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


TEACHER_KEYS = ("path", "cache", "weight", "temperature", "name")


def _check_teachers(config) -> None:
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


def validate(config) -> None:
    """Refuse, with what to change, any value of `config` (a TrainConfig) that cannot work."""
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
                          f"{closest_hint(str(loss.divergence), list(divergences))}")
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


def _check_embedding_terms(loss) -> None:
    """An embedding student has no LM head: what needs logits or masked text has nothing to act on."""
    for key in LOGIT_KEYS:
        value = getattr(loss, key)
        if value > 0:
            default = next(f.default for f in fields(loss) if f.name == key)
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


def _check_on_policy(config) -> None:
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


def closest_hint(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else f" Known keys: {', '.join(options)}."
