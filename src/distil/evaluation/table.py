"""The comparison table: one flat set of numbers per model, their ratios to the first model, and Markdown.

Ratios are "this model / first model" for every metric, except latency, where the ratio is the speed-up
"first model's latency / this model's latency" (above 1 = faster). The first model is normally the teacher,
so a quality ratio reads as retention and a parameter ratio as relative size. Speed values are medians over
interleaved rounds, shown with their spread (interquartile range / median); speed ratios of a device whose
timings failed the same-architecture check carry a ⚠ and a note under the table.
"""

from __future__ import annotations

# key, row label, how to print the value, ratio kind ("ratio", "speedup" or None for no ratio)
METRICS: list[tuple[str, str, str, str | None]] = [
    ("params_total", "parameters (base model)", "millions", "ratio"),
    ("params_embedding", "embedding parameters", "millions", "ratio"),
    ("params_non_embedding", "non-embedding parameters", "millions", "ratio"),
    ("disk_mb", "weights on disk (MB)", "1", "ratio"),
    ("mlm_loss", "held-out MLM loss", "4", "ratio"),
    ("mlm_accuracy", "held-out masked-token accuracy", "percent", "ratio"),
    ("clm_loss", "held-out causal LM loss", "4", "ratio"),
    ("perplexity", "held-out perplexity", "2", "ratio"),
    ("next_token_accuracy", "held-out next-token accuracy", "percent", "ratio"),
    ("bits_per_byte", "held-out bits per byte (any tokenizer)", "4", "ratio"),
    ("hidden_cosine", "hidden-state cosine to the reference", "4", "ratio"),
    ("latency_ms_cpu", "CPU latency, batch 1 (ms; ratio = speed-up)", "2", "speedup"),
    ("sequences_per_s_cpu", "CPU throughput (sequences/s)", "1", "ratio"),
    ("tokens_per_s_cpu", "CPU throughput (tokens/s)", "0", "ratio"),
    ("latency_spread_cpu", "CPU latency spread (IQR / median)", "percent", None),
    ("batch_spread_cpu", "CPU throughput-batch time spread (IQR / median)", "percent", None),
    ("latency_ms_cuda", "GPU latency, batch 1 (ms; ratio = speed-up)", "2", "speedup"),
    ("sequences_per_s_cuda", "GPU throughput (sequences/s)", "1", "ratio"),
    ("tokens_per_s_cuda", "GPU throughput (tokens/s)", "0", "ratio"),
    ("latency_spread_cuda", "GPU latency spread (IQR / median)", "percent", None),
    ("batch_spread_cuda", "GPU throughput-batch time spread (IQR / median)", "percent", None),
    ("task_accuracy", "task accuracy (mean over seeds)", "percent", "ratio"),
    ("task_accuracy_std", "task accuracy, std over seeds (points)", "points", None),
    ("task_macro_f1", "task macro-F1 (mean over seeds)", "percent", "ratio"),
    ("task_macro_f1_std", "task macro-F1, std over seeds (points)", "points", None),
    # Embedding quality (distil.evaluation.embedding_quality). The two agreements are already relative to the
    # first model (1.0 for itself), so they carry no ratio.
    ("similarity_spearman", "pairwise-similarity Spearman to the first model", "4", None),
    ("neighbour_agreement", "nearest-neighbour agreement with the first model", "percent", None),
    ("sts_spearman", "STS Spearman (cosine vs gold)", "4", "ratio"),
    ("retrieval_ndcg_at_10", "retrieval nDCG@10", "4", "ratio"),
    ("retrieval_recall_at_10", "retrieval recall@10", "percent", "ratio"),
    ("retrieval_mrr_at_10", "retrieval MRR@10", "4", "ratio"),
    ("knn_accuracy", "kNN classification accuracy", "percent", "ratio"),
    ("knn_macro_f1", "kNN classification macro-F1", "percent", "ratio"),
]
MTEB_PREFIX = "mteb:"  # rows "mteb:TASK", one per MTEB task, added after METRICS
LABELS = {key: label for key, label, _, _ in METRICS}
DOUBTFUL = "⚠"


