"""A teacher-signal store of a masked-LM teacher: each sequence is masked once at cache time (seeded by the store's
seed and the sequence's index), the teacher scores the masked input, and training from the store gives the student
that same masked input and those labels, so the soft targets are the live teacher's on what the student sees."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from distil.config import load_config
from distil.data.dataset import TokenSequences
from distil.errors import DistilError
from distil.teacher_cache import format as fmt
from distil.teacher_cache.reader import TeacherStore
from distil.teacher_cache.writer import cache_teacher
from test_teacher_cache import _recipe
from train_fixtures import prepared_data, teacher_dir

T = 2.0


@pytest.fixture(scope="module")
def mlm_store(tmp_path_factory):
    """(root, BERT teacher, prepared data, store with k = the whole vocabulary): the bucketed loss is then dense."""
    root = tmp_path_factory.mktemp("mlm-store")
    teacher = teacher_dir(root, "bert", num_layers=2)
    data = prepared_data(root, teacher, name="data", n_lines=60)
    store = root / "store"
    cache_teacher(str(teacher), str(data), str(store), top_k=96, temperature=T, shard_size=16, batch_size=5,
                  seed=3, store_format="float16", progress=False)
    return root, teacher, data, store


def _stored_masks(store: TeacherStore, index: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    shard, rows = store.rows_of(index, n)
    return np.asarray(shard["mlm_input"][rows], dtype=np.int64), np.asarray(shard["mlm_target"][rows], dtype=bool)


def test_mlm_store_soft_targets_are_the_teachers_on_the_masked_input(mlm_store):
    """At every target position the stored distribution is the teacher's softmax on the masked input (what a live
    teacher sees beside the student), not on the clean text."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    root, teacher, data, store_dir = mlm_store
    store = TeacherStore(store_dir)
    model = AutoModelForMaskedLM.from_pretrained(teacher).eval()
    mask_id = AutoTokenizer.from_pretrained(teacher).mask_token_id
    seqs = TokenSequences(data, "train")
    sample = (0, 5, 17, len(seqs) - 1)

    def stored_and_teacher(index, ids):
        stored = store.targets([index], [len(ids)])
        dense = torch.full((len(ids), 96), float("nan")).scatter(1, stored.top_ids, stored.top_logp)
        with torch.no_grad():
            return dense, torch.log_softmax(model(input_ids=ids[None]).logits[0] / T, -1)

    # Not the clean text's distribution: at some positions of every sequence it is far from it.
    for index in sample:
        dense, on_clean = stored_and_teacher(index, torch.as_tensor(seqs[index], dtype=torch.long))
        assert (dense - on_clean).abs().max() > 0.05, index

    assert store.manifest["masking"] == {"seed": 3, "mlm_probability": 0.15, "mlm_smoothing": 0.7,
                                         "mask_replace": [0.8, 0.1, 0.1], "per_sequence": True}
    masked_tokens = 0
    for index in sample:
        clean = torch.as_tensor(seqs[index], dtype=torch.long)
        masked, target = (torch.as_tensor(a) for a in _stored_masks(store, index, len(clean)))
        assert target.sum() == int(np.ceil(round(0.15 * len(clean), 6)))  # ceil(p * tokens) per sequence
        assert torch.equal(masked[~target], clean[~target])  # only targets are corrupted
        masked_tokens += int((masked[target] == mask_id).sum())
        # The teacher's distribution on the masked input, at the targets and everywhere else
        dense, on_masked = stored_and_teacher(index, masked)
        torch.testing.assert_close(dense, on_masked, atol=3e-3, rtol=2e-3)
    assert masked_tokens > 0


def _live_and_cached_losses(store_dir, teacher, data, indices, restrict: bool, divergence: str = "forward_kl"):
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    from distil.training.sources.live import LiveTeacher
    from distil.training.sources.store import StoreTeacher
    from distil.training.store_run import StoredMasks
    from distil.training.batches import build_step
    from distil.training.objective import Objective, TermSpec

    store = TeacherStore(store_dir)
    live_teacher = AutoModelForMaskedLM.from_pretrained(teacher).eval()
    torch.manual_seed(0)
    student = BertForMaskedLM(BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)).train()
    seqs = TokenSequences(data, "train")
    masks = StoredMasks(store)
    (batch,) = build_step([seqs[i] for i in indices], 0, "mlm", masks.for_step(indices), None, 0, 1,
                          torch.device("cpu"), indices=indices)
    spec = TermSpec(weights={"ce": 1.0}, temperature=T, objective="mlm", restrict_ce_to_mask=restrict,
                    layer_pairs=[], divergence=divergence)
    live = Objective(spec, LiveTeacher(live_teacher), student)
    cached = Objective(spec, StoreTeacher(store, live_teacher.config), student)
    live_loss, _ = live(student, batch)
    cached_loss, _ = cached(student, batch)
    return batch, live_loss, cached_loss


