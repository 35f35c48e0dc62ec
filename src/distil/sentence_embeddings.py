"""Sentence-embedding models: how a teacher pools (read from its sentence-transformers config), and the
student written as a sentence-transformers directory that pools the same way.

A sentence-transformers directory is a `transformers` directory plus a few JSON files: `modules.json` lists the
modules (Transformer at the root, then Pooling, optionally Dense, optionally Normalize), each in its own
sub-directory. distil writes the classic module names, which every sentence-transformers release since 2.0
loads, so `SentenceTransformer(path)` gives the embeddings that `encode` here computes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from distil.errors import DistilError
from distil.losses.embeddings import POOLINGS, pool

log = logging.getLogger(__name__)

MODULES_FILE = "modules.json"
DENSE_WEIGHTS = "model.safetensors"
# sentence-transformers' pooling config flags, by distil's pooling name.
POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                 "max": "pooling_mode_max_tokens", "last": "pooling_mode_lasttoken"}


@dataclass
class SentencePooling:
    mode: str = "mean"                  # mean | cls | last | max
    normalize: bool = False             # L2-normalise the pooled embedding
    max_seq_length: int | None = None   # what the sentence-transformers model truncates to
    source: str = "default"             # where the settings came from (for the start-up log)


def _read_json(path: str, name: str) -> dict | list | None:
    """A JSON file of a local directory, or of a hub repository where the hub is reachable; None if absent."""
    from distil.loading import is_hub_id, resolve_source

    local = Path(resolve_source(path))  # python:PACKAGE/path too
    if local.is_dir():
        file = local / name
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    if not is_hub_id(path):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, name)).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - no such file, or no hub: the teacher is no sentence-transformers model
        return None


def _mode_of(config: dict) -> str:
    if isinstance(config.get("pooling_mode"), str):  # sentence-transformers 6 spelling
        mode = {"lasttoken": "last"}.get(config["pooling_mode"], config["pooling_mode"])
        if mode in POOLINGS:
            return mode
    chosen = [mode for mode, flag in POOLING_FLAGS.items() if config.get(flag)]
    if len(chosen) != 1:
        raise DistilError(
            f"The teacher's sentence-transformers pooling {config} is not one of the poolings distil computes "
            f"({', '.join(POOLINGS)}, one at a time). Set loss.pooling (and loss.normalize_embeddings) explicitly."
        )
    return chosen[0]


def teacher_pooling(teacher_path: str) -> SentencePooling | None:
    """How the teacher's sentence-transformers config pools, or None when it is no sentence-transformers model."""
    modules = _read_json(teacher_path, MODULES_FILE)
    if not isinstance(modules, list):
        return None
    kinds = {m.get("type", "").rsplit(".", 1)[-1].lower(): m.get("path", "") for m in modules}
    pooling_path = kinds.get("pooling")
    if pooling_path is None:
        return None
    config = _read_json(teacher_path, f"{pooling_path}/config.json") or {}
    bert_config = _read_json(teacher_path, "sentence_bert_config.json") or {}
    if "dense" in kinds:
        log.warning("The teacher's sentence-transformers model has a Dense module after pooling; distil compares the "
                    "pooled embeddings before it.")
    return SentencePooling(mode=_mode_of(config), normalize="normalize" in kinds,
                           max_seq_length=bert_config.get("max_seq_length"),
                           source=f"the teacher's sentence-transformers config ({teacher_path})")


def resolve_pooling(loss, teacher_path: str) -> SentencePooling:
    """loss.pooling / loss.normalize_embeddings, with `auto` taken from the teacher's config (else mean, no
    normalisation)."""
    found = teacher_pooling(teacher_path)
    base = found or SentencePooling()
    mode = base.mode if loss.pooling == "auto" else loss.pooling
    normalize = base.normalize if loss.normalize_embeddings == "auto" else bool(loss.normalize_embeddings)
    source = base.source if (loss.pooling == "auto" and loss.normalize_embeddings == "auto") else "the recipe"
    return SentencePooling(mode=mode, normalize=normalize, max_seq_length=base.max_seq_length, source=source)


def embed(hidden: torch.Tensor, mask: torch.Tensor, pooling: SentencePooling, dense=None) -> torch.Tensor:
    """Pooled sentence embeddings of (B, T, H) last hidden states, through `dense` (a float32 linear map) when
    the model has one, then normalised as `pooling` says."""
    pooled = pool(hidden, mask, pooling.mode)
    if dense is not None:
        pooled = dense(pooled).float()
    return torch.nn.functional.normalize(pooled, p=2, dim=-1) if pooling.normalize else pooled


