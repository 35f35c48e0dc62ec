"""Everything `distil train` settles before the first step: accelerator, models, start-up checks, objective,
layer map, masking, optimizer.

Each check turns a known trap into a message that says what to change, before hours of compute are spent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distil.checks import check_data_matches_tokenizer, check_vocabularies  # noqa: F401 (setup.check_...)
from distil.config import TrainConfig
from distil.data import shards
from distil.data.masking import MLMMasker, mask_probabilities
from distil.errors import DistilError
from distil.loading import load_config, load_model, load_tokenizer, vocab_size_of
from distil.training.attention_capture import check_attention_terms
from distil.sentence_embeddings import resolve_pooling, teacher_pooling
from distil.training.fused_head import output_projection

log = logging.getLogger(__name__)


@dataclass
class Models:
    teacher: torch.nn.Module          # what the loop calls: the full LM, or its base when no logits are needed
    teacher_has_head: bool
    student: torch.nn.Module          # the full student (what gets saved)
    student_trained: torch.nn.Module  # what the loop calls and optimises: `student` or its base
    tokenizer: object
    init_record: dict | None          # distil_init.json of the student, when it was built from teacher layers
    original_dropout: dict            # config dropout values to restore when saving
    objective: str                    # mlm | clm, resolved from loss.objective and the teacher
    vocab_limit: int | None = None    # output layers padded differently: logit losses on the first vocab_limit ids
    sentence_pooling: object = None   # SentencePooling: of the sentence terms, or the teacher's own (a
                                      # sentence-transformers teacher); the final student is exported with it


def _auto_class(objective: str, base: bool = False):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if base:
        return AutoModel
    return AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM


def _is_bidirectional(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def _is_causal(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def resolve_objective(config: TrainConfig, teacher_config) -> str:
    """mlm or clm: loss.objective, or (auto) the teacher's own, checked against the teacher and the loss weights."""
    loss, name = config.loss, config.teacher.path
    encoder = _is_bidirectional(teacher_config)
    objective = loss.objective
    if objective == "auto":
        if not (encoder or _is_causal(teacher_config)):
            raise DistilError(
                f"Cannot tell whether the teacher {name} ({teacher_config.model_type}) is an encoder or a decoder. "
                "Set loss.objective to mlm (masked-LM, bidirectional encoders) or clm (causal-LM, decoders)."
            )
        objective = "mlm" if encoder else "clm"
    kind = f"a bidirectional {teacher_config.model_type} encoder" if encoder else f"a {teacher_config.model_type} decoder"
    if (objective == "clm" or loss.alpha_clm > 0) and encoder:
        raise DistilError(
            f"The recipe is causal-LM (loss.objective=clm or loss.alpha_clm > 0) but the teacher {name} is {kind}, "
            "which sees every position at once. Use a decoder teacher (GPT-2, Llama, ...), or a masked-LM recipe: "
            "loss.objective=auto (or mlm) with alpha_mlm instead of alpha_clm."
        )
    if (objective == "mlm" or loss.alpha_mlm > 0) and not encoder:
        raise DistilError(
            f"The recipe is masked-LM (loss.objective=mlm or loss.alpha_mlm > 0) but the teacher {name} is {kind}, "
            "which never saw masked tokens. Use loss.objective=auto (or clm) with alpha_clm instead of alpha_mlm."
        )
    if objective == "clm" and loss.restrict_ce_to_mask:
        raise DistilError("loss.restrict_ce_to_mask applies to masked-LM runs only; unset it for causal-LM recipes.")
    return objective


def _head_missing(info: dict) -> bool:
    head_words = ("cls.", "lm_head", "vocab_", "predictions", "pred_layer")
    return any(any(w in key for w in head_words) for key in info.get("missing_keys", []))


def resolve_teacher_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    choice = config.teacher.dtype
    if choice == "auto":
        if device.type == "cpu":
            return torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.run.mixed_precision, torch.float32)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


STUDENT_INIT = "student-init"


def _matches_recipe(student_dir: Path, config: TrainConfig) -> bool:
    """Whether a student-init directory was built from the recipe's teacher, layers and architecture."""
    from distil.student import INIT_FILE, resolve_layers

    try:
        record = json.loads((student_dir / INIT_FILE).read_text(encoding="utf-8"))
        s = config.student
        expected = resolve_layers(int(record["teacher_num_layers"]), s.layers, s.num_layers)
    except (OSError, ValueError, KeyError, TypeError, DistilError):
        return False
    return (record.get("teacher") == config.teacher.path and record.get("teacher_layers") == expected
            and s.architecture in ("auto", record.get("architecture")))


