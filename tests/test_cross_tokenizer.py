"""Cross-tokenizer components: alignment of two tokenizations by text offsets, ULD and the hybrid divergence across
vocabularies, and the vocabulary transplant of init-student. Tokenizers are built here from hand-written
vocabularies and merges (byte-level BPE, Metaspace BPE, WordPiece), so every split is known."""

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distil.cross_tokenizer.alignment import (NO_BOUNDARY, align_boundaries, align_texts, boundaries_from_offsets,
                                              check_has_offsets, gather_teacher_rows, token_boundaries)
from distil.cross_tokenizer.losses import hybrid_loss, hybrid_parts_sum, hybrid_sum, uld_loss, uld_sum
from distil.cross_tokenizer.transplant import source_rows, transplant_vocabulary
from distil.cross_tokenizer.vocabulary import (VocabularyMapping, byte_level_alphabet, first_id_per_key,
                                               shared_vocabulary, token_keys)
from distil.errors import DistilError
from distil.teacher_signal.divergences import divergence_sum

TEXT = "hello  world é!"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style: every byte a character, merges up to "hello" and "Ġworld"; <|endoftext|> opens each text."""
    alphabet = sorted(byte_level_alphabet(), key=byte_level_alphabet().get)
    merges = [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o"), ("Ġ", "w"), ("Ġw", "o"), ("Ġwo", "r"),
              ("Ġwor", "l"), ("Ġworl", "d"), ("Ġ", "Ġ")]
    vocab = {"<|endoftext|>": 0}
    for token in alphabet + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece style: "▁" marks a space; "hello" -> ▁he llo, "world" -> ▁wo rld, " é" -> ▁é."""
    chars = ["▁", "h", "e", "l", "o", "w", "r", "d", "é", "!"]
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("ll", "o"), ("▁", "w"), ("▁w", "o"), ("r", "l"), ("rl", "d"),
              ("▁", "é")]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for token in chars + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT style: whitespace dropped, "##" continues a word; "hello" -> hel ##lo."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hel", "##lo", "world", "é", "!", "w",
                                         "##o"])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]", pad_token="[PAD]")


def _tokens(tokenizer, text):
    return tokenizer.backend_tokenizer.encode(text).tokens


# --- alignment ---------------------------------------------------------------------------------------------------

def test_cross_tokenizer_alignment_hand_built_spans_1to1_1to2_2to1_2to3():
    """Offsets written by hand: "hello" 1:2, "big" 1:1, "world" 2:1, "abcde" 2:3 (teacher attaches the space to
    the next token as byte-level BPE does, the student drops it as WordPiece does)."""
    text = "hello big world abcde"
    #                   BOS     hello    " big"  " wor"    "ld"     " abc"    "de"
    teacher_offsets = [(0, 0), (0, 5), (5, 9), (9, 13), (13, 15), (15, 19), (19, 21)]
    #                   CLS     hel     lo      big     world     ab        cd        e
    student_offsets = [(0, 0), (0, 3), (3, 5), (6, 9), (10, 15), (16, 18), (18, 20), (20, 21)]
    teacher = boundaries_from_offsets(np.array(teacher_offsets), text)
    student = boundaries_from_offsets(np.array(student_offsets), text)
    assert teacher.tolist() == [NO_BOUNDARY, 0, 6, 10, 13, 16, 19]
    assert student.tolist() == [NO_BOUNDARY, 0, 3, 6, 10, 16, 18, 20]
    alignment = align_boundaries([teacher], [student])
    # Student position i predicts student token i + 1: "hel" <- teacher 0 (predicts "hello"), "lo" none, "big" <- 1,
    # "world" <- 2 (predicts " wor"), "ab" <- 4 (predicts " abc"), "cd" and "e" none, the last position none.
    assert alignment.teacher_position.tolist() == [[0, -1, 1, 2, 4, -1, -1, -1]]
    assert alignment.span_student.tolist() == [[1, 3, 4, 5]]   # spans: hello 2 student tokens, big 1, world 1, abcde 3
    assert alignment.span_teacher.tolist() == [[1, 2, 3, 5]]   # hello 1 teacher token, big 1, world 2, abcde 2


