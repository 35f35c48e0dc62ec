"""The teacher-signal store's formats (float16, compact, packed, packed4): each one's round trip (ids exact, log-
probabilities within the format's quantisation bound), its KL to the dense distribution, its bytes per token, the
refusal of a shard that does not match the manifest, and stores written before the packed formats still reading."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from distil.cli import build_parser
from distil.errors import DistilError
from distil.teacher_cache import DEFAULT_STORE_FORMAT
from distil.teacher_cache import format as fmt
from distil.teacher_cache import packing
from distil.teacher_cache.reader import TeacherStore, sparse_targets
from distil.teacher_cache.signals import sequence_generator, sparse_signals
from distil.teacher_cache.writer import cache_teacher
from train_fixtures import prepared_data, teacher_dir


def zipf_logits(rows: int, vocab: int, s: float = 1.35, seed: int = 0) -> torch.Tensor:
    """A language model's kind of distribution: Zipf-like probabilities (rest mass ~0.14 outside the top 128 at
    s = 1.35 over 50,000 ids, as SmolLM2 on English text), noisy, on a different random order of ids per row."""
    gen = torch.Generator().manual_seed(seed)
    ranked = -s * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64)) + 0.3 * torch.randn(rows, vocab,
                                                                                                  generator=gen,
                                                                                                  dtype=torch.float64)
    order = torch.argsort(torch.rand(rows, vocab, generator=gen), dim=1)
    return torch.empty_like(ranked).scatter_(1, order, ranked).float()


def encoded(layout: fmt.StoreLayout, logits: torch.Tensor, T: float = 1.0, seed: int = 0):
    s = sparse_signals(logits, layout.k, T, layout.sampled, sequence_generator(seed, 0), layout.proposal_temperature)
    arrays = fmt.encode_signals(layout, s.top_ids.numpy(), s.top_logp.numpy(), s.log_rest.numpy(),
                                s.sample_ids.numpy(), s.sample_logp.numpy(), s.sample_logw.numpy())
    return s, arrays


def bucket_kl(logits: torch.Tensor, targets, T: float = 1.0) -> torch.Tensor:
    """KL(dense || stored) over the k+1 buckets, per position, in float64."""
    logp = torch.log_softmax(logits.double() / T, dim=-1)
    top = logp.gather(1, targets.top_ids)
    rest = torch.logsumexp(logp.scatter(1, targets.top_ids, float("-inf")), dim=-1)
    dense = torch.cat([top, rest[:, None]], 1)
    stored = torch.cat([targets.top_logp.double(), targets.log_rest.double()[:, None]], 1)
    return (dense.exp() * (dense - stored)).sum(1)


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 12, 16, 17])
def test_store_format_bit_packing_round_trips_and_matches_the_plain_layout(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=(5, 13))
    values[0, 0], values[1, 1] = (1 << bits) - 1, 0   # the extremes
    packed = packing.pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.shape == (5, packing.packed_width(13, bits))
    np.testing.assert_array_equal(packing.unpack_bits(packed, 13, bits), values)
    # the plain layout: bit j of value i is bit i * bits + j of the row, little-endian (the 8/16-bit fast paths too)
    plain_bits = [[(int(v) >> j) & 1 for v in row for j in range(bits)] for row in values]
    np.testing.assert_array_equal(packed, np.packbits(np.array(plain_bits, dtype=np.uint8), axis=1,
                                                      bitorder="little"))


@pytest.mark.parametrize("count,universe", [(1, 2), (1, 96), (6, 96), (32, 49_152), (128, 49_152), (32, 128_256),
                                            (40, 40)])
def test_store_format_elias_fano_round_trips_sorted_sets(count, universe):
    rng = np.random.default_rng(count)
    rows = [np.sort(rng.choice(universe, count, replace=False)) for _ in range(6)]
    rows.append(np.full(count, universe - 1))              # the largest id, repeated (draws repeat)
    rows.append(np.zeros(count, dtype=np.int64))
    values = np.stack(rows)
    packed = packing.elias_fano_pack(values, universe)
    assert packed.shape == (8, packing.elias_fano_width(count, universe))
    np.testing.assert_array_equal(packing.elias_fano_unpack(packed, count, universe), values)
    low, high = packing.elias_fano_bits(count, universe)
    assert count * low + high <= count * (2 + max(0.0, math.log2(universe / count))) + 1


def by_id(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=1)
    return ids.gather(1, order), values.gather(1, order)


@pytest.mark.parametrize("vocab", [50_000, 128_256])
@pytest.mark.parametrize("store_format", fmt.STORE_FORMATS)
@pytest.mark.parametrize("k,sampled", [(128, 0), (32, 8), (1, 2)])
def test_store_format_round_trip(store_format, k, sampled, vocab):
    """encode -> decode: ids exact; log-probabilities within the format's bound; the draws' weights as drawn."""
    layout = fmt.StoreLayout(fmt.store_format_for(store_format, k), k, sampled, vocab, fmt.ids_dtype(vocab).str)
    logits = zipf_logits(40, vocab, seed=k)
    signals, arrays = encoded(layout, logits)
    assert set(arrays) == set(layout.arrays())
    for name, (shape, dtype) in layout.arrays().items():
        assert arrays[name].dtype == dtype and arrays[name].shape == (40, *shape), name
    got = fmt.decode_signals(arrays, layout)
    want, decoded = signals.top_logp, got["top_logp"]
    if layout.store_format != "compact":   # (compact's fitted curve need not join its head monotonically)
        assert torch.all(decoded[:, 1:] <= decoded[:, :-1])   # by decreasing probability
    if layout.sorted_ids:   # a set, in the order of the decoded log-probabilities (equal codes: any order)
        (ids, decoded), (want_ids, want) = by_id(got["top_ids"], decoded), by_id(signals.top_ids, want)
        assert torch.equal(ids, want_ids)
    else:
        assert torch.equal(got["top_ids"], signals.top_ids)
    if layout.packed:
        steps = np.asarray(arrays["logp_scale"], dtype=np.float32)
        levels = (1 << fmt.PACKED_LOGPROB_BITS[store_format]) - 1
        anchor, top = steps[:, 0], want.max(1).values.numpy()
        assert np.all((anchor >= top) & (anchor - top <= np.abs(top) * 2**-10 + 1e-7))  # float16, rounded up
        spread = anchor - want.min(1).values.numpy()
        assert np.all(steps[:, 1] <= spread / levels * (1 + 2**-10) + 1e-7)   # the step is the range's
        bound = torch.from_numpy(packing.quantisation_bound(steps[:, 1]))[:, None]
        assert torch.all((decoded - want).abs() <= bound + 1e-5)
    elif layout.store_format == "float16":
        assert torch.all((decoded - want).abs() <= want.abs() * 2**-11 + 1e-7)
    else:  # compact: the head in float16, a fitted curve through the rest (its KL is bounded below)
        assert torch.all((decoded[:, :8] - want[:, :8]).abs() <= want[:, :8].abs() * 2**-11 + 1e-7)
    log_rest = np.asarray(arrays["log_rest"], dtype=np.float32)
    assert np.allclose(got["log_rest"].numpy(), signals.log_rest.numpy(), rtol=2**-11, atol=0)
    if not sampled:
        assert got["sample_ids"] is None and got["sample_logw"] is None
        return
    assert torch.equal(got["sample_ids"], signals.sample_ids)
    if layout.packed:
        bound = torch.from_numpy(packing.quantisation_bound(steps[:, 2]))[:, None]
        assert torch.all((got["sample_logp"] - signals.sample_logp).abs() <= bound + 1e-5)
        # not stored: with the tail itself as proposal every weight is R / k'
        assert "sample_logw" not in arrays
        torch.testing.assert_close(got["sample_logw"], torch.from_numpy(log_rest)[:, None].expand(-1, sampled)
                                   - math.log(sampled))
    else:
        torch.testing.assert_close(got["sample_logp"], signals.sample_logp, rtol=2**-10, atol=1e-6)
    torch.testing.assert_close(got["sample_logw"], signals.sample_logw, rtol=2**-10, atol=1e-6)


@pytest.mark.parametrize("store_format,limit", [("float16", 1e-5), ("compact", 5e-3), ("packed", 3e-4),
                                                ("packed4", 3e-2)])
def test_store_format_kl_bound(store_format, limit):
    """KL(dense || stored) over the k+1 buckets on a realistic distribution, as training reads it (renormalised):
    below the format's stated figure, and for the packed formats below the tilt bound s^2 / 8 at every position."""
    layout = fmt.StoreLayout(store_format, 128, 0, 50_000, "<u2")
    logits = zipf_logits(64, 50_000, seed=1)
    _, arrays = encoded(layout, logits)
    kl = bucket_kl(logits, sparse_targets(arrays, layout))
    assert kl.min() >= -1e-9
    assert kl.mean() < limit
    if layout.packed:
        steps = torch.from_numpy(np.asarray(arrays["logp_scale"][:, 1], dtype=np.float64))
        assert torch.all(kl <= steps**2 / 8 + 1e-6)
    if store_format == "packed":   # 8 bits cost far less than compact's fitted curve
        compact = fmt.StoreLayout("compact", 128, 0, 50_000, "<u2")
        assert kl.mean() * 5 < bucket_kl(logits, sparse_targets(encoded(compact, logits)[1], compact)).mean()


