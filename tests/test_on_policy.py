"""On-policy distillation (loss.on_policy_fraction): which steps, what the student writes, what is distilled, and
that runs stay reproducible (seeded, resumable, lambda = 0 is the teacher-forced run)."""


import numpy as np
import pytest
import torch

from distil.config import load_config
from distil.errors import DistilError
from distil.teacher_signal.divergences import divergence_sum
from distil.training import on_policy as op
from distil.training.fused_head import output_projection
from distil.training.loop import train
from distil.training.batches import build_step
from distil.training.objective import Objective, TermSpec
from distil.training.sources.live import LiveTeacher
from tiny_models import VOCAB_SIZE, tiny_llama
from train_fixtures import prepared_data, teacher_dir, train_rows, write_recipe

CPU = torch.device("cpu")
PAD, EOS = 2, 1


def policy_for(student, world=1, rank=0, micro_batches=1, **settings):
    values = dict(fraction=1.0, prefix=5, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=3)
    values.update(settings)
    return op.OnPolicy(student=student, pad_id=PAD, eos_id=EOS, vocab_limit=VOCAB_SIZE, device=CPU, rank=rank,
                       world=world, micro_batches=micro_batches, **values)


def step_sequences(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, VOCAB_SIZE, size=rng.integers(8, 15)).astype(np.uint16) for _ in range(n)]


def as_lists(rows):
    return [r.tolist() for r in rows]


def test_on_policy_steps_are_drawn_from_the_seed_and_the_step():
    draws = [op.is_on_policy_step(56, step, 0.3) for step in range(2000)]
    assert draws == [op.is_on_policy_step(56, step, 0.3) for step in range(2000)]  # no state: a resume draws the same
    assert 0.26 < np.mean(draws) < 0.34
    assert draws != [op.is_on_policy_step(57, step, 0.3) for step in range(2000)]
    assert not any(op.is_on_policy_step(56, s, 0.0) for s in range(100))
    assert all(op.is_on_policy_step(56, s, 1.0) for s in range(100))


def test_on_policy_rows_are_deterministic_given_the_seed():
    student = tiny_llama(num_layers=2, seed=5).train()
    sequences = step_sequences()
    first = policy_for(student).rows_for_step(4, sequences)
    assert isinstance(first, op.OnPolicyRows)
    assert as_lists(policy_for(student).rows_for_step(4, sequences)) == as_lists(first)
    assert as_lists(policy_for(student).rows_for_step(5, sequences)) != as_lists(first)      # another step
    assert as_lists(policy_for(student, seed=4).rows_for_step(4, sequences)) != as_lists(first)  # another seed
    for row, seq, prompt_length in zip(first, sequences, first.prompt_lengths):
        assert prompt_length == 5 and row[:5].tolist() == seq[:5].tolist()  # the prompt is the sequence's start
        continuation = row[5:].tolist()
        assert 1 <= len(continuation) <= 6 and EOS not in continuation[:-1]  # stops at (and keeps) its end-of-text
        assert row.dtype == seq.dtype
    assert student.training  # back in train mode


def test_on_policy_rows_do_not_depend_on_the_split_between_processes_and_accumulation():
    """Each process writes the rows build_step deals it; a row's tokens depend on (seed, step, row) only."""
    student = tiny_llama(num_layers=2, seed=5)
    sequences = step_sequences()
    whole = policy_for(student).rows_for_step(2, sequences)
    split = {}
    for world, micro in ((2, 1), (2, 2), (1, 4)):
        for rank in range(world):
            policy = policy_for(student, world=world, rank=rank, micro_batches=micro)
            for rows in op.own_rows(len(sequences), micro, rank, world):
                written = op.generate(student, [op.prompt_of(sequences[i], 5) for i in rows],
                                      [op.row_seed(3, 2, i) for i in rows], policy.max_new_tokens, 1.0, 1.0, PAD,
                                      EOS, VOCAB_SIZE, CPU)
                split.update(zip(rows, written))
        assert as_lists(split[i] for i in range(len(sequences))) == as_lists(whole), (world, micro)
        # own_rows is build_step's split
        for rank in range(world):
            batches = build_step(whole, PAD, "clm", None, None, rank, world, CPU, micro_batches=micro)
            for rows, batch in zip(op.own_rows(len(whole), micro, rank, world), batches):
                for row, ids, mask in zip(rows, batch.input_ids, batch.attention_mask):
                    assert ids[mask.bool()].tolist() == whole[row].tolist()


