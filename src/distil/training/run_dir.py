"""A run directory: whether a start is fresh or a resume, and the final student with its model card.

Layout of run.output_dir: recipe.yaml (resolved), metrics.jsonl, tensorboard/, checkpoints/, student-init/ (when
the student is built from teacher layers at start), and student/ once the run has finished (with
projections.safetensors beside it when the run trained width projections).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from distil.config import TrainConfig
from distil.errors import DistilError
from distil.loading import hidden_size_of
from distil.disk_space import disk_space_errors, tensor_bytes
from distil.outputs import atomic_output_dir, check_output_dir, write_json_atomic
from distil.sentence_embeddings import write_sentence_transformers
from distil.training import checkpoint as ckpt
from distil.training import projections

FINAL_STUDENT = "student"


def prepare_run_dir(run_dir: Path, config: TrainConfig, is_main: bool) -> Path | None:
    """Decide between a fresh start and a resume; returns the checkpoint to resume from, if any."""
    finished = (run_dir / FINAL_STUDENT / "config.json").exists()
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
    if config.run.overwrite:
        # Refused unless everything in run_dir is what distil train writes: run.overwrite must never delete the
        # user's own files. Only the main process checks and removes (another one checking while it removes would
        # see half a run directory); a refusal there ends the other processes too.
        # The removal itself waits until every start-up check has passed (start_run_dir).
        if is_main and run_dir.exists():
            check_output_dir(run_dir, overwrite=True, flag="run.overwrite=true")
        return None
    if config.run.resume not in ("auto", "never"):
        return ckpt.verified(Path(config.run.resume))
    if finished:
        raise DistilError(
            f"{run_dir} already holds a finished run (its student is in {run_dir / FINAL_STUDENT}). Nothing was changed. "
            "Pass run.overwrite=true to start over there, or choose another run.output_dir."
        )
    if has_checkpoints:
        if config.run.resume == "never":
            raise DistilError(
                f"{run_dir} holds checkpoints of an unfinished run and run.resume=never. Use run.resume=auto to continue "
                "it, or run.overwrite=true to start over."
            )
        found = ckpt.find_resumable(run_dir)
        if found is None:
            raise DistilError(
                f"{run_dir} holds checkpoints but none is intact (each was reported above with what is wrong). Nothing "
                "was changed. Restore the checkpoints from a copy, or start over with run.overwrite=true."
            )
        return found
    # A run stopped before its first checkpoint was complete (a full disk, a kill) may leave checkpoints/ with
    # only the unfinished write: still distil's own, and the run starts again.
    if run_dir.exists() and any(p.name not in ("student-init", "tensorboard", "metrics.jsonl", "recipe.yaml")
                                and not (p.name == "checkpoints" and ckpt.holds_only_leftovers(p))
                                for p in run_dir.iterdir()):
        raise DistilError(
            f"{run_dir} exists and holds files that are not a distil run. Choose another run.output_dir "
            "or pass run.overwrite=true."
        )
    return None


def start_run_dir(run_dir: Path, config: TrainConfig, student_init: Path | None) -> None:
    """Create (or, with run.overwrite, replace) the run directory once every start-up check has passed: move in the
    student-init built beside it, and record the recipe the run really is. Main process only."""
    from distil.config import dump_config
    from distil.training.student_source import keep_student_init

    if config.run.overwrite and run_dir.exists():
        check_output_dir(run_dir, overwrite=True, flag="run.overwrite=true")  # again: files may have appeared since
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.remove_leftovers(run_dir)
    keep_student_init(student_init, run_dir)
    dump_config(config, run_dir / "recipe.yaml")


def save_student(run_dir: Path, config: TrainConfig, models, student, summary: dict, final_eval: dict) -> None:
    """Write `student` (the trained student with all its weights) as a save_pretrained directory with the
    tokenizer, distil_init.json and the model card; as a sentence-transformers directory too when the run
    distilled sentence embeddings or its teacher is a sentence-transformers model. Learned width projections
    are left out of the student and kept beside it in the run directory. An embedding run's student is its base
    model (no LM head was ever built) and always a sentence-transformers directory."""
    for key, value in models.original_dropout.items():
        setattr(student.config, key, value)
    with projections.detached(student) as maps, \
            atomic_output_dir(run_dir / FINAL_STUDENT, overwrite=True, command="train") as tmp, \
            disk_space_errors(tmp, lambda: tensor_bytes(student.state_dict()), partial=tmp):
        student.save_pretrained(tmp)
        models.tokenizer.save_pretrained(tmp)
        dense = maps.maps[projections.SENTENCE_KEY] if maps is not None and \
            projections.SENTENCE_KEY in maps.maps else None
        if models.sentence_pooling is not None:
            write_sentence_transformers(tmp, models.sentence_pooling, hidden_size_of(student.config), dense)
        record = dict(models.init_record or {})
        record.update({"distilled_from": config.teacher.path, "recipe": config.name or None,
                       "steps": summary["steps"], "tokens_seen": summary["tokens_seen"], "heldout": final_eval})
        write_json_atomic(tmp / "distil_init.json", record)
        embedding = _embedding_summary(models, student, dense) if models.objective == "embedding" else None
        (tmp / "README.md").write_text(_model_card(config, models, summary, final_eval, embedding), encoding="utf-8")
    if maps is not None:
        _save_projections(run_dir / projections.PROJECTIONS_FILE, maps)


def _save_projections(path: Path, maps) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.detach().cpu().contiguous() for k, v in maps.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def _embedding_summary(models, student, dense) -> dict:
    """What the model card says a sentence-embedding student is (model_card.embedding_in_words)."""
    record = models.init_record or {}
    hidden = hidden_size_of(student.config)
    return {"pooling": models.sentence_pooling.mode, "normalize": models.sentence_pooling.normalize,
            "dimension": dense.out_features if dense is not None else hidden, "hidden_size": hidden,
            "layers": int(student.config.num_hidden_layers), "teacher_layers": record.get("teacher_layers"),
            "teacher_num_layers": record.get("teacher_num_layers")}


def _model_card(config, models, summary, final_eval, embedding: dict | None = None) -> str:
    from distil.data import shards
    from distil.model_card import student_card

    weights = config.loss.weights()
    dataset = shards.read_manifest(config.data.path).get("dataset") or {}
    return student_card(
        teacher=config.teacher.path, objective=models.objective,
        has_lm_head=any(k in weights for k in ("ce", "mlm", "clm", "mse")), weights=weights,
        temperature=config.loss.temperature, recipe=config.to_dict(), steps=summary["steps"],
        tokens_seen=summary["tokens_seen"], n_parameters=sum(p.numel() for p in models.student.parameters()),
        heldout=final_eval, dataset=dataset.get("name") if isinstance(dataset, dict) else None,
        sentence_transformers=models.sentence_pooling is not None, embedding=embedding,
    )