def flat_metrics(model: dict) -> dict[str, float]:
    """The table's numbers for one model result of `distil.evaluation.evaluate.evaluate`."""
    flat: dict[str, float] = {}
    size = model.get("size") or {}
    for part in ("total", "embedding", "non_embedding"):
        if part in (size.get("params") or {}):
            flat[f"params_{part}"] = size["params"][part]
    if size.get("disk_bytes") is not None:
        flat["disk_mb"] = size["disk_bytes"] / 1e6
    for key in ("mlm_loss", "mlm_accuracy", "clm_loss", "perplexity", "next_token_accuracy", "bits_per_byte"):
        if (model.get("lm") or {}).get(key) is not None:
            flat[key] = model["lm"][key]
    if (model.get("fidelity") or {}).get("hidden_cosine") is not None:
        flat["hidden_cosine"] = model["fidelity"]["hidden_cosine"]
    for device, timing in (model.get("speed") or {}).items():
        for key in ("latency_ms", "sequences_per_s", "tokens_per_s"):
            flat[f"{key}_{device}"] = timing[key]
        for key in ("latency", "batch"):  # results written before interleaved timing have no spread
            if "iqr_relative" in (timing.get(f"{key}_stats") or {}):
                flat[f"{key}_spread_{device}"] = timing[f"{key}_stats"]["iqr_relative"]
    downstream = model.get("downstream") or {}
    for score in ("accuracy", "macro_f1"):
        if score in downstream:
            flat[f"task_{score}"] = downstream[score]["mean"]
            if len(downstream.get("seeds") or []) > 1:  # one run has no spread to show
                flat[f"task_{score}_std"] = downstream[score]["std"]
    flat.update(_embedding_metrics(model.get("embedding") or {}))
    return flat


def _embedding_metrics(embedding: dict) -> dict[str, float]:
    flat = {key: embedding[key] for key in ("similarity_spearman", "neighbour_agreement", "sts_spearman")
            if embedding.get(key) is not None}
    for key in ("ndcg_at_10", "recall_at_10", "mrr_at_10"):
        if (embedding.get("retrieval") or {}).get(key) is not None:
            flat[f"retrieval_{key}"] = embedding["retrieval"][key]
    for key in ("accuracy", "macro_f1"):
        if (embedding.get("knn") or {}).get(key) is not None:
            flat[f"knn_{key}"] = embedding["knn"][key]
    for task, result in (embedding.get("mteb") or {}).items():
        flat[f"{MTEB_PREFIX}{task}"] = result["main_score"]
    return flat


def metric_rows(flats: list[dict[str, float]]) -> list[tuple[str, str, str, str | None]]:
    """METRICS, then one row per MTEB task that some model has (its main score)."""
    tasks = sorted({key for flat in flats for key in flat if key.startswith(MTEB_PREFIX)})
    return METRICS + [(key, f"MTEB {key[len(MTEB_PREFIX):]} (main score)", "4", "ratio") for key in tasks]


def label_of(key: str) -> str:
    return LABELS.get(key) or f"MTEB {key[len(MTEB_PREFIX):]} (main score)"


