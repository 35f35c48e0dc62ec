"""Training across tokenizers: the cross-tokenizer source (live and from a store), the uld / hybrid soft-target
term against a plain computation, sparse against dense, an end-to-end `distil train`, and the refusals.

The student reads byte-level BPE (GPT-2 style), the teachers Metaspace BPE or WordPiece, each trained here on the
corpus, so the two tokenizations split words differently and the alignment has multi-token spans."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distil.config import load_config
from distil.cross_tokenizer.alignment import align_texts, gather_teacher_rows
from distil.cross_tokenizer.divergence import AlignedSignals, CrossVocabularyDivergence
from distil.cross_tokenizer.losses import (hybrid_parts_sum, hybrid_sparse_parts_sum, hybrid_sum, uld_sparse_sum,
                                           uld_sum)
from distil.cross_tokenizer.retokenize import Retokenizer
from distil.cross_tokenizer.vocabulary import shared_vocabulary
from distil.data.prepare import prepare
from distil.errors import DistilError
from distil.metrics_log import read_metrics
from distil.teacher_cache.signals import sparse_signals
from distil.training.batches import build_step
from distil.training.loop import train
from distil.training.sources.cross_tokenizer import CrossTokenizerTeacher
from distil.training.sources.interface import TeacherRequest
from train_fixtures import corpus_lines, write_recipe

T = 2.0


def corpus() -> list[str]:
    lines = corpus_lines(120, n_words=40)
    return lines + ["héllo wörld, " + line for line in lines[:30]]


def _trained(model, pre_tokenizer, decoder, trainer, unk: str | None, **specials) -> PreTrainedTokenizerFast:
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder
    backend.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, **specials)


def byte_level_student_tokenizer() -> PreTrainedTokenizerFast:
    return _trained(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                    trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
                    None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def metaspace_teacher_tokenizer() -> PreTrainedTokenizerFast:
    return _trained(models.BPE(unk_token="<unk>"), pre_tokenizers.Metaspace(), decoders.Metaspace(),
                    trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"]),
                    "<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def wordpiece_teacher_tokenizer() -> PreTrainedTokenizerFast:
    return _trained(models.WordPiece(unk_token="[UNK]"), pre_tokenizers.BertPreTokenizer(), decoders.WordPiece(),
                    trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[PAD]", "[UNK]"]),
                    "[UNK]", pad_token="[PAD]")


def llama_teacher(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                         tie_word_embeddings=False, initializer_range=0.2))
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)   # confident, varied predictions
    return model.eval()


def gpt2_student(vocab: int, seed: int = 1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(root, teacher dir, student dir, prepared data of the student's tokenizer)."""
    root = tmp_path_factory.mktemp("cross_tokenizer")
    student_tok, teacher_tok = byte_level_student_tokenizer(), metaspace_teacher_tokenizer()
    teacher, student = root / "teacher", root / "student"
    llama_teacher(len(teacher_tok)).save_pretrained(teacher)
    teacher_tok.save_pretrained(teacher)
    gpt2_student(len(student_tok)).save_pretrained(student)
    student_tok.save_pretrained(student)
    text = root / "corpus.txt"
    text.write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    data = root / "data"
    prepare([str(text)], str(student), str(data), heldout_fraction=0.1, max_length=32, progress=False)
    return root, teacher, student, data


