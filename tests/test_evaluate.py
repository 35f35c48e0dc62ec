"""`distil evaluate` on tiny models: fixed MLM targets, LM scores against direct computations, parameter
counts against hand-computed numbers, timing bookkeeping, fidelity, downstream retention, ratios, bad input."""

import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertModel

from distil import losses
from distil.data.masking import IGNORE_INDEX
from distil.data.prepare import prepare
from distil.errors import DistilError
from distil.evaluation.evaluate import evaluate, parse_model_specs
from distil.evaluation import lm_quality, retention, speed, table
from distil.loading import load_tokenizer
from tiny_models import VOCAB_SIZE, tiny_bert, tiny_gpt2
from tiny_tokenizers import word_level_tokenizer

# Hand-computed for BertConfig(vocab 96, hidden 32, 4 layers, FFN 64, 64 positions, 2 token types):
EMBEDDING_TABLES = 96 * 32 + 64 * 32 + 2 * 32            # 5,184: word + position + token type
EMBEDDING_NORM = 2 * 32                                   # LayerNorm after the embeddings
PER_LAYER = 3 * (32 * 32 + 32) + (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 32  # 8,544
POOLER = 32 * 32 + 32                                     # BertModel has it, BertForMaskedLM's body does not


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine does not slow them down as much."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lines(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{int(w)}" for w in rng.integers(0, 60, size=int(rng.integers(12, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> SimpleNamespace:
    """Tiny BERT teacher (4 layers), BERT student (2 layers), the teacher's body without a head, a tiny GPT-2,
    a text file and a prepared directory, all sharing word-level tokenizers."""
    root = tmp_path_factory.mktemp("zoo")
    bert_tok = AutoTokenizer.from_pretrained(word_level_tokenizer(root / "tok-bert", n_words=VOCAB_SIZE - 5))
    gpt_tok = AutoTokenizer.from_pretrained(word_level_tokenizer(root / "tok-gpt2", VOCAB_SIZE - 2, "gpt2"))
    teacher, student = tiny_bert(4), tiny_bert(2, seed=7)
    paths = {}
    for name, model, tok in (("teacher", teacher, bert_tok), ("student", student, bert_tok),
                             ("headless", teacher.bert, bert_tok), ("gpt2", tiny_gpt2(2), gpt_tok)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    text = root / "heldout.txt"
    text.write_text("\n".join(_lines(30, 0)) + "\n", encoding="utf-8")
    data = root / "data"
    prepare([str(text)], paths["teacher"], str(data), heldout_fraction=0.5, max_length=32, progress=False)
    return SimpleNamespace(root=root, text=str(text), data=str(data), **paths)


def _targets(path: str, data: str, seed: int = 0):
    tokenizer = load_tokenizer(path)
    sequences, counts = lm_quality.sequences_for(lm_quality.load_heldout([data], max_length=32), tokenizer)
    return sequences, tokenizer, lm_quality.fixed_mlm_targets(sequences, tokenizer, counts, seed=seed)


# --- fixed targets ---------------------------------------------------------------------------------------------

def test_targets_are_identical_across_models_and_runs(zoo):
    sequences, tokenizer, first = _targets(zoo.teacher, zoo.data)
    _, _, again = _targets(zoo.student, zoo.data)   # another model's tokenizer, loaded afresh
    assert len(first) == len(again) == len(sequences) > 0
    for (m1, l1), (m2, l2) in zip(first, again):
        assert torch.equal(m1, m2) and torch.equal(l1, l2)
    specials = set(tokenizer.all_special_ids)
    for seq, (masked, labels) in zip(sequences, first):
        targets = labels != IGNORE_INDEX
        assert int(targets.sum()) == math.ceil(0.15 * len(seq))            # MLMMasker's target count
        assert torch.equal(labels[targets], torch.as_tensor(seq)[targets])  # labels are the original ids
        assert bool((masked[targets] == tokenizer.mask_token_id).all())     # all [MASK] at evaluation
        assert torch.equal(masked[~targets], torch.as_tensor(seq)[~targets])
        assert not any(int(seq[i]) in specials for i in torch.nonzero(targets).flatten())
    _, _, other_seed = _targets(zoo.teacher, zoo.data, seed=1)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other_seed))


def test_evaluate_scores_every_model_on_the_same_targets(zoo):
    runs = [evaluate([zoo.teacher, zoo.student], data=[zoo.data], speed_test=False, max_length=32) for _ in range(2)]
    digests = {m["lm"]["targets_digest"] for run in runs for m in run["models"]}
    assert len(digests) == 1
    assert runs[0]["models"][0]["lm"]["mlm_loss"] == runs[1]["models"][0]["lm"]["mlm_loss"]
    assert runs[0]["models"][0]["lm"]["targets"] == runs[0]["models"][1]["lm"]["targets"]


# --- scores against direct computations -------------------------------------------------------------------------

class ConstantLogits(torch.nn.Module):
    """Predicts the same logits `row` at every position, whatever the input."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.row = row

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1))


def test_mlm_scores_on_hand_made_logits(zoo):
    _, _, targets = _targets(zoo.teacher, zoo.data)
    labels = torch.cat([lab[lab != IGNORE_INDEX] for _, lab in targets]).tolist()
    favourite = max(set(labels), key=labels.count)   # the constant prediction is right for this token only
    row = torch.zeros(VOCAB_SIZE)
    row[favourite], row[favourite + 1] = 3.0, 1.0
    scores = lm_quality.masked_lm_scores(ConstantLogits(row), targets, pad_id=0, batch_size=4)
    log_z = math.log(math.exp(3.0) + math.exp(1.0) + (VOCAB_SIZE - 2))
    expected_loss = sum(log_z - float(row[t]) for t in labels) / len(labels)
    assert scores["targets"] == len(labels)
    assert scores["mlm_accuracy"] == pytest.approx(labels.count(favourite) / len(labels), abs=1e-12)
    assert scores["mlm_loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_mlm_scores_equal_masked_lm_loss_on_the_same_masks(zoo):
    _, _, targets = _targets(zoo.teacher, zoo.data)
    model = tiny_bert(4)
    ids = torch.nn.utils.rnn.pad_sequence([m for m, _ in targets], batch_first=True, padding_value=0)
    labels = torch.nn.utils.rnn.pad_sequence([lab for _, lab in targets], batch_first=True, padding_value=IGNORE_INDEX)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(m) for m, _ in targets], batch_first=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    direct = float(losses.masked_lm_loss(logits, labels))
    picked = labels != IGNORE_INDEX
    direct_accuracy = float((logits[picked].argmax(-1) == labels[picked]).float().mean())
    for batch_size in (len(targets), 3):   # one batch, and token-weighted over several
        scores = lm_quality.masked_lm_scores(model, targets, pad_id=0, batch_size=batch_size)
        assert scores["mlm_loss"] == pytest.approx(direct, rel=1e-5)
        assert scores["mlm_accuracy"] == pytest.approx(direct_accuracy, abs=1e-9)


def test_perplexity_is_exp_of_the_causal_loss(zoo):
    tokenizer = load_tokenizer(zoo.gpt2)
    sequences, _ = lm_quality.sequences_for(lm_quality.load_heldout([zoo.text], max_length=32), tokenizer)
    model = tiny_gpt2(2)
    scores = lm_quality.causal_lm_scores(model, sequences, pad_id=0, batch_size=4)
    # Direct: each sequence alone, no padding, summed next-token cross-entropy over every sequence.
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.as_tensor(seq).unsqueeze(0)
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(seq) - 1
    assert scores["targets"] == count
    assert scores["clm_loss"] == pytest.approx(total / count, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["clm_loss"]), rel=1e-12)


def test_hidden_fidelity_of_a_model_to_itself_is_one_and_headless_models_are_skipped(zoo):
    result = evaluate([zoo.headless, zoo.teacher], data=[zoo.text], reference=zoo.teacher, speed_test=False,
                      max_length=32)
    headless, teacher = result["models"]
    assert headless["lm"] is None and any("no LM head" in note for note in headless["notes"])
    assert teacher["lm"]["mlm_accuracy"] >= 0
    # The headless checkpoint is the teacher's own body: identical hidden states.
    assert headless["fidelity"]["hidden_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert teacher["fidelity"]["hidden_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert headless["fidelity"]["sentences"] == 30


def test_an_untrained_head_from_a_headless_teacher_is_detected(tmp_path):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "distil_init.json").write_text(json.dumps({"teacher_had_lm_head": False, "steps": 10}))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"loss": {"alpha_ce": 0.0, "alpha_cos": 1.0}}))
    assert "never trained" in lm_quality.untrained_head_reason(str(run / "student"))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"loss": {"alpha_ce": 0.0, "alpha_mlm": 1.0}}))
    assert lm_quality.untrained_head_reason(str(run / "student")) is None
    (run / "student" / "distil_init.json").write_text(json.dumps({"teacher_had_lm_head": False}))
    assert "random" in lm_quality.untrained_head_reason(str(run / "student"))


# --- size and speed ----------------------------------------------------------------------------------------------

def test_parameter_counts_match_hand_computed_numbers():
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    counts = speed.count_parameters(BertModel(config))
    assert counts == {"total": EMBEDDING_TABLES + EMBEDDING_NORM + 4 * PER_LAYER + POOLER,   # 40,480
                      "embedding": EMBEDDING_TABLES,
                      "non_embedding": EMBEDDING_NORM + 4 * PER_LAYER + POOLER}
    assert speed.count_parameters(tiny_bert(4).base_model)["total"] == EMBEDDING_TABLES + EMBEDDING_NORM + 4 * PER_LAYER
    # GPT-2: the LM head is tied to the word embeddings and counts once. Per block: 2 norms, c_attn, c_proj, MLP.
    block = 2 * 64 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    gpt2 = speed.count_parameters(tiny_gpt2(4))
    assert gpt2 == {"total": 96 * 32 + 64 * 32 + 4 * block + 64, "embedding": 96 * 32 + 64 * 32,
                    "non_embedding": 4 * block + 64}


def test_speed_reports_positive_medians_of_the_requested_repeats():
    calls = []
    timings = speed.time_calls(lambda: calls.append(1), warmup=2, repeats=5, device=torch.device("cpu"))
    assert len(calls) == 7 and len(timings) == 5
    result = speed.measure_speed(tiny_bert(2).base_model, "cpu", seq_length=16, batch_size=4, warmup=1, repeats=3)
    assert len(result["latency_ms_runs"]) == 3 and len(result["batch_ms_runs"]) == 3
    assert result["latency_ms"] == pytest.approx(statistics.median(result["latency_ms_runs"]))
    assert result["latency_ms"] > 0 and result["sequences_per_s"] > 0
    assert result["sequences_per_s"] == pytest.approx(4000 / statistics.median(result["batch_ms_runs"]))
    assert result["tokens_per_s"] == pytest.approx(16 * result["sequences_per_s"])


def test_weights_on_disk_counts_weight_files_only(zoo):
    size = speed.weights_on_disk(zoo.student)
    assert size == (Path(zoo.student) / "model.safetensors").stat().st_size
    assert speed.weights_on_disk("no-such-hub/model") is None


# --- the whole table ---------------------------------------------------------------------------------------------

def test_evaluate_writes_json_with_ratios_to_the_first_model(zoo, tmp_path, capsys):
    output = tmp_path / "results.json"
    result = evaluate([f"teacher={zoo.teacher}", f"student={zoo.student}"], data=[zoo.data], seq_length=16, speed_batch_size=2,
                      warmup=1, repeats=2, max_length=32, output=str(output))
    saved = json.loads(output.read_text())
    assert saved["models"][1]["name"] == "student"
    teacher_params = EMBEDDING_TABLES + EMBEDDING_NORM + 4 * PER_LAYER
    student_params = EMBEDDING_TABLES + EMBEDDING_NORM + 2 * PER_LAYER
    assert [m["size"]["params"]["total"] for m in saved["models"]] == [teacher_params, student_params]
    ratios = saved["ratios"][1]
    assert ratios["params_total"] == pytest.approx(student_params / teacher_params)
    cpu = [m["speed"]["cpu"] for m in saved["models"]]
    assert ratios["latency_ms_cpu"] == pytest.approx(cpu[0]["latency_ms"] / cpu[1]["latency_ms"])
    assert ratios["mlm_accuracy"] == pytest.approx(saved["models"][1]["lm"]["mlm_accuracy"]
                                                   / saved["models"][0]["lm"]["mlm_accuracy"])
    printed = capsys.readouterr().out
    assert "| parameters (base model) | 0.04M | 0.02M (0.567×) |" in printed
    assert printed.strip() == result["markdown"].strip()
    with pytest.raises(DistilError, match="already exists"):
        evaluate([zoo.teacher], speed_test=False, output=str(output))


def test_downstream_retention_fine_tunes_every_model_per_seed(zoo, tmp_path):
    rows = ["text,label"] + [f"{line},{'yes' if 'w1 ' in line else 'no'}" for line in _lines(24, 3)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "eval.csv").write_text("\n".join(rows[:13]) + "\n")
    result = evaluate([f"teacher={zoo.teacher}", f"student={zoo.student}"], speed_test=False, task_train=str(tmp_path / "train.csv"),
                      task_eval=str(tmp_path / "eval.csv"), seeds=2, task_epochs=1, task_batch_size=8,
                      task_max_length=32, task_output_dir=str(tmp_path / "kept"), progress=False)
    for model in result["models"]:
        scores = model["downstream"]
        assert scores["seeds"] == [42, 43] and len(scores["accuracy"]["runs"]) == 2
        assert scores["accuracy"]["mean"] == pytest.approx(statistics.fmean(scores["accuracy"]["runs"]))
        assert 0.0 <= scores["macro_f1"]["min"] <= scores["macro_f1"]["max"] <= 1.0
    saved = json.loads((tmp_path / "kept" / "01-student" / "seed-43" / "eval_results.json").read_text())
    assert saved["accuracy"] == result["models"][1]["downstream"]["accuracy"]["runs"][1]
    assert "task accuracy, std over seeds" in result["markdown"]
    first, second = (m["downstream"]["accuracy"]["mean"] for m in result["models"])
    assert result["ratios"][1]["task_accuracy"] == pytest.approx(second / first)


def test_evaluate_overwrite_keeps_a_file_it_did_not_write(zoo, tmp_path):
    import subprocess
    import sys

    output = tmp_path / "results.json"
    mine = b'{"my": "own results, kept for the paper"}\n'
    output.write_bytes(mine)
    with pytest.raises(DistilError, match="not a result of distil evaluate"):
        evaluate([zoo.teacher], speed_test=False, output=str(output), overwrite=True)
    assert output.read_bytes() == mine
    # A result distil evaluate wrote is replaced; the temporary file of a killed earlier run goes with it.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = tmp_path / f".results.json.tmp-{child.pid}"
    stale.write_text('{"half": ')
    first = evaluate([zoo.teacher], speed_test=False, output=str(tmp_path / "first.json"))
    (tmp_path / "first.json").replace(output)
    second = evaluate([f"again={zoo.teacher}"], speed_test=False, output=str(output), overwrite=True)
    assert json.loads(output.read_text())["models"][0]["name"] == "again" == second["models"][0]["name"]
    assert first["models"][0]["size"] == second["models"][0]["size"] and not stale.exists()


def test_evaluate_task_output_dir_overwrite_keeps_user_files(zoo, tmp_path):
    """Each fine-tune replaces its folder under --task-output-dir, but never one that distil did not write."""
    rows = ["text,label"] + [f"{line},{'yes' if 'w1 ' in line else 'no'}" for line in _lines(8, 3)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    kept = tmp_path / "kept"
    folder = kept / "01-student" / "seed-42"
    folder.mkdir(parents=True)
    (folder / "my_thesis.txt").write_bytes(b"three years of work\n")
    with pytest.raises(DistilError, match=r"--task-output-dir would delete .*seed-42 is not an output of distil"):
        evaluate([f"teacher={zoo.teacher}", f"student={zoo.student}"], speed_test=False,
                 task_train=str(tmp_path / "train.csv"), task_eval=str(tmp_path / "train.csv"), task_epochs=1,
                 task_batch_size=8, task_max_length=32, task_output_dir=str(kept), progress=False)
    assert [p.relative_to(kept).as_posix() for p in sorted(kept.rglob("*"))] == [
        "01-student", "01-student/seed-42", "01-student/seed-42/my_thesis.txt"]
    assert (folder / "my_thesis.txt").read_bytes() == b"three years of work\n"


def test_spread_and_ratio_arithmetic():
    two = retention.spread([0.5, 0.7])
    assert (two["mean"], two["std"]) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    assert (two["min"], two["max"], two["runs"]) == (0.5, 0.7, [0.5, 0.7])
    assert retention.spread([0.5])["std"] == 0.0
    flats = [{"params_total": 100, "latency_ms_cpu": 10.0, "task_accuracy_std": 0.1},
             {"params_total": 60, "latency_ms_cpu": 4.0, "task_accuracy_std": 0.2}]
    assert table.ratios_to_first(flats)[1] == {"params_total": 0.6, "latency_ms_cpu": 2.5}


def test_model_names():
    assert parse_model_specs(["teacher=/a/b", "runs/x/student", "bert-base-uncased"]) == [
        ("teacher", "/a/b"), ("x/student", "runs/x/student"), ("bert-base-uncased", "bert-base-uncased")]
    with pytest.raises(DistilError, match="called"):
        parse_model_specs(["a/m", "b/m"])


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(models=[]), "at least one model"),
    (dict(task_train="x.csv"), "both --task-train and --task-eval"),
    (dict(reference="REF"), "give the text with --data"),
    (dict(devices=["tpu"]), "Unknown speed device"),
    (dict(seeds=0), "--seeds"),
    (dict(models=["./no/such/model"]), "does not exist"),
    (dict(data=["DATA", "TEXT"]), "not a mix"),
    (dict(data=["TEXT"], max_length=200), "exceeds the 64 positions"),
    (dict(seq_length=100), "exceeds the model's 64 positions"),
])
def test_bad_input_gives_distil_error(zoo, kwargs, message):
    kwargs = dict(kwargs)
    kwargs.setdefault("models", [zoo.teacher])
    kwargs["data"] = [{"DATA": zoo.data, "TEXT": zoo.text}[d] for d in kwargs.get("data", [])] or None
    if kwargs.get("reference"):
        kwargs["reference"] = zoo.teacher
    kwargs.setdefault("speed_test", "seq_length" in kwargs or "devices" in kwargs)
    with pytest.raises(DistilError, match=message):
        evaluate(**kwargs)
