"""A teacher-signal store: the teacher's sparse output distribution, cached once, trained from without the teacher.

- `signals`: dense teacher logits -> top-k log-probabilities, rest mass and importance-sampled tail tokens;
- `format`: the store's layout, manifest and quantisation (shared by writer and reader);
- `packing`: the packed formats' codes (ids in the fewest bits, log-probabilities in few-bit steps);
- `writer`: `distil cache-teacher` (streaming, resumable, multi-process);
- `reader`: a batch's sparse targets from the memory-mapped shards;
- `training`: `teacher.cache: DIR` runs (start-up checks and the objective); the losses are distil.teacher_signal.
"""

# The store formats (format.StoreLayout says what each stores). Here, not in `format`, so that the command line
# lists them without importing torch.
STORE_FORMATS = ("float16", "compact", "packed", "packed4", "float32")
DEFAULT_STORE_FORMAT = "packed"   # loses nothing measurable against float16 (benchmarks/RESULTS.md)