@pytest.mark.parametrize("teacher_kind", ["metaspace", "wordpiece"])
@pytest.mark.parametrize("divergence", ["uld", "hybrid"])
def test_cross_tokenizer_source_equals_plain_alignment_and_losses(teacher_kind, divergence):
    """The live source's term on a batch of student ids equals align_texts + gather_teacher_rows + the loss on
    the full logits of both models, computed from the original texts (float64, 1e-6)."""
    student_tok = byte_level_student_tokenizer()
    teacher_tok = metaspace_teacher_tokenizer() if teacher_kind == "metaspace" else wordpiece_teacher_tokenizer()
    teacher = llama_teacher(len(teacher_tok)).double()
    texts = ["w3 w4 w5 w6 w7", "héllo wörld, w10 w11", "w39 w0 w1"]
    ids = [student_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = build_step([np.array(i) for i in ids], student_tok.pad_token_id, "clm", None, None, 0, 1,
                       torch.device("cpu"))[0]
    torch.manual_seed(3)
    student_logits = torch.randn(*batch.input_ids.shape, len(student_tok), dtype=torch.float64, requires_grad=True)
    kd = batch.attention_mask.bool()
    source = CrossTokenizerTeacher(teacher, teacher_tok, student_tok, len(teacher_tok))
    signals = source.outputs(batch, TeacherRequest(kd_rows=kd)).signals
    got = CrossVocabularyDivergence(divergence, T).value(student_logits[kd], signals)

    teacher_ids, student_ids, alignment = align_texts(texts, teacher_tok, student_tok)
    assert student_ids == ids
    width = max(len(r) for r in teacher_ids)
    padded = torch.tensor([r + [0] * (width - len(r)) for r in teacher_ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in teacher_ids])
    with torch.no_grad():
        full = teacher(input_ids=padded, attention_mask=mask).logits
    rows, carried = gather_teacher_rows(full, alignment)
    assert carried.sum() > 0 and not carried.all()   # some positions inside multi-token spans carry nothing
    student_rows = student_logits[:, : carried.shape[1]][carried]
    mapping = shared_vocabulary(teacher_tok, student_tok)
    want = uld_sum(student_rows, rows, T) if divergence == "uld" else hybrid_sum(student_rows, rows, mapping, T)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got, want)
    (g_got,) = torch.autograd.grad(got, student_logits)
    (g_want,) = torch.autograd.grad(want, student_logits)
    assert torch.allclose(g_got, g_want, atol=1e-9)


def test_cross_tokenizer_sparse_equals_dense_with_the_whole_vocabulary():
    """ULD and the hybrid on a top-k + rest teacher equal the dense ones when k is the teacher's vocabulary, and
    the sparse ULD is a lower bound of the dense one for a smaller k (the tail compared as one bucket)."""
    student_tok, teacher_tok = byte_level_student_tokenizer(), metaspace_teacher_tokenizer()
    mapping = shared_vocabulary(teacher_tok, student_tok)
    assert 0 < mapping.shared < len(teacher_tok)
    torch.manual_seed(0)
    student = torch.randn(6, len(student_tok), dtype=torch.float64) * 3
    student[0, 5] = 40.0                                   # a confident student
    teacher = torch.randn(6, len(teacher_tok), dtype=torch.float64) * 4
    teacher[1, 7] = 60.0                                   # a tiny tail
    full = sparse_signals(teacher, len(teacher_tok), T)
    dense_exact, dense_rest = hybrid_parts_sum(student, teacher, mapping, T)
    top_logp = torch.log_softmax(teacher / T, dim=-1).gather(1, full.top_ids)   # float64 log-probabilities
    sparse_exact, sparse_rest = hybrid_sparse_parts_sum(student, full.top_ids, top_logp, full.log_rest.double(),
                                                        mapping, T)
    assert torch.allclose(sparse_exact, dense_exact, rtol=1e-9) and torch.allclose(sparse_rest, dense_rest, rtol=1e-9)
    assert torch.allclose(uld_sparse_sum(student, top_logp, full.log_rest.double(), T), uld_sum(student, teacher, T),
                          rtol=1e-9)
    for k in (1, 5, 20):
        top = sparse_signals(teacher, k, T)
        logp = torch.log_softmax(teacher / T, dim=-1).gather(1, top.top_ids)
        rest = torch.logsumexp(torch.log_softmax(teacher / T, -1).scatter(1, top.top_ids, -math.inf), -1)
        for row in range(6):
            bound = uld_sparse_sum(student[row:row + 1], logp[row:row + 1], rest[row:row + 1], T)
            assert bound <= uld_sum(student[row:row + 1], teacher[row:row + 1], T) + 1e-12


