"""Distillation between a teacher and a student with different tokenizers: aligning their positions by text
(alignment), divergences across vocabularies (losses), and a student on another vocabulary built from the
teacher's layers (transplant)."""
