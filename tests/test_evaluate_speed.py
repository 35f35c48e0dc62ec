"""Speed in `distil evaluate`: interleaved rounds, medians and spreads, ratios of medians, and the check that
models with one architecture time alike. Every duration comes from a clock the test advances by known
amounts, so nothing here depends on how fast or busy the machine is."""

import functools
import json
import logging
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from distil.evaluation.evaluate import evaluate
from distil.evaluation import lm_quality, speed, table
from tiny_models import VOCAB_SIZE, tiny_bert
from tiny_tokenizers import word_level_tokenizer


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_speed_rounds_are_interleaved_and_timed_by_the_injected_clock():
    clock, log = FakeClock(), []
    # Per call: two warm-up durations (huge, must not be counted), then the three timed rounds.
    durations = {"A": [9.0, 9.0, 0.010, 0.030, 0.012], "B": [9.0, 9.0, 0.002, 0.003, 0.004],
                 "C": [9.0, 9.0, 0.5, 0.25, 0.125]}

    def call(name):
        log.append(name)
        clock.advance(durations[name].pop(0))

    timings = speed.interleaved_timings([lambda: call("A"), lambda: call("B"), lambda: call("C")], warmup=2,
                                        rounds=3, clock=clock, synchronize=lambda: log.append("sync"))
    # Warm-up rounds, one sync, then every timed call followed by a sync before the clock is read.
    assert log == ["A", "B", "C"] * 2 + ["sync"] + ["A", "sync", "B", "sync", "C", "sync"] * 3
    assert timings[0] == pytest.approx([0.010, 0.030, 0.012])
    assert timings[1] == pytest.approx([0.002, 0.003, 0.004])
    assert timings[2] == [0.5, 0.25, 0.125]


def test_speed_duration_summary_is_median_and_quartile_spread():
    odd = speed.duration_summary([0.010, 0.030, 0.011, 0.010, 0.012])   # sorted: 10 10 11 12 30 ms
    assert odd == pytest.approx({"median_ms": 11.0, "q1_ms": 10.0, "q3_ms": 12.0, "min_ms": 10.0, "max_ms": 30.0,
                                 "iqr_relative": 2 / 11, "range_relative": 20 / 11})
    even = speed.duration_summary([0.004, 0.001, 0.003, 0.002])          # inclusive quartiles 1.75 and 3.25 ms
    assert even == pytest.approx({"median_ms": 2.5, "q1_ms": 1.75, "q3_ms": 3.25, "min_ms": 1.0, "max_ms": 4.0,
                                  "iqr_relative": 0.6, "range_relative": 1.2})
    one = speed.duration_summary([0.005])
    assert (one["median_ms"], one["iqr_relative"], one["range_relative"]) == (pytest.approx(5.0), 0.0, 0.0)


def _timed_by(clock: FakeClock, model: torch.nn.Module, seconds: dict[int, list[float]], order: list, label):
    """Each forward of `model` moves `clock` by the next duration listed for its batch size."""
    def before_forward(module, args, kwargs):
        batch = kwargs["input_ids"].shape[0]
        order.append((label, batch))
        clock.advance(seconds[batch].pop(0))
    return model.register_forward_pre_hook(before_forward, with_kwargs=True)


def test_speed_measure_speeds_reports_medians_of_interleaved_rounds_and_ratios_of_medians():
    clock, order = FakeClock(), []
    teacher, student = tiny_bert(4).base_model, tiny_bert(2, seed=7).base_model
    # One warm-up round, then 5 rounds. The teacher's 4th round is a stray slow call: the median ignores it.
    teacher_s = {1: [1.0, 0.008, 0.008, 0.009, 0.100, 0.010], 4: [1.0, 0.032, 0.030, 0.034, 0.031, 0.033]}
    student_s = {1: [1.0, 0.002, 0.003, 0.002, 0.002, 0.004], 4: [1.0, 0.010, 0.008, 0.008, 0.009, 0.008]}
    hooks = [_timed_by(clock, teacher, teacher_s, order, "t"), _timed_by(clock, student, student_s, order, "s")]
    results = speed.measure_speeds([teacher, student], "cpu", seq_length=8, batch_size=4, warmup=1, repeats=5,
                                   clock=clock)
    for hook in hooks:
        hook.remove()
    assert order == [("t", 1), ("s", 1)] * 6 + [("t", 4), ("s", 4)] * 6
    t, s = results
    assert t["latency_ms_runs"] == pytest.approx([8, 8, 9, 100, 10])
    assert t["latency_ms"] == pytest.approx(9.0) and s["latency_ms"] == pytest.approx(2.0)
    assert t["latency_stats"]["iqr_relative"] == pytest.approx((10 - 8) / 9)
    assert t["latency_stats"]["range_relative"] == pytest.approx((100 - 8) / 9)
    assert t["batch_ms"] == pytest.approx(32.0) and s["batch_ms"] == pytest.approx(8.0)
    assert s["batch_stats"]["iqr_relative"] == pytest.approx((9 - 8) / 8)
    assert t["sequences_per_s"] == pytest.approx(4 / 0.032) and t["tokens_per_s"] == pytest.approx(32 / 0.032)
    ratios = table.ratios_to_first([table.flat_metrics({"speed": {"cpu": r}}) for r in results])[1]
    # Medians: 9 / 2 = 4.5 (the means, 27 / 2.6, would say 10.4).
    assert ratios["latency_ms_cpu"] == pytest.approx(4.5)
    assert ratios["sequences_per_s_cpu"] == pytest.approx(32 / 8)


