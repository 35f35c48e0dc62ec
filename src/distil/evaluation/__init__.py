"""The parts of `distil evaluate`: held-out LM quality, size and speed, downstream retention, the table.

`distil.evaluation.evaluate.evaluate` is the entry point that runs them over several models.
"""