def student_source(config: TrainConfig, run_dir: Path, is_main: bool, barrier) -> tuple[str, Path | None]:
    """(student directory to load, directory to move to run_dir/student-init once every start-up check passed).

    A student given by path or config is loaded as it is. One built from teacher layers is kept in the run
    directory; until the run has started it is built beside it, so that a start that fails leaves no run
    directory behind. A student-init that does not match the recipe (left by a failed start with other
    layers) is rebuilt, never reused."""
    s = config.student
    if s.path:
        return s.path, None
    if s.config:
        return s.config, None
    kept = run_dir / STUDENT_INIT
    if not config.run.overwrite and (kept / "config.json").exists() and _matches_recipe(kept, config):
        return str(kept), None
    pending = run_dir.parent / f".{run_dir.name}.{STUDENT_INIT}.tmp"
    if is_main:
        from distil.student import init_student

        if kept.exists() and not config.run.overwrite:
            log.warning("%s was built for another recipe (teacher or layers differ); building it again.", kept)
        shutil.rmtree(pending, ignore_errors=True)
        init_student(config.teacher.path, str(pending), layers=s.layers, num_layers=s.num_layers,
                     architecture=s.architecture, overwrite=True)
    barrier()
    return str(pending), pending


@contextlib.contextmanager
def discarded_on_error(path: Path | None):
    """Remove `path` (a student-init built for a start that then fails a check) when the block raises."""
    try:
        yield
    except BaseException:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        raise


def keep_student_init(pending: Path | None, run_dir: Path) -> None:
    """Move a student-init built beside the run directory into it (main process, after the start-up checks)."""
    if pending is None:
        return
    kept = run_dir / STUDENT_INIT
    if kept.exists():
        shutil.rmtree(kept)
    os.replace(pending, kept)