def test_speed_fingerprint_ignores_names_and_weights_but_not_the_architecture():
    a, b = tiny_bert(2, seed=1).base_model, tiny_bert(2, seed=2).base_model
    a.config._name_or_path, b.config._name_or_path = "runs/x/student-init", "runs/x/student"
    b.config.architectures = ["BertForMaskedLM"]
    assert speed.architecture_fingerprint(a) == speed.architecture_fingerprint(b)
    assert speed.architecture_fingerprint(a) != speed.architecture_fingerprint(tiny_bert(3).base_model)
    assert speed.architecture_fingerprint(a) != speed.architecture_fingerprint(tiny_bert(2, hidden_act="relu").base_model)
    assert speed.architecture_fingerprint(a) != speed.architecture_fingerprint(tiny_bert(2).base_model.half())


def _timing(latency_ms: float, batch_ms: float) -> dict:
    return {"latency_ms": latency_ms, "batch_ms": batch_ms}


def test_speed_identical_architectures_more_than_20_percent_apart_are_flagged():
    names, prints = ["teacher", "init", "student"], ["T", "S", "S"]
    # 25% apart in latency (and 5% in batch time): flagged, on latency only.
    found = speed.same_architecture_disagreements(names, prints, [_timing(30, 90), _timing(10, 40), _timing(12.5, 42)])
    assert found == [{"models": ["init", "student"], "metric": "latency_ms", "measures": "batch-1 latency",
                      "medians_ms": [10, 12.5], "relative_difference": pytest.approx(0.25)}]
    # 10% apart: fine. 20% exactly is still within the tolerance. Different architectures are never compared.
    assert speed.same_architecture_disagreements(names, prints, [_timing(30, 90), _timing(10, 40), _timing(11, 44)]) == []
    assert speed.same_architecture_disagreements(names, prints, [_timing(30, 90), _timing(12, 40), _timing(10, 48)]) == []
    assert speed.same_architecture_disagreements(names, ["T", "S", "U"], [_timing(30, 90), _timing(1, 1), _timing(9, 9)]) == []
    # The slower one may come first: the difference is slower / faster - 1 either way.
    found = speed.same_architecture_disagreements(names, prints, [_timing(30, 90), _timing(10, 60), _timing(10, 40)])
    assert [(d["metric"], d["relative_difference"]) for d in found] == [("batch_ms", pytest.approx(0.5))]


