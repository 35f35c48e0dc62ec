"""`distil report`: plots and a Markdown summary of one or more training runs (and an evaluation).

From each run's metrics.jsonl: the training loss terms, the held-out losses (student solid, teacher dashed),
the learning rate and the throughput over steps, every run overlaid in the same plots under its name. From a
`distil evaluate` JSON: bar charts of quality, size, speed and embedding quality per model, a scatter of each
embedding model's pairwise cosines against the first model's, and its comparison table. Everything
goes into one directory, written atomically (a failed report leaves nothing behind).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from distil.errors import DistilError
from distil.evaluation import table
from distil.metrics_log import METRICS, read_metrics
from distil.outputs import atomic_output_dir, check_output_dir, check_writable, locks_output

SUMMARY = "summary.md"
HELDOUT_SKIP = {"step", "split", "batches", "tokens_per_s"}
QUALITY = ["mlm_accuracy", "next_token_accuracy", "hidden_cosine", "task_accuracy", "task_macro_f1"]
SIZE = ["params_total", "params_non_embedding", "disk_mb"]
SPEED = ["latency_ms_cpu", "sequences_per_s_cpu", "latency_ms_cuda", "sequences_per_s_cuda"]
EMBEDDING = ["similarity_spearman", "neighbour_agreement", "sts_spearman", "retrieval_ndcg_at_10",
             "retrieval_recall_at_10", "retrieval_mrr_at_10", "knn_accuracy", "knn_macro_f1"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DistilError("distil report draws with matplotlib, which is not installed. Install it: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def load_runs(run_dirs: list[str]) -> list[dict]:
    """Each run as {"name", "dir", "recipe", "train": rows, "heldout": rows}; refuses dirs without metrics."""
    if not run_dirs:
        raise DistilError("Give at least one run directory (written by distil train).")
    runs = []
    for given in run_dirs:
        folder = Path(given)
        if not folder.is_dir():
            raise DistilError(f"The run directory {folder} does not exist. Give directories written by distil train.")
        rows = read_metrics(folder)
        if not rows:
            raise DistilError(f"{folder} has no {METRICS} with numbers in it, so there is nothing to plot. Is it a distil train "
                              "run directory (run.output_dir), and has the run logged at least one step?")
        recipe = {}
        if (folder / "recipe.yaml").is_file():
            recipe = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8")) or {}
        by_step = lambda split: sorted((r for r in rows if r.get("split") == split and "step" in r), key=lambda r: r["step"])
        runs.append({"name": folder.resolve().name, "dir": str(folder), "recipe": recipe,
                     "train": by_step("train"), "heldout": by_step("heldout")})
    names = [r["name"] for r in runs]
    for run in runs:
        if names.count(run["name"]) > 1:
            run["name"] = "/".join(Path(run["dir"]).resolve().parts[-2:])
    return runs


def load_evaluation(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise DistilError(f"The evaluation file {file} does not exist. Write one with distil evaluate ... --output FILE.json.")
    try:
        evaluation = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DistilError(f"{file} is not valid JSON ({exc}). Give the file written by distil evaluate --output.") from None
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("models"), list) or not evaluation["models"]:
        raise DistilError(f"{file} is not a distil evaluate result (it has no list of models). Give the file written by "
                          "distil evaluate --output.")
    return evaluation


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _draw_panels(plt, path: Path, title: str, panels: list[tuple[str, list[tuple[str, list, list, str, str]]]],
                 xlabel: str = "optimizer step") -> None:
    """One figure, one axis per panel; each line is (label, x, y, color, linestyle)."""
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (panel_title, lines) in zip(axes.flat, panels):
        for label, xs, ys, color, style in lines:
            ax.plot(xs, ys, label=label, color=color, linestyle=style, marker="o" if len(xs) < 12 else None,
                    markersize=3)
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _training_panels(runs: list[dict]) -> list:
    keys: list[str] = []
    for run in runs:
        for row in run["train"]:
            for key in row:
                if (key == "loss" or key.startswith("loss_")) and key not in keys:
                    keys.append(key)
    return [(("total loss" if key == "loss" else key[5:]),
             [(run["name"], *_series(run["train"], key), f"C{i}", "-") for i, run in enumerate(runs)
              if _series(run["train"], key)[0]])
            for key in keys]


def _heldout_panels(runs: list[dict]) -> list:
    """student_X and teacher_X share a panel (teacher dashed); other held-out numbers get one each."""
    keys: list[str] = []
    for run in runs:
        for row in run["heldout"]:
            keys += [k for k in row if k not in HELDOUT_SKIP and k not in keys]
    groups: dict[str, list[str]] = {}
    for key in keys:
        base = key.split("_", 1)[1] if key.startswith(("student_", "teacher_")) else key
        groups.setdefault(base, []).append(key)
    panels = []
    for base, members in groups.items():
        lines = []
        for i, run in enumerate(runs):
            for key in sorted(members, key=lambda k: not k.startswith("student_")):
                xs, ys = _series(run["heldout"], key)
                if xs:
                    who = key.split("_", 1)[0] if key != base else base
                    lines.append((f"{run['name']} {who}", xs, ys, f"C{i}", "--" if key.startswith("teacher_") else "-"))
        if lines:
            panels.append((base, lines))
    return panels


def _single_panel(runs: list[dict], key: str, title: str) -> list:
    lines = [(run["name"], *_series(run["train"], key), f"C{i}", "-") for i, run in enumerate(runs)]
    lines = [line for line in lines if line[1]]
    return [(title, lines)] if lines else []


def _bar_panels(plt, path: Path, title: str, evaluation: dict, keys: list[str]) -> bool:
    """One bar chart per metric that some model has; error bars for task scores over several seeds."""
    names = [m["name"] for m in evaluation["models"]]
    flats = [table.flat_metrics(m) for m in evaluation["models"]]
    present = [k for k in keys if any(k in f for f in flats)]
    if not present:
        return False
    columns = min(4, len(present))
    rows = math.ceil(len(present) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.8 * rows), squeeze=False)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, present):
        values = [f.get(key, math.nan) for f in flats]  # NaN draws no bar: a missing number is not a zero
        has_spread = key.startswith("task_") and any(f"{key}_std" in f for f in flats)
        errors = [f.get(f"{key}_std", 0.0) for f in flats] if has_spread else None
        bars = ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(names))])
        for bar, flat, error in zip(bars, flats, errors or [0.0] * len(flats)):
            x = bar.get_x() + bar.get_width() / 2
            if key in flat:
                top = bar.get_height() + error  # above the error bar, not on it
                ax.annotate(table.format_value(flat[key], _style(key)), (x, top), ha="center", va="bottom", fontsize=8)
            else:
                ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=8, color="grey")
        ax.set_xlim(-0.6, len(names) - 0.4)  # keep a slot for every model, drawn or not
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(table.label_of(key), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _style(key: str) -> str:
    return next(style for k, _, style, _ in table.metric_rows([{key: 0.0}]) if k == key)


def _embedding_keys(evaluation: dict) -> list[str]:
    flats = [table.flat_metrics(m) for m in evaluation["models"]]
    return EMBEDDING + sorted({k for f in flats for k in f if k.startswith(table.MTEB_PREFIX)})


def _similarity_scatter(plt, path: Path, evaluation: dict) -> bool:
    """Each model's cosine of sampled text pairs against the first model's, with the Spearman over all pairs
    in the title: a cloud on the diagonal is a model that ranks pairs as the reference does."""
    models = evaluation["models"]
    reference = (models[0].get("embedding") or {}).get("sampled_pair_cosines")
    others = [m for m in models[1:] if (m.get("embedding") or {}).get("sampled_pair_cosines")]
    if not reference or not others:
        return False
    fig, axes = plt.subplots(1, len(others), figsize=(4.4 * len(others), 4.2), squeeze=False)
    for i, (ax, model) in enumerate(zip(axes.flat, others)):
        ys = model["embedding"]["sampled_pair_cosines"]
        ax.scatter(reference, ys, s=4, alpha=0.35, color=f"C{i + 1}", edgecolors="none")
        low, high = min(min(reference), min(ys)), max(max(reference), max(ys))
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(f"{model['name']}: Spearman {model['embedding']['similarity_spearman']:.3f}, "
                     f"{model['embedding']['neighbours_k']}-NN agreement "
                     f"{100 * model['embedding']['neighbour_agreement']:.0f}%", fontsize=9)
        ax.set_xlabel(f"cosine, {models[0]['name']}")
        ax.set_ylabel(f"cosine, {model['name']}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Pairwise cosine similarities of held-out texts ({len(reference)} sampled pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _final_heldout_table(runs: list[dict]) -> list[str]:
    finals = [run["heldout"][-1] if run["heldout"] else {} for run in runs]
    keys: list[str] = []
    for final in finals:
        keys += [k for k in final if k not in HELDOUT_SKIP and k not in keys]
    if not keys:
        return ["No held-out evaluation was logged (prepare the data with --heldout or --heldout-file)."]
    lines = ["| held-out metric | " + " | ".join(f"{r['name']} (step {f.get('step', '–')})" for r, f in zip(runs, finals)) + " |",
             "|---|" + "---:|" * len(runs)]
    for key in keys:
        cells = [f"{f[key]:.4f}" if isinstance(f.get(key), (int, float)) else str(f.get(key, "–")) for f in finals]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def _runs_table(runs: list[dict]) -> list[str]:
    lines = ["| run | recipe | teacher | steps | tokens seen | final training loss | time (s) |", "|---|---|---|---:|---:|---:|---:|"]
    for run in runs:
        last = run["train"][-1] if run["train"] else {}
        recipe = run["recipe"]
        teacher = (recipe.get("teacher") or {}).get("path", "–")
        loss = f"{last['loss']:.4f}" if isinstance(last.get("loss"), (int, float)) else "–"
        elapsed = f"{last['elapsed_s']:.0f}" if isinstance(last.get("elapsed_s"), (int, float)) else "–"
        tokens = f"{last['tokens_seen']:,}" if isinstance(last.get("tokens_seen"), int) else "–"
        lines.append(f"| {run['name']} | {recipe.get('name') or '–'} | {teacher} | {last.get('step', '–')} | {tokens} | "
                     f"{loss} | {elapsed} |")
    return lines


@locks_output("report")
def report(run_dirs: list[str], output_dir: str, evaluation: str | None = None, overwrite: bool = False) -> dict:
    """Write PNG plots and summary.md for `run_dirs` (and an evaluation JSON) into `output_dir`."""
    check_output_dir(output_dir, overwrite)  # before reading anything: a refused output costs nothing
    check_writable(output_dir)
    runs = load_runs(run_dirs)
    results = load_evaluation(evaluation) if evaluation else None
    plt = _pyplot()
    plots: list[tuple[str, str]] = []
    with atomic_output_dir(output_dir, overwrite, command="report") as tmp:
        figures = [
            ("training_losses.png", "Training loss terms", _training_panels(runs)),
            ("heldout.png", "Held-out evaluation (student solid, teacher dashed)", _heldout_panels(runs)),
            ("learning_rate.png", "Learning rate", _single_panel(runs, "lr", "learning rate")),
            ("tokens_per_s.png", "Training throughput", _single_panel(runs, "tokens_per_s", "tokens / s")),
        ]
        for file_name, title, panels in figures:
            if panels:
                _draw_panels(plt, tmp / file_name, title, panels)
                plots.append((file_name, title))
        if results is not None:
            for file_name, title, keys in (("eval_quality.png", "Quality", QUALITY), ("eval_size.png", "Size", SIZE),
                                           ("eval_speed.png", "Speed", SPEED),
                                           ("eval_embedding.png", "Embedding quality", _embedding_keys(results))):
                if _bar_panels(plt, tmp / file_name, title, results, keys):
                    plots.append((file_name, title))
            if _similarity_scatter(plt, tmp / "embedding_similarity.png", results):
                plots.append(("embedding_similarity.png", "Pairwise similarities against the first model"))
        lines = ["# distil report", "", "## Runs", "", *_runs_table(runs), "", "## Final held-out numbers", "",
                 *_final_heldout_table(runs), ""]
        if results is not None:
            lines += ["## Comparison (distil evaluate)", "", f"From `{evaluation}`.", "", table.results_markdown(results)]
        lines += ["## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for name, title in plots]
        (tmp / SUMMARY).write_text("\n".join(lines), encoding="utf-8")
    print(f"report written to {output_dir}: {SUMMARY} and {len(plots)} plots ({', '.join(p for p, _ in plots)})")
    return {"output_dir": str(output_dir), "summary": str(Path(output_dir) / SUMMARY), "plots": [p for p, _ in plots]}
