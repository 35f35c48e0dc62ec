"""distil: knowledge distillation of transformer language models.

The Python API mirrors the command line (see the README, "Python API"): `distil.prepare`, `distil.init_student`,
`distil.train`, `distil.evaluate`, `distil.run_task`, `distil.static_student`. They are imported on first use, so `import distil` stays
light (no torch) until one of them is called.
"""

__version__ = "0.1.0"

_API = {
    "prepare": ("distil.data.prepare", "prepare"),
    "init_student": ("distil.student", "init_student"),
    "train": ("distil.api", "train"),
    "evaluate": ("distil.evaluation.evaluate", "evaluate"),
    "run_task": ("distil.tasks.finetune", "run_task"),
    "static_student": ("distil.static_student", "static_student"),
    "encode_static": ("distil.static_embedding", "encode_static"),
    "load_config": ("distil.config", "load_config"),
    "DistilError": ("distil.errors", "DistilError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, attribute = _API[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'distil' has no attribute {name!r}")
