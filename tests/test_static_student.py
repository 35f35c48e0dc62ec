"""Static students: the table from the teacher (vocabulary through the teacher, PCA, SIF weights), training on
text, and the export that sentence-transformers and Model2Vec load with the embeddings distil computes."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from distil.errors import DistilError
from distil.static_embedding import encode_static, load_static, sentence_embeddings_from_ids
from distil.static_student import (corpus_probabilities, evaluation_loss, heldout_split, pca_basis, project,
                                   pull_penalty, sif_weights, similarity_loss, static_student, train_table,
                                   zipf_probabilities)
from tiny_tokenizers import word_level_tokenizer

N_WORDS = 40
N_SPECIALS = 5  # [PAD] [UNK] [CLS] [SEP] [MASK]
TEXTS = ["w1 w2 w3", "w4", "w5 w5 w6 w7 w8 w9 w10 w11", "", "w39 w0 w12"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny BERT sentence encoder (mean pooling, L2-normalised) with a word-level tokenizer."""
    from transformers import BertConfig, BertModel

    from distil.sentence_embeddings import SentencePooling, write_sentence_transformers

    directory = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=N_WORDS + N_SPECIALS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    BertModel(config, add_pooling_layer=False).eval().save_pretrained(directory)
    word_level_tokenizer(directory, n_words=N_WORDS, family="bert")
    write_sentence_transformers(directory, SentencePooling("mean", normalize=True, max_seq_length=32), 32)
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(2, 12))) for _ in range(300)]
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(teacher_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "trained"
    summary = static_student(str(teacher_dir), str(out), data=[str(text_file)], dim=8, steps=60, batch_size=32,
                             lr=1e-2, seed=3, heldout_fraction=0, progress=False)
    return out, summary


def test_static_student_sentence_transformers_round_trip(trained):
    from sentence_transformers import SentenceTransformer

    from distil.sentence_embeddings import encode

    out, _ = trained
    texts = TEXTS + ["w3 w77 w4"]  # w77 is no word: sentence-transformers keeps its [UNK] in the mean, as distil does
    ours = encode_static(out, texts)
    theirs = torch.from_numpy(SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_numpy=True))
    assert ours.shape == (len(texts), 8)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(encode(str(out), texts), ours, rtol=0, atol=0)  # what ablation.py scores
    norms = ours.norm(dim=1)
    assert torch.allclose(norms[[0, 1, 2, 4, 5]], torch.ones(5), atol=1e-6) and norms[3] == 0  # "" embeds to 0


