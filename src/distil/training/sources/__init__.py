"""Where a run's teacher signals come from: one interface (`interface.TeacherSource`), one file per kind.

- `live`: a teacher model run in this process (replicated, or sharded under FSDP);
- `store`: a teacher-signal store written by `distil cache-teacher` (no teacher model loaded);
- `mixture`: several sources, weighted, mixed per position in probability space;
- `setup`: the one place that turns a recipe's `teacher:` / `teachers:` into a source.

A source answers one question, `outputs(batch, request)`: the teacher's signals at the positions the soft-target
term counts (distil.teacher_signal.signals), and, when asked, its hidden states and self-attention. The objective
(training.objective) takes a source as a parameter and never asks which kind it is; nothing here imports the
objective, the loop or held-out evaluation.
"""
