"""Distillation losses, one module per family, as small pure functions on tensors.

- `logits`: soft-target KL (and any divergence), masked-LM and causal-LM cross-entropy, logit MSE;
- divergences (forward and reverse KL, generalised JSD, skew KL, skew reverse KL, total variation) are defined
  once in `distil.teacher_signal.divergences`, for dense and sparse teacher signals; re-exported here;
- `hidden`: hidden-state cosine and MSE;
- `relations`: self-attention relations (MiniLMv2) and attention maps (TinyBERT);
- `embeddings`: pooled sentence embeddings (MSE, cosine) and the pooling itself;
- `rows`: the row selection they share.

Which terms a run computes, and with which weights, is decided in `distil.training.objective`.
"""

from distil.losses.hidden import hidden_cosine, hidden_mse
from distil.losses.embeddings import pool, sentence_cosine, sentence_mse
from distil.teacher_signal.divergences import DIVERGENCES, divergence_sum
from distil.losses.logits import causal_lm_loss, logit_mse, masked_lm_loss, soft_target_kl, soft_target_loss
from distil.losses.relations import attention_map_loss, relation_kl, relation_loss

__all__ = ["soft_target_kl", "soft_target_loss", "divergence_sum", "DIVERGENCES", "masked_lm_loss", "causal_lm_loss", "logit_mse", "hidden_cosine", "hidden_mse",
           "relation_kl", "relation_loss", "attention_map_loss", "pool", "sentence_mse", "sentence_cosine"]
