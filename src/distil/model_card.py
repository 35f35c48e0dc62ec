"""The distilled student's README.md: a Hugging Face model card with YAML metadata the hub understands.

Metadata: `base_model` (the teacher, when it is a hub id), `library_name`, `pipeline_tag`, `tags` (distillation),
the teacher's licence when its own card states one, `datasets` when the data came from a named dataset, and
`model-index` results once `distil evaluate` has measured the student against its teacher. The body says how the
student was made: the objective in words, the recipe, steps and tokens seen, and the held-out numbers.
Publishing stays with the hub's own tool (`hf upload`), see the README.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from distil.loading import is_hub_id

log = logging.getLogger(__name__)

CARD = "README.md"
TAGS = ["distillation", "knowledge-distillation", "distil"]
PIPELINE = {"mlm": "fill-mask", "clm": "text-generation", "hidden": "feature-extraction"}
POOLING_WORDS = {"mean": "mean pooling", "cls": "CLS pooling", "max": "max pooling", "last": "last-token pooling"}
# distil evaluate's metrics that go into model-index: (flat key, metric type, name, scale to report)
INDEX_METRICS = [
    ("mlm_accuracy", "accuracy", "masked-token accuracy (held-out)", 100.0),
    ("mlm_loss", "loss", "masked-LM loss (held-out)", 1.0),
    ("perplexity", "perplexity", "perplexity (held-out)", 1.0),
    ("next_token_accuracy", "accuracy", "next-token accuracy (held-out)", 100.0),
    ("hidden_cosine", "cosine_similarity", "hidden-state cosine to the teacher", 1.0),
    ("task_accuracy", "accuracy", "downstream accuracy after fine-tuning", 100.0),
    ("task_macro_f1", "f1", "downstream macro-F1 after fine-tuning", 100.0),
]


def read_card_metadata(model_dir: str | Path) -> dict:
    """The YAML front matter of a local model directory's README.md ({} when there is none)."""
    path = Path(model_dir) / CARD
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def teacher_license(teacher: str) -> str | None:
    """The licence the teacher's own card states (local directories and python: packages; hub cards when cached)."""
    from distil.loading import resolve_source

    try:
        source = resolve_source(teacher)
    except Exception:  # the teacher was loaded already; a card is never a reason to fail
        return None
    if Path(source).is_dir():
        return read_card_metadata(source).get("license")
    return None


def soft_target_in_words(temperature: float, loss: dict, teacher_cache: str | None = None) -> str:
    """The soft-target term as the recipe set it: which divergence, on whose text, from where."""
    kind = loss.get("divergence", "forward_kl")
    divergence = {
        "forward_kl": "KL",
        "reverse_kl": "reverse KL",
        "jsd": f"generalised Jensen-Shannon divergence, beta {loss.get('jsd_beta', 0.5):g},",
        "skew_kl": f"skew KL, alpha {loss.get('skew_alpha', 0.1):g},",
        "skew_reverse_kl": f"skew reverse KL, alpha {loss.get('skew_alpha', 0.1):g},",
        "tvd": "total variation distance",
    }.get(kind, kind)
    words = f"the teacher's softened output distribution ({divergence} at temperature {temperature:g}, scaled by T^2)"
    if loss.get("on_policy_fraction"):
        words += f", on the student's own generations for {loss['on_policy_fraction']:.0%} of the steps"
    if teacher_cache:
        words += ", read from a teacher-signal store (distil cache-teacher)"
    return words


def objective_in_words(objective: str, weights: dict[str, float], temperature: float, loss: dict | None = None,
                       teacher_cache: str | None = None) -> str:
    words = {
        "ce": soft_target_in_words(temperature, loss or {}, teacher_cache),
        "mlm": "masked-language-model cross-entropy on the data",
        "clm": "next-token cross-entropy on the data",
        "mse": "the teacher's logits (squared error)",
        "cos": "the teacher's hidden states (cosine distance)",
        "hidden_mse": "the teacher's hidden states (mean squared error)",
        "relation": "the teacher's self-attention relations (MiniLMv2: query, key and value relations, KL)",
        "attention": "the teacher's attention maps (TinyBERT)",
        "sentence_mse": "the teacher's pooled sentence embeddings (mean squared error)",
        "sentence_cos": "the teacher's pooled sentence embeddings (cosine distance)",
    }
    parts = [f"{words[name]} x {weight:g}" for name, weight in weights.items() if name in words]
    if objective == "embedding":
        return ("Trained on clean text (no masking, as at inference) to match " + "; ".join(parts) + ". It has no "
                "language-model head (loss.objective: embedding): it is the base model plus its sentence-transformers "
                "modules.")
    kind = "masked-LM" if objective == "mlm" else "causal-LM"
    return f"A {kind} student trained to match " + "; ".join(parts) + "."


