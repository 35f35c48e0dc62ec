"""Dynamic MLM masking: exact target counts, statistics over many seeded draws, and determinism."""

from __future__ import annotations

import pytest
import torch

from distil.data.masking import MLMMasker, causal_lm_labels, mask_probabilities

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIAL = [PAD, CLS, SEP, MASK, UNK]
VOCAB = 100


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform_masker(**kwargs) -> MLMMasker:
    probs = mask_probabilities([1] * VOCAB, SPECIAL, smoothing=0.0)
    return MLMMasker(probs, MASK, SPECIAL, VOCAB, **kwargs)


def bert_batch(lengths: list[int], max_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] w ... w [SEP] [PAD]...; padded slots hold ordinary ids so only the attention mask
    marks them as padding."""
    g = gen(seed)
    ids = torch.randint(len(SPECIAL), VOCAB, (len(lengths), max_len), generator=g)
    attention = torch.zeros(len(lengths), max_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        attention[row, :n] = 1
        ids[row, 0] = CLS
        ids[row, n - 1] = SEP
    return ids, attention


# --- mask_probabilities --------------------------------------------------------------------------


def test_mask_probabilities_by_hand():
    # smoothing 1/3: weights max(c, 1) ** (-1/3) for counts [5, 1, 8, 27, 0] -> [-, 1, 1/2, 1/3, 1]
    # (id 0 is special -> 0; the unseen id 4 counts as seen once).  Sum 17/6, so p = [0, 6, 3, 2, 6] / 17.
    p = mask_probabilities([5, 1, 8, 27, 0], special_ids=[0], smoothing=1 / 3)
    assert p.dtype == torch.float32
    assert torch.allclose(p, torch.tensor([0, 6, 3, 2, 6]) / 17, atol=1e-7)


def test_mask_probabilities_default_smoothing_and_uniform():
    p = mask_probabilities([0, 27, 1000, 7], special_ids=[0])
    assert (p[1] / p[2]).item() == pytest.approx((1000 / 27) ** 0.7, rel=1e-5)
    assert p.sum().item() == pytest.approx(1.0)
    uniform = mask_probabilities([0, 27, 1000, 7], special_ids=[0, 3], smoothing=0.0)
    assert torch.allclose(uniform, torch.tensor([0.0, 0.5, 0.5, 0.0]))


def test_mask_probabilities_rejects_bad_input():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mask_probabilities([1, 2], special_ids=[5])
    with pytest.raises(ValueError, match="every token is special"):
        mask_probabilities([1, 2], special_ids=[0, 1])
    with pytest.raises(ValueError, match="smoothing"):
        mask_probabilities([1, 2], special_ids=[], smoothing=-1.0)


# --- target selection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths, expected",
    [
        ([12, 9, 10, 6], 6),  # 37 real tokens: ceil(5.55) = 6
        ([25, 25, 25, 25], 15),  # 100 real tokens: exactly 15 (0.15 * 100 is 15.000000000000002 in floats)
        ([3], 1),  # 0.45 -> 1
    ],
)
def test_target_count_is_ceil_of_share_of_real_tokens(lengths, expected):
    masker = uniform_masker()
    ids, attention = bert_batch(lengths, max_len=25)
    for seed in range(30):
        _, labels = masker(ids, attention, gen(seed))
        assert int((labels != -100).sum()) == expected


def test_all_eligible_taken_when_fewer_than_targets():
    # mlm_probability 1.0 asks for every real token, but [CLS]/[SEP] cannot be targets:
    # exactly the real non-special positions are taken.
    masker = uniform_masker(mlm_probability=1.0)
    ids, attention = bert_batch([8, 5, 3], max_len=8)
    _, labels = masker(ids, attention, gen(0))
    eligible = (attention == 1) & (ids != CLS) & (ids != SEP)
    assert torch.equal(labels != -100, eligible)


def test_no_real_tokens_gives_no_targets():
    masker = uniform_masker()
    ids = torch.full((2, 4), PAD)
    masked, labels = masker(ids, torch.zeros(2, 4, dtype=torch.long), gen(0))
    assert torch.equal(masked, ids)
    assert bool((labels == -100).all())


def test_special_and_pad_positions_never_targeted():
    # token_probs deliberately gives special ids weight: the masker must zero them itself.
    raw = torch.full((VOCAB,), 1.0 / VOCAB)
    masker = MLMMasker(raw, MASK, SPECIAL, VOCAB, mlm_probability=0.4)
    ids, attention = bert_batch([20, 13, 7, 2], max_len=20, seed=3)
    ids[1, 5] = UNK  # a special id inside real text
    touched = torch.zeros_like(ids, dtype=torch.bool)
    for seed in range(300):
        masked, labels = masker(ids, attention, gen(seed))
        targeted = labels != -100
        assert not bool(targeted[attention == 0].any())
        assert not bool(torch.isin(ids[targeted], torch.tensor(SPECIAL)).any())
        assert torch.equal(masked[~targeted], ids[~targeted])  # nothing else changes
        touched |= targeted
    # ...while every eligible position does get its turn.
    eligible = (attention == 1) & ~torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(touched, eligible)


def test_labels_hold_original_ids_at_targets():
    masker = uniform_masker()
    ids, attention = bert_batch([25, 18, 11], max_len=25, seed=7)
    for seed in range(20):
        masked, labels = masker(ids, attention, gen(seed))
        targeted = labels != -100
        assert torch.equal(labels[targeted], ids[targeted])
        assert bool((labels[~targeted] == -100).all())
        assert masked.shape == ids.shape and masked.dtype == ids.dtype


# --- corruption of targets -----------------------------------------------------------------------


def test_mask_keep_random_split_is_80_10_10():
    masker = uniform_masker()
    ids, attention = bert_batch([128] * 64, max_len=128, seed=11)  # 8192 real tokens -> 1229 targets
    counts = torch.zeros(3)
    for seed in range(16):  # ~19.7k targets
        masked, labels = masker(ids, attention, gen(seed))
        targeted = labels != -100
        new, old = masked[targeted], ids[targeted]
        is_mask = new == MASK
        is_keep = new == old
        counts += torch.tensor([is_mask.sum(), is_keep.sum(), (~is_mask & ~is_keep).sum()])
    share = counts / counts.sum()
    # A random replacement equals the original with probability 1/95: keep 0.101, random 0.099.
    # Standard errors are about 0.003 / 0.002 at this sample size; the tolerances are ~5 sigma.
    assert share[0].item() == pytest.approx(0.8, abs=0.015)
    assert share[1].item() == pytest.approx(0.1, abs=0.01)
    assert share[2].item() == pytest.approx(0.1, abs=0.01)


def test_random_replacements_are_uniform_over_non_special_tokens():
    masker = uniform_masker(mask_replace=(0.0, 0.0, 1.0))
    ids, attention = bert_batch([128] * 64, max_len=128, seed=5)
    drawn = []
    for seed in range(16):
        masked, labels = masker(ids, attention, gen(seed))
        drawn.append(masked[labels != -100])
    drawn = torch.cat(drawn)
    histogram = torch.bincount(drawn, minlength=VOCAB)
    assert int(histogram[SPECIAL].sum()) == 0
    # 95 non-special ids, ~19.7k draws: ~207 each (sd ~14); all well inside [120, 300].
    assert int(histogram[len(SPECIAL):].min()) > 120
    assert int(histogram[len(SPECIAL):].max()) < 300


# --- frequency smoothing -------------------------------------------------------------------------


def per_occurrence_rates(smoothing: float) -> tuple[float, float]:
    """Mask rate of a rare token (count 100) and a frequent one (count 1000), each filling half of
    a batch. A low mlm_probability keeps sampling without replacement close to weighted sampling."""
    rare, frequent = 10, 11
    counts = [1000] * VOCAB
    counts[rare] = 100
    probs = mask_probabilities(counts, SPECIAL, smoothing=smoothing)
    masker = MLMMasker(probs, MASK, SPECIAL, VOCAB, mlm_probability=0.02)
    ids = torch.tensor([rare, frequent]).repeat(64, 64)  # (64, 128), alternating
    attention = torch.ones_like(ids)
    hits = torch.zeros(2)
    for seed in range(40):
        _, labels = masker(ids, attention, gen(seed))
        hits += torch.tensor([(labels == rare).sum(), (labels == frequent).sum()])
    occurrences = 40 * ids.numel() / 2
    return (hits[0] / occurrences).item(), (hits[1] / occurrences).item()


def test_smoothing_masks_rare_tokens_more_often():
    rare_rate, frequent_rate = per_occurrence_rates(0.7)
    # Weight ratio (1000 / 100) ** 0.7 = 5.01; ~6.5k targets, so the ratio is known to a few percent.
    assert rare_rate / frequent_rate == pytest.approx(10**0.7, rel=0.15)


def test_no_smoothing_masks_tokens_equally():
    rare_rate, frequent_rate = per_occurrence_rates(0.0)
    assert rare_rate / frequent_rate == pytest.approx(1.0, abs=0.1)


# --- determinism, devices, validation ------------------------------------------------------------


def test_same_seed_same_output_different_seed_different_output():
    masker = uniform_masker()
    ids, attention = bert_batch([25, 20, 15, 9], max_len=25, seed=2)
    a = masker(ids, attention, gen(42))
    b = masker(ids, attention, gen(42))
    c = masker(ids, attention, gen(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_global_seed_reproduces_without_generator():
    masker = uniform_masker()
    ids, attention = bert_batch([25, 20], max_len=25, seed=4)
    torch.manual_seed(9)
    a = masker(ids, attention)
    torch.manual_seed(9)
    b = masker(ids, attention)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_non_contiguous_input():
    masker = uniform_masker()
    ids, attention = bert_batch([10] * 10, max_len=10, seed=6)
    masked, labels = masker(ids.t(), attention.t(), gen(0))
    targeted = labels != -100
    assert masked.shape == (10, 10)
    assert torch.equal(labels[targeted], ids.t()[targeted])
    assert int(targeted.sum()) == 15  # ceil(0.15 * 100 real tokens); 80 of them are eligible


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_input_device():
    masker = uniform_masker()
    ids, attention = bert_batch([25, 20, 15], max_len=25)
    g = torch.Generator(device="cuda").manual_seed(0)
    masked, labels = masker(ids.cuda(), attention.cuda(), g)
    assert masked.is_cuda and labels.is_cuda
    targeted = labels != -100
    assert int(targeted.sum()) == 9  # ceil(0.15 * 60)
    assert torch.equal(labels[targeted].cpu(), ids.cuda()[targeted].cpu())


def test_masker_rejects_bad_configuration():
    probs = mask_probabilities([1] * VOCAB, SPECIAL)
    with pytest.raises(ValueError, match="one entry per vocabulary id"):
        MLMMasker(probs, MASK, SPECIAL, VOCAB + 1)
    with pytest.raises(ValueError, match="mlm_probability"):
        MLMMasker(probs, MASK, SPECIAL, VOCAB, mlm_probability=0.0)
    with pytest.raises(ValueError, match="mask_replace"):
        MLMMasker(probs, MASK, SPECIAL, VOCAB, mask_replace=(0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="attention_mask shape"):
        MLMMasker(probs, MASK, SPECIAL, VOCAB)(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))


# --- causal LM labels ----------------------------------------------------------------------------


def test_causal_lm_labels_mask_padding_by_attention_not_by_id():
    eos = 50  # GPT-2 pads with end-of-text, which is also a real token
    ids = torch.tensor([[7, 8, eos, eos], [9, eos, eos, eos]])
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    expected = torch.tensor([[7, 8, eos, -100], [9, eos, -100, -100]])
    assert torch.equal(causal_lm_labels(ids, attention), expected)