def run(root: Path, name: str, teacher: Path, student: Path, data: Path, divergence: str = "hybrid",
        teacher_section: dict | None = None, **loss):
    recipe = write_recipe(root / f"{name}.yaml", teacher, data, root / name,
                          teacher=teacher_section or {"path": str(teacher)},
                          student={"num_layers": None, "path": str(student)},
                          loss={"objective": "clm", "alpha_ce": 1.0, "alpha_clm": 1.0, "alpha_mlm": 0.0,
                                "alpha_cos": 0.0, "divergence": divergence, "temperature": T, **loss},
                          optim={"max_steps": 3, "lr": 1e-3}, run={"dropout": 0.0})
    return train(load_config(recipe))


def test_cross_tokenizer_train_end_to_end_and_store_equals_live(pair):
    """Three steps of `distil train` with a teacher of another tokenizer (hybrid), then the same student from a
    store written for it (k = the teacher's vocabulary, float32): the same losses step by step to 1e-5."""
    from distil.teacher_cache.writer import cache_teacher

    root, teacher, student, data = pair
    summary = run(root, "live", teacher, student, data)
    live = [r for r in read_metrics(root / "live") if r["split"] == "train"]
    assert summary["steps"] == 3 and [r["step"] for r in live] == [1, 2, 3]
    assert all(math.isfinite(r["loss_ce"]) and r["loss_ce"] > 0 for r in live)
    heldout = summary["heldout"]
    assert "student_clm" in heldout
    # The live teacher speaks about the held-out text too: the run's divergence by name, and no teacher LM loss
    # (its predictions are over its own tokens, not the student's labels).
    assert heldout["divergence"] == "hybrid" and math.isfinite(heldout["kd"]) and heldout["kd"] > 0
    assert not any(key.startswith("teacher_") for key in heldout)
    saved = PreTrainedTokenizerFast.from_pretrained(root / "live" / "student")
    assert saved.get_vocab() == PreTrainedTokenizerFast.from_pretrained(student).get_vocab()

    vocab = len(PreTrainedTokenizerFast.from_pretrained(teacher))
    store = root / "store"
    cache_teacher(str(teacher), str(data), str(store), top_k=vocab, temperature=T, store_format="float32",
                  student_tokenizer=str(student), progress=False)
    run(root, "stored", teacher, student, data, teacher_section={"cache": str(store)})
    stored = [r for r in read_metrics(root / "stored") if r["split"] == "train"]
    for a, b in zip(live, stored):
        assert abs(a["loss_ce"] - b["loss_ce"]) <= 1e-5 * max(1.0, abs(a["loss_ce"])), (a, b)
        assert abs(a["loss_clm"] - b["loss_clm"]) <= 1e-5 * max(1.0, abs(a["loss_clm"])), (a, b)


@pytest.mark.parametrize("store_format", ["float16", "compact", "packed", "packed4"])
def test_cross_tokenizer_store_in_every_format(pair, store_format):
    """A store for a student of another tokenizer leaves the rows of positions without a teacher row empty; in
    every format (the packed ones included, whose empty rows are no valid code) only the carried rows are decoded,
    and the losses match the float32 store of the same top-k up to the format's quantisation."""
    from distil.teacher_cache.writer import cache_teacher

    root, teacher, student, data = pair
    losses = {}
    for fmt in ("float32", store_format):
        store = root / f"store-{fmt}"
        if (store / "manifest.json").exists():   # the float32 reference, written once for the module's pair
            losses[fmt] = [r["loss_ce"] for r in read_metrics(root / f"stored-{fmt}") if r["split"] == "train"]
            continue
        cache_teacher(str(teacher), str(data), str(store), top_k=8, temperature=T, store_format=fmt,
                      student_tokenizer=str(student), progress=False)
        run(root, f"stored-{fmt}", teacher, student, data, teacher_section={"cache": str(store)})
        losses[fmt] = [r["loss_ce"] for r in read_metrics(root / f"stored-{fmt}") if r["split"] == "train"]
    assert len(losses[store_format]) == 3
    for a, b in zip(losses["float32"], losses[store_format]):
        assert abs(a - b) <= 2e-2 * abs(a), (store_format, losses)


