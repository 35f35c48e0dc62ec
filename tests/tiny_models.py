"""Tiny random models from configs, for fast tests that compare numbers.

Every builder seeds torch, builds the model in eval mode and then perturbs every bias and norm weight
(which initialise to 0 and 1): with identity norms, a test could not tell one layer norm from another.
"""

from __future__ import annotations

import torch

VOCAB_SIZE = 96
SEED = 1234


def _perturb(model, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif param.dim() == 1:  # norm scales
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def tiny_bert(num_layers: int = 4, seed: int = SEED, **overrides):
    """BertForMaskedLM: hidden 32, 4 heads, FFN 64, vocab 96, tied decoder."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, initializer_range=0.1, **overrides,
    )
    return _perturb(BertForMaskedLM(config), seed)


def tiny_roberta(num_layers: int = 4, seed: int = SEED, **overrides):
    """RobertaForMaskedLM: hidden 32, 4 heads, FFN 64, vocab 96, padding id 1 (positions start at 2)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, initializer_range=0.1, **overrides,
    )
    return _perturb(RobertaForMaskedLM(config), seed)


def tiny_gpt2(num_layers: int = 4, seed: int = SEED, **overrides):
    """GPT2LMHeadModel: hidden 32, 4 heads, 64 positions, vocab 96, head tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=32, n_layer=num_layers, n_head=4, n_positions=64, bos_token_id=0,
        eos_token_id=0, initializer_range=0.1, **overrides,
    )
    return _perturb(GPT2LMHeadModel(config), seed)


def tiny_llama(num_layers: int = 4, seed: int = SEED, **overrides):
    """LlamaForCausalLM: hidden 32, 4 query / 2 key-value heads, FFN 64, vocab 96, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.1, **overrides,
    )
    return _perturb(LlamaForCausalLM(config), seed)


def tiny_tokenizer():
    """A fast word-level tokenizer over VOCAB_SIZE tokens, BERT-style specials first."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB_SIZE - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
