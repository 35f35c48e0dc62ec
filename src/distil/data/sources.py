"""Where `distil prepare` reads its lines: text files, a `datasets` dataset, or a weighted mix of sources.

Everything is checked here, before the tokenizer is loaded, so that a wrong path, split or column fails at once.
Each source yields stripped, non-empty sequences into the same framing and cleaning, whatever it reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from distil.data.hf_datasets import OpenedDataset, iter_dataset_texts, open_dataset
from distil.data.mixing import WeightedMix, mix_summary, parse_mix
from distil.data.textfiles import SUPPORTED, ReadStats, check_input_files, iter_lines
from distil.errors import DistilError


@dataclass
class Source:
    split: str  # the output split its lines go to: train (then maybe drawn into heldout by --heldout) or heldout
    lines: Callable[[ReadStats], Iterator[str]]
    size_bytes: int | None = None  # text files: for a progress bar in bytes
    rows: int | None = None  # datasets read without streaming


@dataclass
class SourcePlan:
    sources: list[Source]
    inputs: list[str]  # the manifest's "inputs": text files, or the mix's sources
    heldout_files: list[str]
    heldout_split: str | None = None
    dataset: OpenedDataset | None = None
    heldout_dataset: OpenedDataset | None = None
    mix: WeightedMix | None = None
    text_field: str = "text"
    in_bytes: bool = field(init=False)

    def __post_init__(self):
        self.in_bytes = all(s.size_bytes is not None for s in self.sources)

    @property
    def progress_unit(self) -> str:
        return "B" if self.in_bytes else " rows"

    @property
    def progress_total(self) -> int | None:
        if self.in_bytes:
            return sum(s.size_bytes for s in self.sources)
        rows = [s.rows for s in self.sources]
        return sum(rows) if all(r is not None for r in rows) else None

    def position(self, stats: ReadStats) -> int:
        return stats.bytes_done if self.in_bytes else stats.lines

    def heldout_manifest(self, fraction: float, seed: int) -> dict:
        entry = {"fraction": fraction, "files": self.heldout_files, "seed": seed}
        if self.heldout_split is not None:
            entry["split"] = self.heldout_split
        return entry

    def extra_manifest(self) -> dict:
        """Manifest entries beyond those of text files (none for text files, so their manifests stay as they were)."""
        extra: dict = {}
        if self.dataset is not None:
            extra["dataset"] = {**self.dataset.manifest(), "text_field": self.text_field}
            if self.heldout_dataset is not None:
                extra["dataset"]["heldout"] = self.heldout_dataset.manifest()
        if self.mix is not None:
            extra["mix"] = self.mix.manifest()
        return extra


def plan_sources(
    inputs: Sequence[str] | None,
    heldout_files: Sequence[str],
    heldout_fraction: float = 0.0,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    streaming: bool = False,
    heldout_split: str | None = None,
    mix: Sequence[str | tuple[str, float]] | None = None,
    text_field: str = "text",
    skip_bad_lines: bool = False,
    seed: int = 0,
) -> SourcePlan:
    """Check the options and open every source (text files are checked, datasets loaded) in reading order."""
    inputs, heldout_files, mix = list(inputs or []), list(heldout_files or []), list(mix or [])
    given = [what for what, present in (("input files", inputs), ("--dataset", dataset is not None), ("--mix", mix))
             if present]
    if len(given) > 1:
        raise DistilError(
            f"Give one kind of input: text files, --dataset or --mix (got {' and '.join(given)}). --mix takes text "
            "files and datasets alike, e.g. --mix en.txt:0.7 fr_dataset_dir:0.3."
        )
    if not given:
        raise DistilError(
            "No input was given. Pass text files (one sequence per line), --dataset NAME_OR_PATH (a hub id, a "
            "save_to_disk directory, or .parquet / .json / .csv / .arrow files), or --mix SOURCE:WEIGHT ..."
        )
    if heldout_split is not None:
        if dataset is None:
            raise DistilError("--heldout-split takes the held-out split from --dataset; give --dataset too, or use "
                              "--heldout FRACTION or --heldout-file FILE.")
        if heldout_fraction or heldout_files:
            raise DistilError("Give one of --heldout FRACTION, --heldout-file FILE and --heldout-split NAME.")
        if heldout_split == split:
            raise DistilError(f"--heldout-split {heldout_split} is the training split too. Name another split, or "
                              "use --heldout FRACTION to hold out part of it.")
    read = functools.partial(_read_text_file, text_field=text_field, skip_bad_lines=skip_bad_lines)

    def text_sources(names: list[str], split_name: str) -> list[Source]:
        return [Source(split_name, functools.partial(read, p), size_bytes=p.stat().st_size)
                for p in (check_input_files(names) if names else [])]

    if inputs:
        if dataset_config is not None or streaming:
            raise DistilError("--dataset-config and --streaming apply to --dataset (or datasets in --mix), not to "
                              "text files. Leave them out.")
        sources = text_sources(inputs, "train")
        return SourcePlan(sources + text_sources(heldout_files, "heldout"), [str(Path(n)) for n in inputs],
                          [str(Path(n)) for n in heldout_files], text_field=text_field)
    heldout_sources = text_sources(heldout_files, "heldout")
    heldout_names = [str(Path(n)) for n in heldout_files]

    def read_dataset(opened: OpenedDataset, stats: ReadStats) -> Iterator[str]:
        return iter_dataset_texts(opened, stats, text_field=text_field, skip_bad_lines=skip_bad_lines)

    if dataset is not None:
        opened = open_dataset(dataset, dataset_config, split, streaming, text_field)
        sources = [Source("train", functools.partial(read_dataset, opened), rows=opened.rows)]
        held = None
        if heldout_split is not None:
            held = open_dataset(dataset, dataset_config, heldout_split, streaming, text_field)
            heldout_sources = [Source("heldout", functools.partial(read_dataset, held), rows=held.rows)]
        return SourcePlan(sources + heldout_sources, [], heldout_names, heldout_split, opened, held,
                          text_field=text_field)

    names, weights, openers, details, sizes, rows = [], [], [], [], [], []
    for name, weight in parse_mix(mix):
        names.append(name)
        weights.append(weight)
        if is_text_file(name):
            (path,) = check_input_files([name])
            openers.append(functools.partial(read, path))
            details.append({})
            sizes.append(path.stat().st_size)
            rows.append(None)
        else:
            opened = open_dataset(name, dataset_config, split, streaming, text_field)
            openers.append(functools.partial(read_dataset, opened))
            details.append({"dataset": opened.manifest()})
            sizes.append(None)
            rows.append(opened.rows)
    if (dataset_config is not None or streaming) and not any(details):
        raise DistilError("--dataset-config and --streaming apply to datasets, and every --mix source is a text file. "
                          "Leave them out.")
    weighted = WeightedMix(names, weights, openers, seed, details)
    # The bar's total is every byte (or row) of every source; a mix usually stops before the end of most of them.
    source = Source("train", weighted.lines, size_bytes=None if None in sizes else sum(sizes),
                    rows=None if None in rows else sum(rows))
    return SourcePlan([source] + heldout_sources, names, heldout_names, mix=weighted, text_field=text_field)


def is_text_file(name: str) -> bool:
    """A path read by the text-file reader (one sequence per line); other --mix sources are datasets."""
    return name.lower().endswith(SUPPORTED)


def _read_text_file(path: Path, stats: ReadStats, text_field: str, skip_bad_lines: bool) -> Iterator[str]:
    return iter_lines(path, stats, text_field=text_field, skip_bad_lines=skip_bad_lines)


def source_summary(manifest: dict) -> list[str]:
    """Printed lines about where the text came from (datasets, mixes); none for plain text files."""
    lines = []
    if "dataset" in manifest:
        d = manifest["dataset"]
        fingerprint = f", fingerprint {d['fingerprint']}" if d["fingerprint"] else ""
        held = f"; held-out split {d['heldout']['split']!r}" if "heldout" in d else ""
        lines.append(f"  dataset {d['name_or_path']} split {d['split']!r} ({d['loader']}"
                     f"{', streamed' if d['streaming'] else ''}{fingerprint}){held}")
    if "mix" in manifest:
        lines.extend(mix_summary(manifest["mix"]))
    return lines
