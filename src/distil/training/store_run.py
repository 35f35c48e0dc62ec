"""What a run from a teacher-signal store (`teacher.cache: DIR`, or a store in `teachers:`) checks before it
starts, and the masks it trains with.

The checks: the prepared data are the ones the store was written for (fingerprint and lengths), the temperature is
the store's, and every loss term can be computed from what the store holds (refused otherwise, saying what would
make it work). The store itself is read by training.sources.store. A masked-LM teacher's store holds each
sequence's masked input and targets (the teacher scored the masked input): `StoredMasks` gives every training step
those, never freshly drawn masks, and a recipe whose masking settings are not the store's is refused.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from distil.errors import DistilError
from distil.teacher_signal.divergences import unsupported_divergence
from distil.teacher_cache import format as fmt
from distil.teacher_cache.reader import TeacherStore

REPRESENTATION_TERMS = ("cos", "hidden_mse", "sentence_mse", "sentence_cos")


def _refuse(message: str) -> None:
    raise DistilError(message)


def check_store_terms(config, store: TeacherStore, pairs: list[tuple[int, int]], n_student: int,
                      n_teacher: int, temperature: float | None = None, representation: bool = True) -> None:
    """Refuse, with what to change, every loss term the store cannot provide. `temperature`: the one its signals
    are used at (default loss.temperature); `representation`: whether the hidden-state and self-attention terms
    are computed against it (with several teachers, only the named hidden teacher's are)."""
    loss, root = config.loss, store.root
    temperature = float(loss.temperature if temperature is None else temperature)
    if loss.alpha_mse > 0:
        _refuse(f"loss.alpha_mse needs the teacher's dense logits, which a teacher-signal store ({root}) does not "
                "keep (only its top-k distribution). Set loss.alpha_mse=0, or train with the live teacher (unset "
                "teacher.cache).")
    if representation and (loss.alpha_relation > 0 or loss.alpha_attention > 0):
        _refuse(f"loss.alpha_relation and loss.alpha_attention need the teacher's self-attention, which a "
                f"teacher-signal store ({root}) does not keep. Set them to 0, or train with the live teacher (unset "
                "teacher.cache).")
    if loss.alpha_ce > 0:
        problem = unsupported_divergence(loss.divergence, store.sampled > 0)
        if problem:
            _refuse(f"{problem}, and the store {root} holds {store.sampled} sampled tokens per position. Use "
                    "loss.divergence=forward_kl, or a store written without --sampled (its top-k + rest form supports "
                    "every divergence), or the live teacher.")
        if abs(temperature - store.temperature) > 1e-9:
            setting = "loss.temperature" if not config.teachers else "the teacher's temperature in teachers"
            _refuse(f"The store {root} holds the teacher's distribution at temperature {store.temperature:g}, but "
                    f"{setting} is {temperature:g}. Set it to {store.temperature:g}, or write "
                    f"a store at this temperature (distil cache-teacher --temperature {temperature:g}).")
    wants_hidden = representation and any(getattr(loss, f"alpha_{t}") > 0 for t in REPRESENTATION_TERMS)
    if wants_hidden:
        if store.hidden_states != "last":
            _refuse(f"Hidden-state and sentence-embedding losses need the teacher's hidden states, and the store "
                    f"{root} holds none. Write it with distil cache-teacher --hidden-states last (the last hidden "
                    "state), set those loss weights to 0, or train with the live teacher (unset teacher.cache).")
        other = [p for p in pairs if p != (n_student, n_teacher)]
        if (loss.alpha_cos > 0 or loss.alpha_hidden_mse > 0) and other:
            _refuse(f"The store {root} holds the teacher's last hidden state only, but loss.hidden_layers pairs "
                    f"{other} with other teacher layers. Set loss.hidden_layers=last, or train with the live teacher.")


MASKING_KEYS = (("mlm_probability", "--mlm-probability"), ("mlm_smoothing", "--mlm-smoothing"),
                ("mask_replace", "--mask-replace"))


def check_store_masking(config, store: TeacherStore, objective: str) -> None:
    """An MLM teacher's store fixes the masks: refuse one without them, and a recipe that would mask otherwise."""
    root, masking = store.root, store.masking
    if objective != "mlm":
        return
    if not masking:
        _refuse(f"The store {root} holds a masked-LM teacher's signals on the clean text (it was written by an earlier "
                "distil, without masks), but the student sees masked text: its soft targets at the masked positions "
                "would be the teacher's answers to another input. Write it again with distil cache-teacher "
                "--overwrite (the teacher then scores each sequence masked as training masks it).")
    differing = [(key, flag, getattr(config.loss, key), masking[key]) for key, flag in MASKING_KEYS
                 if not _same_setting(getattr(config.loss, key), masking[key])]
    if differing:
        said = "; ".join(f"loss.{key} is {_shown(want)}, the store's is {_shown(have)}"
                         for key, _, want, have in differing)
        sets = " ".join(f"loss.{key}={json.dumps(have).replace(' ', '')}" for key, _, _, have in differing)
        flags = " ".join(f"{flag} {_shown(want)}" for _, flag, want, _ in differing)
        _refuse(f"The store {root} holds each sequence masked once, and the recipe's masking settings are not the "
                f"ones it was masked with ({said}). Set {sets}, or write a store with the recipe's settings "
                f"(distil cache-teacher ... {flags}).")


def _same_setting(a, b) -> bool:
    a, b = np.atleast_1d(np.asarray(a, dtype=float)), np.atleast_1d(np.asarray(b, dtype=float))
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=1e-9))