def test_on_policy_generation_uses_the_kv_cache_in_eval_mode():
    student = tiny_llama(num_layers=2, seed=5).train()
    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 names it cache
        calls.append((kwargs["input_ids"].shape[1], cache is not None and cache.get_seq_length() > 0,
                      module.training, torch.is_grad_enabled()))

    handle = student.register_forward_pre_hook(record, with_kwargs=True)
    try:
        sequences = step_sequences(4)
        rows = policy_for(student, max_new_tokens=5, prefix=6).rows_for_step(0, sequences)
    finally:
        handle.remove()
    longest_new = max(len(r) - 6 for r in rows)
    assert len(calls) == longest_new  # one forward per new token, not one per token of the whole text
    assert calls[0][:2] == (6, False)  # the prompt once
    assert all(width == 1 and cached for width, cached, _, _ in calls[1:])  # then one token on the cache
    assert not any(training or grad for _, _, training, grad in calls)  # eval mode, no gradients
    assert student.training


def test_on_policy_sampler_draws_from_the_tempered_nucleus():
    scores = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 4000
    sampler = op.GumbelSampler(list(range(n)), temperature=2.0, top_p=1.0, vocab_limit=None, device=CPU)
    drawn = sampler(None, scores.expand(n, -1).clone()).argmax(dim=-1)
    frequency = torch.bincount(drawn, minlength=6).float() / n
    torch.testing.assert_close(frequency, torch.softmax(scores / 2.0, dim=-1), atol=0.03, rtol=0)
    nucleus = op.GumbelSampler(list(range(n)), temperature=1.0, top_p=0.8, vocab_limit=5, device=CPU)
    drawn = nucleus(None, scores.expand(n, -1).clone()).argmax(dim=-1)
    p = torch.softmax(scores, dim=-1)  # 0.63, 0.23, 0.14, ...: the nucleus of 0.8 is the first three
    assert set(drawn.tolist()) == {0, 1, 2}
    assert abs((drawn == 0).float().mean().item() - (p[0] / p[:3].sum()).item()) < 0.03


