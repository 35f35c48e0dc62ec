"""The teacher's signal and what turns it into gradients: the one home of the distillation math.

- `signals`: what a teacher says about the student's positions (dense logits or states, or sparse top-k + rest +
  sampled tail; optionally hidden states), whoever produced it;
- `divergences`: each divergence defined once, its value and its gradient, for dense and sparse signals;
- `engine`: the chunked output layer (workspace, logit transform and derivative, LM cross-entropy, the divergence
  for the chunk's signals, gradient accumulation) that the live fused path and the store path both run.

The plain (unfused) path and held-out evaluation call the same `Divergence.value` on whole logits.
"""
