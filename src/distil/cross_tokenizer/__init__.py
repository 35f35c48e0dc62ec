"""Distillation between a teacher and a student with different tokenizers: aligning their positions by text
(alignment), divergences across vocabularies (losses), and a student on another vocabulary built from the
teacher's layers (transplant)."""

# The divergences that compare distributions over two vocabularies (distil.cross_tokenizer.losses). Named here,
# where importing them costs no torch, so that recipe and start-up checks can ask.
CROSS_VOCABULARY_DIVERGENCES = ("uld", "hybrid")