@pytest.mark.parametrize("restrict", [True, False])
def test_mlm_store_training_loss_equals_the_live_teachers_on_the_same_masks(mlm_store, restrict):
    """The batch built from the store carries its masks; the soft-target loss from the store equals the live
    teacher's on that batch (k = vocabulary: exact up to the store's float16)."""
    root, teacher, data, store_dir = mlm_store
    indices = [3, 40, 11, 27, 0, 8]
    batch, live_loss, cached_loss = _live_and_cached_losses(store_dir, teacher, data, indices, restrict)
    store = TeacherStore(store_dir)
    for row, index in enumerate(indices):
        n = int(batch.attention_mask[row].sum())
        masked, target = _stored_masks(store, index, n)
        assert batch.input_ids[row, :n].tolist() == masked.tolist()
        clean = TokenSequences(data, "train")[index]
        assert batch.labels[row, :n].tolist() == np.where(target, clean, -100).tolist()
    assert batch.step_targets == sum(int(_stored_masks(store, i, len(TokenSequences(data, "train")[i]))[1].sum())
                                     for i in indices)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=2e-4)  # float16 log-probabilities


def test_mlm_store_masks_do_not_depend_on_shard_size_batching_or_process_count(mlm_store, tmp_path):
    root, teacher, data, store_dir = mlm_store
    other = tmp_path / "store-other-shards"
    kwargs = dict(top_k=4, temperature=T, seed=3, progress=False)
    first = cache_teacher(str(teacher), str(data), str(other), shard_size=7, batch_size=2, rank=0, world=2, **kwargs)
    assert first["finished"] is False  # process 0 of 2 wrote shards 0, 2, 4, ...; process 1 writes the others
    finished = cache_teacher(str(teacher), str(data), str(other), shard_size=7, batch_size=2, rank=1, world=2,
                             **kwargs)
    assert finished["finished"]
    a, b = TeacherStore(store_dir), TeacherStore(other)
    lengths = TokenSequences(data, "train").lengths
    for index, n in enumerate(lengths):
        for x, y in zip(_stored_masks(a, index, int(n)), _stored_masks(b, index, int(n))):
            assert np.array_equal(x, y), index
    # another seed gives other masks
    reseeded = tmp_path / "store-seed-4"
    cache_teacher(str(teacher), str(data), str(reseeded), shard_size=16, **{**kwargs, "seed": 4})
    c = TeacherStore(reseeded)
    assert any(not np.array_equal(_stored_masks(a, i, int(n))[1], _stored_masks(c, i, int(n))[1])
               for i, n in enumerate(lengths))


def test_mlm_store_damaged_masks_are_refused(mlm_store, tmp_path):
    root, teacher, data, store_dir = mlm_store
    copy = tmp_path / "damaged"
    shutil.copytree(store_dir, copy)
    path = copy / fmt.shard_name(1) / "mlm_target.npy"
    array = np.load(path, allow_pickle=False)
    array[3] = 1 - array[3]
    np.save(path, array, allow_pickle=False)
    store = TeacherStore(copy)
    store.rows_of(0, 1)  # shard 0 is intact
    with pytest.raises(DistilError, match="masks of shard-00001"):
        store.rows_of(16, 1)


@pytest.mark.parametrize("override, key", [
    ({"mlm_probability": 0.2}, "loss.mlm_probability"),
    ({"mlm_smoothing": 0.0}, "loss.mlm_smoothing"),
    ({"mask_replace": [1.0, 0.0, 0.0]}, "loss.mask_replace"),
])
def test_mlm_store_refuses_a_recipe_with_other_masking(mlm_store, override, key):
    from distil.student import init_student
    from distil.training.loop import train

    root, teacher, data, store_dir = mlm_store
    student = root / "student"
    if not student.exists():
        init_student(str(teacher), str(student), layers=None, num_layers=1)
    recipe = _recipe(root, data, store_dir, student, "run-other-masks", alpha_clm=0.0, alpha_mlm=1.0,
                     restrict_ce_to_mask=True, **override)
    with pytest.raises(DistilError, match=key.replace(".", r"\.")) as raised:
        train(load_config(recipe, ["optim.max_steps=2", "run.overwrite=true"]))
    assert "--" + key.split(".")[1].replace("_", "-") in str(raised.value)
    assert not (root / "run-other-masks" / "metrics.jsonl").exists()


