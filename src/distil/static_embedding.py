"""Static sentence-embedding models: one vector per vocabulary entry, a sentence is the mean of its tokens' vectors.

The directory format is the one sentence-transformers writes for its `StaticEmbedding` module (the module at the
root, `modules.json`, `config_sentence_transformers.json`, `model.safetensors`, `tokenizer.json`, and a
`1_Normalize` module when the embeddings are L2-normalised), with two choices that make Model2Vec's
`StaticModel.from_pretrained` read the same directory:
- the table is stored under the tensor name `embeddings`. sentence-transformers' StaticEmbedding reads that name
  as well as its own `embedding.weight`; Model2Vec reads its own layout (config.json + `embeddings`) first.
- a Model2Vec `config.json` says `normalize` and `max_length` (null: no truncation), which Model2Vec applies.
The tokenizer is written without padding and without truncation, so both libraries tokenise a text alike.

`sentence_embeddings_from_ids` is the one definition of the model's output; `encode_static` (what distil scores)
and training call it, and it is what sentence-transformers computes (an EmbeddingBag mean, then Normalize).
Model2Vec agrees except on texts with unknown-token pieces, which it drops and sentence-transformers keeps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distil.errors import DistilError

TABLE_FILE = "model.safetensors"
TABLE_TENSOR = "embeddings"                    # Model2Vec's name; sentence-transformers reads it too
SENTENCE_TRANSFORMERS_TENSOR = "embedding.weight"
STATIC_MODULE = "sentence_transformers.models.StaticEmbedding"
NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


@dataclass
class StaticModel:
    table: torch.Tensor   # (vocabulary, dim) float32
    tokenizer: object     # a `tokenizers.Tokenizer`, without padding or truncation
    normalize: bool


def sentence_embeddings_from_ids(table: torch.Tensor, ids: list[list[int]], normalize: bool) -> torch.Tensor:
    """Mean of each sequence's rows of `table` (zeros for an empty sequence), L2-normalised if `normalize`.
    Differentiable in `table`: training optimises exactly what encoding computes."""
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    flat = torch.tensor([i for x in ids for i in x], dtype=torch.long)
    offsets = torch.cumsum(lengths, 0) - lengths
    pooled = torch.nn.functional.embedding_bag(flat, table, offsets, mode="mean")
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids a static model averages: the text's tokens, no framing ([CLS], [SEP], <s> ...)."""
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


def is_static_directory(directory: str | Path) -> bool:
    """Whether `directory` is a sentence-transformers directory whose first module is a StaticEmbedding."""
    modules_file = Path(directory) / "modules.json"
    if not modules_file.is_file():
        return False
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    return bool(modules) and modules[0].get("type", "").rsplit(".", 1)[-1] == "StaticEmbedding"


def load_static(directory: str | Path) -> StaticModel:
    """A static model from a directory written by distil, by sentence-transformers or by Model2Vec."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    directory = Path(directory)
    if not is_static_directory(directory):
        raise DistilError(f"{directory} is no static embedding model (its modules.json names no StaticEmbedding "
                          "module). Give a directory written by `distil static-student`.")
    modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
    root = directory / modules[0].get("path", "")
    tensors = load_file(str(root / TABLE_FILE))
    table = tensors.get(TABLE_TENSOR, tensors.get(SENTENCE_TRANSFORMERS_TENSOR))
    if table is None or set(tensors) - {TABLE_TENSOR, SENTENCE_TRANSFORMERS_TENSOR}:
        raise DistilError(f"{root / TABLE_FILE} holds {sorted(tensors)}, not one embedding table: distil reads "
                          "plain static models (no vocabulary quantisation).")
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer.no_padding()
    normalize = any(m.get("type", "").rsplit(".", 1)[-1] == "Normalize" for m in modules[1:])
    return StaticModel(table=table.float(), tokenizer=tokenizer, normalize=normalize)


@torch.no_grad()
def encode_static(model_or_directory: StaticModel | str | Path, texts: list[str],
                  batch_size: int = 1024) -> torch.Tensor:
    """Sentence embeddings of `texts`, as `SentenceTransformer(directory).encode` computes them."""
    model = model_or_directory if isinstance(model_or_directory, StaticModel) else load_static(model_or_directory)
    out = [sentence_embeddings_from_ids(model.table, token_ids(model.tokenizer, texts[start:start + batch_size]),
                                        model.normalize)
           for start in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.table.shape[1])


def write_static_directory(directory: Path, model: StaticModel, base_model: str, details: dict) -> None:
    """Write `model` in the format described at the top of this module; `details` go into config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({TABLE_TENSOR: model.table.detach().float().contiguous()}, str(directory / TABLE_FILE))
    tokenizer = model.tokenizer
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.save(str(directory / "tokenizer.json"))
    modules = [{"idx": 0, "name": "0", "path": "", "type": STATIC_MODULE}]
    if model.normalize:
        modules.append({"idx": 1, "name": "1", "path": "1_Normalize", "type": NORMALIZE_MODULE})
        (directory / "1_Normalize").mkdir(exist_ok=True)  # Normalize has no settings
    _write_json(directory / "modules.json", modules)
    _write_json(directory / "config_sentence_transformers.json",
                {"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None})
    _write_json(directory / "config.json", {
        "model_type": "model2vec", "architectures": ["StaticModel"], "tokenizer_name": base_model,
        "hidden_dim": int(model.table.shape[1]), "normalize": model.normalize, "max_length": None,
        "embedding_dtype": "float32", **details})


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
