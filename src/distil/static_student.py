"""`distil static-student`: a static embedding table distilled from a sentence-embedding teacher.

1. Every vocabulary entry goes through the teacher alone, framed as the teacher's tokenizer frames a text
   as `distil prepare` frames a sequence ([CLS] id [SEP] for BERT, <s> id </s> for RoBERTa, end-of-text on both
   sides for GPT-2) and pooled as the teacher pools a
   sentence (its sentence-transformers pooling: mean over every position, framing included, then L2
   normalisation for all-MiniLM). Subword pieces (`##ing`, `Ġthe`) go in as they are, by id: the row stands for
   what the piece contributes where the tokenizer produces it. Special tokens get a row like any other entry;
   encoding adds no framing, so only [UNK] (unknown characters) and special tokens written literally in a text
   are ever looked up.
2. PCA of those vectors (centred, float64 SVD) to the target dimension; each component's sign is fixed so that
   its largest loading is positive, so the table does not depend on the SVD routine's sign choice.
3. Frequency weighting by SIF, a / (a + p(token)), folded into the rows, so that frequent tokens weigh less in
   the mean. p comes from the token's rank in the vocabulary (Zipf, p ~ 1 / (rank + 1): needs no text, and
   WordPiece / BPE vocabularies are built roughly in frequency order) or from the token counts of the training
   text (add-one smoothed: frequent words of the user's own text are found exactly, but a small corpus gives
   every unseen token the largest weight).
4. Training on text: the student's sentence embedding (the mean of its tokens' rows, exactly what encoding
   computes) against the teacher's sentence embedding of the same text, brought into the student's space by
   the same PCA (centred, projected); loss 1 - cosine, Adam, seeded batches.
5. Written as a sentence-transformers StaticEmbedding directory that Model2Vec also loads (distil.static_embedding).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distil.errors import DistilError
from distil.outputs import locks_output
from distil.static_embedding import StaticModel, sentence_embeddings_from_ids, write_static_directory

log = logging.getLogger(__name__)
WEIGHTINGS = ("zipf", "corpus", "none")


def framing_of(tokenizer) -> tuple[list[int], list[int]]:
    """The ids put before and after a text's own ids: the framing `distil prepare` gives sequences."""
    from distil.data.prepare import framing_for

    framing = framing_for(tokenizer)
    return list(framing.prefix), list(framing.suffix)