def test_cross_tokenizer_alignment_byte_level_to_metaspace_whitespace_run_and_split_character():
    teacher, student = byte_level_tokenizer(), metaspace_tokenizer()
    # The double space: byte-level gives a lone "Ġ" and "Ġworld", Metaspace a lone "▁" and "▁wo"; "é" (2 bytes) is
    # split by byte-level BPE into "Ã" "©" that both carry the character's offsets.
    assert _tokens(teacher, TEXT) == ["<|endoftext|>", "hello", "Ġ", "Ġworld", "Ġ", "Ã", "©", "!"]
    assert _tokens(student, TEXT) == ["<s>", "▁he", "llo", "▁", "▁wo", "rld", "▁é", "!"]
    _, (teacher_bounds,) = token_boundaries(teacher, [TEXT])
    _, (student_bounds,) = token_boundaries(student, [TEXT])
    assert teacher_bounds.tolist() == [-1, 0, -1, 7, -1, 13, -1, 14]   # whitespace-only and mid-character: none
    assert student_bounds.tolist() == [-1, 0, 2, -1, 7, 9, 13, 14]
    _, _, alignment = align_texts([TEXT], teacher, student)
    # <s> -> "▁he" takes teacher 0 (-> "hello"); "llo" and the lone "▁" none; "▁wo" takes teacher 2 (-> "Ġworld");
    # "rld" none; "▁é" takes teacher 4 (-> "Ã", the first byte of é); "!" takes teacher 6 (-> "!").
    assert alignment.teacher_position.tolist() == [[0, -1, -1, 2, -1, 4, 6, -1]]


def test_cross_tokenizer_alignment_byte_level_to_wordpiece_and_back():
    teacher, student = byte_level_tokenizer(), wordpiece_tokenizer()
    assert _tokens(student, TEXT) == ["[CLS]", "hel", "##lo", "world", "é", "!", "[SEP]"]
    _, _, alignment = align_texts([TEXT], teacher, student)
    assert alignment.teacher_position.tolist() == [[0, -1, 2, 4, 6, -1, -1]]
    # The other direction: a WordPiece teacher, a byte-level student.
    _, _, back = align_texts([TEXT], student, teacher)
    # Student (byte-level) positions: BOS -> "hello" <- teacher 0 (-> "hel"); "hello" -> "Ġ" none (whitespace only);
    # "Ġ" -> "Ġworld" <- teacher 2 (-> "world"); "Ġworld" -> "Ġ" none; "Ġ" -> "Ã" <- teacher 3 (-> "é");
    # "Ã" -> "©" none (mid-character); "©" -> "!" <- teacher 4; "!" last.
    assert back.teacher_position.tolist() == [[0, -1, 2, -1, 3, -1, 4, -1]]


def test_cross_tokenizer_alignment_unicode_and_same_tokenizer_is_identity():
    """The same tokenizer on both sides carries every position that predicts a token beginning a boundary."""
    tokenizer = metaspace_tokenizer()
    texts = [TEXT, "héllo wörld", "  hello"]
    ids, _, alignment = align_texts(texts, tokenizer, tokenizer)
    _, bounds = token_boundaries(tokenizer, texts)
    for row, (row_ids, row_bounds) in enumerate(zip(ids, bounds)):
        expected = [i if i + 1 < len(row_ids) and row_bounds[i + 1] >= 0 else -1 for i in range(len(row_ids))]
        assert alignment.teacher_position[row, : len(row_ids)].tolist() == expected
        assert (alignment.teacher_position[row, len(row_ids):] == -1).all()