def test_static_student_files_as_model2vec_reads_them(trained):
    """The files Model2Vec's loader takes (its own layout, chosen first when config.json exists), read here as it
    reads them: config.json's normalize and max_length, the `embeddings` tensor, one row per tokenizer entry."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    out, _ = trained
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["normalize"] is True and config["max_length"] is None and config["hidden_dim"] == 8
    with safe_open(str(out / "model.safetensors"), framework="numpy") as tensors:
        assert list(tensors.keys()) == ["embeddings"]
        table = tensors.get_tensor("embeddings")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert table.shape == (len(tokenizer.get_vocab()), 8) == (N_WORDS + N_SPECIALS, 8)
    assert tokenizer.truncation is None and tokenizer.padding is None
    modules = json.loads((out / "modules.json").read_text(encoding="utf-8"))
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["StaticEmbedding", "Normalize"]


def test_static_student_model2vec_loads_the_same_embeddings(trained):
    model2vec = pytest.importorskip("model2vec")
    out, _ = trained
    texts = [t for t in TEXTS if t]  # Model2Vec drops [UNK] pieces and embeds "" as 0: texts without either
    loaded = model2vec.StaticModel.from_pretrained(str(out))
    theirs = torch.from_numpy(loaded.encode(texts, use_multiprocessing=False)).float()
    torch.testing.assert_close(theirs, encode_static(out, texts), rtol=0, atol=1e-6)


def test_static_student_mean_of_rows_matches_plain_formulation():
    torch.manual_seed(0)
    table = torch.randn(10, 4)
    ids = [[1, 2, 2], [], [9], [0, 3, 5, 7]]
    for normalize in (False, True):
        got = sentence_embeddings_from_ids(table, ids, normalize)
        for row, sequence in zip(got, ids):
            plain = (table.double()[sequence].sum(0) / len(sequence)) if sequence else torch.zeros(4, dtype=torch.float64)
            if normalize and sequence:
                plain = plain / plain.norm()
            torch.testing.assert_close(row.double(), plain, rtol=0, atol=1e-6)


def test_static_student_pca_hand_computed():
    # Five points on the line (5, 5) + t (1, -2): one component, +-(1, -2)/sqrt(5); its largest loading (-2)
    # is made positive, so the component is (-1, 2)/sqrt(5) and point t projects to -sqrt(5) t.
    t = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    points = torch.tensor([5.0, 5.0], dtype=torch.float64) + t.unsqueeze(1) * torch.tensor([1.0, -2.0],
                                                                                         dtype=torch.float64)
    mean, components = pca_basis(points, 1)
    torch.testing.assert_close(mean, torch.tensor([5.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(components[:, 0], torch.tensor([-1.0, 2.0], dtype=torch.float64) / math.sqrt(5))
    torch.testing.assert_close(project(points, mean, components)[:, 0], -math.sqrt(5) * t)
    # The sign does not follow the input's: the same points reflected give the same component.
    _, again = pca_basis(points.flip(0), 1)
    torch.testing.assert_close(again, components)
    with pytest.raises(DistilError, match="dimension 3"):
        pca_basis(points, 3)


def test_static_student_sif_weights_hand_computed():
    # Zipf over 3 ids: p = (1, 1/2, 1/3) / (11/6); with a = 1/2, a / (a + p) = 11/23, 11/17, 11/15.
    torch.testing.assert_close(zipf_probabilities(3), torch.tensor([6 / 11, 3 / 11, 2 / 11], dtype=torch.float64))
    torch.testing.assert_close(sif_weights(zipf_probabilities(3), 0.5),
                               torch.tensor([11 / 23, 11 / 17, 11 / 15], dtype=torch.float64))
    # Counts (3, 0, 1), add-one smoothed: p = (4, 1, 2) / 7, weights 7/15, 7/9, 7/11.
    probabilities = corpus_probabilities(torch.tensor([3, 0, 1]))
    torch.testing.assert_close(sif_weights(probabilities, 0.5),
                               torch.tensor([7 / 15, 7 / 9, 7 / 11], dtype=torch.float64))


def _pooled_vocabulary(teacher_dir) -> torch.Tensor:
    """The plain formulation: each entry framed [CLS] i [SEP], mean of the teacher's last hidden states."""
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        framed = torch.tensor([[2, i, 3] for i in range(N_WORDS + N_SPECIALS)])  # [CLS] = 2, [SEP] = 3
        return teacher(input_ids=framed).last_hidden_state.double().mean(1)