def drawn_by_hand(student, prompt, seed, max_new_tokens, temperature, top_p, eos_id):
    """One row sampled the plain way: the whole text through the model at every step (no cache, no generate),
    scores / T in float64, the top-p nucleus kept, and argmax of log-probability + Gumbel noise from the row's
    own generator: a draw from softmax(scores / T) within the nucleus, and nothing else."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.from_numpy(prompt.astype(np.int64))[None]
    for _ in range(max_new_tokens):
        with torch.no_grad():
            scores = student(input_ids=ids).logits[0, -1].double()
        noise = torch.rand(scores.shape[-1], generator=generator).double()
        logp = torch.log_softmax(scores / temperature, dim=-1)
        probs, order = logp.exp().sort(descending=True)
        before = probs.cumsum(0) - probs
        logp[order[before >= top_p]] = float("-inf")  # outside the nucleus: the mass before it reaches top_p
        token = int((logp - torch.log(-torch.log(noise))).argmax())
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token == eos_id:
            break
    return ids[0].tolist()


PROMPTS = [op.prompt_of(s, 5) for s in step_sequences(6, seed=11)]


def confident_student():
    """A tiny Llama with sharper next-token distributions, so that a logits processor visibly moves the draw."""
    student = tiny_llama(num_layers=2, seed=5)
    with torch.no_grad():
        student.get_output_embeddings().weight.mul_(4.0)
    return student


def draw(student, eos_id=EOS, temperature=1.0, top_p=1.0, max_new_tokens=6):
    return as_lists(op.generate(student, PROMPTS, [op.row_seed(3, 0, i) for i in range(len(PROMPTS))],
                                max_new_tokens, temperature, top_p, PAD, eos_id, VOCAB_SIZE, CPU))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.7, 0.85)])
def test_generation_config_neutral_draw_is_the_tempered_softmax(temperature, top_p):
    """generate() (KV-cached, batched, left-padded) writes exactly the rows of the plain sampling loop."""
    student = confident_student()
    rows = draw(student, temperature=temperature, top_p=top_p)
    for i, (prompt, row) in enumerate(zip(PROMPTS, rows)):
        assert row == drawn_by_hand(student, prompt, op.row_seed(3, 0, i), 6, temperature, top_p, EOS), i


def first_new_tokens(rows):
    return sorted({row[len(p)] for p, row in zip(PROMPTS, rows)})


# What a checkpoint's generation_config.json may carry; none of it may change the draw. Each entry builds the
# settings from the neutral draw, so that every one of them would change it if it were applied.
STUDENT_GENERATION_SETTINGS = {
    "repetition_penalty": lambda rows: {"repetition_penalty": 1.3},
    "no_repeat_ngram_size": lambda rows: {"no_repeat_ngram_size": 1},
    "suppress_tokens": lambda rows: {"suppress_tokens": first_new_tokens(rows)},
    "begin_suppress_tokens": lambda rows: {"begin_suppress_tokens": first_new_tokens(rows)},
    "bad_words_ids": lambda rows: {"bad_words_ids": [[t] for t in first_new_tokens(rows)]},
    "sequence_bias": lambda rows: {"sequence_bias": {(t,): -20.0 for t in first_new_tokens(rows)}},
    "forced_eos_token_id": lambda rows: {"forced_eos_token_id": 7},
    "sampling_top_k_temperature": lambda rows: {"do_sample": True, "top_k": 1, "temperature": 0.05},
    "eos_token_id": lambda rows: {"eos_token_id": first_new_tokens(rows)},
}


@pytest.mark.parametrize("name", sorted(STUDENT_GENERATION_SETTINGS))
def test_generation_config_of_the_student_does_not_change_the_draw(name):
    clean = confident_student()
    neutral = draw(clean)
    student = confident_student()
    settings = STUDENT_GENERATION_SETTINGS[name](neutral)
    for key, value in settings.items():
        setattr(student.generation_config, key, value)
    assert draw(student) == neutral
    for key, value in settings.items():  # the checkpoint's own settings are left as they were
        assert getattr(student.generation_config, key) == value


def test_generation_config_min_new_tokens_does_not_delay_the_end_of_text():
    """A row whose first drawn token is the end-of-text stops there, whatever min_new_tokens / min_length say."""
    student = confident_student()
    eos = draw(student)[0][len(PROMPTS[0])]  # make row 0's first draw the end-of-text
    neutral = draw(student, eos_id=eos)
    assert len(neutral[0]) == len(PROMPTS[0]) + 1
    for settings in ({"min_new_tokens": 4}, {"min_length": len(PROMPTS[0]) + 4}):
        other = confident_student()
        for key, value in settings.items():
            setattr(other.generation_config, key, value)
        assert draw(other, eos_id=eos) == neutral, settings


def test_on_policy_kd_mask_covers_only_generated_tokens():
    """The soft-target term of an on-policy step equals a hand computation over the positions that produced the
    student's tokens; no causal-LM term; in the plain and the fused path."""
    teacher, student = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=2, seed=2)
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(4.0)
    rows = policy_for(student, prefix=4).rows_for_step(0, step_sequences(6))
    batch = build_step(rows, PAD, "clm", None, None, 0, 1, CPU)[0]
    expected = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for i, (row, p) in enumerate(zip(rows, rows.prompt_lengths)):
        expected[i, p - 1: len(row) - 1] = True  # position j predicts token j + 1: the generated ones
    assert torch.equal(batch.kd_mask, expected)
    assert (batch.labels == -100).all()
    generated = sum(len(r) - p for r, p in zip(rows, rows.prompt_lengths))
    assert batch.step_targets == batch.local_targets == generated == int(expected.sum())

    T = 2.0
    with torch.no_grad():
        t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    by_hand = sum(divergence_sum(s_logits[i, j][None], t_logits[i, j][None], "forward_kl", T)
                  for i in range(len(rows)) for j in range(batch.input_ids.shape[1]) if expected[i, j]) / generated
    spec = TermSpec(weights={"ce": 5.0, "clm": 2.0}, temperature=T, objective="clm", restrict_ce_to_mask=False,
                    layer_pairs=[])
    for fused in (False, True):
        source = LiveTeacher(teacher, output_projection(teacher) if fused else None)
        total, shares = Objective(spec, source, student, output_projection(student) if fused else None)(student, batch)
        assert shares["ce"].item() == pytest.approx(by_hand.item(), rel=1e-5)
        assert shares["clm"].item() == 0.0
        assert total.item() == pytest.approx(5.0 * by_hand.item(), rel=1e-5)


