"""Model2Vec's own distillation of a teacher, for the side-by-side table (run with the Model2Vec venv's python).

    python model2vec_distill.py TEACHER_DIR DIM OUT_DIR

Writes OUT_DIR/float16 (Model2Vec's default precision) and OUT_DIR/float32 (the same table, not rounded), and
OUT_DIR/distill.json with the seconds the distillation took. Everything else is Model2Vec's default.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from model2vec.distill import distill


def main() -> None:
    teacher, dim, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    started = time.perf_counter()
    model = distill(teacher, pca_dims=dim, quantize_to="float32", device="cpu")
    seconds = time.perf_counter() - started
    model.save_pretrained(out / "float32")
    model.embedding = model.embedding.astype(np.float16)  # what quantize_to="float16" (the default) stores
    model.save_pretrained(out / "float16")
    (out / "distill.json").write_text(json.dumps({"seconds": seconds, "dim": dim, "teacher": teacher,
                                                  "rows": int(model.embedding.shape[0])}) + "\n")
    print(json.dumps({"seconds": seconds, "rows": int(model.embedding.shape[0])}))


if __name__ == "__main__":
    main()
