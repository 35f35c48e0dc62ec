"""`distil static-student`: a static embedding table distilled from a sentence-embedding teacher.

1. Every vocabulary entry goes through the teacher alone, framed as `distil prepare` frames a sequence
   ([CLS] id [SEP] for BERT, <s> id </s> for RoBERTa, end-of-text on both sides for GPT-2) and pooled as the
   teacher pools a sentence (its sentence-transformers pooling: mean over every position, framing included),
   WITHOUT the teacher's final L2 normalisation by default: the pooled vector's norm stays in the row and acts
   as a learned token weight in the mean (a frequent function word pools to a short vector). Subword pieces
   (`##ing`, `Ġthe`) go in as they are, by id.
2. Rows that text never reaches are left out of everything that follows and stored as zeros: the tokenizer's
   special tokens except the unknown token (encoding adds no framing) and entries matching `exclude_tokens`
   (BERT's ~994 `[unused]` slots by default). Their teacher vectors are far from any word's and would bend the
   principal components; in a rank-based frequency estimate they would push every real token down ~1000 ranks.
3. PCA of the kept vectors (centred, float64 SVD, no whitening) to the target dimension; each component's sign
   is fixed so that its largest loading is positive, so the table does not depend on the SVD routine's sign.
4. Frequency weighting by SIF, a / (a + p(token)), folded into the rows, so that frequent tokens weigh less in
   the mean. p comes from the token's rank among the kept entries in id order (Zipf, p ~ 1 / (rank + 1): needs
   no text, and WordPiece / BPE vocabularies are built roughly in frequency order) or from the token counts of
   the training text (add-one smoothed).
5. Training on text (optional), on what encoding computes (the mean of the tokens' rows). Objective
   `similarity` (default): within each batch, the squared difference between the student's and the teacher's
   cosine similarities of every pair of texts, the teacher's embeddings as it outputs them; the student learns
   to rank pairs as the teacher does, which is what retrieval, kNN and similarity use, and it transfers to text
   unlike the training text. Objective `cosine`: 1 - cos(student, teacher), the teacher's pooled vector (pooled
   as the rows are) centred and projected by the same PCA. Plus a pull `pull * |table - initial|^2 /
   |initial|^2` that keeps the table near the distilled one; Adam, seeded batches. A slice of the text is held
   out: every `eval_every` steps the Spearman agreement of the student's pairwise similarities of the held-out
   texts with the teacher's is measured, the best table is kept, and training stops after `patience`
   measurements without a gain.
6. Written as a sentence-transformers StaticEmbedding directory that Model2Vec also loads (distil.static_embedding).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distil.errors import DistilError
from distil.outputs import locks_output
from distil.static_embedding import StaticModel, sentence_embeddings_from_ids, write_static_directory

log = logging.getLogger(__name__)
WEIGHTINGS = ("zipf", "corpus", "none")
OBJECTIVES = ("similarity", "cosine")
UNUSED_SLOTS = r"\[unused\d+\]"  # BERT's reserved vocabulary slots: never produced by its tokenizer


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


def excluded_rows(tokenizer, vocab_size: int, pattern: str | None) -> torch.Tensor:
    """(vocab_size,) bool: the entries no text reaches, left out of the PCA, the ranks and the table: special
    tokens other than the unknown token, and entries whose string fully matches `pattern`."""
    try:
        compiled = re.compile(pattern) if pattern else None
    except re.error as error:
        raise DistilError(f"--exclude-tokens {pattern!r} is no regular expression ({error}). Give one such as "
                          "'\\[unused\\d+\\]', or '' to keep every entry.") from None
    vocabulary = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    excluded = torch.zeros(vocab_size, dtype=torch.bool)
    unknown = tokenizer.unk_token_id
    for token_id in tokenizer.all_special_ids:
        if token_id != unknown and 0 <= token_id < vocab_size:
            excluded[token_id] = True
    if compiled is not None:
        for token, token_id in vocabulary.items():
            if token_id < vocab_size and compiled.fullmatch(token):
                excluded[token_id] = True
    if int((~excluded).sum()) < 2:
        raise DistilError(f"--exclude-tokens {pattern!r} leaves fewer than two vocabulary entries. Give a narrower "
                          "pattern, or '' to keep every entry.")
    return excluded


def rank_probabilities(kept: torch.Tensor) -> torch.Tensor:
    """Zipf probabilities by rank among the kept entries in id order (0 for the others)."""
    probabilities = torch.zeros(len(kept), dtype=torch.float64)
    probabilities[kept] = zipf_probabilities(int(kept.sum()))
    return probabilities


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


def similarity_loss(table: torch.Tensor, ids: list[list[int]], teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the ordered pairs i != j of a batch of (cos(student_i, student_j) - cos(teacher_i, teacher_j))^2,
    the teacher's embeddings as it outputs them (any width, not centred): the student learns to rank pairs of
    texts as the teacher does, which is what retrieval, kNN and similarity use."""
    student = torch.nn.functional.normalize(sentence_embeddings_from_ids(table, ids, normalize=False), dim=1)
    reference = torch.nn.functional.normalize(teacher.to(student.dtype), dim=1)
    count = len(ids)
    if count < 2:
        return student.sum() * 0.0  # no pair: nothing to match, still a graph for backward
    difference = (student @ student.T - reference @ reference.T).pow(2)
    return (difference.sum() - difference.diagonal().sum()) / (count * (count - 1))