def test_on_policy_teacher_forced_steps_are_untouched():
    sequences = step_sequences()
    assert policy_for(None, fraction=0.0).rows_for_step(0, sequences) is sequences
    batch = build_step(sequences, PAD, "clm", None, None, 0, 1, CPU)[0]
    assert batch.kd_mask is None


# End-to-end runs on a tiny Llama teacher.

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("on-policy")
    teacher = teacher_dir(root, "llama", num_layers=3)
    return root, teacher, prepared_data(root, teacher)


STEPS = 6


def seed_with_mixed_steps():
    """A run seed whose steps 0-2 and 3-5 (before and after the resume point) each hold both kinds of step."""
    for seed in range(100):
        kinds = [op.is_on_policy_step(seed, s, 0.5) for s in range(STEPS)]
        if len(set(kinds[:3])) == 2 and len(set(kinds[3:])) == 2:
            return seed, kinds
    raise AssertionError("no seed")


def run(workspace, name, loss=None, **run_settings):
    root, teacher, data = workspace
    recipe = write_recipe(root / f"{name}.yaml", teacher, data, root / name,
                          loss={"alpha_ce": 5.0, "alpha_mlm": 0.0, "alpha_clm": 2.0, "alpha_cos": 1.0, **(loss or {})},
                          data={"batch_size": 4}, optim={"max_steps": STEPS, "lr": 3e-3},
                          run={"dropout": 0.0, **run_settings})
    return recipe, root / name


ON_POLICY = {"on_policy_fraction": 0.5, "on_policy_prefix": 6, "on_policy_max_new_tokens": 8,
             "on_policy_temperature": 0.8}


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "student" / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_on_policy_run_resumed_gives_the_same_steps_and_weights(workspace, caplog):
    import shutil

    seed, kinds = seed_with_mixed_steps()
    recipe, straight = run(workspace, "straight", ON_POLICY, seed=seed)
    with caplog.at_level("INFO"):
        train(load_config(recipe))
    assert any(r.message.startswith("on-policy: 50% of the steps") for r in caplog.records)
    rows = train_rows(straight)
    for step, on in enumerate(kinds, start=1):  # CLM is off exactly on the on-policy steps
        assert (rows[step]["loss_clm"] == 0.0) == on, step
        assert rows[step]["loss_ce"] > 0

    recipe, resumed = run(workspace, "resumed", ON_POLICY, seed=seed, checkpoint_every=3)
    train(load_config(recipe))
    shutil.rmtree(resumed / "student")  # as a run killed after its step-3 checkpoint
    with caplog.at_level("INFO"):
        summary = train(load_config(recipe))
    assert summary["steps"] == STEPS and any("Resuming from" in r.message for r in caplog.records)
    again = train_rows(resumed)
    for step in range(1, STEPS + 1):
        for key in ("loss", "loss_ce", "loss_clm", "loss_cos"):
            assert again[step][key] == pytest.approx(rows[step][key], abs=1e-6), (step, key)
    assert_same_weights(weights(straight), weights(resumed))


def test_on_policy_fraction_zero_is_the_teacher_forced_run(workspace):
    recipe, plain = run(workspace, "teacher-forced")
    train(load_config(recipe))
    recipe, zero = run(workspace, "lambda-zero", {**ON_POLICY, "on_policy_fraction": 0.0})
    train(load_config(recipe))
    assert_same_weights(weights(plain), weights(zero))
    recipe, mixed = run(workspace, "lambda-one", {**ON_POLICY, "on_policy_fraction": 1.0})
    train(load_config(recipe))
    assert not torch.equal(weights(plain)["lm_head.weight"], weights(mixed)["lm_head.weight"])


