"""Writing results so that nothing finished is lost, nothing half-written is left behind, and nothing of the user's
is ever deleted.

Every command that produces a directory writes it under a temporary sibling name and renames it into place only
when complete. A directory that already holds a finished result is refused unless the user passes --overwrite, and
--overwrite replaces only what distil wrote: a directory that distil cannot recognise as its own output is refused
even then. distil's outputs carry a small marker file (MARKER, written into the temporary directory before the
rename); outputs of older versions are recognised by the files each command has always written (LEGACY_MARKERS, a
run directory's layout, a demo tree). Temporary and half-replaced directories left by a process that was killed
(`.NAME.tmp-PID`, `.NAME.old-PID`) are removed by the next run that writes NAME.

One writer at a time: a command holds `.NAME.lock` beside its output NAME for as long as it writes it (output_lock),
and a second command for the same output is refused. The target is checked again just before the final rename:
whatever appeared there meanwhile is never deleted; the new result is then kept beside it under its own name.
A full disk is reported as such, with the space needed (disk_space_errors), instead of the writer's raw error.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from distil import __version__
from distil.disk_space import bytes_under, disk_space_errors, human_size  # noqa: F401 (human_size: imported from here too)
from distil.errors import DistilError

log = logging.getLogger(__name__)

MARKER = ".distil-output.json"
# The file each command has always written into its output, for outputs made before MARKER existed.
LEGACY_MARKERS = {"manifest.json": "prepare", "distil_init.json": "init-student", "task_config.json": "task"}
REPORT_SUMMARY, REPORT_TITLE = "summary.md", "# distil report"
# What `distil train` writes into run.output_dir. The run directory is built up step by step, so it has no MARKER:
# one of RUN_SIGNATURE, or a student directory distil wrote, says it is a run (a recipe.yaml alone does not: the
# user may keep their own recipe there).
RUN_ENTRIES = frozenset({"recipe.yaml", "metrics.jsonl", "checkpoints", "student", "student-init", "tensorboard"})
RUN_SIGNATURE = ("metrics.jsonl", "checkpoints")
# What `distil demo` writes into its output directory: each directory there is itself a distil output.
DEMO_DIRS = frozenset({"data", "run", "report", "retrieval"})
DEMO_FILES = frozenset({"evaluation.json"})
SHOWN_NAMES = 5

# `.NAME.tmp-PID`, `.NAME.old-PID`, `.NAME.tmp` (and `..NAME.tmp.tmp-PID`, a temporary of a temporary), and
# `.NAME.lock`, the lock of a command writing NAME
_LEFTOVER = re.compile(r"\.+(?P<name>.+?)\.(?:(?:tmp|old)(?:-\d+)?|lock)")


def write_marker(directory: str | Path, command: str | None) -> None:
    """Mark `directory` as written by distil `command` (the content is fixed, so reruns stay byte-identical)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"written_by": "distil", "command": command, "version": __version__}
    (directory / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def output_command(path: str | Path) -> str | None:
    """The distil command that wrote directory `path` ("unknown" for an unnamed one), or None if it is not distil's."""
    recognised = _recognise(Path(path))
    return recognised[0] if recognised else None


def foreign_entries(path: str | Path) -> list[str]:
    """Names (relative to `path`) of what distil did not write in directory `path`: everything, if it is not a
    distil output at all; for a run directory or a demo tree, whatever is not part of their layout."""
    path = Path(path)
    names = sorted(e.name for e in path.iterdir() if e.name != MARKER)
    recognised = _recognise(path)
    if recognised is None:
        return names
    command, layout = recognised
    if layout is None:
        return []
    foreign = []
    for name in names:
        entry = path / name
        if _leftover_of(name, layout):
            continue
        if name not in layout:
            foreign.append(name)
        elif command == "demo" and name in DEMO_DIRS:
            inner = _recognise(entry) if entry.is_dir() else None
            if inner is None:
                foreign.append(name)
            elif inner[1] is not None:
                foreign += [f"{name}/{sub}" for sub in foreign_entries(entry)]
        elif command == "demo" and not entry.is_file():
            foreign.append(name)
    return foreign


def _recognise(path: Path) -> tuple[str, frozenset | None] | None:
    """(command, layout) for a distil output directory, or None. layout None: every file in it is distil's;
    otherwise only the names in layout (and distil's temporary leftovers) are."""
    marker = path / MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and record.get("written_by") == "distil":
            command = record.get("command") or "unknown"
            return command, (DEMO_DIRS | DEMO_FILES if command == "demo" else None)
    for name, command in LEGACY_MARKERS.items():
        if (path / name).is_file():
            return command, None
    if _is_report(path):
        return "report", None
    if any((path / name).exists() for name in RUN_SIGNATURE) or any(
            (path / name).is_dir() and _recognise(path / name) is not None for name in ("student", "student-init")):
        return "train", RUN_ENTRIES
    if any((path / name).is_dir() and _recognise(path / name) is not None for name in DEMO_DIRS):
        return "demo", DEMO_DIRS | DEMO_FILES
    return None


def _is_report(path: Path) -> bool:
    try:
        with open(path / REPORT_SUMMARY, encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == REPORT_TITLE
    except (OSError, UnicodeDecodeError):
        return False


def _leftover_of(name: str, layout: frozenset) -> bool:
    """Whether `name` is a temporary leftover of one of the entries in `layout`."""
    found = _LEFTOVER.fullmatch(name)
    return bool(found) and any(found["name"] == entry or found["name"].startswith(entry + ".") for entry in layout)


def _has_content(path: Path) -> bool:
    """Anything other than distil's marker, or than temporary leftovers in a directory that is distil's."""
    names = [e.name for e in path.iterdir() if e.name != MARKER]
    if names and all(_LEFTOVER.fullmatch(n) for n in names):
        return _recognise(path) is None
    return bool(names)


def _shown(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def check_output_dir(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Refuse an output directory that already has content, unless overwriting is allowed and all of it is distil's.

    `flag` names what would replace the directory (--overwrite, run.overwrite=true, ...) in the messages."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DistilError(f"The output path {path} exists and is a file, not a directory. Choose another output path.")
    if not path.is_dir() or not _has_content(path):
        return path
    foreign = foreign_entries(path)
    if not overwrite:
        if foreign:
            raise DistilError(
                f"The output directory {path} already holds files that distil did not write ({_shown(foreign)}). "
                f"Nothing was changed. Choose another output directory ({flag} only replaces distil's own outputs)."
            )
        raise DistilError(
            f"The output directory {path} already holds results. Nothing was changed. "
            f"Pass {flag} to replace it, or choose another output directory."
        )
    if foreign:
        command = output_command(path)
        what = ("is not an output of distil" if command is None
                else f"is a distil {command} output but also holds files distil did not write")
        raise DistilError(
            f"{flag} would delete files that distil did not write: {path} {what} ({_shown(foreign)}). Nothing was "
            f"changed; distil only replaces directories it wrote itself (they carry {MARKER}). Choose another output "
            "directory, or move those files away (or remove the directory) yourself and run again."
        )
    return path


def remove_stale_leftovers(path: str | Path) -> int:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `path` whose process no longer runs; returns bytes freed.

    A process killed outright (SIGKILL, power loss) cannot clean up after itself; its PID in the name tells whether
    it is gone. Leftovers of a live process (another run writing the same output right now) are never touched."""
    path = Path(path)
    if not path.parent.is_dir():
        return 0
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:tmp|old)-(\d+)")
    freed = 0
    for entry in sorted(path.parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if not found or int(found.group(1)) == os.getpid() or _process_running(int(found.group(1))):
            continue
        size = bytes_under(entry)
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            log.warning("could not remove %s, left by process %s that no longer runs: %s", entry, found.group(1), exc)
            continue
        freed += size
        log.warning("removed %s, left by process %s that no longer runs (%s freed)", entry, found.group(1),
                    human_size(size))
    return freed


def _process_running(pid: int) -> bool:
    """Whether a process with this PID exists; in doubt (no permission to ask, Windows) it counts as running."""
    if pid <= 0 or os.name == "nt":  # on Windows os.kill would terminate the process instead of asking
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False, command: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` (marked as distil `command`'s output) only if the block
    completes, holding the lock on `path` throughout.

    On success the previous content of `path` (allowed only with overwrite, and only when it is distil's) is
    replaced in one rename; on any exception the temporary directory is removed and `path` is untouched. If the
    target changed while the block ran so that it may no longer be replaced, nothing there is touched and the new
    result is kept under a name of its own (the DistilError names it).
    """
    with output_lock(path, command):
        final = check_output_dir(path, overwrite)  # again, now that no other distil process can write it
        before = _snapshot(final)
        check_writable(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
            with disk_space_errors(tmp):
                write_marker(tmp, command)
            keep_umask(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        changed = _changed_target(final, overwrite, before)
        if changed is None:
            try:
                replace_dir(tmp, final)
                return
            except OSError as exc:  # something took the name between the check and the rename
                changed = f"{final} appeared while it was being replaced ({exc.strerror or exc})"
        kept = _keep_result(tmp, final)
        raise DistilError(
            f"The output {final} changed while distil {command or ''} was writing it: {changed}. Nothing there was "
            f"touched; the new result is kept in {kept}. Move it where you want it (or remove it)."
        )


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file under directory `path`, by relative name."""
    if not path.is_dir():
        return {}
    found = {}
    for entry in path.rglob("*"):
        with contextlib.suppress(OSError):
            info = entry.lstat()
            found[entry.relative_to(path).as_posix()] = (info.st_size, info.st_mtime_ns)
    return found


def _changed_target(final: Path, overwrite: bool, before: dict) -> str | None:
    """Why `final` may not be replaced now (something appeared or changed there during the run), or None."""
    if final.exists() and not final.is_dir():
        return "a file now stands there"
    if not final.is_dir() or not _has_content(final):
        return None
    foreign = foreign_entries(final)
    if foreign:
        return f"it now holds files distil did not write ({_shown(foreign)})"
    now = _snapshot(final)
    changed = sorted(name for name, seen in now.items() if before.get(name) != seen)
    if changed:
        return f"files appeared or changed in it while this command ran ({_shown(changed)})"
    if not overwrite:
        return "it now holds a finished result, and --overwrite was not given"
    return None


def _keep_result(tmp: Path, final: Path) -> Path:
    """Give a finished result that could not take its place a visible name beside it (temporary names are
    removed as leftovers once this process has gone)."""
    kept = final.parent / f"{final.name}.new-{os.getpid()}"
    os.replace(tmp, kept)
    return kept


def check_writable(path: str | Path) -> None:
    """Refuse, before any work is done, an output that cannot be written: the nearest existing directory at or
    above `path` must be writable (a read-only file system or a directory without write permission)."""
    path = Path(path).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return  # a file in the way is reported by check_output_dir, with its own message
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path else f"{existing}, where it would be created,"
        raise DistilError(
            f"Cannot write the output {path}: {where} is not writable (a read-only file system, or no write "
            "permission for this user). Nothing was changed. Choose an output directory you can write to."
        )


def keep_umask(directory: Path) -> None:
    """Give files the user's usual permissions: safetensors writes weights readable by their owner only (0600),
    unlike every other file of a model directory (0644 under the common umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    wanted = 0o666 & ~mask
    for entry in directory.rglob("*"):
        if entry.is_file() and (entry.stat().st_mode & 0o777) == 0o600 and wanted != 0o600:
            entry.chmod(wanted)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing `dst` as close to atomically as a filesystem allows. The previous
    `dst` is deleted only if everything in it is distil's; otherwise it is kept beside, under a name of its own."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        if old.exists():  # left by an earlier replace in this process whose clean-up failed
            shutil.rmtree(old)
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except OSError:
            os.replace(old, dst)
            raise
        if _has_content(old) and foreign_entries(old):  # written there in the instant since the last check
            kept = dst.parent / f"{dst.name}.replaced-{os.getpid()}"
            os.replace(old, kept)
            log.warning("%s held files distil did not write when it was replaced; they are kept in %s", dst, kept)
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON to `path` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --- one writer per output ---------------------------------------------------------------------------------------

try:
    import fcntl
except ImportError:  # Windows: the lock file alone (created exclusively) excludes a second writer
    fcntl = None


def lock_path(path: str | Path) -> Path:
    """The lock file of output `path`: `.NAME.lock` beside it."""
    absolute = Path(os.path.abspath(path))
    return absolute.parent / f".{absolute.name}.lock"


_HELD_HERE: set[Path] = set()  # the lock files this process holds


def locks_output(command: str, parameter: str = "output_dir"):
    """Decorator of a command function: it holds the lock on its output (the argument `parameter`) from its start,
    not only while it writes, so that a second writer is refused before either spends its compute."""
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            target = signature.bind_partial(*args, **kwargs).arguments.get(parameter)
            if target is None:  # the command says itself what is missing
                return function(*args, **kwargs)
            with output_lock(target, command):
                return function(*args, **kwargs)
        return locked
    return decorate


@contextlib.contextmanager
def output_lock(path: str | Path, command: str | None, take: bool = True) -> Iterator[None]:
    """Hold the lock on output `path` for the block: a second distil command writing `path` is refused meanwhile.

    The lock file records {pid, host, command, started}. The holder keeps an advisory lock (flock) on it, which the
    kernel drops when the holder dies, so a lock file left by a killed process is taken over (and said in the log).
    `take=False` (the other processes of a distributed run: their main process holds the lock) holds nothing."""
    if not take:
        yield
        return
    check_writable(path)
    lock = lock_path(path)
    held = lock.resolve()
    if held in _HELD_HERE:  # this process holds it already (a command locks at its start, its final write again)
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, Path(path), command)
    _HELD_HERE.add(held)
    try:
        yield
    finally:
        _HELD_HERE.discard(held)
        with contextlib.suppress(OSError):
            if _same_file(fd, lock):
                os.unlink(lock)
        os.close(fd)  # drops the flock only now, after the file is gone


def _acquire(lock: Path, path: Path, command: str | None) -> int:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    for _ in range(100):  # each retry follows a holder that just released the lock
        if fcntl is None:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise DistilError(_held_message(path, lock, _read_lock(lock))) from None
        else:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DistilError(_held_message(path, lock, _read_lock(lock))) from None
            if not _same_file(fd, lock):  # the holder removed it between our open and flock: take the next one
                os.close(fd)
                continue
        previous = _read_lock(lock)
        if previous.get("pid") is not None and previous.get("host") != record["host"]:
            # A lock of another machine on a shared filesystem whose locks may not reach across machines.
            os.close(fd)
            raise DistilError(_held_message(path, lock, previous, other_host=True))
        pid = previous.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _process_running(pid):
            # Its process still runs, yet holds no flock: a writer that does not take one (say on a filesystem
            # without locks), or a new process that got the PID of a dead holder. In doubt, refuse.
            os.close(fd)
            raise DistilError(_held_message(path, lock, previous, pid_running=True))
        if previous:
            log.warning("took over the lock %s of %s (process %s, started %s), which no longer runs", lock,
                        _who(previous), previous.get("pid"), previous.get("started"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return fd
    raise DistilError(f"Could not take the lock {lock}: other processes keep taking and releasing it. "
                      "Wait until they have finished, then run again.")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _read_lock(lock: Path) -> dict:
    try:
        record = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _who(record: dict) -> str:
    return f"distil {record['command']}" if record.get("command") else "distil"


def _held_message(path: Path, lock: Path, record: dict, other_host: bool = False, pid_running: bool = False) -> str:
    holder = (f"{_who(record)} (process {record.get('pid', '?')} on {record.get('host', '?')}, started "
              f"{record.get('started', '?')})" if record else "another distil process")
    if other_host:
        return (f"{path} is locked by {holder}: its lock {lock} comes from another machine, where distil cannot "
                "tell whether that process still runs. Nothing was changed. Wait for it to finish or choose another "
                f"output; if it no longer runs, delete {lock} and run again.")
    unsure = (f" If process {record.get('pid')} is not a distil command, delete {lock} and run again."
              if pid_running else "")
    return (f"{path} is being written by {holder}; its lock is {lock}. Nothing was changed. Wait for that command to "
            f"finish (or stop it), or choose another output.{unsure}")