LOSSES = {"similarity": similarity_loss, "cosine": cosine_loss}


def pull_penalty(table: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """|table - initial|^2 / |initial|^2 (Frobenius): how far training moved the table, relative to its size."""
    return (table - initial).pow(2).sum() / initial.pow(2).sum().clamp_min(1e-30)


@torch.no_grad()
def evaluation_loss(table: torch.Tensor, ids: list[list[int]], targets: torch.Tensor, chunk: int = 1024,
                    objective: str = "cosine") -> float:
    """The objective over all sequences, in chunks (pairs within each chunk for the similarity objective)."""
    loss = LOSSES[objective]
    total = sum(float(loss(table, ids[s:s + chunk], targets[s:s + chunk])) * len(ids[s:s + chunk])
                for s in range(0, len(ids), chunk))
    return total / max(len(ids), 1)


@torch.no_grad()
def heldout_agreement(table: torch.Tensor, ids: list[list[int]], teacher_embeddings: torch.Tensor) -> float:
    """Spearman between the student's and the teacher's cosine similarities of every pair of held-out texts."""
    from distil.evaluation.embedding_metrics import similarity_agreement

    return similarity_agreement(sentence_embeddings_from_ids(table.float(), ids, normalize=False),
                                teacher_embeddings)


def heldout_split(count: int, fraction: float) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): every round(1 / fraction)-th sequence is held out (none for 0)."""
    if fraction <= 0:
        return list(range(count)), []
    every = max(2, round(1 / fraction))
    return ([i for i in range(count) if i % every != every - 1], [i for i in range(count) if i % every == every - 1])


def train_table(table: torch.Tensor, ids: list[list[int]], targets: torch.Tensor, steps: int, batch_size: int,
                lr: float, seed: int, progress: bool = True, log_every: int = 100, pull: float = 0.0,
                heldout_ids: list[list[int]] | None = None, heldout_teacher: torch.Tensor | None = None,
                eval_every: int = 100, patience: int = 3,
                objective: str = "cosine") -> tuple[torch.Tensor, list[dict]]:
    """Adam on the table rows against the targets under `objective` (LOSSES), plus `pull` times the pull
    penalty; batches drawn from a seeded permutation per pass. With held-out texts (ids and the teacher's
    embeddings of them), their similarity agreement is measured before training and every `eval_every` steps:
    the best table is returned, and training stops after `patience` measurements without a gain."""
    if steps < 0 or batch_size < 1 or lr <= 0 or pull < 0 or eval_every < 1 or patience < 1:
        raise DistilError(f"Training a static student needs steps >= 0, batch size >= 1, lr > 0, pull >= 0, "
                          f"eval every >= 1 and patience >= 1; got {steps}, {batch_size}, {lr}, {pull}, {eval_every}, "
                          f"{patience}.")
    if objective == "similarity" and steps and batch_size < 2:
        raise DistilError("The similarity objective compares pairs of texts within a batch: give --batch-size 2 or "
                          "more (256 is usual), or --objective cosine.")
    keep = [i for i, x in enumerate(ids) if x]  # a sequence with no text tokens has no student embedding
    if steps and not keep:
        raise DistilError("The training text has no tokens besides the framing. Give text with words in it.")
    ids, targets = [ids[i] for i in keep], targets[keep]
    initial = table.detach().clone().float()
    weights = torch.nn.Parameter(initial.clone())
    optimizer = torch.optim.Adam([weights], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, position, history = torch.empty(0, dtype=torch.long), 0, []
    watch = bool(heldout_ids) and heldout_teacher is not None
    best_table, best_agreement, since_best = initial, -2.0, 0
    if watch:
        best_agreement = heldout_agreement(initial, heldout_ids, heldout_teacher)
        history.append({"step": 0, "heldout_agreement": best_agreement})
    bar = tqdm(range(steps), desc="static-student", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if position + batch_size > len(order):
            order, position = torch.randperm(len(ids), generator=generator), 0
        batch = order[position:position + batch_size].tolist()
        position += batch_size
        fit = LOSSES[objective](weights, [ids[i] for i in batch], targets[batch])
        loss = fit + pull * pull_penalty(weights, initial) if pull else fit
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        record = {"step": done, "loss": fit.item()} if done % log_every == 0 or done == steps else None
        if watch and (done % eval_every == 0 or done == steps):
            agreement = heldout_agreement(weights.detach(), heldout_ids, heldout_teacher)
            record = {**(record or {"step": done, "loss": fit.item()}), "heldout_agreement": agreement}
            if agreement > best_agreement:
                best_table, best_agreement, since_best = weights.detach().clone(), agreement, 0
            else:
                since_best += 1
        if record is not None:
            history.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "step"})
            log.info("static-student step %d/%d: %s", done, steps,
                     ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
        if watch and since_best >= patience:
            log.info("static-student: held-out agreement has not risen for %d measurements; stopping at step %d, "
                     "keeping the table of the best measurement (%.4f)", patience, done, best_agreement)
            break
    return (best_table if watch else weights.detach()), history


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
                   steps: int = 3000, batch_size: int = 256, lr: float = 5e-3, seed: int = 0,
                   weighting: str = "zipf", sif_coefficient: float = 1e-4, max_sequences: int = 20000,
                   max_length: int | None = None, normalize_tokens: bool = False,
                   exclude_tokens: str | None = UNUSED_SLOTS, pull: float = 0.0, heldout_fraction: float = 0.05,
                   eval_every: int = 100, patience: int = 3, objective: str = "similarity",
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Distil a static embedding table of width `dim` from `teacher`, train it up to `steps` Adam steps on
    `data` (a prepared directory or text files; needed when steps > 0 or weighting is corpus), write it to
    `output_dir`. Returns what was done (also written as static_student.json). The module docstring says what
    each option does."""
    from transformers import AutoModel

    from distil.loading import load_model, load_tokenizer, resolve_source
    from distil.outputs import atomic_output_dir, check_output_dir, write_json_atomic
    from distil.sentence_embeddings import SentencePooling, load_dense, teacher_pooling

    if weighting not in WEIGHTINGS:
        raise DistilError(f"Unknown weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}.")
    if not 0 < sif_coefficient < 1:
        raise DistilError(f"The SIF coefficient must lie between 0 and 1 (1e-4 is usual); got {sif_coefficient}.")
    if objective not in OBJECTIVES:
        raise DistilError(f"Unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}.")
    if not 0 <= heldout_fraction < 1:
        raise DistilError(f"The held-out fraction must lie in [0, 1) (0.05 is usual; 0 trains without early "
                          f"stopping); got {heldout_fraction}.")
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
    # The rows (and the training targets) are the teacher's pooled vectors before its own L2 normalisation,
    # unless normalize_tokens asks for unit rows; the exported model still normalises sentences as the teacher does.
    token_pooling = SentencePooling(pooling.mode, normalize=normalize_tokens)
    log.info("static-student: %d vocabulary entries through %s (%s pooling, %s)", vocab_size, teacher, pooling.mode,
             "unit rows" if normalize_tokens else "norms kept")
    vectors = vocabulary_vectors(model, tokenizer, vocab_size, token_pooling, dense, progress=progress)
    excluded = excluded_rows(tokenizer, vocab_size, exclude_tokens)
    kept_rows = ~excluded
    kept_vectors = vectors[kept_rows]
    mean, components = pca_basis(kept_vectors, dim)
    kept = float(project(kept_vectors, mean, components).var(dim=0).sum() / (kept_vectors - mean).var(dim=0).sum())
    log.info("static-student: %d entries left out (never reached by text); PCA %d -> %d keeps %.1f%% of the "
             "variance", int(excluded.sum()), vectors.shape[1], dim, 100 * kept)

    sequences: list[list[int]] = []
    prefix, suffix = framing_of(tokenizer)
    if data:
        limit = max_length or pooling.max_seq_length or 128
        sequences = _read_training_text(list(data), tokenizer, limit, max_sequences, prefix, suffix)
        if not sequences:
            raise DistilError(f"No text was found in {', '.join(data)}.")
    student_ids = [s[len(prefix):len(s) - len(suffix)] for s in sequences]  # what encoding looks up: no framing
    if weighting == "zipf":
        weights = sif_weights(rank_probabilities(kept_rows), sif_coefficient)
    elif weighting == "corpus":
        counts = torch.bincount(torch.tensor([i for s in student_ids for i in s], dtype=torch.long),
                                minlength=vocab_size)[:vocab_size]
        weights = sif_weights(corpus_probabilities(counts), sif_coefficient)
    else:
        weights = torch.ones(vocab_size, dtype=torch.float64)
    table = (project(vectors, mean, components) * weights.unsqueeze(1)).float()
    table[excluded] = 0.0

    summary = {"teacher": teacher, "dim": dim, "vocabulary": vocab_size, "excluded_rows": int(excluded.sum()),
               "exclude_tokens": exclude_tokens, "normalize_tokens": normalize_tokens, "pca_variance_kept": kept,
               "weighting": weighting, "sif_coefficient": sif_coefficient, "steps": steps, "seed": seed,
               "training_sequences": len(sequences), "normalize": pooling.normalize}
    if steps > 0:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        teacher_embeddings = sentence_targets(model, sequences, pad_id, token_pooling, dense,
                                              desc="training text through the teacher" if progress else None)
        # cosine: the teacher's vector in the student's space; similarity: as the teacher outputs it
        targets = (project(teacher_embeddings, mean, components) if objective == "cosine"
                   else teacher_embeddings).float()
        train, heldout = heldout_split(len(sequences), heldout_fraction)
        heldout = [i for i in heldout if student_ids[i]]
        train_ids, train_targets = [student_ids[i] for i in train], targets[train]
        before = evaluation_loss(table, train_ids, train_targets, objective=objective)
        table, history = train_table(table, train_ids, train_targets, steps, batch_size, lr, seed, progress,
                                     pull=pull, heldout_ids=[student_ids[i] for i in heldout],
                                     heldout_teacher=teacher_embeddings[heldout] if len(heldout) > 1 else None,
                                     eval_every=eval_every, patience=patience, objective=objective)
        after = evaluation_loss(table, train_ids, train_targets, objective=objective)
        log.info("static-student: loss against the teacher on the training text %.4f -> %.4f", before, after)
        summary.update(objective=objective, batch_size=batch_size, lr=lr, pull=pull, heldout_sequences=len(heldout),
                       loss_before=before, loss_after=after, history=history)
        agreements = [h for h in history if "heldout_agreement" in h]
        if agreements:
            best = max(agreements, key=lambda h: h["heldout_agreement"])
            summary.update(heldout_agreement_before=agreements[0]["heldout_agreement"],
                           heldout_agreement_best=best["heldout_agreement"], best_step=best["step"],
                           steps_run=history[-1]["step"])
    summary["seconds"] = time.perf_counter() - started

    from tokenizers import Tokenizer

    exported = StaticModel(table=table, tokenizer=Tokenizer.from_str(backend.to_str()), normalize=pooling.normalize)
    details = {"apply_pca": dim, "sif_coefficient": sif_coefficient, "weighting": weighting,
               "trained_steps": summary.get("best_step", steps)}
    with atomic_output_dir(output_dir, overwrite, command="static-student") as tmp:
        write_static_directory(tmp, exported, teacher, details)
        write_json_atomic(tmp / "static_student.json", summary)
    return summary
