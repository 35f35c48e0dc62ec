"""Held-out bits per byte: a hand-computed case, one text distribution under two tokenizations (characters and
character pairs) giving the same number, and `distil evaluate` reporting it for a causal model."""

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distil.evaluation import lm_quality
from distil.evaluation.evaluate import evaluate

ALPHABET = {"a": 0.5, "b": 0.25, "é": 0.125, "d": 0.125}   # é is 2 UTF-8 bytes


def _tokenizer(tokens: list[str], pairs: bool) -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1}
    for token in tokens:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".." if pairs else "."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


class IndependentCharacters(torch.nn.Module):
    """A model whose next token ignores the context: each token's probability is the product of its characters'
    (ALPHABET); the framing tokens get none."""

    def __init__(self, tokenizer):
        super().__init__()
        logits = torch.full((len(tokenizer),), float("-inf"))
        for token, index in tokenizer.get_vocab().items():
            if token not in ("<s>", "</s>"):
                logits[index] = sum(math.log(ALPHABET[ch]) for ch in token)
        self.register_buffer("row", logits)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1))


def _characters():
    return _tokenizer(list(ALPHABET), pairs=False)


def _pairs():
    return _tokenizer([x + y for x in ALPHABET for y in ALPHABET], pairs=True)


def test_bits_per_byte_hand_computed():
    tokenizer = _characters()
    # "abé" + "dd": bits = 1 + 2 + 3 + 3 + 3 = 12; bytes = 1 + 1 + 2 + 1 + 1 = 6 -> 2.0 bits per byte.
    result = lm_quality.causal_lm_bits_per_byte(IndependentCharacters(tokenizer), tokenizer, ["abé", "dd"])
    assert result["bits_per_byte"] == pytest.approx(12 / 6, abs=1e-6)  # log-softmax in float32
    assert (result["bpb_bytes"], result["bpb_tokens"]) == (6, 5)
    assert lm_quality.bits_per_byte(12 * math.log(2), 6) == pytest.approx(2.0)


def test_bits_per_byte_same_model_under_two_tokenizations_of_one_text():
    """Characters and character pairs give the same distribution over text, so the same bits per byte, though the
    token counts (and so the loss per token) differ by a factor of two."""
    texts = ["abéd" * 5, "ddaébbaé", "éé"]
    chars, pairs = _characters(), _pairs()
    by_char = lm_quality.causal_lm_bits_per_byte(IndependentCharacters(chars), chars, texts, max_length=8)
    by_pair = lm_quality.causal_lm_bits_per_byte(IndependentCharacters(pairs), pairs, texts, max_length=8)
    expected_bits = sum(-math.log2(ALPHABET[ch]) for text in texts for ch in text)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    assert by_char["bits_per_byte"] == pytest.approx(expected_bits / n_bytes, abs=1e-6)
    assert by_pair["bits_per_byte"] == pytest.approx(expected_bits / n_bytes, abs=1e-6)
    assert by_char["bpb_tokens"] == 2 * by_pair["bpb_tokens"]


def test_bits_per_byte_reported_by_evaluate_for_a_causal_model(tmp_path):
    from tiny_models import VOCAB_SIZE, tiny_gpt2
    from tiny_tokenizers import word_level_tokenizer

    word_level_tokenizer(tmp_path / "gpt2", VOCAB_SIZE - 2, "gpt2")
    tiny_gpt2(2).save_pretrained(tmp_path / "gpt2")
    lines = [" ".join(f"w{(7 * i + j) % 90}" for j in range(14)) for i in range(6)]
    (tmp_path / "heldout.txt").write_text("\n".join(lines) + "\n")
    summary = evaluate([f"gpt2={tmp_path / 'gpt2'}"], data=[str(tmp_path / "heldout.txt")], speed_test=False,
                       max_length=64)
    lm = summary["models"][0]["lm"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "gpt2")
    model = tiny_gpt2(2).eval()
    nll = 0.0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(line, add_special_tokens=False)["input_ids"]])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            nll -= float(log_probs.gather(-1, ids[0, 1:, None]).sum())
    expected = nll / math.log(2) / sum(len(line.encode()) for line in lines)
    assert lm["bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    assert "held-out bits per byte" in summary["markdown"]