# --- through distil evaluate --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A 4-layer teacher, a 2-layer student and an exact copy of the student (identical architecture)."""
    root = tmp_path_factory.mktemp("speed-zoo")
    tokenizer = AutoTokenizer.from_pretrained(word_level_tokenizer(root / "tok", n_words=VOCAB_SIZE - 5))
    paths = {}
    for name, model in (("teacher", tiny_bert(4)), ("student", tiny_bert(2, seed=7))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    shutil.copytree(root / "student", root / "student-copy")
    paths["student-copy"] = str(root / "student-copy")
    return paths


def _specs(models: dict[str, str]) -> list[str]:
    return [f"{name}={path}" for name, path in models.items()]


def _record_forwards(monkeypatch, order: list, clock: FakeClock | None = None, seconds: dict | None = None):
    """Every model evaluate loads logs (name, batch size) per forward, and moves `clock` by seconds[name][batch]."""
    real = lm_quality.load_eval_model

    def loading(name, path, device="cpu"):
        model = real(name, path, device)

        def before_forward(module, args, kwargs):
            batch = kwargs["input_ids"].shape[0]
            order.append((name, batch))
            if clock is not None:
                clock.advance(seconds[name][batch])
        model.base.register_forward_pre_hook(before_forward, with_kwargs=True)
        return model

    monkeypatch.setattr(lm_quality, "load_eval_model", loading)


def test_evaluate_speed_times_all_models_in_interleaved_rounds(models, monkeypatch):
    order: list = []
    _record_forwards(monkeypatch, order)
    result = evaluate(_specs(models), seq_length=8, speed_batch_size=2, warmup=1, repeats=3, devices=["cpu"],
                      cpu_threads=1)
    each = [("teacher", 1), ("student", 1), ("student-copy", 1)]
    assert order == each * 4 + [(name, 2) for name, _ in each] * 4   # 1 warm-up + 3 timed rounds, per batch size
    assert [len(m["speed"]["cpu"]["latency_ms_runs"]) for m in result["models"]] == [3, 3, 3]
    assert result["settings"]["speed"]["method"] == "interleaved rounds"


@pytest.mark.parametrize("copy_ms, flagged", [(2.5, True), (2.2, False)])
def test_evaluate_speed_flags_identical_architectures_that_time_apart(models, monkeypatch, tmp_path, caplog,
                                                                      copy_ms, flagged):
    clock, order = FakeClock(), []
    seconds = {"teacher": {1: 0.008, 2: 0.024}, "student": {1: 0.002, 2: 0.006},
               "student-copy": {1: copy_ms / 1000, 2: 3 * copy_ms / 1000}}
    _record_forwards(monkeypatch, order, clock, seconds)
    monkeypatch.setattr(speed, "compare_speeds", functools.partial(speed.compare_speeds, clock=clock))
    output = tmp_path / "results.json"
    with caplog.at_level(logging.WARNING, logger="distil.evaluation.speed"):
        result = evaluate(_specs(models), seq_length=8, speed_batch_size=2, warmup=1, repeats=3, devices=["cpu"],
                          cpu_threads=1, output=str(output))
    saved = json.loads(output.read_text())
    teacher, student, copy = (m["speed"]["cpu"] for m in saved["models"])
    assert (teacher["latency_ms"], student["latency_ms"], copy["latency_ms"]) == pytest.approx((8.0, 2.0, copy_ms))
    assert copy["sequences_per_s"] == pytest.approx(2000 / (3 * copy_ms))
    assert student["latency_stats"]["iqr_relative"] == pytest.approx(0.0, abs=1e-9)   # the same duration every round
    assert saved["ratios"][1]["latency_ms_cpu"] == pytest.approx(4.0)
    assert saved["ratios"][2]["latency_ms_cpu"] == pytest.approx(8.0 / copy_ms)
    prints = [m["architecture"] for m in saved["models"]]
    assert prints[1] == prints[2] != prints[0]
    check = saved["speed_check"]
    assert check["same_architecture"] == [["student", "student-copy"]]
    latency_row = "| CPU latency, batch 1 (ms; ratio = speed-up) | 8.00 | 2.00 (4.000×{0}) | {1:.2f} ({2:.3f}×{0}) |"
    if flagged:
        assert check["trustworthy"] == {"cpu": False}
        assert [(d["models"], d["metric"]) for d in check["disagreements"]] == [
            (["student", "student-copy"], "latency_ms"), (["student", "student-copy"], "batch_ms")]
        assert check["disagreements"][0]["relative_difference"] == pytest.approx(0.25)
        assert check["untrustworthy_ratios"] == ["latency_ms_cpu", "sequences_per_s_cpu", "tokens_per_s_cpu"]
        assert [teacher["trustworthy"], student["trustworthy"], copy["trustworthy"]] == [False] * 3
        assert latency_row.format(" ⚠", copy_ms, 8.0 / copy_ms) in result["markdown"]
        assert ("CPU speed is not trustworthy: student and student-copy have an identical architecture, yet their "
                "median batch-1 latency differs by 25% (2.00 ms vs 2.50 ms)") in result["markdown"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and "machine was busy" in warnings[0]
    else:
        assert check["trustworthy"] == {"cpu": True} and check["disagreements"] == []
        assert check["untrustworthy_ratios"] == [] and copy["trustworthy"] is True
        assert latency_row.format("", copy_ms, 8.0 / copy_ms) in result["markdown"]
        assert "⚠" not in result["markdown"]
        assert "identical architectures (student, student-copy) timed within 20% of each other" in result["markdown"]
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
