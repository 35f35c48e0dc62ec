"""Static students against Model2Vec, side by side (run.sh drives it; see benchmarks/RETENTION.md).

    python bench.py score CASES MODEL_DIR LIBRARY OUT_JSON TEACHER_EMBEDDINGS
        the cases of embedding_ablation/ablation.py (its `score`), the model embedded through LIBRARY:
        distil (distil's encode: what sentence-transformers computes), model2vec (StaticModel.encode) or
        sentence-transformers (SentenceTransformer.encode)
    python bench.py speed CASES OUT_JSON NAME=LIBRARY:MODEL_DIR ...
        sentences per second on every text of the cases, 1 thread, interleaved rounds, medians
    python bench.py table RESULTS_DIR
        the markdown tables of RETENTION.md
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "embedding_ablation"))
import ablation  # noqa: E402  (the cases and their scoring: one definition for every model)

LIBRARIES = ("distil", "model2vec", "sentence-transformers")
WARMUP, ROUNDS = 1, 7


def encoder(library: str, model_dir: str):
    """texts -> (N, dim) float32 tensor, through `library`'s own loading and encoding of `model_dir`."""
    if library == "distil":
        from distil.sentence_embeddings import encode

        return lambda texts: encode(model_dir, texts)
    if library == "model2vec":
        from model2vec import StaticModel

        model = StaticModel.from_pretrained(model_dir)
        return lambda texts: torch.from_numpy(np.asarray(model.encode(texts, use_multiprocessing=False),
                                                         dtype=np.float32))
    if library == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_dir, device="cpu")
        return lambda texts: torch.from_numpy(model.encode(texts, convert_to_numpy=True)).float()
    raise SystemExit(f"unknown library {library!r}: one of {', '.join(LIBRARIES)}")


def case_texts(cases: Path) -> list[str]:
    bible = json.loads((cases / "bible.json").read_text(encoding="utf-8"))
    tweets = json.loads((cases / "tweets.json").read_text(encoding="utf-8"))
    passages = json.loads((cases / "passages.json").read_text(encoding="utf-8"))
    return bible["queries"] + bible["corpus"] + [t for t, _ in tweets["train"] + tweets["test"]] + passages


def score(cases: Path, model_dir: str, library: str, out: Path, teacher_embeddings: Path) -> None:
    embed = encoder(library, model_dir)
    ablation._embed = lambda _model_dir, texts: embed(texts)
    result = ablation.score(cases, model_dir, out, teacher_embeddings)
    result["library"] = library
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def directory_bytes(model_dir: str) -> dict:
    files = [p for p in Path(model_dir).rglob("*") if p.is_file() and p.name != "README.md"]
    return {"table_bytes": (Path(model_dir) / "model.safetensors").stat().st_size,
            "directory_bytes": sum(p.stat().st_size for p in files)}


def speed(cases: Path, out: Path, named: list[str]) -> None:
    torch.set_num_threads(1)
    texts = case_texts(cases)
    runs = {}
    for item in named:
        name, spec = item.split("=", 1)
        library, model_dir = spec.split(":", 1)
        runs[name] = (encoder(library, model_dir), library, model_dir)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(WARMUP + ROUNDS):
        names = list(runs)
        names = names[round_index % len(names):] + names[:round_index % len(names)]  # each goes first in turn
        for name in names:
            started = time.perf_counter()
            runs[name][0](texts)
            if round_index >= WARMUP:
                seconds[name].append(time.perf_counter() - started)
    rows = {name: {"library": library, "model": model_dir, "texts": len(texts),
                   "median_seconds": statistics.median(seconds[name]), "seconds": seconds[name],
                   "sentences_per_second": len(texts) / statistics.median(seconds[name]),
                   **directory_bytes(model_dir)}
            for name, (_, library, model_dir) in runs.items()}
    out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({n: round(r["sentences_per_second"]) for n, r in rows.items()}))


def table(results: Path) -> None:
    teacher = json.loads((results / "teacher.json").read_text(encoding="utf-8"))
    print("| model | encoded by | " + " | ".join(label for _, label in ablation.METRICS) + " |")
    print("|" + "---|" * (2 + len(ablation.METRICS)))
    print("| teacher (all-MiniLM-L6-v2) | distil | " + " | ".join(f"{teacher[k]:.4f}" for k, _ in ablation.METRICS)
          + " |")
    for path in sorted(results.glob("*.json")):
        if path.stem in ("teacher", "speed"):
            continue
        row = json.loads(path.read_text(encoding="utf-8"))
        cells = [f"{row[k]:.4f}" + ("" if k == "similarity_spearman" else f" ({row[k] / teacher[k]:.1%})")
                 for k, _ in ablation.METRICS]
        print(f"| {path.stem.split('@')[0]} | {row['library']} | " + " | ".join(cells) + " |")
    speed_file = results / "speed.json"
    if speed_file.exists():
        rows = json.loads(speed_file.read_text(encoding="utf-8"))
        print("\n| model | encoded by | sentences/s (1 thread) | table on disk | directory on disk |")
        print("|---|---|---:|---:|---:|")
        for name, row in rows.items():
            print(f"| {name} | {row['library']} | {row['sentences_per_second']:,.0f} | "
                  f"{row['table_bytes'] / 2**20:.1f} MiB | {row['directory_bytes'] / 2**20:.1f} MiB |")


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "score":
        score(Path(args[0]), args[1], args[2], Path(args[3]), Path(args[4]))
    elif command == "speed":
        speed(Path(args[0]), Path(args[1]), args[2:])
    elif command == "table":
        table(Path(args[0]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