def test_mlm_store_trains_with_its_masks(mlm_store, monkeypatch):
    """A short run from the store: every step's batches carry the stored masked inputs and labels of their
    sequences, never freshly drawn masks."""
    from distil.student import init_student
    from distil.training import loop
    from train_fixtures import train_rows

    root, teacher, data, store_dir = mlm_store
    student = root / "student"
    if not student.exists():
        init_student(str(teacher), str(student), layers=None, num_layers=1)
    seen = []

    def recording_build_step(*args, **kwargs):
        batches = loop_build_step(*args, **kwargs)
        seen.extend(batches)
        return batches

    loop_build_step = loop.build_step
    monkeypatch.setattr(loop, "build_step", recording_build_step)
    recipe = _recipe(root, data, store_dir, student, "run-stored-masks", alpha_clm=0.0, alpha_mlm=1.0,
                     restrict_ce_to_mask=True)
    summary = loop.train(load_config(recipe, ["optim.max_steps=3", "run.overwrite=true", "run.eval_every=0"]))
    rows = train_rows(root / "run-stored-masks")
    assert summary["steps"] == 3 and all(np.isfinite(rows[s]["loss_ce"]) for s in (1, 2, 3))
    store, clean = TeacherStore(store_dir), TokenSequences(data, "train")
    checked = 0
    for batch in seen:
        if batch.sequence_ids is None:  # held-out batches: masked afresh (the store holds the train split)
            continue
        for row, index in enumerate(batch.sequence_ids.tolist()):
            n = int(batch.attention_mask[row].sum())
            masked, target = _stored_masks(store, index, n)
            assert batch.input_ids[row, :n].tolist() == masked.tolist()
            assert batch.labels[row, :n].tolist() == np.where(target, clean[index], -100).tolist()
            checked += 1
    assert checked == 3 * 8


def test_mlm_store_written_without_masks_is_refused(mlm_store, tmp_path):
    """A masked-LM teacher's store that holds clean-text signals (an earlier distil's) would give soft targets for
    another input than the student's: refused at start."""
    import json

    from distil.student import init_student
    from distil.training.loop import train

    root, teacher, data, store_dir = mlm_store
    old = tmp_path / "old-store"
    shutil.copytree(store_dir, old)
    manifest = json.loads((old / fmt.MANIFEST).read_text())
    manifest.pop("masking")
    (old / fmt.MANIFEST).write_text(json.dumps(manifest))
    student = root / "student"
    if not student.exists():
        init_student(str(teacher), str(student), layers=None, num_layers=1)
    recipe = _recipe(tmp_path, data, old, student, "run-old-store", alpha_clm=0.0, restrict_ce_to_mask=True)
    with pytest.raises(DistilError, match="on the clean text"):
        train(load_config(recipe, ["optim.max_steps=2"]))


def test_mlm_store_cli_masking_flags(mlm_store, tmp_path, capsys):
    from distil.cli import main

    root, teacher, data, store_dir = mlm_store
    out = tmp_path / "cli-store"
    code = main(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--output", str(out), "--top-k", "4",
                 "--mlm-probability", "0.3", "--mlm-smoothing", "0", "--mask-replace", "1", "0", "0", "--seed", "5"])
    assert code in (0, None)
    store = TeacherStore(out)
    assert store.manifest["masking"] == {"seed": 5, "mlm_probability": 0.3, "mlm_smoothing": 0.0,
                                         "mask_replace": [1.0, 0.0, 0.0], "per_sequence": True}
    from transformers import AutoTokenizer

    mask_id = AutoTokenizer.from_pretrained(teacher).mask_token_id
    n = len(TokenSequences(data, "train")[0])
    masked, target = _stored_masks(store, 0, n)
    assert target.sum() == int(np.ceil(round(0.3 * n, 6)))
    assert set(masked[target].tolist()) == {mask_id}  # mask_replace 1 0 0: every target is the mask token
    capsys.readouterr()
    code = main(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "--output", str(tmp_path / "bad"),
                 "--mask-replace", "0.5", "0.5", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--mask-replace" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