def test_store_format_kl_bound_extremes():
    """A confident teacher (one token holds ~all the mass) and a flat one: the packed codes stay within bound."""
    layout = fmt.StoreLayout("packed", 16, 4, 1000, "<u2")
    confident = torch.zeros(3, 1000)
    confident[:, 7] = 60.0
    flat = torch.zeros(3, 1000)
    for logits in (confident, flat):
        signals, arrays = encoded(layout, logits)
        targets = sparse_targets(arrays, layout)
        assert torch.all(torch.isfinite(targets.top_logp)) and torch.all(torch.isfinite(targets.sample_logw))
        assert bucket_kl(logits, targets).abs().max() < 1e-6
        assert torch.equal(by_id(targets.top_ids, targets.top_logp)[0], signals.top_ids.sort(dim=1).values)


def test_store_format_bytes_per_token_as_designed():
    """Signal bytes per position: ids in ceil(log2 V) bits, one byte (packed) or half (packed4) per log-probability,
    the anchor and steps in float16, the rest mass in float16, draws' weights recomputed rather than stored."""
    def size(name, k, sampled, vocab=49_152, proposal_temperature=1.0):
        return fmt.StoreLayout(name, k, sampled, vocab, fmt.ids_dtype(vocab).str, proposal_temperature) \
            .bytes_per_position()

    assert size("float16", 128, 0) == 128 * 2 + 128 * 2 + 2 == 514
    assert size("compact", 128, 0) == 128 * 2 + 8 * 2 + 4 * 4 + 2 == 290
    # top-k ids as a sorted set: k l low bits (l = floor(log2(V / k))) and k + (V - 1 >> l) + 1 high bits
    assert packing.elias_fano_width(128, 49_152) == 128 * 8 // 8 + (128 + 192 + 7) // 8 == 168
    assert packing.elias_fano_width(32, 49_152) == 32 * 10 // 8 + (32 + 48 + 7) // 8 == 50
    assert size("packed", 128, 0) == 168 + 128 + 4 + 2 == 302
    assert size("packed", 32, 0) == 50 + 32 + 4 + 2 == 88
    assert size("packed", 32, 8) == 50 + 32 + 6 + 2 + 16 + 8 == 114
    assert size("packed4", 32, 8) == 50 + 16 + 6 + 2 + 16 + 4 == 94
    assert size("packed", 24, 8) == (24 * 11 // 8 + 6) + 24 + 6 + 2 + 16 + 8 == 95
    assert size("packed", 32, 8, proposal_temperature=2.0) == 114 + 8 * 2   # weights stored in float16
    # k = 1: a sorted set is no smaller than one 16-bit id
    assert not fmt.StoreLayout("packed", 1, 0, 49_152, "<u2").sorted_ids and size("packed", 1, 0) == 2 + 1 + 4 + 2
    # a 128k vocabulary, where the unpacked formats need int32 ids
    assert size("packed", 32, 0, vocab=128_256) == (32 * 11 // 8 + (32 + 63 + 7) // 8) + 32 + 4 + 2 == 94
    assert size("float16", 32, 0, vocab=128_256) == 32 * 4 + 32 * 2 + 2


# --- through files ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_format")
    teacher = teacher_dir(root, "gpt2", num_layers=2)
    data = prepared_data(root, teacher, name="data", n_lines=60, heldout=0.1)
    return root, teacher, data


def _dense(teacher, data, index):
    from transformers import AutoModelForCausalLM

    from distil.data.dataset import TokenSequences

    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    ids = torch.as_tensor(TokenSequences(data, "train")[index]).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


@pytest.mark.parametrize("store_format,proposal_temperature", [("packed", 1.0), ("packed4", 1.0), ("packed", 2.0)])
def test_store_format_store_reads_what_was_encoded(workspace, store_format, proposal_temperature):
    """cache-teacher --format: the store's targets are those of the teacher's signals encoded in memory; the
    manifest names the format and its bytes per token are the layout's plus file headers."""
    root, teacher, data = workspace
    out = root / f"store-{store_format}-{proposal_temperature}"
    m = cache_teacher(str(teacher), str(data), str(out), top_k=6, sampled=3, temperature=2.0, shard_size=16,
                      store_format=store_format, proposal_temperature=proposal_temperature, progress=False)
    layout = fmt.layout_of(m)
    assert m["store_format"] == store_format and m["format_version"] == fmt.FORMAT_VERSION
    assert packing.id_bits(m["vocab_size"]) == 7 and layout.sorted_ids   # 96 tokens: bit by bit, and a sorted set
    assert layout.bytes_per_position() <= m["signal_bytes_per_token"] <= layout.bytes_per_position() + 8
    store = TeacherStore(out)
    for index in (0, 21):
        logits = _dense(teacher, data, index)
        s = sparse_signals(logits, 6, 2.0, 3, sequence_generator(0, index), proposal_temperature)
        arrays = fmt.encode_signals(layout, s.top_ids.numpy(), s.top_logp.numpy(), s.log_rest.numpy(),
                                    s.sample_ids.numpy(), s.sample_logp.numpy(), s.sample_logw.numpy())
        want, got = sparse_targets(arrays, layout), store.targets([index], [logits.shape[0]])
        for name in ("top_ids", "top_logp", "log_rest", "sample_ids", "sample_logp", "sample_logw"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
        assert torch.equal(got.top_ids.sort(dim=1).values, logits.topk(6, dim=-1).indices.sort(dim=1).values)


def test_store_format_command_line_flag(workspace, capsys):
    from distil.cli import main

    root, teacher, data = workspace
    out = root / "store-cli"
    assert main(["cache-teacher", "--teacher", str(teacher), "--data", str(data), "-o", str(out), "--top-k", "5",
                 "--format", "packed4", "--shard-size", "64"]) == 0
    assert json.loads((out / fmt.MANIFEST).read_text())["store_format"] == "packed4"
    assert TeacherStore(out).targets([2], [4]).top_ids.shape == (4, 5)
    args = build_parser().parse_args(["cache-teacher", "--teacher", "t", "--data", "d", "-o", "o", "--format",
                                      "packed"])
    assert args.store_format == "packed"
    old = build_parser().parse_args(["cache-teacher", "--teacher", "t", "--data", "d", "-o", "o", "--logprobs",
                                     "compact"])
    assert old.store_format == "compact"
    assert build_parser().parse_args(["cache-teacher", "--teacher", "t", "--data", "d", "-o", "o"]).store_format \
        == DEFAULT_STORE_FORMAT


def test_store_format_refuses_a_corrupt_or_mismatched_shard(workspace, tmp_path):
    root, teacher, data = workspace
    packed, packed4 = root / "store-packed-1.0", root / "store-packed4-1.0"
    for source in (packed, packed4):
        if not (source / fmt.MANIFEST).exists():
            cache_teacher(str(teacher), str(data), str(source), top_k=6, sampled=3, temperature=2.0, shard_size=16,
                          store_format=source.name.split("-")[1], progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(packed, mixed)
    shutil.copy2(packed4 / "shard-00000" / "top_logp_codes.npy", mixed / "shard-00000" / "top_logp_codes.npy")
    store = TeacherStore(mixed)
    with pytest.raises(DistilError, match="does not match its manifest.*top_logp_codes"):
        store.targets([0], [3])
    store.targets([16], [3])   # the other shards are intact
    cut = tmp_path / "cut"
    shutil.copytree(packed, cut)
    path = cut / "shard-00001" / "top_ids_sorted.npy"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DistilError, match="damaged: shard-00001 cannot be read"):
        TeacherStore(cut).targets([16], [3])
    renamed = tmp_path / "renamed"
    shutil.copytree(packed, renamed)
    manifest = json.loads((renamed / fmt.MANIFEST).read_text())
    manifest["store_format"] = "packed3"
    (renamed / fmt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DistilError, match="format 'packed3', which this distil does not know"):
        TeacherStore(renamed)


@pytest.mark.parametrize("store_format", ["float16", "compact"])
def test_store_format_store_of_format_version_1_still_reads(workspace, tmp_path, store_format):
    """A store written before the packed formats (format_version 1, the format under `logprobs`, the same arrays)
    reads as it did."""
    root, teacher, data = workspace
    new = tmp_path / "new"
    cache_teacher(str(teacher), str(data), str(new), top_k=24, sampled=2, temperature=2.0, shard_size=16,
                  store_format=store_format, progress=False)
    old = tmp_path / "old"
    shutil.copytree(new, old)
    manifest = json.loads((old / fmt.MANIFEST).read_text())
    manifest["format_version"] = 1
    manifest["logprobs"] = manifest.pop("store_format")
    (old / fmt.MANIFEST).write_text(json.dumps(manifest))
    assert TeacherStore(old).store_format == store_format
    a, b = TeacherStore(new).targets([3, 20], [5, 7]), TeacherStore(old).targets([3, 20], [5, 7])
    for name in ("top_ids", "top_logp", "log_rest", "sample_ids", "sample_logp", "sample_logw"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert TeacherStore(old).targets([], []).top_logp.shape == (0, 24)
