"""Reading the text of a `datasets` dataset one row at a time, for `distil prepare --dataset`.

What --dataset NAME_OR_PATH may be, tried in this order:
  - a directory written by `save_to_disk`: load_from_disk; from a DatasetDict the --split is taken;
  - local data files (.parquet, .json / .jsonl, .csv, .arrow; a glob such as `data/*.parquet` works): datasets'
    packaged builders, load_dataset("parquet", data_files=...). Such files give one split, `train`;
  - another local directory: load_dataset(DIR), which reads the data files inside it (files named train.*,
    validation.*, test.* give those splits);
  - anything else is a hub id: load_dataset(NAME, CONFIG, split=SPLIT). Where the hub cannot be reached this is
    found in one quick look, instead of datasets' half-minute of retries.
With --streaming an IterableDataset is read and nothing is materialised (no Arrow cache is built); without it the
Arrow table is memory-mapped. Either way only the text column is read, a few hundred rows at a time, never as a
whole-column list. Each row is one sequence, like one line of a text file or one record of a .jsonl file (newlines
inside a value stay inside that sequence); values are stripped, and empty ones counted and skipped, as for lines.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from distil.data.textfiles import ReadStats, record_bad
from distil.errors import DistilError
from distil.loading import first_line

log = logging.getLogger(__name__)

DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
ROWS_PER_READ = 512
STRING_DTYPES = ("string", "large_string")


@dataclass
class OpenedDataset:
    """One split of a dataset, loaded (memory-mapped or streaming) and checked to have the text column."""

    name_or_path: str
    config: str | None
    split: str
    streaming: bool
    loader: str  # load_from_disk, a packaged builder (parquet, json, csv, arrow), folder, or hub
    data: Any  # datasets.Dataset or datasets.IterableDataset
    fingerprint: str | None
    rows: int | None  # None when streaming: the number of rows is only known at the end

    @property
    def label(self) -> str:
        config = f" ({self.config})" if self.config else ""
        return f"dataset {self.name_or_path}{config} split {self.split!r}"

    def manifest(self) -> dict:
        return {"name_or_path": self.name_or_path, "config": self.config, "split": self.split, "loader": self.loader,
                "streaming": self.streaming, "fingerprint": self.fingerprint, "rows": self.rows}


def open_dataset(name_or_path: str, config: str | None = None, split: str = "train", streaming: bool = False,
                 text_field: str = "text") -> OpenedDataset:
    """Load one split of a dataset (see the module docstring for what NAME_OR_PATH may be) and check its text column."""
    datasets = _import_datasets(name_or_path)
    path = Path(name_or_path).expanduser()
    files = _data_files(name_or_path)
    loader = "hub"
    fingerprint = None
    try:
        if path.is_dir() and _saved_to_disk(path):
            loader = "load_from_disk"
            _refuse_config(config, name_or_path, "a directory written by save_to_disk")
            data, fingerprint = _from_disk(datasets, path, split, streaming)
        elif files:
            loader = _builder_for(files, name_or_path)
            _refuse_config(config, name_or_path, "local data files")
            if split != "train":
                raise DistilError(
                    f"The data files {name_or_path} form one split, 'train'; there is no split {split!r} in them. "
                    "Put files named train.* and validation.* in one directory and pass the directory, or give the "
                    "other file its own --dataset run."
                )
            data = datasets.load_dataset(loader, data_files=files, split="train", streaming=streaming)
        elif path.is_dir():
            loader = "folder"
            data = datasets.load_dataset(str(path), config, split=split, streaming=streaming)
        elif _looks_like_a_path(name_or_path):
            raise DistilError(
                f"The dataset path {name_or_path} does not exist. Give a directory written by save_to_disk, data files "
                f"({', '.join(sorted(DATA_FILE_BUILDERS))}), or a hub dataset id."
            )
        else:
            _check_hub(datasets, name_or_path)
            data = datasets.load_dataset(name_or_path, config, split=split, streaming=streaming)
    except ConnectionError as exc:
        offline = ": with HF_HUB_OFFLINE set, only datasets already in the local cache load" \
            if datasets.config.HF_HUB_OFFLINE else ""
        raise DistilError(
            f"The dataset {name_or_path!r} is not a local path, and it cannot be loaded from the hub here "
            f"({first_line(exc).rstrip('.')}){offline}. For a local dataset check the path (./NAME for one in this "
            "folder); otherwise save the dataset with save_to_disk on a machine that reaches the hub and pass that "
            "directory."
        ) from None
    except (FileNotFoundError, ValueError, KeyError, datasets.exceptions.DatasetsError) as exc:
        config_text = f" ({config})" if config else ""
        raise DistilError(
            f"Could not load the dataset {name_or_path}{config_text} split {split!r}: {first_line(_root_cause(exc))} "
            "Check the name or path, --dataset-config and --split, and that the data files are intact."
        ) from None
    if not streaming:
        fingerprint = fingerprint or getattr(data, "_fingerprint", None)
    opened = OpenedDataset(name_or_path, config, split, streaming, loader, data, fingerprint,
                           None if streaming else len(data))
    _check_text_column(datasets, opened, text_field)
    return opened


def iter_dataset_texts(opened: OpenedDataset, stats: ReadStats, text_field: str = "text",
                       skip_bad_lines: bool = False) -> Iterator[str]:
    """Yield the non-empty, stripped text of each row, counting rows, empty values and skipped rows in `stats`."""
    data = opened.data
    if data.column_names is not None:
        data = data.select_columns([text_field])
    # Arrow slices, turned into Python strings here: datasets' own Python formatting builds a dict per row first
    # (about 2.5 times slower when streaming).
    batches = data.with_format("arrow").iter(batch_size=ROWS_PER_READ)
    row = 0
    while True:
        try:
            table = next(batches, None)
        except (OSError, ValueError, KeyError) as exc:  # a stream that breaks off, a malformed file further in
            raise DistilError(
                f"Reading the {opened.label} failed after {row:,} rows: {first_line(exc)} Nothing was written. "
                "Check the data (and the connection, when streaming from the hub), then run the command again."
            ) from None
        if table is None:
            return
        if text_field not in table.column_names:
            raise _missing_column(opened, text_field, list(table.column_names))
        for value in table.column(text_field).to_pylist():
            stats.lines += 1
            if not isinstance(value, str):
                _bad_row(stats, skip_bad_lines, opened, row,
                         f"has a non-string {text_field!r} value ({_describe(value)})")
            elif "\x00" in value:
                _bad_row(stats, skip_bad_lines, opened, row, f"has NUL bytes (binary data) in its {text_field!r} value")
            else:
                text = value.strip()
                if text:
                    yield text
                else:
                    stats.empty += 1
            row += 1


def _root_cause(exc: BaseException) -> BaseException:
    # DatasetGenerationError says only "An error occurred while generating the dataset"; what went wrong is below it.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _describe(value) -> str:
    if value is None:
        return "a missing value; an empty CSV cell reads as one"
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}"


def _bad_row(stats: ReadStats, skip: bool, opened: OpenedDataset, row: int, problem: str) -> None:
    record_bad(stats, skip, f"Row {row} (counting from 0) of the {opened.label}", problem,
               "Fix the data, or pass --skip-bad-lines to skip such rows")


def _check_text_column(datasets, opened: OpenedDataset, text_field: str) -> None:
    columns = opened.data.column_names
    if columns is None:  # a stream whose columns are only known once read: checked on the first rows
        return
    if text_field not in columns:
        raise _missing_column(opened, text_field, list(columns))
    feature = (opened.data.features or {}).get(text_field)
    is_value = isinstance(feature, datasets.Value)
    if feature is not None and not (is_value and feature.dtype in STRING_DTYPES):
        raise DistilError(
            f"The column {text_field!r} of the {opened.label} holds {feature.dtype if is_value else feature} values, "
            "not text. "
            "Pass --text-field with the column that holds the text."
        )


def _missing_column(opened: OpenedDataset, text_field: str, columns: list[str]) -> DistilError:
    return DistilError(
        f"The {opened.label} has no column {text_field!r} (its columns: {', '.join(columns) or 'none'}). "
        "Pass --text-field with the column that holds the text."
    )


def _import_datasets(name_or_path: str):
    try:
        import datasets
    except ImportError:
        raise DistilError(
            f"Reading the dataset {name_or_path!r} needs the `datasets` package, which is not installed. Install it "
            "(pip install datasets, or the project's `tasks` extra), or export the text to .txt / .jsonl files."
        ) from None
    return datasets


def _saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _from_disk(datasets, path: Path, split: str, streaming: bool):
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DistilError(
                f"The dataset {path} has no split {split!r} (its splits: {', '.join(loaded)}). "
                "Pass --split (or --heldout-split) with one of them."
            )
        dataset = loaded[split]
    else:
        dataset = loaded
        # A lone saved Dataset is one split: the one it was saved from, or train when it never had a name.
        own = str(dataset.split) if dataset.split is not None else "train"
        if own != split:
            raise DistilError(
                f"The dataset {path} holds a single split, {own!r}, not {split!r}. Pass --split {own}, or save a "
                "DatasetDict (with every split) with save_to_disk."
            )
    fingerprint = dataset._fingerprint  # as loaded: with_format below would derive a new one
    dataset = dataset.with_format(None)
    return (dataset.to_iterable_dataset() if streaming else dataset), fingerprint


def _data_files(name_or_path: str) -> list[str]:
    if any(ch in name_or_path for ch in "*?["):
        matches = sorted(p for p in glob.glob(str(Path(name_or_path).expanduser())) if Path(p).is_file())
        if not matches:
            raise DistilError(f"The pattern {name_or_path} matches no files. Check the path and the wildcard.")
        return matches
    path = Path(name_or_path).expanduser()
    return [str(path)] if path.is_file() else []


def _builder_for(files: list[str], name_or_path: str) -> str:
    builders = set()
    for name in files:
        builder = DATA_FILE_BUILDERS.get(Path(name).suffix.lower())
        if builder is None:
            raise DistilError(
                f"--dataset cannot read {name}: data files must be {', '.join(sorted(DATA_FILE_BUILDERS))}. "
                "Pass plain text (.txt, .txt.gz) as input files instead of --dataset."
            )
        builders.add(builder)
    if len(builders) > 1:
        raise DistilError(f"{name_or_path} mixes data file formats ({', '.join(sorted(builders))}). Use one format.")
    return builders.pop()


def _refuse_config(config: str | None, name_or_path: str, what: str) -> None:
    if config is not None:
        raise DistilError(
            f"--dataset-config {config} was given, but {name_or_path} is {what}, which has no configurations. "
            "Leave --dataset-config out."
        )


def _looks_like_a_path(name: str) -> bool:
    # Hub ids are NAME or OWNER/NAME; anything with a data-file suffix, a leading ./ ~ / or more slashes is a path.
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in DATA_FILE_BUILDERS
        or name.endswith((".txt", ".gz", ".text"))
    )


def _check_hub(datasets, repo_id: str) -> None:
    problem = _hub_problem(datasets, repo_id)
    if problem:
        raise DistilError(
            f"The dataset {repo_id!r} is not a local path, and {problem}. For a local dataset check the path "
            "(./NAME for one in this folder); for a hub dataset use a machine that reaches the hub, or save it there "
            "with save_to_disk and pass the directory."
        )


def _hub_problem(datasets, repo_id: str) -> str | None:
    """Why a hub dataset cannot be loaded here, found in one quick look, or None when it may be."""
    if datasets.config.HF_HUB_OFFLINE:
        return None  # load_dataset then answers at once: from the local cache, or with an error
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(repo_id, timeout=10)
    except GatedRepoError:
        return None  # the hub answered; datasets explains what access it needs
    except RepositoryNotFoundError:
        return "the hub has no dataset of that name (or it is private)"
    except HfHubHTTPError:
        return None
    except Exception as exc:  # no network, DNS failure, timeout: whatever the HTTP client raises
        if _in_local_cache(datasets, repo_id):
            log.warning("the hub cannot be reached; loading %s from the local cache (set HF_HUB_OFFLINE=1 to skip "
                        "datasets' retries)", repo_id)
            return None
        return f"the hub cannot be reached from this machine ({first_line(exc).rstrip('.')})"
    return None


def _in_local_cache(datasets, repo_id: str) -> bool:
    from huggingface_hub import constants

    hub_copy = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    prepared_copy = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return hub_copy.is_dir() or prepared_copy.is_dir()