@torch.no_grad()
def sentence_targets(teacher, sequences: list[list[int]], pad_id: int, pooling, dense=None,
                     batch_size: int = 64, desc: str | None = None) -> torch.Tensor:
    """The teacher's sentence embeddings of framed id sequences (its pooling and normalisation), in order."""
    from distil.sentence_embeddings import embed

    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # little padding per batch
    chunks = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, dynamic_ncols=True):
        rows = [sequences[i] for i in order[start:start + batch_size]]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.as_tensor(row)
            mask[r, :len(row)] = 1
        hidden = teacher(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        chunks.append(embed(hidden, mask, pooling, dense).double())
    if not chunks:
        return torch.zeros(0, 0, dtype=torch.float64)
    out = torch.empty(len(sequences), chunks[0].shape[1], dtype=torch.float64)
    out[torch.as_tensor(order)] = torch.cat(chunks)
    return out


def vocabulary_vectors(teacher, tokenizer, vocab_size: int, pooling, dense=None, batch_size: int = 512,
                       progress: bool = True) -> torch.Tensor:
    """(vocab_size, hidden) float64: each vocabulary entry through the teacher alone, framed and pooled."""
    prefix, suffix = framing_of(tokenizer)
    sequences = [prefix + [i] + suffix for i in range(vocab_size)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return sentence_targets(teacher, sequences, pad_id, pooling, dense, batch_size,
                            desc="vocabulary through the teacher" if progress else None)


def pca_basis(vectors: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (H,), components (H, dim)) of the rows of `vectors`, in float64, components by falling variance,
    each signed so that its largest-magnitude loading is positive."""
    rows, width = vectors.shape
    if not 1 <= dim <= min(width, rows - 1):
        raise DistilError(f"A static student of dimension {dim} cannot be had from {rows} vectors of width {width}: "
                          f"choose --dim between 1 and {min(width, rows - 1)}.")
    vectors = vectors.double()
    mean = vectors.mean(dim=0)
    _, _, vh = torch.linalg.svd(vectors - mean, full_matrices=False)
    components = vh[:dim].T.clone()
    largest = components.abs().argmax(dim=0)
    components *= torch.sign(components[largest, torch.arange(dim)]).unsqueeze(0)
    return mean, components


def project(vectors: torch.Tensor, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """Vectors in the PCA space: centred, then onto the components."""
    return (vectors.double() - mean) @ components


def zipf_probabilities(vocab_size: int) -> torch.Tensor:
    """p(rank) proportional to 1 / (rank + 1), rank = token id."""
    inverse = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    return inverse / inverse.sum()


def corpus_probabilities(counts: torch.Tensor) -> torch.Tensor:
    """Add-one smoothed token frequencies."""
    counts = counts.double() + 1.0
    return counts / counts.sum()


def sif_weights(probabilities: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Smooth inverse frequency: a / (a + p)."""
    return coefficient / (coefficient + probabilities)


def cosine_loss(table: torch.Tensor, ids: list[list[int]], targets: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student sentence embedding, target) over the sequences."""
    student = sentence_embeddings_from_ids(table, ids, normalize=False)
    return (1.0 - torch.nn.functional.cosine_similarity(student, targets.to(student.dtype), dim=1)).mean()


@torch.no_grad()
def evaluation_loss(table: torch.Tensor, ids: list[list[int]], targets: torch.Tensor, chunk: int = 4096) -> float:
    total = sum(float(cosine_loss(table, ids[s:s + chunk], targets[s:s + chunk])) * len(ids[s:s + chunk])
                for s in range(0, len(ids), chunk))
    return total / max(len(ids), 1)


def train_table(table: torch.Tensor, ids: list[list[int]], targets: torch.Tensor, steps: int, batch_size: int,
                lr: float, seed: int, progress: bool = True, log_every: int = 100) -> tuple[torch.Tensor, list[dict]]:
    """Adam on the table rows against the targets; batches drawn from a seeded permutation per pass."""
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise DistilError(f"Training a static student needs steps >= 0, batch size >= 1 and lr > 0; got {steps}, "
                          f"{batch_size}, {lr}.")
    keep = [i for i, x in enumerate(ids) if x]  # a sequence with no text tokens has no student embedding
    if steps and not keep:
        raise DistilError("The training text has no tokens besides the framing. Give text with words in it.")
    ids, targets = [ids[i] for i in keep], targets[keep]
    weights = torch.nn.Parameter(table.detach().clone().float())
    optimizer = torch.optim.Adam([weights], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, position, history = torch.empty(0, dtype=torch.long), 0, []
    bar = tqdm(range(steps), desc="static-student", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if position + batch_size > len(order):
            order, position = torch.randperm(len(ids), generator=generator), 0
        batch = order[position:position + batch_size].tolist()
        position += batch_size
        loss = cosine_loss(weights, [ids[i] for i in batch], targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            value = loss.item()
            history.append({"step": step + 1, "loss": value})
            bar.set_postfix(loss=f"{value:.4f}")
            log.info("static-student step %d/%d: loss %.4f", step + 1, steps, value)
    return weights.detach(), history


def _read_training_text(data: list[str], tokenizer, max_length: int, max_sequences: int,
                        prefix: list[int], suffix: list[int]) -> list[list[int]]:
    """Framed id sequences: the train split of one `distil prepare` directory, or the lines of text files;
    at most `max_sequences`, spread evenly over what there is."""
    from distil.data import shards

    if len(data) == 1 and (Path(data[0]) / shards.MANIFEST).is_file():
        from distil.data.dataset import TokenSequences
        from distil.training.setup import check_data_matches_tokenizer

        check_data_matches_tokenizer(data[0], tokenizer, None)
        split = TokenSequences(data[0], "train", max_length=max_length)
        picked = _spread(len(split), max_sequences)
        return [split[i].tolist() for i in picked]
    from distil.data.textfiles import ReadStats, check_input_files, iter_lines

    lines = [line for path in check_input_files(data) for line in iter_lines(path, ReadStats())]
    lines = [lines[i] for i in _spread(len(lines), max_sequences)]
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise DistilError(f"--max-length {max_length} leaves no room for text inside the teacher's framing.")
    encoded = tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
    return [prefix + list(ids[:body]) + suffix for ids in encoded]


def _spread(available: int, wanted: int) -> list[int]:
    if available <= wanted:
        return list(range(available))
    return [int(i * available / wanted) for i in range(wanted)]


@locks_output("static-student")
def static_student(teacher: str, output_dir: str, data: list[str] | None = None, dim: int = 256,
                   steps: int = 1000, batch_size: int = 256, lr: float = 5e-3, seed: int = 0,
                   weighting: str = "zipf", sif_coefficient: float = 1e-4, max_sequences: int = 20000,
                   max_length: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Distil a static embedding table of width `dim` from `teacher`, train it `steps` Adam steps on `data`
    (a prepared directory or text files; needed when steps > 0 or weighting is corpus), write it to
    `output_dir`. Returns what was done (also written as static_student.json)."""
    from transformers import AutoModel

    from distil.loading import load_model, load_tokenizer, resolve_source
    from distil.outputs import atomic_output_dir, check_output_dir, write_json_atomic
    from distil.sentence_embeddings import SentencePooling, load_dense, teacher_pooling

    if weighting not in WEIGHTINGS:
        raise DistilError(f"Unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}.")
    if not 0 < sif_coefficient < 1:
        raise DistilError(f"The SIF coefficient must lie between 0 and 1 (1e-4 is usual); got {sif_coefficient}.")
    if not data and (steps > 0 or weighting == "corpus"):
        raise DistilError("Training (--steps > 0) and --weighting corpus need text: give --data (a `distil prepare` "
                          "directory made with the teacher's tokenizer, or text files), or --steps 0.")
    check_output_dir(output_dir, overwrite)
    started = time.perf_counter()
    tokenizer = load_tokenizer(teacher)
    if not getattr(tokenizer, "is_fast", False):
        raise DistilError(f"{teacher}'s tokenizer has no tokenizer.json (fast tokenizer): a static model is saved "
                          "with one. Convert the tokenizer to a fast one first.")
    torch.manual_seed(seed)
    model, _ = load_model(teacher, AutoModel, dtype=torch.float32)
    model.eval()
    local = resolve_source(teacher)
    pooling = teacher_pooling(teacher) or SentencePooling("mean", normalize=False)
    dense = load_dense(Path(local)) if Path(local).is_dir() else None
    backend = tokenizer.backend_tokenizer
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    log.info("static-student: %d vocabulary entries through %s (%s pooling%s)", vocab_size, teacher, pooling.mode,
             ", normalised" if pooling.normalize else "")
    vectors = vocabulary_vectors(model, tokenizer, vocab_size, pooling, dense, progress=progress)
    mean, components = pca_basis(vectors, dim)
    kept = float(project(vectors, mean, components).var(dim=0).sum() / (vectors - mean).var(dim=0).sum())
    log.info("static-student: PCA %d -> %d keeps %.1f%% of the variance", vectors.shape[1], dim, 100 * kept)

    sequences: list[list[int]] = []
    prefix, suffix = framing_of(tokenizer)
    if data:
        limit = max_length or pooling.max_seq_length or 128
        sequences = _read_training_text(list(data), tokenizer, limit, max_sequences, prefix, suffix)
        if not sequences:
            raise DistilError(f"No text was found in {', '.join(data)}.")
    student_ids = [s[len(prefix):len(s) - len(suffix)] for s in sequences]  # what encoding looks up: no framing
    if weighting == "zipf":
        weights = sif_weights(zipf_probabilities(vocab_size), sif_coefficient)
    elif weighting == "corpus":
        counts = torch.bincount(torch.tensor([i for s in student_ids for i in s], dtype=torch.long),
                                minlength=vocab_size)[:vocab_size]
        weights = sif_weights(corpus_probabilities(counts), sif_coefficient)
    else:
        weights = torch.ones(vocab_size, dtype=torch.float64)
    table = (project(vectors, mean, components) * weights.unsqueeze(1)).float()

    summary = {"teacher": teacher, "dim": dim, "vocabulary": vocab_size, "pca_variance_kept": kept,
               "weighting": weighting, "sif_coefficient": sif_coefficient, "steps": steps, "seed": seed,
               "training_sequences": len(sequences), "normalize": pooling.normalize}
    if steps > 0:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        teacher_embeddings = sentence_targets(model, sequences, pad_id, pooling, dense,
                                              desc="training text through the teacher" if progress else None)
        targets = project(teacher_embeddings, mean, components).float()
        before = evaluation_loss(table, student_ids, targets)
        table, history = train_table(table, student_ids, targets, steps, batch_size, lr, seed, progress)
        after = evaluation_loss(table, student_ids, targets)
        log.info("static-student: loss against the teacher on the training text %.4f -> %.4f", before, after)
        summary.update(batch_size=batch_size, lr=lr, loss_before=before, loss_after=after, history=history)
    summary["seconds"] = time.perf_counter() - started

    from tokenizers import Tokenizer

    exported = StaticModel(table=table, tokenizer=Tokenizer.from_str(backend.to_str()), normalize=pooling.normalize)
    details = {"apply_pca": dim, "sif_coefficient": sif_coefficient, "weighting": weighting, "trained_steps": steps}
    with atomic_output_dir(output_dir, overwrite, command="static-student") as tmp:
        write_static_directory(tmp, exported, teacher, details)
        write_json_atomic(tmp / "static_student.json", summary)
    return summary
