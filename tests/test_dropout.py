"""run.dropout sets every dropout probability of the student's config, whatever the architecture calls it
(BERT's hidden_dropout_prob, GPT-2's resid_pdrop, DistilBERT's dropout, Llama's attention_dropout, ...)."""

import logging

import pytest
import torch

from distil.training.models import override_dropout

VOCAB = 96


def _config(name: str, dropout: float):
    """A tiny config of each architecture the recipes name (and a few more decoders), with every dropout
    probability it has set to `dropout`."""
    import transformers as tf

    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)
    decoder = dict(small, num_key_value_heads=2, attention_dropout=dropout, pad_token_id=0)
    bert = dict(small, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    builders = {
        "bert": lambda: tf.BertConfig(**bert),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**bert, pad_token_id=1),
        "roberta": lambda: tf.RobertaConfig(**bert, pad_token_id=1),
        "distilbert": lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                  max_position_embeddings=64, dropout=dropout,
                                                  attention_dropout=dropout),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout),
        "llama": lambda: tf.LlamaConfig(**decoder),
        "qwen2": lambda: tf.Qwen2Config(**decoder),
        "mistral": lambda: tf.MistralConfig(**decoder),
        "gemma": lambda: tf.GemmaConfig(**decoder, head_dim=8),
    }
    return builders[name]()


BIDIRECTIONAL = {"bert", "xlm-roberta", "roberta", "distilbert"}
ARCHITECTURES = ["bert", "xlm-roberta", "roberta", "distilbert", "gpt2", "llama", "qwen2", "mistral", "gemma"]


def _forwards(config, sentence_encoder: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(train-mode output, eval-mode output) of a model built from `config` on one fixed batch."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(0)
    if sentence_encoder:
        model = AutoModel.from_config(config)
    else:
        model = (AutoModelForMaskedLM if config.model_type in BIDIRECTIONAL else AutoModelForCausalLM).from_config(config)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))

    def output():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out.last_hidden_state if sentence_encoder else out.logits

    with torch.no_grad():
        torch.manual_seed(2)
        model.train()
        trained = output()
        model.eval()
        evaluated = output()
    return trained, evaluated


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_dropout_override_zero_makes_train_forward_equal_eval(name):
    config = _config(name, 0.1)
    assert not torch.equal(*_forwards(config)), "the tiny model must show its dropout at 0.1"
    original = override_dropout(config, 0.0)
    assert original and all(getattr(config, key) == 0.0 for key in original)
    trained, evaluated = _forwards(config)
    assert torch.equal(trained, evaluated)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_dropout_override_turns_dropout_on(name):
    config = _config(name, 0.0)
    assert torch.equal(*_forwards(config))
    override_dropout(config, 0.1)
    assert not torch.equal(*_forwards(config))


def test_dropout_override_sentence_encoder():
    """The sentence recipes train the bare BERT encoder (hidden states only)."""
    config = _config("bert", 0.1)
    override_dropout(config, 0.0)
    assert torch.equal(*_forwards(config, sentence_encoder=True))


def test_dropout_override_returns_what_it_replaced_and_logs_it(caplog):
    config = _config("gpt2", 0.1)
    config.summary_first_dropout = 0.3
    with caplog.at_level(logging.INFO, logger="distil.training.models"):
        original = override_dropout(config, 0.0)
    assert original == {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "summary_first_dropout": 0.3}
    assert all(getattr(config, key) == 0.0 for key in original)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert all(key in message for key in original)


def test_dropout_override_sets_whole_number_values_from_json():
    """A config.json may hold a probability as 0 (an int): it is a dropout all the same."""
    config = _config("llama", 0.0)
    config.attention_dropout = 0
    assert override_dropout(config, 0.1) == {"attention_dropout": 0}
    assert config.attention_dropout == 0.1


def test_dropout_override_leaves_unset_and_non_probability_values():
    config = _config("bert", 0.1)
    config.classifier_dropout = None  # None means "use hidden_dropout_prob": left to mean that
    config.use_dropout_flag = True    # a switch, not a probability
    override_dropout(config, 0.0)
    assert config.classifier_dropout is None and config.use_dropout_flag is True
    assert override_dropout(config, None) == {}


def test_dropout_override_says_when_a_model_has_no_dropout_setting(caplog):
    from transformers import PretrainedConfig

    with caplog.at_level(logging.WARNING, logger="distil.training.models"):
        assert override_dropout(PretrainedConfig(), 0.0) == {}
    assert any("no dropout" in r.getMessage() for r in caplog.records)
