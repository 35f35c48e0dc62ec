"""Giving a student built from the teacher's layers another tokenizer's vocabulary (`init-student --tokenizer OTHER
--transplant-vocabulary`).

Each token of the new vocabulary gets an input-embedding row (and an output-layer row, and bias, when the output
layer is not tied to the embeddings) from the teacher's:
  - exact: a token whose text the teacher's vocabulary holds too (distil.cross_tokenizer.vocabulary keys, which
    undo the byte-level / ▁ / ## spellings) copies the teacher's row;
  - composed: any other token takes the mean of the teacher's rows of the pieces the teacher's tokenizer splits its
    text into (fast vocabulary transfer, Gee et al. 2022);
  - special tokens without a same-spelled teacher token take the row of the teacher's special token of the same
    role (beginning/end of text, unknown, padding, ...);
  - fallback: a token the teacher's tokenizer turns into nothing (whitespace a WordPiece teacher drops) and a
    special token without a counterpart take the mean of all the teacher's rows.
The transformer layers are untouched, and the config's vocabulary size and special-token ids become the new
tokenizer's.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from distil.cross_tokenizer.alignment import check_has_offsets
from distil.cross_tokenizer.vocabulary import first_id_per_key, token_keys

logger = logging.getLogger(__name__)


def _text_of(key: bytes | str) -> str:
    """The text a key stands for, as a string for the teacher's tokenizer (a stray byte of a multi-byte character
    becomes U+FFFD, whose pieces are the closest the teacher can read)."""
    return key if isinstance(key, str) else key.decode("utf-8", errors="replace")


def source_rows(teacher_tokenizer, new_tokenizer) -> tuple[list[list[int]], dict]:
    """Per new token id, the teacher ids whose rows it averages (one id for an exact match, none for the
    fallback), and the counts {exact, special_by_role, composed, fallback, total}."""
    check_has_offsets(teacher_tokenizer, "teacher tokenizer")
    check_has_offsets(new_tokenizer, "new tokenizer")
    teacher_lookup = first_id_per_key(token_keys(teacher_tokenizer))
    new_keys = token_keys(new_tokenizer)
    sources: list[list[int] | None] = [[teacher_lookup[k]] if k in teacher_lookup else None for k in new_keys]
    exact = sum(1 for s in sources if s is not None)
    # A special token without a same-spelled teacher token takes the row of the teacher's token of the same role
    # (the new "<s>" is the teacher's "<|endoftext|>" as beginning of text); one without a role, the mean row.
    by_role = 0
    for role in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "cls_token_id", "sep_token_id",
                 "mask_token_id"):
        new_id, teacher_id = getattr(new_tokenizer, role, None), getattr(teacher_tokenizer, role, None)
        if new_id is not None and teacher_id is not None and sources[new_id] is None:
            sources[new_id] = [int(teacher_id)]
            by_role += 1
    for index, key in enumerate(new_keys):
        if isinstance(key, str) and sources[index] is None:
            sources[index] = []
    missing = [i for i, s in enumerate(sources) if s is None]
    if missing:
        texts = [_text_of(new_keys[i]) for i in missing]
        encoder = teacher_tokenizer.backend_tokenizer
        encoder.no_truncation()
        encoder.no_padding()
        for index, encoding in zip(missing, encoder.encode_batch(texts, add_special_tokens=False)):
            sources[index] = [i for i in encoding.ids if i < len(teacher_tokenizer)]
    fallback = sum(1 for s in sources if not s)
    counts = {"exact": exact, "special_by_role": by_role, "composed": len(missing) - sum(1 for i in missing if not sources[i]),
              "fallback": fallback, "total": len(new_keys)}
    return sources, counts


def _rows_from(source: torch.Tensor, sources: list[list[int]]) -> torch.Tensor:
    """(len(sources), ...) rows: each the mean of `source`'s rows it names, or of all of them when it names none."""
    lengths = np.fromiter((len(s) for s in sources), dtype=np.int64, count=len(sources))
    flat = torch.as_tensor(np.fromiter((i for s in sources for i in s), dtype=np.int64, count=int(lengths.sum())))
    owner = torch.as_tensor(np.repeat(np.arange(len(sources)), lengths))
    work = source.detach().to(torch.float32)
    out = torch.zeros((len(sources),) + tuple(source.shape[1:]), dtype=torch.float32)
    out.index_add_(0, owner, work[flat])
    out /= torch.as_tensor(np.maximum(lengths, 1), dtype=torch.float32).reshape(-1, *([1] * (source.dim() - 1)))
    empty = torch.as_tensor(lengths == 0)
    if bool(empty.any()):
        out[empty] = work.mean(dim=0)
    return out.to(source.dtype)


def transplant_vocabulary(model, teacher_tokenizer, new_tokenizer) -> dict:
    """Resize `model` (a student built from the teacher, still on the teacher's vocabulary) to `new_tokenizer`'s
    vocabulary in place, rows initialised as the module docstring says; returns the record for distil_init.json."""
    sources, counts = source_rows(teacher_tokenizer, new_tokenizer)
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    old_input = embeddings.weight.detach().clone()
    old_output = None if output is None or tied else output.weight.detach().clone()
    old_bias = None if output is None or getattr(output, "bias", None) is None else output.bias.detach().clone()
    if old_output is not None and old_output.shape[0] != old_input.shape[0]:
        logger.warning("The output layer has %d rows and the embeddings %d; rows are taken from each by teacher id.",
                       old_output.shape[0], old_input.shape[0])

    new_size = len(new_tokenizer)
    model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(_rows_from(old_input, sources))
        new_output = model.get_output_embeddings()
        if old_output is not None:
            new_output.weight.copy_(_rows_from(old_output, sources))
        if old_bias is not None and getattr(new_output, "bias", None) is not None:
            new_output.bias.copy_(_rows_from(old_bias, sources))
    _set_special_ids(model, new_tokenizer)
    logger.info("Vocabulary transplant: %d of %d tokens exact, %d special by role, %d composed from the teacher's pieces, %d from the "
                "mean embedding", counts["exact"], counts["total"], counts["special_by_role"], counts["composed"], counts["fallback"])
    return {"tokenizer": getattr(new_tokenizer, "name_or_path", None), "teacher_vocab_size": len(teacher_tokenizer),
            "vocab_size": new_size, "tokens_exact": counts["exact"], "tokens_special_by_role": counts["special_by_role"],
            "tokens_composed": counts["composed"],
            "tokens_fallback": counts["fallback"], "output_layer": "tied" if tied else ("own" if output is not None else "none")}


def _set_special_ids(model, tokenizer) -> None:
    """The config's (and generation config's) special-token ids are the new tokenizer's: the teacher's ids would
    name other tokens now."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id", "mask_token_id"):
        value = getattr(tokenizer, name, None)
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None and hasattr(config, name):
                setattr(config, name, value)
