"""`distil fit-head`: give a headless encoder an MLM head, so that soft-target distillation becomes possible.

Many sentence encoders (all-MiniLM-L6-v2 among them) ship only their encoder: their logits would come from a
random head, so only hidden-state losses can distil them. This trains a fresh MLM head (transform + decoder) on
the frozen encoder with the masked-LM loss on prepared data, and writes the encoder with its fitted head as a
save_pretrained directory usable as a teacher (`teacher.path`). The encoder's weights are not changed (tested),
so its hidden states, and hence a student's hidden-state targets, stay exactly the teacher's. The held-out
masked-token accuracy before and after fitting is reported (and recorded in fit_head.json).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distil.data.dataset import GlobalBatchSampler, TokenSequences, pad_id_of
from distil.errors import DistilError
from distil.loading import load_model, load_tokenizer
from distil.outputs import atomic_output_dir, locks_output, write_json_atomic

log = logging.getLogger(__name__)
EVAL_SEED = 12345


def _masked_accuracy(model, heldout: TokenSequences, masker, pad_id: int, batch_size: int, max_batches: int) -> dict:
    """Masked-LM loss and accuracy on fixed held-out batches with fixed masks."""
    from distil.training.batches import build_step

    model.eval()
    generator = torch.Generator()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for index, start in enumerate(range(0, min(len(heldout), batch_size * max_batches), batch_size)):
            generator.manual_seed(EVAL_SEED + index)
            sequences = [heldout[i] for i in range(start, min(len(heldout), start + batch_size))]
            (batch,) = build_step(sequences, pad_id, "mlm", masker, generator, 0, 1, torch.device("cpu"))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            targets = batch.labels != -100
            predicted = logits[targets].argmax(-1)
            correct += int((predicted == batch.labels[targets]).sum())
            total += int(targets.sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits[targets], batch.labels[targets],
                                                                reduction="sum"))
    return {"masked_accuracy": correct / max(total, 1), "mlm_loss": loss_sum / max(total, 1), "targets": total}


@locks_output("fit-head")
def fit_head(teacher: str, data: str, output_dir: str, steps: int = 300, lr: float = 1e-3, batch_size: int = 32,
             seed: int = 0, eval_batches: int = 20, overwrite: bool = False, progress: bool = True) -> dict:
    """Fit a fresh MLM head on `teacher`'s frozen encoder with `data` (a prepared directory); write it to
    `output_dir`. Returns held-out masked-token accuracy and loss before and after."""
    from transformers import AutoModelForMaskedLM

    from distil.config import TrainConfig
    from distil.recipe_checks import POSITIVE, check_number
    from distil.outputs import check_output_dir
    from distil.checks import check_data_matches_tokenizer
    from distil.data.masking import build_masker

    lr = check_number("fit-head's learning rate (lr, --lr)", lr, POSITIVE)
    if steps < 1 or batch_size < 1:
        raise DistilError(f"fit-head needs steps >= 1 and batch size >= 1; got {steps} and {batch_size}.")
    check_output_dir(output_dir, overwrite)
    tokenizer = load_tokenizer(teacher)
    check_data_matches_tokenizer(data, tokenizer, None)
    model, info = load_model(teacher, AutoModelForMaskedLM, dtype=torch.float32)
    fresh = [k for k in info.get("missing_keys", []) if not k.startswith(model.base_model_prefix + ".")]
    if not fresh:
        log.warning("%s already has an MLM head; fit-head trains it again on the frozen encoder.", teacher)
    head = [p for name, p in model.named_parameters() if not name.startswith(model.base_model_prefix + ".")]
    if not head:
        raise DistilError(f"Cannot tell {teacher}'s MLM head from its encoder ({type(model).__name__}).")
    model.base_model.requires_grad_(False)
    encoder_before = {k: v.clone() for k, v in model.base_model.state_dict().items()}

    train = TokenSequences(data, "train")
    if train.manifest["splits"].get("heldout", {}).get("sequences", 0) == 0:
        raise DistilError(f"{data} has no held-out split to measure the head on. Prepare it with --heldout 0.01 "
                          "(or --heldout-file).")
    heldout = TokenSequences(data, "heldout")
    vocab = model.get_input_embeddings().num_embeddings
    masker = build_masker(TrainConfig(), data, train.manifest, vocab, tokenizer)
    pad_id = pad_id_of(train.manifest)
    before = _masked_accuracy(model, heldout, masker, pad_id, batch_size, eval_batches)
    log.info("fit-head: held-out masked-token accuracy with the fresh head %.2f%%", 100 * before["masked_accuracy"])

    from distil.training.batches import build_step

    torch.manual_seed(seed)
    # Tied decoders share the word embeddings, which stay frozen: only the head's own parameters are trained.
    trained = [p for p in head if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr)
    sampler = GlobalBatchSampler(train.lengths, batch_size, seed=seed)
    batches = iter(sampler)
    generator = torch.Generator()
    started = time.perf_counter()
    model.train()
    model.base_model.eval()  # no dropout in the frozen encoder: its outputs are the teacher's
    for step in tqdm(range(steps), desc="fit-head", disable=not progress, dynamic_ncols=True):
        generator.manual_seed(seed * 1_000_003 + step)
        (batch,) = build_step([train[i] for i in next(batches)], pad_id, "mlm", masker, generator, 0, 1,
                              torch.device("cpu"))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        targets = batch.labels != -100
        loss = torch.nn.functional.cross_entropy(logits[targets], batch.labels[targets])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = _masked_accuracy(model, heldout, masker, pad_id, batch_size, eval_batches)
    unchanged = all(torch.equal(v, model.base_model.state_dict()[k]) for k, v in encoder_before.items())
    if not unchanged:
        raise RuntimeError("fit-head changed the encoder's weights; only the head may be trained")
    summary = {"teacher": teacher, "data": data, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
               "before": before, "after": after, "seconds": time.perf_counter() - started,
               "trained_parameters": sum(p.numel() for p in trained)}
    model.requires_grad_(True)
    with atomic_output_dir(output_dir, overwrite, command="fit-head") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(Path(tmp) / "fit_head.json", summary)
    print(f"fit-head: held-out masked-token accuracy {100 * before['masked_accuracy']:.2f}% -> "
          f"{100 * after['masked_accuracy']:.2f}% (MLM loss {before['mlm_loss']:.3f} -> {after['mlm_loss']:.3f}) "
          f"after {steps} steps; teacher with its fitted head written to {output_dir}")
    return summary
