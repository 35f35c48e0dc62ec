"""The Python API, for notebooks and sweeps: the four steps of the command line as functions.

    import distil
    distil.prepare(["corpus.txt"], tokenizer="bert-base-uncased", output_dir="data/bert")
    distil.init_student("bert-base-uncased", "students/init", layers=[0, 2, 4, 7, 9, 11], num_layers=None)
    summary = distil.train("recipes/distilbert-base-uncased.yaml", overrides=["optim.max_steps=1000"])
    results = distil.evaluate(["teacher=bert-base-uncased", f"student={summary['student_dir']}"], data=["data/bert"])

Mistakes raise `distil.DistilError` with the same one-paragraph message the command line prints.
"""

from __future__ import annotations

from pathlib import Path

from distil.config import TrainConfig, load_config


def train(config_or_path: TrainConfig | str | Path | dict, overrides: list[str] | None = None) -> dict:
    """Run (or resume) a distillation: a recipe path, a TrainConfig, or a dict shaped like a recipe, with
    `section.key=value` overrides. Returns the summary (steps, tokens_seen, heldout, student_dir, ...).
    Calling it again in the same process (another recipe, another mixed precision) works."""
    import tempfile

    import yaml

    from distil.errors import DistilError
    from distil.training.loop import train as run

    if isinstance(config_or_path, bool) or not isinstance(config_or_path, (TrainConfig, str, Path, dict)):
        raise DistilError(f"distil.train takes a recipe path, a TrainConfig or a dict shaped like a recipe, not "
                          f"{type(config_or_path).__name__} ({config_or_path!r:.80}). Pass e.g. "
                          "distil.train('recipes/distilbert-base-uncased.yaml').")
    if overrides is not None and (isinstance(overrides, str) or not isinstance(overrides, (list, tuple))
                                  or not all(isinstance(o, str) for o in overrides)):
        raise DistilError(f"distil.train's overrides must be a list of 'section.key=value' strings, got "
                          f"{overrides!r:.80}. Pass e.g. overrides=['optim.max_steps=1000'].")
    if isinstance(config_or_path, TrainConfig):
        config_or_path = config_or_path.to_dict()
    if isinstance(config_or_path, dict):
        # Through a recipe file, so that a dict is validated exactly like a recipe.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "recipe.yaml"
            path.write_text(yaml.safe_dump(config_or_path), encoding="utf-8")
            config = load_config(path, list(overrides or []))
        return run(config)
    return run(load_config(config_or_path, list(overrides or [])))
