"""Tiny word-level tokenizers with predictable ids, saved as save_pretrained directories.

Word "wN" has id N + number of specials, so tests can write expected ids by hand.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


def word_level_tokenizer(directory: Path, n_words: int = 50, family: str = "bert") -> Path:
    """family: 'bert' ([CLS] x [SEP]), 'roberta' (<s> x </s>) or 'gpt2' (no framing, <|endoftext|> only)."""
    if family == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    elif family == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    elif family == "gpt2":
        specials = ["<|endoftext|>", "<unk>"]
    else:
        raise ValueError(family)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for n in range(n_words):
        vocab[f"w{n}"] = len(vocab)
    unk = "[UNK]" if family == "bert" else "<unk>"
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if family == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        kwargs = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    elif family == "roberta":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        kwargs = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                      cls_token="<s>", sep_token="</s>")
    else:
        kwargs = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=512, **kwargs)
    directory = Path(directory)
    tok.save_pretrained(directory)
    return directory


def word_ids(words: str, n_specials: int) -> list[int]:
    return [int(w[1:]) + n_specials for w in words.split()]