def test_cross_tokenizer_refusals_say_why(pair):
    root, teacher, student, data = pair
    with pytest.raises(DistilError, match="loss.divergence=hybrid or uld"):
        run(root, "refused-kl", teacher, student, data, divergence="forward_kl")
    with pytest.raises(DistilError, match="hidden states"):
        run(root, "refused-cos", teacher, student, data, alpha_cos=1.0)
    with pytest.raises(DistilError, match="several"):
        recipe = write_recipe(root / "two.yaml", teacher, data, root / "two", teacher={"path": ""},
                              student={"num_layers": None, "path": str(student)},
                              loss={"objective": "clm", "alpha_ce": 1.0, "alpha_mlm": 0.0, "alpha_cos": 0.0,
                                    "divergence": "uld"})
        values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        values["teachers"] = [{"name": "a", "path": str(teacher)}, {"name": "b", "path": str(teacher)}]
        recipe.write_text(yaml.safe_dump(values), encoding="utf-8")
        train(load_config(recipe))


def test_cross_tokenizer_teacher_position_limit_is_checked():
    """A teacher with a learned position table shorter than its own tokenization of a student row: refused before
    the forward (which would index past the table), with the length to prepare instead; a row that fits runs."""
    student_tok, teacher_tok = metaspace_teacher_tokenizer(), byte_level_student_tokenizer()   # a longer teacher
    retokenizer = Retokenizer(student_tok, teacher_tok)
    row = student_tok("w10 w11 w12 w13 w14 w15 w16 w17", add_special_tokens=False)["input_ids"]
    teacher_length = len(retokenizer([row])[0][0])
    assert teacher_length > len(row)            # the start-up check, on the student's length, would let it pass
    config = GPT2Config(vocab_size=len(teacher_tok), n_embd=16, n_layer=1, n_head=2, n_positions=teacher_length - 1)
    with pytest.raises(DistilError, match=f"into {teacher_length} tokens, but the teacher has positions for "
                                          f"{teacher_length - 1}"):
        retokenizer.teacher_logits(GPT2LMHeadModel(config).eval(), [row], len(teacher_tok), "cpu")
    config.n_positions = teacher_length
    logits, _ = retokenizer.teacher_logits(GPT2LMHeadModel(config).eval(), [row], len(teacher_tok), "cpu")
    assert logits.shape == (1, teacher_length, len(teacher_tok))


def test_cross_tokenizer_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False
        name_or_path = "slow-tok"

    with pytest.raises(DistilError, match="slow tokenizer without character offsets"):
        Retokenizer(Slow(), metaspace_teacher_tokenizer())


def test_cross_tokenizer_store_of_the_teachers_own_tokenizer_is_refused(pair):
    """A store written on data of the teacher's tokenizer cannot train a student of another one: refused saying so."""
    from distil.teacher_cache.writer import cache_teacher

    root, teacher, student, data = pair
    text = root / "corpus.txt"
    teacher_data = root / "data-teacher"
    if not teacher_data.exists():
        prepare([str(text)], str(teacher), str(teacher_data), heldout_fraction=0.1, max_length=32, progress=False)
    own = root / "store-own"
    cache_teacher(str(teacher), str(teacher_data), str(own), top_k=8, temperature=T, progress=False)
    with pytest.raises(DistilError, match="--student-tokenizer"):
        run(root, "refused-store", teacher, student, data, teacher_section={"cache": str(own)})


def test_cross_tokenizer_aligned_signals_pick_rows_in_order():
    """AlignedSignals.rows keeps the teacher rows of the carried kd rows it picks, for a slice and a mask."""
    from distil.teacher_signal.signals import DenseSignals

    carried = torch.tensor([True, False, True, True, False])
    teacher = DenseSignals(logits=torch.arange(3.0).unsqueeze(1))
    signals = AlignedSignals(carried, teacher, shared_vocabulary(metaspace_teacher_tokenizer(),
                                                                 byte_level_student_tokenizer()))
    part = signals.rows(slice(2, 5))
    assert part.carried.tolist() == [True, True, False] and part.teacher.logits.squeeze(1).tolist() == [1.0, 2.0]
    picked = signals.rows(torch.tensor([True, True, False, True, False]))
    assert picked.carried.tolist() == [True, False, True] and picked.teacher.logits.squeeze(1).tolist() == [0.0, 2.0]