def load_models(config: TrainConfig, student_dir: str, device: torch.device) -> Models:
    """Load teacher and student, run the start-up checks, and place both on `device`."""
    if config.teacher.cache:  # a teacher-signal store stands in for the teacher (see distil.teacher_cache)
        from distil.teacher_cache.training import load_models_from_cache

        return load_models_from_cache(config, student_dir, device)
    loss = config.loss
    wants_logits = any(getattr(loss, k) > 0 for k in ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse"))
    wants_sentence = loss.alpha_sentence_mse > 0 or loss.alpha_sentence_cos > 0
    wants_teacher_logits = loss.alpha_ce > 0 or loss.alpha_mse > 0

    teacher_config = load_config(config.teacher.path)
    objective = resolve_objective(config, teacher_config)
    tokenizer = load_tokenizer(config.teacher.tokenizer or config.teacher.path)
    teacher_dtype = resolve_teacher_dtype(config, device)
    log.info("Loading teacher %s (%s)", config.teacher.path, teacher_dtype)
    teacher, info = load_model(config.teacher.path, _auto_class(objective), dtype=teacher_dtype)
    has_head = not _head_missing(info)
    if wants_teacher_logits and not has_head:
        raise DistilError(
            f"The teacher {config.teacher.path} has no {'MLM' if objective == 'mlm' else 'LM'} head (its checkpoint holds "
            "only the encoder), so soft-target and logit losses would distil a random head. Set loss.alpha_ce and "
            "loss.alpha_mse to 0 and use hidden-state losses (loss.alpha_cos, loss.alpha_hidden_mse), or fit a head first."
        )
    teacher.eval().requires_grad_(False)
    # Under FSDP the models are sharded on the host and only each process's shards go to the device.
    placement = torch.device("cpu") if config.run.fsdp else device
    teacher.to(placement)

    student_cfg = _student_config(config, student_dir)
    original_dropout = _override_dropout(student_cfg, config.run.dropout)
    student_path = Path(student_dir)
    if config.student.config:
        torch.manual_seed(config.run.seed)
        student = _auto_class(objective).from_config(student_cfg)
    else:
        student, _ = load_model(student_dir, _auto_class(objective), config=student_cfg, dtype=torch.float32)
    student.train()
    student.to(placement)

    init_record = None
    # A student from random weights has no teacher layers, whatever sits beside its config.
    record_path = student_path / "distil_init.json" if student_path.is_dir() and not config.student.config else None
    if record_path is not None and record_path.exists():
        init_record = json.loads(record_path.read_text(encoding="utf-8"))

    vocab_limit = check_vocabularies(teacher.config, student.config, tokenizer, config,
                                     None if config.student.config else student_dir)
    sentence_pooling = resolve_pooling(loss, config.teacher.path) if wants_sentence \
        else teacher_pooling(config.teacher.path)
    if wants_sentence:
        log.info("sentence embeddings: %s pooling%s, from %s", sentence_pooling.mode,
                 ", L2-normalised" if sentence_pooling.normalize else "", sentence_pooling.source)
    check_attention_terms(teacher, student, config.loss)
    check_data_matches_tokenizer(config.data.path, tokenizer, teacher.config)

    teacher_called = teacher if (wants_teacher_logits and has_head) else teacher.base_model
    student_trained = student if wants_logits else student.base_model
    return Models(teacher=teacher_called, teacher_has_head=has_head, student=student, student_trained=student_trained,
                  tokenizer=tokenizer, init_record=init_record, original_dropout=original_dropout, objective=objective,
                  vocab_limit=vocab_limit, sentence_pooling=sentence_pooling)


def _student_config(config: TrainConfig, student_dir: str):
    if config.student.config:
        return load_config(config.student.config)
    return load_config(student_dir)


# A config attribute is a dropout probability when its name says so: BERT's hidden_dropout_prob, DistilBERT's
# dropout, Llama's attention_dropout, GPT-2's resid_pdrop / embd_pdrop / attn_pdrop, T5's dropout_rate.
DROPOUT_KEY = re.compile(r"dropout|pdrop")


def _override_dropout(model_config, value: float | None) -> dict:
    """Set every dropout probability of `model_config` to `value`; returns the values it replaced (restored on
    save, so the student keeps its architecture's dropout). None leaves the config as it is."""
    original = {}
    if value is None:
        return original
    for key, current in list(model_config.to_dict().items()):
        # A config.json may write a probability as 0 or 1 (ints); None ("use the other one") and flags stay.
        if DROPOUT_KEY.search(key) and isinstance(current, (int, float)) and not isinstance(current, bool):
            original[key] = current
            setattr(model_config, key, float(value))
    if original:
        log.info("run.dropout=%g: student %s set (were %s)", value, ", ".join(original),
                 ", ".join(f"{k}={v}" for k, v in original.items()))
    else:
        log.warning("run.dropout=%g is not applied: the student config (%s) has no dropout setting, so its dropout, "
                    "if it has any, stays as built", value, getattr(model_config, "model_type", "") or "no model type")
    return original


def learned_position_limit(model: torch.nn.Module) -> int | None:
    """How many positions a model with a learned position table can take (None: rotary or relative positions,
    which have no hard limit). RoBERTa's table starts after its padding index, so it holds two fewer."""
    for name, module in model.named_modules():
        if name.endswith(("position_embeddings", "wpe")) and isinstance(module, torch.nn.Embedding):
            return module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
    return None


def check_positions(models: Models, longest: int, config: TrainConfig) -> None:
    """Sequences longer than a model's position table fail inside the first forward; say so before it."""
    for who, model in (("teacher", models.teacher), ("student", models.student)):
        limit = learned_position_limit(model)
        if limit is not None and longest > limit:
            raise DistilError(
                f"The data in {config.data.path} holds sequences of up to {longest} tokens, but the {who} has "
                f"positions for {limit}. Set data.max_length={limit} (sequences are shortened inside their framing), "
                f"or prepare the data again with --max-length {limit}."
            )


def layer_pairs(config: TrainConfig, student_config, teacher_config, init_record: dict | None) -> list[tuple[int, int]]:
    """Pairs of hidden-state indices (0 = embeddings, i = output of layer i) compared by hidden losses."""
    n_s, n_t = int(student_config.num_hidden_layers), int(teacher_config.num_hidden_layers)
    choice = config.loss.hidden_layers
    if choice == "last":
        return [(n_s, n_t)]
    if choice == "mapped":
        if init_record and len(init_record.get("teacher_layers", [])) == n_s:
            sources = init_record["teacher_layers"]
        else:
            from distil.student import select_layers

            sources = select_layers(n_t, n_s)
        pairs = [(j + 1, t + 1) for j, t in enumerate(sources)]
        if pairs[-1] != (n_s, n_t):
            pairs.append((n_s, n_t))
        return pairs
    pairs = [(int(s), int(t)) for s, t in choice]
    for s, t in pairs:
        if s > n_s or t > n_t:
            raise DistilError(
                f"loss.hidden_layers pair [{s}, {t}] is out of range: the student has hidden states 0..{n_s} and the "
                f"teacher 0..{n_t} (0 is the embedding output)."
            )
    return pairs


def freeze_embeddings(student: torch.nn.Module, positions: bool, token_types: bool) -> list[str]:
    """Freeze position / token-type embeddings, as the seed's --freeze_pos_embs; returns the frozen names."""
    frozen = []
    for name, param in student.named_parameters():
        is_pos = name.endswith(("position_embeddings.weight", "wpe.weight"))
        is_type = name.endswith("token_type_embeddings.weight")
        if (positions and is_pos) or (token_types and is_type):
            param.requires_grad_(False)
            frozen.append(name)
    if positions and not any("position" in n or "wpe" in n for n in frozen):
        log.warning("run.freeze_position_embeddings is set but the student has no learned position embeddings "
                    "(rotary or sinusoidal positions); nothing frozen.")
    return frozen


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (every parameter with fewer than 2 dims) get no weight decay."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    o = config.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step; the default on CPU is a per-tensor loop of ~10 passes with weight-sized
    # temporaries (84 -> 17 ms per step for a 17M-parameter student on 2 cores). CUDA has it too.
    # Sharded (FSDP) parameters are DTensors, which the fused kernel does not take.
    params = [p for group in groups for p in group["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and not hasattr(p, "full_tensor") for p in params) or None
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)


def schedule_shape(total_steps: int, warmup_fraction: float) -> dict:
    """The learning-rate schedule as checkpoints record it: the scheduler's own state holds only its step, so a
    resume compares this to be sure it rebuilt the same schedule."""
    return {"kind": "linear_warmup_decay", "total_steps": total_steps, "warmup_steps": int(total_steps * warmup_fraction)}


def build_scheduler(optimizer, total_steps: int, warmup_fraction: float):
    """Linear warm-up from 0 to the peak over warmup_fraction of the steps, then linear decay to 0."""
    warmup = schedule_shape(total_steps, warmup_fraction)["warmup_steps"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate keeps one process-wide state, fixed by the first Accelerator: a second train() in the same
    # process (a notebook, a sweep) with another mixed precision would be refused. Start from a clean state;
    # the process group of a distributed launch (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # A rank that dies must not leave the others waiting forever at a collective.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.run.collective_timeout_s))
    # Without a GPU, accelerate only sets up gloo data parallelism (torchrun on CPU) when told cpu=True.
    on_cpu = not torch.cuda.is_available()
    # `accelerate launch --use_fsdp` asks for FSDP through the environment; distil shards the models itself
    # (training/parallel.py reads the same variable), so accelerate must not build its own FSDP plugin, which
    # would also refuse to start without a GPU.
    use_fsdp = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        return Accelerator(mixed_precision=config.run.mixed_precision, kwargs_handlers=[timeout], cpu=on_cpu,
                           log_with=trackers(config) or None, project_dir=config.run.output_dir)
    except ValueError as exc:
        raise DistilError(f"Mixed precision {config.run.mixed_precision!r} is not available here: {exc}") from None
    finally:
        if use_fsdp is not None:
            os.environ["ACCELERATE_USE_FSDP"] = use_fsdp


# The module each tracker of run.report_to needs, and the package that provides it.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio"),
                   "comet_ml": ("comet_ml", "comet-ml"), "aim": ("aim", "aim"), "clearml": ("clearml", "clearml"),
                   "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab")}


def trackers(config: TrainConfig) -> list:
    """accelerate trackers for run.report_to; TensorBoard writes to <run>/tensorboard. A tracker that is asked for
    but not installed is refused before anything starts."""
    import importlib.util

    from accelerate.tracking import TensorBoardTracker

    chosen = []
    for name in config.run.report_to:
        module, package = TRACKER_MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise DistilError(f"run.report_to asks for {name}, which is not installed. Install it (pip install "
                              f"{package}) or leave it out of run.report_to (tensorboard is the default).")
        chosen.append(TensorBoardTracker("tensorboard", config.run.output_dir) if name == "tensorboard" else name)
    return chosen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_masker(config: TrainConfig, data_dir: str, manifest: dict, vocab_size: int, tokenizer) -> MLMMasker:
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


def fused_projections(config: TrainConfig, models, spec) -> tuple | None:
    """(student projection, teacher projection or None) when the fused head can replace the output layers."""
    if not (config.run.fused_head and spec.needs_logits):
        return None
    s_proj = output_projection(models.student)
    teacher_head = spec.needs_teacher_logits and not config.teacher.cache  # a store holds the teacher's output
    t_proj = output_projection(models.teacher) if teacher_head else None
    if s_proj is None or (teacher_head and t_proj is None):
        log.info("The output layer is not a plain linear projection; using the unfused logit losses.")
        return None
    return s_proj, t_proj