def ratios_to_first(flats: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per model, each metric's ratio to the first model's (speed-up for latencies); missing when undefined."""
    kinds = {key: kind for key, _, _, kind in metric_rows(flats)}
    first = flats[0] if flats else {}
    result = []
    for flat in flats:
        ratios = {}
        for key, value in flat.items():
            kind = kinds.get(key)
            base = first.get(key)
            if kind is None or base is None or value is None:
                continue
            if kind == "speedup" and value > 0:
                ratios[key] = base / value
            elif kind == "ratio" and base != 0:
                ratios[key] = value / base
        result.append(ratios)
    return result


def format_value(value: float, style: str) -> str:
    if style == "millions":
        return f"{value / 1e6:.2f}M"
    if style == "percent":
        return f"{100 * value:.2f}%"
    if style == "points":
        return f"{100 * value:.2f}"
    return f"{value:,.{int(style)}f}"


def markdown_table(names: list[str], flats: list[dict[str, float]], ratios: list[dict[str, float]],
                   doubtful: frozenset[str] | set[str] = frozenset()) -> str:
    """Rows = metrics, columns = models; every model after the first shows its ratio to the first, with a ⚠
    for the metrics in `doubtful` (speed ratios from a machine too busy to time reliably)."""
    header = "| metric | " + " | ".join(f"{name}{' (ratio to first)' if i else ''}" for i, name in enumerate(names)) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    for key, label, style, kind in metric_rows(flats):
        if all(key not in flat for flat in flats):
            continue
        cells = []
        for i, (flat, ratio) in enumerate(zip(flats, ratios)):
            if key not in flat:
                cells.append("–")
                continue
            text = format_value(flat[key], style)
            if i and key in ratio:
                text += f" ({ratio[key]:.3f}× {DOUBTFUL})" if key in doubtful else f" ({ratio[key]:.3f}×)"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """The table of an evaluation result, its settings in one line, and every model's notes."""
    models = results["models"]
    names = [m["name"] for m in models]
    flats = [flat_metrics(m) for m in models]
    speed_check = results.get("speed_check") or {}
    doubtful = set(speed_check.get("untrustworthy_ratios") or [])
    lines = [markdown_table(names, flats, ratios_to_first(flats), doubtful), ""]
    settings = results.get("settings") or {}
    described = []
    if settings.get("data"):
        described.append(f"held-out text: {settings['data']}")
    if settings.get("reference"):
        described.append(f"reference for hidden-state cosine: {settings['reference']}")
    if settings.get("speed"):
        s = settings["speed"]
        runs = "interleaved rounds (every model once per round)" if s.get("method") == "interleaved rounds" else "runs"
        described.append(f"speed: sequence length {s['seq_length']}, throughput batch {s['batch_size']}, "
                         f"median of {s['repeats']} {runs} after {s['warmup']} warm-up, {s.get('cpu_threads')} CPU threads")
    if settings.get("task"):
        t = settings["task"]
        described.append(f"task: {t['train_file']} -> {t['eval_file']}, seeds {t['seeds']}, epochs {t['epochs']}, "
                         f"lr {t['lr']}, batch {t['batch_size']}, max length {t['max_length']}")
    described += _embedding_settings(settings.get("embedding") or {})
    lines += [f"- {d}" for d in described]
    lines += _speed_check_lines(speed_check)
    for model in models:
        for note in model.get("notes") or []:
            lines.append(f"- {model['name']}: {note}")
    for i, model in enumerate(models):
        lines.append(f"- model {i + 1} `{model['name']}` = {model['path']}")
    return "\n".join(lines) + "\n"


def _embedding_settings(embedding: dict) -> list[str]:
    if not embedding:
        return []
    lines = []
    if embedding.get("heldout_texts"):
        lines.append(f"embeddings: agreement with the first model on {embedding['heldout_texts']} held-out texts "
                     f"(Spearman of all pairwise cosines; share of its {embedding.get('neighbours_k')} nearest "
                     "neighbours found, ties to the earlier text)")
    if embedding.get("sts"):
        lines.append(f"STS pairs: {embedding['sts']['file']} ({embedding['sts']['pairs']} pairs)")
    if embedding.get("retrieval"):
        r = embedding["retrieval"]
        lines.append(f"retrieval: {r['directory']} ({r['queries']} queries, {r['corpus']} documents)")
    if embedding.get("classification"):
        c = embedding["classification"]
        lines.append(f"kNN classification (k = {embedding.get('knn_k')}, cosine, majority vote): {c['files']} "
                     f"({c['train']} train, {c['test']} test)")
    if embedding.get("mteb"):
        lines.append(f"MTEB tasks: {', '.join(embedding['mteb'])}")
    return lines


def _speed_check_lines(check: dict) -> list[str]:
    """What the same-architecture speed check found: a ⚠ line per disagreement, else which models agreed."""
    lines = [f"- {DOUBTFUL} {d['message']}" for d in check.get("disagreements") or []]
    if not lines and check.get("same_architecture"):
        groups = "; ".join(", ".join(group) for group in check["same_architecture"])
        lines.append(f"- speed check: identical architectures ({groups}) timed within "
                     f"{100 * check['tolerance']:.0f}% of each other")
    return lines