def _shown(value) -> str:
    return " ".join(f"{float(v):g}" for v in value) if isinstance(value, (list, tuple)) else f"{float(value):g}"


class StoredMasks:
    """The masks of an MLM teacher's store for training steps: `for_step(indices)` is the masker of one step
    batch (called by build_step as an MLMMasker is), returning each row's stored masked input and its labels."""

    def __init__(self, store: TeacherStore):
        self.store = store

    def for_step(self, indices: list[int]):
        def masker(ids: torch.Tensor, attention_mask: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            if ids.shape[0] != len(indices):
                raise ValueError(f"a step batch of {ids.shape[0]} rows was given {len(indices)} sequence indices")
            masked, labels = ids.clone().cpu(), torch.full(ids.shape, -100, dtype=ids.dtype)
            clean = ids.cpu()
            for row, (sequence, count) in enumerate(zip(indices, attention_mask.sum(dim=1).tolist())):
                stored, target = (torch.from_numpy(a) for a in self.store.masks(int(sequence), int(count)))
                if not torch.equal(stored[~target], clean[row, :count][~target]):
                    _refuse(f"Sequence {sequence}'s tokens differ from the ones the store {self.store.root} masked: "
                            "the store was written for other data. Write it again for these data.")
                masked[row, :count] = stored
                labels[row, :count] = torch.where(target, clean[row, :count], -100)
            return masked.to(ids.device), labels.to(ids.device)

        return masker


def stored_masks_of(stores: list[TeacherStore], objective: str) -> StoredMasks | None:
    """The stored masks training steps use (the stores of an MLM teacher: every teacher, live or stored, then scores
    the masked input the store was written with), or None (live teachers only, CLM stores)."""
    masked = [store for store in stores if store.masking]
    if objective != "mlm" or not masked:
        return None
    if len(masked) > 1:
        _refuse(f"The stores {', '.join(str(s.root) for s in masked)} each hold their own masks, and a step can show "
                "the student one masked input only. Mix one masked-LM store with live teachers (they score the "
                "store's masked input).")
    return StoredMasks(masked[0])


def check_store_matches_data(config, store: TeacherStore, train_lengths: np.ndarray) -> None:
    m, root = store.manifest, store.root
    if m["split"] != "train":
        _refuse(f"The store {root} was written for the {m['split']!r} split; training reads the train split. Write "
                "a store with distil cache-teacher --split train.")
    got = fmt.data_fingerprint(config.data.path, "train")
    if got != m["data"]["fingerprint"]:
        _refuse(f"The store {root} was written for other data than {config.data.path} (data fingerprint "
                f"{m['data']['fingerprint']}, these data {got}; written from {m.get('data_path')}). Its positions "
                "would not be these tokens'. Write a store for these data (distil cache-teacher --data "
                f"{config.data.path}), or set data.path to the data it was written for.")
    if m["data"].get("max_length") != config.data.max_length or not np.array_equal(store.lengths(), train_lengths):
        _refuse(f"The store {root} holds sequences cut at max_length {m['data'].get('max_length')}, but "
                f"data.max_length is {config.data.max_length}: the positions differ. Set data.max_length="
                f"{'null' if m['data'].get('max_length') is None else m['data'].get('max_length')}, or write the "
                "store " + ("without --max-length." if config.data.max_length is None
                            else f"with --max-length {config.data.max_length}."))