def test_cross_tokenizer_alignment_batch_equals_row_by_row():
    teacher, student = byte_level_tokenizer(), metaspace_tokenizer()
    texts = [TEXT, "hello", "  world  hello é", "é!é!"]
    _, _, batch = align_texts(texts, teacher, student)
    for row, text in enumerate(texts):
        _, _, single = align_texts([text], teacher, student)
        width = single.teacher_position.shape[1]
        assert batch.teacher_position[row, :width].tolist() == single.teacher_position[0].tolist()
        assert (batch.teacher_position[row, width:] == -1).all()


def test_cross_tokenizer_alignment_from_stored_boundaries_without_text():
    """Prepared data keeps per-position boundaries; aligning them needs no text and gives the same answer."""
    teacher, student = byte_level_tokenizer(), metaspace_tokenizer()
    _, teacher_bounds = token_boundaries(teacher, [TEXT])
    _, student_bounds = token_boundaries(student, [TEXT])
    stored_teacher = np.stack([np.asarray(teacher_bounds[0], dtype=np.int32)])
    stored_student = np.stack([np.asarray(student_bounds[0], dtype=np.int32)])
    _, _, from_text = align_texts([TEXT], teacher, student)
    assert align_boundaries(stored_teacher, stored_student).teacher_position.tolist() == from_text.teacher_position.tolist()


def test_cross_tokenizer_gather_teacher_rows_moves_logits_to_student_positions():
    alignment = align_boundaries([np.array([-1, 0, 6, 10])], [np.array([-1, 0, 3, 6, 10])])
    teacher_logits = torch.arange(4 * 3, dtype=torch.float32).reshape(1, 4, 3)
    rows, mask = gather_teacher_rows(teacher_logits, alignment)
    assert mask.tolist() == [[True, False, True, True, False]]
    assert torch.equal(rows, teacher_logits[0, [0, 1, 2]])


def test_cross_tokenizer_slow_tokenizer_is_refused_with_what_to_do():
    class SlowTokenizer:
        is_fast = False
        name_or_path = "some/slow"

    with pytest.raises(DistilError, match="slow tokenizer without character offsets.*use_fast=True"):
        check_has_offsets(SlowTokenizer(), "student tokenizer")


# --- vocabulary keys -----------------------------------------------------------------------------------------------

def test_cross_tokenizer_token_keys_undo_each_spelling():
    byte_keys = dict(zip(byte_level_tokenizer().convert_ids_to_tokens(list(range(len(byte_level_tokenizer())))),
                         token_keys(byte_level_tokenizer())))
    assert byte_keys["Ġworld"] == b" world" and byte_keys["hello"] == b"hello" and byte_keys["Ã"] == b"\xc3"
    assert byte_keys["<|endoftext|>"] == "<|endoftext|>"   # special: a str, never equal to text
    meta = dict(zip(metaspace_tokenizer().convert_ids_to_tokens(list(range(len(metaspace_tokenizer())))),
                    token_keys(metaspace_tokenizer())))
    assert meta["▁wo"] == b" wo" and meta["rld"] == b"rld" and meta["▁é"] == " é".encode()
    wp = dict(zip(wordpiece_tokenizer().convert_ids_to_tokens(list(range(len(wordpiece_tokenizer())))),
                  token_keys(wordpiece_tokenizer())))
    assert wp["world"] == b" world" and wp["##lo"] == b"lo" and wp["[CLS]"] == "[CLS]"
    mapping = shared_vocabulary(byte_level_tokenizer(), wordpiece_tokenizer())
    teacher_tokens = byte_level_tokenizer().convert_ids_to_tokens(mapping.teacher_ids.tolist())
    student_tokens = wordpiece_tokenizer().convert_ids_to_tokens(mapping.student_ids.tolist())
    # WordPiece's word-initial "world" and "w" are " world" and " w"; "##o" is "o". Its "!" starts a word, so it is
    # " !", which the teacher does not hold ("!" without the space is another text); nor does it hold "lo".
    assert dict(zip(student_tokens, teacher_tokens)) == {"world": "Ġworld", "w": "Ġw", "##o": "o"}


# --- losses ------------------------------------------------------------------------------------------------------

P = [0.5, 0.3, 0.2]            # teacher over tokens a, b, c
Q = [0.6, 0.1, 0.2, 0.1]       # student over its own ids a', b', d, e


