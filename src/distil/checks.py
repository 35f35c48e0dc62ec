"""Checks that data, tokenizers and models agree on what each token id means.

Shared by the commands that put them together (train, init-student, fit-head, cache-teacher): a token id read
with another tokenizer's table is another word, and nothing downstream can notice it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from distil.data import shards
from distil.errors import DistilError
from distil.loading import load_tokenizer, vocab_size_of

log = logging.getLogger(__name__)


CROSS_HINT = ("To distil a student of another tokenizer (data prepared with the student's tokenizer, which the "
              "student directory holds, e.g. from distil init-student --tokenizer OTHER --transplant-vocabulary), set "
              "loss.divergence=hybrid or uld: the teacher then reads the text with its own tokenizer and the two are "
              "aligned by text.")


def check_cross_tokenizer_run(config, objective: str, teacher_tokenizer, student_dir: str | None):
    """A run with a teacher of another tokenizer (loss.divergence uld or hybrid): the student's own tokenizer,
    after refusing, with why, what such a run cannot do."""
    from distil.cross_tokenizer.alignment import check_has_offsets

    loss = config.loss
    if config.teachers and len(config.teachers) > 1:
        raise DistilError(f"loss.divergence={loss.divergence} distils from one teacher of another tokenizer, and the "
                          "recipe has several: their distributions over different vocabularies have no common ids "
                          "to mix. Keep one teacher.")
    if objective != "clm":
        raise DistilError(f"loss.divergence={loss.divergence} aligns next-token distributions by text, which needs "
                          f"causal models; this run is {objective}. A masked-LM teacher predicts masked tokens of its "
                          "own tokenization, which a student of another tokenizer does not share.")
    representation = [f"loss.alpha_{t}" for t in ("mse", "cos", "hidden_mse", "sentence_mse", "sentence_cos",
                                                   "relation", "attention") if getattr(loss, f"alpha_{t}") > 0]
    if representation:
        raise DistilError(f"{', '.join(representation)} compare the student with the teacher position by position "
                          f"(logits id by id, or hidden states), and a teacher of another tokenizer has other "
                          f"positions and ids. Set them to 0 with loss.divergence={loss.divergence}.")
    if not student_dir or not Path(student_dir).is_dir():
        raise DistilError(f"loss.divergence={loss.divergence} needs the student's own tokenizer, and the student "
                          f"({student_dir or config.student.config}) is no directory holding one. Build it with distil "
                          "init-student --tokenizer OTHER --transplant-vocabulary, or save its tokenizer beside it.")
    student_tokenizer = load_tokenizer(student_dir)
    check_has_offsets(teacher_tokenizer, "teacher tokenizer")
    check_has_offsets(student_tokenizer, "student tokenizer")
    return student_tokenizer


def check_vocabularies(teacher_config, student_config, tokenizer, config,
                       student_dir: str | None = None) -> int | None:
    """None when the output layers match; the tokenizer's size when they differ only by padding (both cover every
    id of the shared tokenizer: soft targets then compare the tokenizer's ids only); else a clear refusal."""
    t, s = vocab_size_of(teacher_config), vocab_size_of(student_config)
    n = len(tokenizer)
    if n > min(t, s):
        who = "the teacher" if t < n else "the student"
        raise DistilError(
            f"The tokenizer has {n} tokens but {who} only {min(t, s)} embeddings: ids above {min(t, s) - 1} would crash. "
            "Use the tokenizer that belongs to the teacher (teacher.tokenizer), and a student built from the teacher "
            "(distil init-student) or with a vocabulary at least as large."
        )
    if t == s:
        return None
    if _own_tokenizer_differs(student_dir, tokenizer):
        raise DistilError(
            f"The teacher's vocabulary has {t} entries and the student's {s}, and the student's own tokenizer is not the "
            "teacher's: soft targets compare the two distributions id by id, so they need the same tokenizer. Build "
            "the student from the teacher (distil init-student) or give it the teacher's tokenizer. " + CROSS_HINT
        )
    log.warning("The output layers differ by padding only (teacher %d rows, student %d, tokenizer %d ids): the "
                "logit losses compare the tokenizer's %d ids; the padding rows are never predicted.", t, s, n, n)
    return n


def _own_tokenizer_differs(student_dir: str | None, tokenizer) -> bool:
    if not student_dir or not Path(student_dir).is_dir():
        return False
    try:
        own = load_tokenizer(student_dir)
    except DistilError:
        return False  # a student without a tokenizer of its own uses the teacher's
    return shards.vocabulary_fingerprint(own) != shards.vocabulary_fingerprint(tokenizer)


def check_data_matches_tokenizer(data_dir: str, tokenizer, teacher_config) -> None:
    manifest = shards.read_manifest(data_dir)
    expected = shards.vocabulary_fingerprint(tokenizer)
    got = manifest["tokenizer"]["vocab_fingerprint"]
    if expected != got:
        raise DistilError(
            f"The data in {data_dir} was prepared with another tokenizer ({manifest['tokenizer']['name_or_path']}, "
            f"{manifest['vocab_size']} tokens) than the teacher's ({len(tokenizer)} tokens): token ids would mean "
            "different words. Run distil prepare again with --tokenizer set to the teacher. " + CROSS_HINT
        )


TRANSPLANT_HINT = ("To give the student this tokenizer's own vocabulary instead, add --transplant-vocabulary (each "
                   "token's embedding is built from the teacher's embeddings of its pieces).")


def check_student_tokenizer(tokenizer, teacher_tokenizer, teacher_config, tokenizer_name: str, teacher: str) -> None:
    """A tokenizer saved with a student built from the teacher (`init-student --tokenizer`) must read every id as
    the teacher's embeddings were trained on it: each of the teacher tokenizer's tokens keeps its id, and any
    token it adds (special tokens, say) has an embedding row, as train allows for padded vocabularies."""
    try:
        check_vocabularies(teacher_config, teacher_config, tokenizer, None)  # every id has an embedding row
    except DistilError as exc:
        raise DistilError(f"{exc} {TRANSPLANT_HINT}") from None
    rows, vocab = vocab_size_of(teacher_config), tokenizer.get_vocab()
    if teacher_tokenizer is None:
        return  # a teacher saved without a tokenizer: only the size can be checked
    own = teacher_tokenizer.get_vocab()
    moved = [token for token, i in sorted(own.items(), key=lambda kv: kv[1]) if vocab.get(token) != i]
    if moved:
        examples = ", ".join(f"{token!r} is {own[token]} for the teacher, {vocab.get(token)} here" for token in moved[:3])
        raise DistilError(
            f"The tokenizer {tokenizer_name} gives {len(moved)} of the teacher's {len(own)} tokens another id or "
            f"none ({examples}). init-student copies the teacher's embeddings row by row, so the student reads "
            "each id as the teacher does and needs the teacher's token -> id table (extra tokens within the "
            f"embedding's {rows} rows are fine). Leave --tokenizer out to save the teacher's tokenizer. "
            + TRANSPLANT_HINT
        )


def check_data_matches_any(data_dir: str, tokenizers: list) -> None:
    """`data_dir` was prepared with one of `tokenizers` (same token -> id table), else the train-time refusal."""
    got = shards.read_manifest(data_dir)["tokenizer"]["vocab_fingerprint"]
    if not any(shards.vocabulary_fingerprint(t) == got for t in tokenizers):
        check_data_matches_tokenizer(data_dir, tokenizers[0], None)