def embedding_in_words(teacher: str, embedding: dict) -> str:
    """What a sentence-embedding student is: its depth, output dimension, pooling and normalisation.
    `embedding`: pooling, normalize, dimension, hidden_size, layers, teacher_layers, teacher_num_layers."""
    layers = f"{embedding['layers']} layers"
    if embedding.get("teacher_layers"):
        of = f" of {embedding['teacher_num_layers']}" if embedding.get("teacher_num_layers") else ""
        layers += f" (teacher layers {', '.join(map(str, embedding['teacher_layers']))}{of})"
    dimension = f"{embedding['dimension']} dimensions"
    hidden = embedding.get("hidden_size")
    if hidden and hidden != embedding["dimension"]:
        dimension += f" (its {hidden}-wide states through a learned Dense map into the teacher's space)"
    normalised = "L2-normalised" if embedding["normalize"] else "not normalised"
    pooling = POOLING_WORDS.get(embedding["pooling"], f"{embedding['pooling']} pooling")
    return f"A sentence-embedding student of {teacher}: {layers}, {dimension}, {pooling}, {normalised}."


def render_card(metadata: dict, body: str) -> str:
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---\n\n" + body.rstrip() + "\n"


def student_card(*, teacher: str, objective: str, has_lm_head: bool, weights: dict[str, float], temperature: float,
                 recipe: dict, steps: int, tokens_seen: int, n_parameters: int, heldout: dict,
                 dataset: str | None = None, sentence_transformers: bool = False,
                 embedding: dict | None = None) -> str:
    """README.md for a student written by `distil train` (`sentence_transformers`: the directory is one too;
    `embedding`: what a sentence-embedding student is, see embedding_in_words)."""
    metadata: dict = {}
    if is_hub_id(teacher):
        metadata["base_model"] = teacher
    metadata["library_name"] = "sentence-transformers" if sentence_transformers else "transformers"
    metadata["pipeline_tag"] = "sentence-similarity" if sentence_transformers else \
        PIPELINE[objective if has_lm_head else "hidden"]
    metadata["tags"] = list(TAGS) + (["sentence-transformers"] if sentence_transformers else [])
    licence = teacher_license(teacher)
    if licence:
        metadata["license"] = licence
    if dataset:
        metadata["datasets"] = [dataset]
    made = (f"Made with distil's `distil train` ({recipe.get('name') or 'custom recipe'}):"
            f" {steps:,} optimizer steps, {tokens_seen:,} tokens seen, {n_parameters / 1e6:.1f}M parameters.")
    trained = objective_in_words(objective, weights, temperature, recipe.get("loss"),
                                 (recipe.get("teacher") or {}).get("cache"))
    transformers_load = ["```python", "from transformers import AutoModel, AutoTokenizer",
                         "model = AutoModel.from_pretrained(PATH); tokenizer = AutoTokenizer.from_pretrained(PATH)",
                         "```", ""]
    if embedding is not None:
        lines = [f"# Sentence-embedding student distilled from {teacher}", "", embedding_in_words(teacher, embedding),
                 "", made, "", trained, "", "Load it with sentence-transformers:", "", "```python",
                 "from sentence_transformers import SentenceTransformer",
                 "embeddings = SentenceTransformer(PATH).encode(sentences)", "```", "",
                 "or its base model with plain transformers (last hidden states, to pool as above):", "",
                 *transformers_load]
    else:
        lines = [f"# Student distilled from {teacher}", "", made, "", trained, "",
                 "Load it with plain transformers:", "", *transformers_load]
    if sentence_transformers and embedding is None:
        lines += ["or as a sentence encoder:", "", "```python", "from sentence_transformers import SentenceTransformer",
                  "embeddings = SentenceTransformer(PATH).encode(sentences)", "```", ""]
    if heldout:
        lines += ["## Held-out evaluation at the end of training", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in heldout.items()]
        lines.append("")
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    return render_card(metadata, "\n".join(lines))


def add_evaluation(model_dir: str | Path, name: str, flat: dict, ratios: dict, teacher_name: str, task: str | None,
                   markdown: str, data: str | None = None) -> bool:
    """Put `distil evaluate`'s results for a distil-made student into its card (model-index and a section).
    Returns whether the card was updated (cards not written by distil are left alone)."""
    path = Path(model_dir) / CARD
    metadata = read_card_metadata(model_dir)
    if "distil" not in (metadata.get("tags") or []):
        return False
    text = path.read_text(encoding="utf-8")
    body = text[text.find("\n---", 3) + 4:].lstrip("\n")
    marker = "## Evaluation (distil evaluate)"
    if marker in body:
        body = body[: body.index(marker)].rstrip() + "\n"
    metrics = [{"type": kind, "name": label, "value": round(float(flat[key]) * scale, 4)}
               for key, kind, label, scale in INDEX_METRICS if flat.get(key) is not None]
    for key, label in (("latency_ms_cpu", "CPU speed-up over the teacher (batch 1)"),
                       ("latency_ms_cuda", "GPU speed-up over the teacher (batch 1)")):
        if ratios.get(key) is not None:
            metrics.append({"type": "speedup", "name": label, "value": round(float(ratios[key]), 3)})
    if metrics:
        metadata["model-index"] = [{"name": name, "results": [{
            "task": {"type": task or metadata.get("pipeline_tag", "fill-mask"),
                     "name": "distillation retention" if task else "language modelling"},
            "dataset": {"type": "custom", "name": Path(data).name if data else "held-out text"},
            "metrics": metrics,
        }]}]
    section = [marker, "", f"Measured against the teacher ({teacher_name}) by `distil evaluate`:", "", markdown.strip()]
    path.write_text(render_card(metadata, body.rstrip() + "\n\n" + "\n".join(section)), encoding="utf-8")
    return True