def _logits(probs):
    return torch.tensor([probs], dtype=torch.float64).log()


def test_cross_tokenizer_uld_hand_computed():
    # Sorted: p = .5 .3 .2 0, q = .6 .2 .1 .1 -> |.1| + |.1| + |.1| + |.1| = 0.4
    assert uld_sum(_logits(Q), _logits(P), 1.0).item() == pytest.approx(0.4, abs=1e-12)
    # T = 2: p_T ∝ sqrt(p), times T^2.
    p2 = sorted((math.sqrt(x) / sum(map(math.sqrt, P)) for x in P), reverse=True) + [0.0]
    q2 = sorted((math.sqrt(x) / sum(map(math.sqrt, Q)) for x in Q), reverse=True)
    expected = 4 * sum(abs(a - b) for a, b in zip(p2, q2))
    assert uld_sum(_logits(Q), _logits(P), 2.0).item() == pytest.approx(expected, abs=1e-12)


def test_cross_tokenizer_uld_zero_for_identical_distributions_under_any_permutation():
    torch.manual_seed(0)
    teacher = torch.randn(5, 40, dtype=torch.float64) * 3
    for seed in range(3):
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(seed))
        assert uld_sum(teacher[:, perm], teacher, 2.0).item() == pytest.approx(0.0, abs=1e-12)
    # A student with extra ids it never uses (logit -inf) is still the same distribution.
    padded = torch.cat([teacher[:, torch.randperm(40)], torch.full((5, 7), float("-inf"), dtype=torch.float64)], dim=1)
    assert uld_sum(padded, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-12)
    assert uld_loss(teacher + 1.0, teacher).item() == pytest.approx(0.0, abs=1e-6)   # float32 path, shifted logits


def test_cross_tokenizer_uld_and_hybrid_gradients_match_finite_differences():
    torch.manual_seed(1)
    student = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, dtype=torch.float64)
    mapping = VocabularyMapping(np.array([0, 2, 3]), np.array([4, 0, 1]), 5, 6)
    assert torch.autograd.gradcheck(lambda s: uld_sum(s, teacher, 2.0), (student,))
    assert torch.autograd.gradcheck(lambda s: hybrid_sum(s, teacher, mapping, 2.0, 0.5), (student,))


def test_cross_tokenizer_hybrid_hand_computed():
    # Shared: teacher a (0) = student 0, teacher b (1) = student 1; rest: teacher {c}, student {d, e}.
    mapping = VocabularyMapping(np.array([0, 1]), np.array([0, 1]), 3, 4)
    exact, rest = hybrid_parts_sum(_logits(Q), _logits(P), mapping, 1.0)
    expected_exact = 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.3)
    assert exact.item() == pytest.approx(expected_exact, abs=1e-12)
    assert rest.item() == pytest.approx(abs(0.2 - 0.2) + abs(0.0 - 0.1), abs=1e-12)   # [.2] vs [.2, .1]
    assert hybrid_sum(_logits(Q), _logits(P), mapping, 1.0, 0.5).item() == pytest.approx(expected_exact + 0.05, abs=1e-12)


def test_cross_tokenizer_hybrid_exact_part_is_forward_kl_for_identical_vocabularies():
    torch.manual_seed(2)
    student = torch.randn(6, 30, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 30, dtype=torch.float64) * 2
    identity = VocabularyMapping(np.arange(30), np.arange(30), 30, 30)
    exact, rest = hybrid_parts_sum(student, teacher, identity, 2.0)
    reference = divergence_sum(student, teacher, "forward_kl", 2.0)
    assert exact.item() == pytest.approx(reference.item(), rel=1e-12)
    assert rest.item() == 0.0
    grad, = torch.autograd.grad(hybrid_sum(student, teacher, identity, 2.0), student)
    grad_reference, = torch.autograd.grad(reference, student)
    assert torch.allclose(grad, grad_reference, atol=1e-12)
    # A shuffled id mapping over the same vocabulary is the same divergence once the student's ids are shuffled.
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    shuffled = VocabularyMapping(np.arange(30), perm.numpy(), 30, 30)
    student_shuffled = torch.empty_like(student.detach())
    student_shuffled[:, perm] = student.detach()
    assert hybrid_sum(student_shuffled, teacher, shuffled, 2.0).item() == pytest.approx(reference.item(), rel=1e-12)


