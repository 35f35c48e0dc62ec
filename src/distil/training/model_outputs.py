"""Running a model on a batch: its logits (or whatever its output layer returns) and its hidden states, like with
like across encoders and pre-norm decoders."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# Attributes under which `transformers` base models keep the norm applied after their last block.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


@dataclass
class HiddenStates:
    """A model's hidden states, like with like: `blocks[i]` is the output of block i (0: the embeddings), before
    any final norm; `final` is what the output layer sees (the last block's output after the final norm of
    pre-norm decoders such as GPT-2 and Llama; the same tensor as blocks[-1] for BERT-style encoders)."""

    blocks: tuple[torch.Tensor, ...]
    final: torch.Tensor

    def pair_with(self, other: "HiddenStates", index: int, other_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two states a hidden loss compares: last against last is final against final (the seed's
        DistilGPT2 term); any other pair compares block outputs, so a normed state never meets a raw one."""
        if index == len(self.blocks) - 1 and other_index == len(other.blocks) - 1:
            return self.final, other.final
        return self.blocks[index], other.blocks[other_index]


def final_norm_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm a pre-norm decoder applies after its last block, or None (post-norm encoders have none)."""
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


@contextlib.contextmanager
def _input_of(module: torch.nn.Module | None):
    """Record what `module` is called with (the last block's output, for a final norm)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0])) if module is not None else None
    try:
        yield seen
    finally:
        if handle is not None:
            handle.remove()


def forward(model, batch, want_hidden: bool, final_norm: torch.nn.Module | None = None):
    """Run a model (full LM or its base) and return (logits or None, HiddenStates or None)."""
    with _input_of(final_norm if want_hidden else None) as before_norm:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    output_hidden_states=want_hidden, return_dict=True)
    logits = getattr(out, "logits", None)
    if not want_hidden:
        return logits, None
    states = tuple(out.hidden_states)
    blocks = states[:-1] + (before_norm[-1],) if before_norm else states
    return logits, HiddenStates(blocks=blocks, final=states[-1])