def write_sentence_transformers(directory: Path, pooling: SentencePooling, hidden_size: int,
                                dense: torch.nn.Linear | None = None) -> None:
    """Add the sentence-transformers files to a save_pretrained directory (the transformer sits at its root)."""
    from safetensors.torch import save_file

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    flags = {flag: mode == pooling.mode for mode, flag in POOLING_FLAGS.items()}
    _write(directory / "1_Pooling" / "config.json",
           {"word_embedding_dimension": hidden_size, **flags, "pooling_mode_mean_sqrt_len_tokens": False})
    if dense is not None:
        path = f"{len(modules)}_Dense"
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": path,
                        "type": "sentence_transformers.models.Dense"})
        _write(directory / path / "config.json",
               {"in_features": dense.in_features, "out_features": dense.out_features, "bias": dense.bias is not None,
                "activation_function": "torch.nn.modules.linear.Identity"})
        weights = {"linear.weight": dense.weight.detach().float().cpu().contiguous()}
        if dense.bias is not None:
            weights["linear.bias"] = dense.bias.detach().float().cpu().contiguous()
        save_file(weights, str(directory / path / DENSE_WEIGHTS))
    if pooling.normalize:
        path = f"{len(modules)}_Normalize"
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": path,
                        "type": "sentence_transformers.models.Normalize"})
        (directory / path).mkdir(parents=True, exist_ok=True)
    _write(directory / MODULES_FILE, modules)
    _write(directory / "sentence_bert_config.json",
           {"max_seq_length": pooling.max_seq_length or 512, "do_lower_case": False})
    _write(directory / "config_sentence_transformers.json", {"similarity_fn_name": "cosine", "prompts": {},
                                                              "default_prompt_name": None})


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def load_dense(directory: Path) -> torch.nn.Linear | None:
    """The Dense module of a sentence-transformers directory written by distil, or None."""
    from safetensors.torch import load_file

    modules = _read_json(str(directory), MODULES_FILE) or []
    for module in modules:
        if module.get("type", "").lower().endswith("dense"):
            config = json.loads((directory / module["path"] / "config.json").read_text(encoding="utf-8"))
            dense = torch.nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
            dense.load_state_dict({k.removeprefix("linear."): v for k, v in
                                   load_file(str(directory / module["path"] / DENSE_WEIGHTS)).items()})
            return dense
    return None


class SentenceEncoder:
    """A sentence-transformers directory (a teacher, or a student written by `distil train`) loaded once, whose
    `encode` computes embeddings by distil's own code: the model's last hidden states, pooled, through Dense,
    normalised. `pooling` stands in for the directory's own (for a plain `transformers` directory, e.g. a
    student straight from `distil init-student`)."""

    def __init__(self, model_dir: str, pooling: SentencePooling | None = None, max_length: int | None = None,
                 device: str | torch.device = "cpu"):
        from transformers import AutoModel

        from distil.loading import load_tokenizer, resolve_source

        model_dir = resolve_source(model_dir)
        self.pooling = pooling or teacher_pooling(model_dir)
        if self.pooling is None:
            raise DistilError(f"{model_dir} has no {MODULES_FILE}: it is no sentence-transformers directory. Train with "
                              "loss.alpha_sentence_mse / alpha_sentence_cos, or from a sentence-transformers teacher.")
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval().to(self.device)
        dense = load_dense(Path(model_dir))
        self.dense = dense.to(self.device) if dense is not None else None
        self.max_length = max_length or self.pooling.max_seq_length or 512

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings on the CPU, in the order of `texts`."""
        # Batches of similar lengths (longest first) waste little on padding; the result is in the input order.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            out.append(embed(hidden, batch["attention_mask"], self.pooling, self.dense).cpu())
        if not out:
            return torch.zeros(0, int(self.model.config.hidden_size))
        embeddings = torch.cat(out)
        return embeddings[torch.argsort(torch.as_tensor(order))]


def encode(model_dir: str, texts: list[str], batch_size: int = 32, max_length: int | None = None,
           pooling: SentencePooling | None = None) -> torch.Tensor:
    """Sentence embeddings of `texts` from a sentence-transformers directory: `SentenceEncoder(...).encode`. A
    static model (`distil static-student`) is encoded by its own function, which takes no batch size, length
    limit or pooling."""
    from distil.loading import resolve_source
    from distil.static_embedding import encode_static, is_static_directory

    if is_static_directory(resolve_source(model_dir)):  # token vectors averaged, as its export computes
        return encode_static(resolve_source(model_dir), texts)
    return SentenceEncoder(model_dir, pooling, max_length).encode(texts, batch_size)