def test_cross_tokenizer_hybrid_confident_teacher_and_mean_over_masked_rows():
    """A teacher sure of a shared token: the exact part is -log q of that token (times T^2 = 1), and the rest's ULD
    is the student's whole mass outside the shared tokens (.2 + .1) against the teacher's (0)."""
    mapping = VocabularyMapping(np.array([0, 1]), np.array([1, 0]), 3, 4)
    teacher = torch.tensor([[30.0, -30.0, -30.0]], dtype=torch.float64)
    student = _logits(Q)
    assert hybrid_sum(student, teacher, mapping, 1.0).item() == pytest.approx(-math.log(0.1) + 0.3, abs=1e-9)
    rows_s = torch.stack([student[0], student[0] * 0.5]).unsqueeze(0)
    rows_t = torch.stack([teacher[0], teacher[0]]).unsqueeze(0)
    mask = torch.tensor([[True, False]])
    assert hybrid_loss(rows_s, rows_t, mapping, 1.0, mask=mask).item() == pytest.approx(-math.log(0.1) + 0.3, abs=1e-9)
    assert hybrid_loss(rows_s, rows_t, mapping, 1.0, mask=torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0


# --- vocabulary transplant ---------------------------------------------------------------------------------------

def _teacher_gpt2(tokenizer, tied: bool = True):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=32,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    return GPT2LMHeadModel(config).eval()


def _teacher_llama_untied(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("new_tokenizer", [metaspace_tokenizer, wordpiece_tokenizer])
@pytest.mark.parametrize("build", [_teacher_gpt2, _teacher_llama_untied])
def test_cross_tokenizer_transplant_keeps_every_shared_token_and_composes_the_rest(new_tokenizer, build):
    teacher_tok, new_tok = byte_level_tokenizer(), new_tokenizer()
    model = build(teacher_tok)
    teacher_in = model.get_input_embeddings().weight.detach().clone()
    teacher_out = model.get_output_embeddings().weight.detach().clone()
    record = transplant_vocabulary(model, teacher_tok, new_tok)
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    assert new_in.shape == (len(new_tok), 16) and model.config.vocab_size == len(new_tok)

    teacher_lookup = first_id_per_key(token_keys(teacher_tok))
    shared = [(i, teacher_lookup[k]) for i, k in enumerate(token_keys(new_tok)) if k in teacher_lookup]
    assert record["tokens_exact"] == len(shared) > 0
    for new_id, teacher_id in shared:
        assert torch.equal(new_in[new_id], teacher_in[teacher_id])
        assert torch.equal(new_out[new_id], teacher_out[teacher_id])
    # Composed by hand: " é" (Metaspace "▁é", WordPiece's word-initial "é") is not a teacher token; the teacher
    # splits it into "Ġ", "Ã", "©".
    tokens = new_tok.get_vocab()
    composed_id = tokens["▁é"] if "▁é" in tokens else tokens["é"]
    pieces = [teacher_tok.get_vocab()[t] for t in ("Ġ", "Ã", "©")]
    assert torch.allclose(new_in[composed_id], teacher_in[pieces].mean(dim=0), atol=1e-6)
    assert torch.allclose(new_out[composed_id], teacher_out[pieces].mean(dim=0), atol=1e-6)
    # Special tokens by role: the new beginning of text is the teacher's <|endoftext|>.
    start = new_tok.bos_token_id if new_tok.bos_token_id is not None else new_tok.cls_token_id
    if new_tok.bos_token_id is not None:
        assert torch.equal(new_in[start], teacher_in[0])
        assert model.config.bos_token_id == new_tok.bos_token_id
    assert record["tokens_exact"] + record["tokens_special_by_role"] + record["tokens_composed"] + \
        record["tokens_fallback"] == len(new_tok)
    ids = torch.tensor([new_tok(TEXT)["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(new_tok))


def test_cross_tokenizer_transplant_counts_hand_checked():
    _, counts = source_rows(byte_level_tokenizer(), metaspace_tokenizer())
    # Metaspace vocabulary: <unk> <s> </s> ▁ h e l o w r d é ! ▁h ▁he ll llo ▁w ▁wo rl rld ▁é (22 tokens).
    # Exact (same text in the byte-level vocabulary): h e l o w r d ! ("é" is two teacher bytes) and ▁ (" " = Ġ),
    # ▁w (Ġw), ▁wo (Ġwo): 11. Specials by role: <unk>? (the teacher has none), <s> and </s> (bos, eos): 2.
    # <unk> has no counterpart: fallback. Composed: é ▁h ▁he ll llo rl rld ▁é = 8.
    assert counts == {"exact": 11, "special_by_role": 2, "composed": 8, "fallback": 1, "total": 22}


def test_cross_tokenizer_init_student_transplant_end_to_end(tmp_path, capsys):
    from distil.student import INIT_FILE, init_student

    teacher_tok = byte_level_tokenizer()
    teacher = _teacher_gpt2(teacher_tok)
    teacher.save_pretrained(tmp_path / "teacher")
    teacher_tok.save_pretrained(tmp_path / "teacher")
    metaspace_tokenizer().save_pretrained(tmp_path / "meta")
    summary = init_student(str(tmp_path / "teacher"), str(tmp_path / "student"), None, 1,
                           tokenizer=str(tmp_path / "meta"), transplant_vocabulary=True)
    assert "11 of 22 tokens exact" in capsys.readouterr().out
    record = json.loads((tmp_path / "student" / INIT_FILE).read_text())["vocabulary_transplant"]
    assert record == summary["vocabulary_transplant"] and record["tokens_exact"] == 11 and record["vocab_size"] == 22
    student = GPT2LMHeadModel.from_pretrained(tmp_path / "student")
    assert student.config.vocab_size == 22 and student.config.bos_token_id == 1 and student.config.eos_token_id == 2
    saved = PreTrainedTokenizerFast.from_pretrained(tmp_path / "student")
    assert saved.get_vocab() == metaspace_tokenizer().get_vocab()
    with pytest.raises(DistilError, match="--transplant-vocabulary gives the student another tokenizer"):
        init_student(str(tmp_path / "teacher"), str(tmp_path / "student2"), None, 1, transplant_vocabulary=True)


def test_cross_tokenizer_hybrid_student_vocabulary_inside_the_teachers_is_finite():
    """Every student token is a teacher token: the student has no bucket to put the teacher's other mass in, so the
    exact part is the KL to the teacher renormalised over the shared tokens (finite), and ULD sees the rest."""
    teacher = torch.tensor([[1.0, 0.5, -0.2, 2.0]], dtype=torch.float64)   # ids 0..3; 3 has no student token
    student = torch.tensor([[0.3, -0.4, 0.9]], dtype=torch.float64, requires_grad=True)
    mapping = VocabularyMapping(np.array([0, 1, 2]), np.array([2, 0, 1]), 4, 3)
    exact, rest = hybrid_parts_sum(student, teacher, mapping, 1.0)
    p = torch.softmax(teacher, -1)[0]
    shared = p[[0, 1, 2]] / p[[0, 1, 2]].sum()
    q = torch.softmax(student.detach(), -1)[0][[2, 0, 1]]
    assert torch.isfinite(exact).all()
    assert exact.item() == pytest.approx(float((shared * (shared / q).log()).sum()), abs=1e-12)
    assert rest.item() == pytest.approx(float(p[3]), abs=1e-12)   # the teacher's token 3 against nothing
    exact.backward()
    assert torch.isfinite(student.grad).all()
