"""The retention table of benchmarks/RETENTION.md from a `distil evaluate --output` JSON file.

Usage: python summarize.py EVALUATION_JSON [--task-eval CSV] [--training-seeds JSON]
Prints Markdown: per model the task accuracy and macro-F1 as mean over fine-tuning seeds, their std and min-max,
and the ratio of the mean to the teacher's (the first model); the majority-class score of the eval set; what
distil evaluate said about speed; and, from a second evaluation JSON of the students named distilled and
distilled-seed*, the spread over training seeds of whatever it measured (task scores if fine-tuned, hidden cosine).
"""
import argparse
import csv
import json
import statistics
from collections import Counter


def percent(value: float) -> float:
    return 100.0 * value if value <= 1.0 else value


def scores(model: dict, score: str) -> list[float]:
    return [percent(v) for v in model["downstream"][score]["runs"]]


def cell(values: list[float], reference: float | None) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    text = f"{mean:.2f}% ± {std:.2f} ({min(values):.2f}-{max(values):.2f})"
    return text if reference is None else f"{text}, {mean / reference:.3f}×"


def majority(eval_csv: str) -> tuple[str, float, float]:
    with open(eval_csv, encoding="utf-8", newline="") as fh:
        labels = [row["label"] for row in csv.DictReader(fh)]
    label, count = Counter(labels).most_common(1)[0]
    accuracy = count / len(labels)
    # Always predicting one class: F1 of that class is 2p/(1+p), the others score 0.
    return label, 100 * accuracy, 100 * (2 * accuracy / (1 + accuracy)) / len(set(labels))


def distilled_runs(models: list[dict]) -> list[dict]:
    return [m for m in models if m["name"] == "distilled" or m["name"].startswith("distilled-seed")]


def training_seed_spread(models: list[dict], reference: dict[str, float]) -> None:
    distilled = distilled_runs(models)
    if len(distilled) < 2:
        return
    print(f"\nOver {len(distilled)} training seeds ({', '.join(m['name'] for m in distilled)}):\n")
    print("| measure | mean ± std over training seeds (min-max) |")
    print("|---|---:|")
    cosines = [(m.get("fidelity") or {}).get("hidden_cosine") for m in distilled]
    if all(c is not None for c in cosines):
        print(f"| hidden cosine to teacher | {statistics.fmean(cosines):.4f} ± "
              f"{statistics.stdev(cosines):.4f} ({min(cosines):.4f}-{max(cosines):.4f}) |")
    if all(m.get("downstream") for m in distilled):
        for score in ("accuracy", "macro_f1"):
            means = [statistics.fmean(scores(m, score)) for m in distilled]
            print(f"| task {score} (per-training-seed means) | {cell(means, reference.get(score))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation")
    parser.add_argument("--task-eval")
    parser.add_argument("--training-seeds")
    args = parser.parse_args()
    with open(args.evaluation, encoding="utf-8") as fh:
        results = json.load(fh)
    models = results["models"]
    teacher = models[0]
    reference = {s: statistics.fmean(scores(teacher, s)) for s in ("accuracy", "macro_f1")}
    seeds = models[0]["downstream"]["seeds"]
    print(f"Task scores: mean ± std over fine-tuning seeds {seeds} (min-max), ratio of the mean to {teacher['name']}.\n")
    print("| model | hidden cosine to teacher | task accuracy | task macro-F1 |")
    print("|---|---:|---:|---:|")
    for model in models:
        is_teacher = model is teacher
        cosine = (model.get("fidelity") or {}).get("hidden_cosine")
        print(f"| {model['name']} | {'–' if cosine is None else f'{cosine:.4f}'} | "
              f"{cell(scores(model, 'accuracy'), None if is_teacher else reference['accuracy'])} | "
              f"{cell(scores(model, 'macro_f1'), None if is_teacher else reference['macro_f1'])} |")

    if args.task_eval:
        label, accuracy, macro_f1 = majority(args.task_eval)
        print(f"\nAlways predicting the majority class ({label}): accuracy {accuracy:.2f}%, macro-F1 {macro_f1:.2f}%.")

    check = results.get("speed_check") or {}
    print("\nSpeed (batch 1 latency ms; throughput sequences/s), medians of interleaved rounds:\n")
    for model in models:
        for device, timing in (model.get("speed") or {}).items():
            print(f"- {model['name']} [{device}]: latency {timing['latency_ms']:.2f} ms, "
                  f"throughput {timing['sequences_per_s']:.2f} seq/s, trustworthy: {timing.get('trustworthy')}")
    for disagreement in check.get("disagreements") or []:
        print(f"- ⚠ {disagreement['message']}")
    if check and not check.get("disagreements"):
        print(f"- speed check: identical architectures agreed within {100 * check['tolerance']:.0f}%: "
              f"{check.get('same_architecture')}")

    training_seed_spread(models, reference)
    if args.training_seeds:
        with open(args.training_seeds, encoding="utf-8") as fh:
            training_seed_spread(json.load(fh)["models"], reference)


if __name__ == "__main__":
    main()