@pytest.mark.parametrize("override,match", [
    ("loss.on_policy_fraction=1.5", "on_policy_fraction must be in"),
    ("loss.on_policy_prefix=0", "at least 1"),
    ("loss.on_policy_max_new_tokens=0", "at least 1"),
    ("loss.on_policy_temperature=0", "on_policy_temperature must be > 0"),
    ("loss.on_policy_top_p=0", r"on_policy_top_p must be in \(0, 1\]"),
    ("loss.objective=mlm", "needs a causal student"),
])
def test_on_policy_bad_settings_are_refused(workspace, override, match):
    recipe, _ = run(workspace, "refused", ON_POLICY)
    with pytest.raises(DistilError, match=match):
        load_config(recipe, [override, "loss.alpha_clm=0"] if "mlm" in override else [override])


def test_on_policy_with_teacher_cache_is_refused(workspace, tmp_path):
    recipe, _ = run(workspace, "cached", ON_POLICY)
    config = load_config(recipe)
    config.teacher.cache = str(tmp_path)  # the store's key (teacher.cache)
    from distil.recipe_checks import validate

    with pytest.raises(DistilError, match="cannot score what the student writes"):
        validate(config)


@pytest.mark.parametrize("case,match", [
    ("bert", "masked-LM"), ("no_soft_targets", "no soft-target term"), ("positions", "positions for 64"),
    ("fsdp", "FSDP"),
])
def test_on_policy_refused_at_start_with_what_to_change(workspace, case, match):
    root, teacher, data = workspace
    loss = dict(ON_POLICY)
    if case == "bert":
        teacher = teacher_dir(root, "bert", num_layers=2)
        data = prepared_data(root, teacher, name="data-bert")
        loss.update(alpha_clm=0.0, alpha_mlm=2.0)
    elif case == "no_soft_targets":
        loss.update(alpha_ce=0.0)
    elif case == "positions":
        teacher = teacher_dir(root, "gpt2", num_layers=2)  # learned positions: 64
        data = prepared_data(root, teacher, name="data-gpt2")
        loss.update(on_policy_prefix=40, on_policy_max_new_tokens=30)
    recipe = write_recipe(root / f"start-{case}.yaml", teacher, data, root / f"start-{case}",
                          loss={"alpha_ce": 5.0, "alpha_mlm": 0.0, "alpha_clm": 2.0, "alpha_cos": 0.0, **loss},
                          optim={"max_steps": 2})
    config = load_config(recipe)
    if case == "fsdp":
        from types import SimpleNamespace

        config.run.fsdp = True
        with pytest.raises(DistilError, match=match):
            op.check(config, SimpleNamespace(), SimpleNamespace(objective="clm"))
        return
    with pytest.raises(DistilError, match=match):
        train(config)
    assert not (root / f"start-{case}").exists()  # refused before the run directory is made


def test_on_policy_two_processes_with_accumulation_match_one_process(workspace):
    """Each of 2 gloo processes writes its own rows (2 x accumulation 2 x batch 2); gathered, the step is the one
    that 1 process x batch 8 writes and trains on: same losses, same token counts."""
    from train_fixtures import launch

    root, teacher, data = workspace
    common = dict(loss={"alpha_ce": 5.0, "alpha_mlm": 0.0, "alpha_clm": 2.0, "alpha_cos": 1.0, **ON_POLICY,
                        "on_policy_fraction": 1.0},
                  run={"dropout": 0.0, "log_every": 1})
    results = {}
    for name, processes, batch, accumulation in (("ddp-1x8", 1, 8, 1), ("ddp-2x2x2", 2, 2, 2)):
        recipe = write_recipe(root / f"{name}.yaml", teacher, data, root / name, data={"batch_size": batch},
                              optim={"max_steps": 3, "lr": 3e-3, "gradient_accumulation": accumulation}, **common)
        done = launch([str(recipe)], processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = train_rows(root / name)
    a, b = results["ddp-1x8"], results["ddp-2x2x2"]
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step]["tokens_seen"] == a[step]["tokens_seen"], step  # the same generated rows
        for key in ("loss", "loss_ce", "loss_cos"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-5), (step, key)
        assert a[step]["loss_clm"] == b[step]["loss_clm"] == 0.0
