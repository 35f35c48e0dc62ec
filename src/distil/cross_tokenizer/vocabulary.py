"""What text each token of a vocabulary stands for, so that two tokenizers' vocabularies can be compared.

Tokenizers write the same text differently in their vocabularies: byte-level BPE (GPT-2) maps every byte to a
printable character ("Ġworld" is " world"), SentencePiece / Metaspace marks a leading space with "▁" and may spell
raw bytes as "<0xE6>", WordPiece marks a word-internal piece with "##" and drops the space before a word. A token's
*key* undoes these conventions: the UTF-8 bytes of the text the token stands for, with a leading space where the
token starts a word (so WordPiece "world" = byte-level "Ġworld" = Metaspace "▁world" = b" world", and "##ing" =
b"ing"). A byte-level token holding part of a multi-byte character keeps its raw bytes. Special tokens are keyed
by their content as a str, so they only ever equal another tokenizer's special token of the same spelling.

Two tokens are the same token across vocabularies when their keys are equal: that is the id-to-id mapping the
hybrid loss compares exactly and the vocabulary transplant copies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from distil.errors import DistilError

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
METASPACE = "\u2581"


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE character -> byte table: bytes that are printable Latin-1 stand for themselves, the
    other 68 (controls, space, 0x7F-0xA0, 0xAD) for the characters 256, 257, ... in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


@dataclass(frozen=True)
class TokenConventions:
    """How one tokenizer spells text in its vocabulary."""

    byte_level: bool
    metaspace: bool
    byte_fallback: bool
    continuing_prefix: str | None   # WordPiece's "##": a token without it starts a word
    end_of_word_suffix: str | None


def conventions_of(tokenizer) -> TokenConventions:
    """Read the conventions from the fast tokenizer's own description (model, pre-tokenizer, decoder)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistilError(
            f"The tokenizer {getattr(tokenizer, 'name_or_path', '')} is not a fast (tokenizer.json) tokenizer, so "
            "its vocabulary's spelling and its offsets are unknown. Use the fast version (save it with "
            "transformers so that tokenizer.json is written)."
        )
    described = json.loads(backend.to_str())
    model = described.get("model") or {}
    around = json.dumps([described.get("pre_tokenizer"), described.get("decoder")], ensure_ascii=False)
    prefix = model.get("continuing_subword_prefix")
    if model.get("type") == "WordPiece" and prefix is None:
        prefix = "##"
    return TokenConventions(
        byte_level='"ByteLevel"' in around,
        metaspace='"Metaspace"' in around or METASPACE in around,
        byte_fallback=bool(model.get("byte_fallback")),
        continuing_prefix=prefix or None,
        end_of_word_suffix=model.get("end_of_word_suffix") or None,
    )


def token_key(token: str, conventions: TokenConventions) -> bytes:
    """The UTF-8 bytes of the text a (non-special) vocabulary entry stands for (see the module docstring)."""
    if conventions.byte_fallback:
        fallback = _BYTE_FALLBACK.match(token)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
    if conventions.end_of_word_suffix and token.endswith(conventions.end_of_word_suffix):
        token = token[: -len(conventions.end_of_word_suffix)]
    if conventions.continuing_prefix:
        if token.startswith(conventions.continuing_prefix) and len(token) > len(conventions.continuing_prefix):
            token = token[len(conventions.continuing_prefix):]
        elif not conventions.byte_level and not conventions.metaspace:
            token = " " + token  # WordPiece drops the space before a word-initial piece
    if conventions.byte_level:
        alphabet = byte_level_alphabet()
        if all(ch in alphabet for ch in token):
            return bytes(alphabet[ch] for ch in token)
    if conventions.metaspace:
        token = token.replace(METASPACE, " ")
    return token.encode("utf-8")


def token_keys(tokenizer) -> list[bytes | str]:
    """Per id of `tokenizer` (0 .. len(tokenizer) - 1): the token's key; special tokens keep their content (str),
    other added tokens are literal text (their UTF-8 bytes)."""
    conventions = conventions_of(tokenizer)
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    keys: list[bytes | str] = []
    for index, token in enumerate(tokens):
        if index in added:
            entry = added[index]
            keys.append(entry.content if entry.special else entry.content.encode("utf-8"))
        elif token is None:
            keys.append(f"<missing id {index}>")
        else:
            keys.append(token_key(token, conventions))
    return keys


@dataclass(frozen=True)
class VocabularyMapping:
    """Tokens the two vocabularies share, id to id: teacher id `teacher_ids[k]` is student id `student_ids[k]`."""

    teacher_ids: np.ndarray
    student_ids: np.ndarray
    teacher_size: int
    student_size: int

    @property
    def shared(self) -> int:
        return int(len(self.teacher_ids))


def first_id_per_key(keys: list[bytes | str]) -> dict[bytes | str, int]:
    """key -> the lowest id with that key (a vocabulary may spell one text twice, e.g. an added token)."""
    lookup: dict[bytes | str, int] = {}
    for index, key in enumerate(keys):
        lookup.setdefault(key, index)
    return lookup


def shared_vocabulary(teacher_tokenizer, student_tokenizer) -> VocabularyMapping:
    """The id-to-id mapping of the tokens whose keys both vocabularies hold (each key mapped once)."""
    teacher_lookup = first_id_per_key(token_keys(teacher_tokenizer))
    student_lookup = first_id_per_key(token_keys(student_tokenizer))
    pairs = sorted((teacher_lookup[key], student_id) for key, student_id in student_lookup.items()
                   if key in teacher_lookup)
    teacher_ids = np.array([t for t, _ in pairs], dtype=np.int64)
    student_ids = np.array([s for _, s in pairs], dtype=np.int64)
    return VocabularyMapping(teacher_ids, student_ids, len(teacher_tokenizer), len(student_tokenizer))
