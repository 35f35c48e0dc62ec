"""A full disk is said as such ("No space left on <mount point> ..., about N needed"), with no traceback and
nothing half-written left, and a rerun with enough space succeeds.

The outputs go to a real small filesystem (a tmpfs mounted for the test, which needs root); without root the
same paths are driven by a write that fails with ENOSPC.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import VOCAB_SIZE
from tiny_tokenizers import word_level_tokenizer
from train_fixtures import prepared_data, subprocess_env, write_recipe


def wide_teacher(root: Path, hidden_size: int) -> Path:
    """A 4-layer BERT of the given width with a word-level tokenizer (wide enough for its files to be megabytes)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    out = root / f"teacher-{hidden_size}"
    BertForMaskedLM(BertConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, num_hidden_layers=4,
                               num_attention_heads=4, intermediate_size=2 * hidden_size,
                               max_position_embeddings=64)).save_pretrained(out)
    tok = word_level_tokenizer(root / "tok", n_words=VOCAB_SIZE - 5, family="bert")
    AutoTokenizer.from_pretrained(tok).save_pretrained(out)
    return out


def mount_small_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size (as root); unmounted after the test."""
    mounted = []

    def mount(size: str = "2m") -> Path:
        where = tmp_path / f"small-disk-{len(mounted)}"
        if not mount_small_tmpfs(where, size):
            pytest.skip("mounting a small tmpfs needs root (test_disk_full_enospc_is_translated covers the rest)")
        mounted.append(where)
        return where
    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


def test_disk_full_enospc_is_translated(tmp_path):
    """Without a small filesystem: the translation itself, on a write failing with ENOSPC."""
    from distil.disk_space import disk_space_errors, mount_point
    from distil.errors import DistilError

    partial = tmp_path / ".out.tmp-1"
    partial.mkdir()
    (partial / "weights").write_bytes(bytes(3000))
    with pytest.raises(DistilError) as caught:
        with disk_space_errors(partial, needed_bytes=lambda: 5_000_000, partial=partial):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(caught.value).startswith(f"No space left on {mount_point(tmp_path)} (")
    assert f"free) while writing {partial}; about 5.0 MB needed. Nothing half-written was kept." in str(caught.value)
    assert not partial.exists()
    with pytest.raises(DistilError, match=r"; 3.0 KB was written before it filled\."):
        with disk_space_errors(tmp_path):
            (tmp_path / "half").write_bytes(bytes(3000))
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="Permission denied"):  # another failure stays what it is
        with disk_space_errors(tmp_path):
            raise OSError(errno.EACCES, "Permission denied")


def run_distil(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distil", *map(str, args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def assert_disk_full_message(result: subprocess.CompletedProcess, small_disk: Path) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"error: No space left on {small_disk} (" in result.stderr
    assert "Nothing half-written was kept. Free some space there, or choose an output on another filesystem" \
        in result.stderr


def test_disk_full_prepare(tmp_path, small_disk):
    small_disk = small_disk("2m")
    tok = word_level_tokenizer(tmp_path / "tok", n_words=50, family="bert")
    text = tmp_path / "corpus.txt"
    text.write_text("".join(" ".join(f"w{(i + k) % 50}" for k in range(40)) + "\n" for i in range(120_000)))
    result = run_distil("prepare", text, "--tokenizer", tok, "-o", small_disk / "data")
    assert_disk_full_message(result, small_disk)
    assert "MB needed" in result.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == []  # no output, no temporary, no lock
    bigger = tmp_path / "data"
    assert run_distil("prepare", text, "--tokenizer", tok, "-o", bigger).returncode == 0
    assert (bigger / "train.tokens.bin").stat().st_size == 120_000 * 42 * 2  # [CLS] + 40 words + [SEP], uint16


def test_disk_full_init_student(tmp_path, small_disk):
    small_disk = small_disk("2m")
    teacher = wide_teacher(tmp_path, 256)  # the 2-layer student's weights: about 4 MB, twice the filesystem
    result = run_distil("init-student", teacher, "-o", small_disk / "student", "--num-layers", "2")
    assert_disk_full_message(result, small_disk)
    assert "about " in result.stderr and "MB needed" in result.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == []
    bigger = tmp_path / "student"
    assert run_distil("init-student", teacher, "-o", bigger, "--num-layers", "2").returncode == 0
    assert (bigger / "model.safetensors").exists()


def test_disk_full_train_checkpoint(tmp_path, small_disk):
    """student-init (about 2.8 MB) and the checkpoint's weights fit in 8 MB; its optimizer state (twice that) not."""
    small_disk = small_disk("8m")
    root = tmp_path
    teacher = wide_teacher(root, 192)
    data = prepared_data(root, teacher)
    run_dir = small_disk / "run"
    recipe = write_recipe(root / "run.yaml", teacher, data, run_dir,
                          optim={"max_steps": 4}, run={"checkpoint_every": 2})
    result = run_distil("train", recipe)
    assert_disk_full_message(result, small_disk)
    assert f"while writing {run_dir / 'checkpoints'}" in result.stderr and "MB needed" in result.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == []  # no half-written checkpoint
    assert not (small_disk / ".run.lock").exists()
    bigger = root / "run"
    recipe = write_recipe(root / "run-big.yaml", teacher, data, bigger, optim={"max_steps": 4},
                          run={"checkpoint_every": 2})
    assert run_distil("train", recipe).returncode == 0
    assert (bigger / "checkpoints" / "step-00000002" / "state.json").exists()
    assert (bigger / "student" / "model.safetensors").exists()