@pytest.mark.parametrize("normalize_tokens", [False, True])
def test_static_student_untrained_rows_are_the_teachers_token_embeddings(teacher_dir, tmp_path, normalize_tokens):
    """steps 0, no weighting: row i is the PCA projection of the teacher's pooled embedding of [CLS] i [SEP]
    (its norm kept unless normalize_tokens), the PCA fitted on the rows text reaches: [PAD] [CLS] [SEP] [MASK]
    are left out and stored as zeros, [UNK] (id 1) stays."""
    out = tmp_path / "untrained"
    static_student(str(teacher_dir), str(out), dim=6, steps=0, weighting="none", normalize_tokens=normalize_tokens,
                   progress=False)
    pooled = _pooled_vocabulary(teacher_dir)
    if normalize_tokens:
        pooled = torch.nn.functional.normalize(pooled, dim=1)
    kept = [1] + list(range(N_SPECIALS, N_SPECIALS + N_WORDS))
    mean, components = pca_basis(pooled[kept], 6)
    expected = torch.zeros(N_WORDS + N_SPECIALS, 6, dtype=torch.float64)
    expected[kept] = (pooled[kept] - mean) @ components
    torch.testing.assert_close(load_static(out).table.double(), expected, rtol=0, atol=1e-5)
    assert pooled[kept].norm(dim=1).std() > (0 if normalize_tokens else 0.01)  # the norms differ: they matter
    summary = json.loads((out / "static_student.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 0 and summary["training_sequences"] == 0 and summary["excluded_rows"] == 4


def test_static_student_exclude_tokens_leaves_rows_out_of_pca_and_zipf_ranks(teacher_dir, tmp_path):
    """Entries matching --exclude-tokens (w10 .. w19 here) join the special tokens: out of the PCA, zero rows, and
    the Zipf rank counts only the kept entries in id order (41 - 10 = 31 of them: [UNK], w0 .. w9, w20 .. w39)."""
    out = tmp_path / "excluded"
    static_student(str(teacher_dir), str(out), dim=5, steps=0, weighting="zipf", sif_coefficient=0.01,
                   exclude_tokens=r"w1\d", progress=False)
    tokenizer = load_static(out).tokenizer
    excluded = sorted(tokenizer.token_to_id(f"w{n}") for n in range(10, 20))
    kept = [i for i in range(N_WORDS + N_SPECIALS) if i not in excluded and i not in (0, 2, 3, 4)]
    assert len(kept) == 31
    pooled = _pooled_vocabulary(teacher_dir)
    mean, components = pca_basis(pooled[kept], 5)
    harmonic = sum(1 / r for r in range(1, 32))
    weights = torch.tensor([0.01 / (0.01 + 1 / (r * harmonic)) for r in range(1, 32)], dtype=torch.float64)
    expected = torch.zeros(N_WORDS + N_SPECIALS, 5, dtype=torch.float64)
    expected[kept] = (pooled[kept] - mean) @ components * weights.unsqueeze(1)
    torch.testing.assert_close(load_static(out).table.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(DistilError, match="no regular expression"):
        static_student(str(teacher_dir), str(tmp_path / "bad"), dim=5, steps=0, exclude_tokens="[", progress=False)
    with pytest.raises(DistilError, match="fewer than two"):
        static_student(str(teacher_dir), str(tmp_path / "all"), dim=5, steps=0, exclude_tokens=".*", progress=False)


def test_static_student_training_lowers_loss_and_is_deterministic(teacher_dir, text_file, trained, tmp_path):
    out, summary = trained
    assert summary["loss_after"] < 0.6 * summary["loss_before"], summary  # 0.52 -> 0.27 when written
    again = tmp_path / "again"
    static_student(str(teacher_dir), str(again), data=[str(text_file)], dim=8, steps=60, batch_size=32, lr=1e-2,
                   seed=3, heldout_fraction=0, progress=False)
    assert torch.equal(load_static(again).table, load_static(out).table)
    other = tmp_path / "other-seed"
    static_student(str(teacher_dir), str(other), data=[str(text_file)], dim=8, steps=60, batch_size=32, lr=1e-2,
                   seed=4, heldout_fraction=0, progress=False)
    assert not torch.equal(load_static(other).table, load_static(out).table)


def test_static_student_cli_refuses_overwrite_and_bad_input(teacher_dir, text_file, tmp_path, capsys):
    from distil.cli import main

    out = tmp_path / "cli"
    args = ["static-student", str(teacher_dir), "--data", str(text_file), "--dim", "4", "--steps", "5",
            "--batch-size", "16", "-o", str(out)]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["dim"] == 4
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(["static-student", str(teacher_dir), "--steps", "5", "-o", str(tmp_path / "no-data")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["static-student", str(teacher_dir), "--steps", "0", "--dim", "64", "-o", str(tmp_path / "wide")]) == 2
    assert "--dim between 1 and 32" in capsys.readouterr().err


def test_static_student_pull_penalty_hand_computed():
    # initial rows (3, 4) and (0, 0): |initial|^2 = 25; the table moved by (1, 0) and (0, 2): 1 + 4 = 5, 5 / 25.
    initial = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    moved = initial + torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert pull_penalty(moved, initial).item() == pytest.approx(0.2, abs=1e-7)
    assert pull_penalty(initial, initial).item() == 0.0


def test_static_student_pull_keeps_the_table_near_the_distilled_one():
    """The same batches with and without a strong pull: the pulled table moves far less, and with pull 0 the
    loss is the plain cosine loss (the run equals one without the pull argument)."""
    torch.manual_seed(0)
    table = torch.randn(20, 4)
    ids = [[int(i) for i in torch.randint(0, 20, (5,))] for _ in range(64)]
    targets = torch.randn(64, 4)
    free, _ = train_table(table, ids, targets, steps=40, batch_size=16, lr=0.05, seed=1, progress=False)
    plain, _ = train_table(table, ids, targets, steps=40, batch_size=16, lr=0.05, seed=1, progress=False, pull=0.0)
    pulled, _ = train_table(table, ids, targets, steps=40, batch_size=16, lr=0.05, seed=1, progress=False, pull=100.0)
    assert torch.equal(free, plain)
    assert pull_penalty(pulled, table) < 0.2 * pull_penalty(free, table)


def test_static_student_heldout_early_stop_keeps_the_best_table():
    """Held-out texts whose teacher embeddings are the initial table's own: agreement 1 at step 0, which no step
    can beat, so training stops after `patience` measurements and returns the initial table unchanged."""
    torch.manual_seed(0)
    table = torch.randn(20, 4)
    ids = [[int(i) for i in torch.randint(0, 20, (5,))] for _ in range(64)]
    heldout = [[int(i) for i in torch.randint(0, 20, (4,))] for _ in range(12)]
    teacher = sentence_embeddings_from_ids(table, heldout, normalize=False)
    best, history = train_table(table, ids, torch.randn(64, 4), steps=1000, batch_size=16, lr=0.05, seed=1,
                                progress=False, log_every=1000, heldout_ids=heldout, heldout_teacher=teacher,
                                eval_every=5, patience=3)
    assert torch.equal(best, table)
    assert [h["step"] for h in history] == [0, 5, 10, 15]  # measured at 0, then 3 measurements without a gain
    assert history[0]["heldout_agreement"] == pytest.approx(1.0)
    assert all(h["heldout_agreement"] < 1.0 for h in history[1:])
    with pytest.raises(DistilError, match="--batch-size 2"):  # one text a batch: no pair to compare
        train_table(table, ids, torch.randn(64, 4), steps=5, batch_size=1, lr=0.05, seed=1, progress=False,
                    objective="similarity")


def test_static_student_heldout_split_every_kth():
    assert heldout_split(10, 0.25) == ([0, 1, 2, 4, 5, 6, 8, 9], [3, 7])
    assert heldout_split(3, 0.0) == ([0, 1, 2], [])


def test_static_student_similarity_loss_hand_computed():
    # Student sentences (1, 0), (0, 1), (1, 1): cosines 0, 1/sqrt2, 1/sqrt2. Teacher (2, 0), (1, 0), (0, 3): cosines
    # 1, 0, 0. Squared differences 1, 1/2, 1/2 over each ordered pair: 2 * 2 / (3 * 2) = 2/3.
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # any width
    assert similarity_loss(table, [[0], [1], [2]], teacher).item() == pytest.approx(2 / 3, abs=1e-6)
    # A sentence of two rows is their mean: [0, 1] -> (1/2, 1/2), the direction of (1, 1).
    assert similarity_loss(table, [[0], [1], [0, 1]], teacher).item() == pytest.approx(2 / 3, abs=1e-6)
    assert similarity_loss(table, [[2]], teacher[:1]).item() == 0.0  # one text: no pair


def test_static_student_similarity_loss_matches_plain_formulation():
    torch.manual_seed(0)
    table = torch.randn(12, 5, dtype=torch.float64)
    ids = [[1, 2], [3], [4, 5, 6], [0, 11, 11], [7]]
    teacher = torch.randn(5, 9, dtype=torch.float64)
    total = 0.0
    for i in range(5):
        for j in range(5):
            if i != j:
                a, b = table[ids[i]].mean(0), table[ids[j]].mean(0)
                total += (float(a @ b / (a.norm() * b.norm()))
                          - float(teacher[i] @ teacher[j] / (teacher[i].norm() * teacher[j].norm()))) ** 2
    assert similarity_loss(table, ids, teacher).item() == pytest.approx(total / 20, abs=1e-12)


@pytest.mark.parametrize("objective", ["similarity", "cosine"])
def test_static_student_training_lowers_each_objective(objective):
    torch.manual_seed(0)
    table = torch.randn(30, 6)
    ids = [[int(i) for i in torch.randint(0, 30, (4,))] for _ in range(128)]
    targets = torch.randn(128, 6)
    before = evaluation_loss(table, ids, targets, objective=objective)
    trained, _ = train_table(table, ids, targets, steps=150, batch_size=32, lr=0.05, seed=0, progress=False,
                             objective=objective)
    # 0.357 -> 0.270 (similarity: 128 random texts' pairs fit by 30 rows only in part), 1.047 -> 0.486 (cosine)
    assert evaluation_loss(trained, ids, targets, objective=objective) < 0.8 * before


def test_static_student_cli_exclude_tokens_and_normalize_tokens(teacher_dir, tmp_path, capsys):
    from distil.cli import main

    def excluded(*flags):
        out = tmp_path / f"cli-{len(list(tmp_path.iterdir()))}"
        assert main(["static-student", str(teacher_dir), "--steps", "0", "--dim", "4", "-o", str(out), *flags]) == 0
        summary = json.loads(capsys.readouterr().out)
        return summary["excluded_rows"], summary["normalize_tokens"]

    assert excluded() == (4, False)                        # [PAD] [CLS] [SEP] [MASK]; no [unusedN] here
    assert excluded("--exclude-tokens", r"w1\d") == (14, False)  # and w10 .. w19
    assert excluded("--exclude-tokens", "", "--normalize-tokens") == (4, True)
