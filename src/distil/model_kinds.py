"""What kind of language model a checkpoint is, which transformers class loads it, and how many positions it takes:
shared by training, the teacher-signal store and every command that loads a teacher."""

from __future__ import annotations

import torch

from distil.config import TrainConfig
from distil.errors import DistilError


def auto_class(objective: str, base: bool = False):
    """The transformers class a run loads its models with: the base model for the embedding objective (no LM
    head is built), else the masked-LM or causal-LM model."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if base or objective == "embedding":
        return AutoModel
    return AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM


def is_bidirectional(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def is_causal(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def check_embedding_teacher(teacher_config, name: str) -> None:
    """The embedding objective's teacher must be an encoder (a type that is neither, e.g. an encoder with no LM
    class in transformers, is let through: the hidden-state terms only need its states)."""
    if is_bidirectional(teacher_config) or not (is_causal(teacher_config)
                                                 or getattr(teacher_config, "is_decoder", False)):
        return
    raise DistilError(
        f"The embedding objective (loss.objective=embedding, init-student --objective embedding) distils a sentence "
        f"encoder, but the teacher {name} is a {teacher_config.model_type} decoder: each of its positions sees only the "
        "tokens before it, so its mean, CLS or max-pooled states are no sentence embedding of the whole input. Use an "
        "encoder teacher (BERT, RoBERTa, MiniLM, MPNet, ...), or the auto objective (causal-LM) for this teacher."
    )


def resolve_objective(config: TrainConfig, teacher_config) -> str:
    """mlm, clm or embedding: loss.objective, or (auto) the teacher's own, checked against the teacher and the loss
    weights. auto never picks embedding: a head-less encoder with logit terms is refused (training.models) with a
    message that names it, so a recipe says what its student is."""
    loss, name = config.loss, config.teacher.path
    encoder = is_bidirectional(teacher_config)
    objective = loss.objective
    if objective == "embedding":
        check_embedding_teacher(teacher_config, name)
        return objective
    if objective == "auto":
        if not (encoder or is_causal(teacher_config)):
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


# Words in the weight names of LM heads (BERT's cls.predictions, DistilBERT's vocab_*, GPT's lm_head, XLM's
# pred_layer).
HEAD_WORDS = ("cls.", "lm_head", "vocab_", "predictions", "pred_layer")


def is_head_weight(key: str) -> bool:
    return any(w in key for w in HEAD_WORDS)


def head_missing(info: dict) -> bool:
    return any(is_head_weight(key) for key in info.get("missing_keys", []))


def learned_position_limit(model: torch.nn.Module) -> int | None:
    """How many positions a model with a learned position table can take (None: rotary or relative positions,
    which have no hard limit). RoBERTa's table starts after its padding index, so it holds two fewer."""
    for name, module in model.named_modules():
        if name.endswith(("position_embeddings", "wpe")) and isinstance(module, torch.nn.Embedding):
            return module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
    return None
