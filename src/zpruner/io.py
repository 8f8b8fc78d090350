"""Writing outputs so that a failed or killed run never destroys or half-writes anything.

Every file goes to a sibling temporary name and is renamed into place when complete (a
rename within one folder is atomic). A model folder is written beside its target and
swapped in; an existing folder is replaced only when it is a previous zpruner output and
the caller allows it, and never goes missing on Linux (the two folders are exchanged
atomically with ``renameat2``). Temporary folders carry the writer's process id in their
name, so the next run can tell a killed run's leftovers from a running one's.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import ZprunerError

log = logging.getLogger(__name__)

MANIFEST = "zpruner.json"  # written last into every saved model: marks a complete zpruner output
_PARTIAL = ".zpruner-partial"  # written first into every temporary model folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_mode(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; outputs get the permissions open() would give."""
    os.chmod(path, mode & ~_umask())


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary sibling of ``path``, then rename it into place."""
    path = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        _open_mode(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps_json(payload, **kwargs) -> str:
    """Strict JSON: a NaN or infinity raises instead of writing a token no parser accepts."""
    try:
        return json.dumps(payload, allow_nan=False, **kwargs)
    except ValueError as exc:
        raise ZprunerError(f"internal error: a non-finite number reached a results file ({exc})") from exc


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    text = dumps_json(payload, indent=2) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------- checks before any work

def _check_parent(option: str, path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise ZprunerError(f"{option} {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZprunerError(f"{option} {path}: folder {parent} is not writable; choose another place")


def check_output_file(option: str, value: str | os.PathLike) -> Path:
    """A file path the run will write at its end: refused now if that write could not succeed."""
    if not str(value).strip():
        raise ZprunerError(f"{option} is empty (an unset shell variable?); give a file path")
    path = Path(value).expanduser().resolve()
    if path.is_dir():
        raise ZprunerError(f"{option} {value} is a folder; give a file path such as {path / 'results.json'}")
    _check_parent(option, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ZprunerError(f"{option} {value} exists and is not writable; choose another file")
    return path


def check_output_folder(option: str, value: str | os.PathLike) -> Path:
    """A folder the run will write files into (created if missing)."""
    if not str(value).strip():
        raise ZprunerError(f"{option} is empty (an unset shell variable?); give a folder")
    path = Path(value).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ZprunerError(f"{option} {value} is an existing file; give a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ZprunerError(f"{option} {value}: folder {existing} is not writable; choose another place")
    return path


def check_model_target(value: str | os.PathLike, overwrite: bool, option: str = "--save") -> Path:
    """Where a model folder will go: absent, empty, or (with ``overwrite``) a previous
    zpruner output. Anything else is refused, so no run can delete a user's files."""
    if not str(value).strip():
        raise ZprunerError(f"{option} is empty (an unset shell variable?); give a new folder for the model")
    path = Path(value).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ZprunerError(f"{option} {value} is an existing file; give a new folder for the model")
    _check_parent(option, path)
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST).is_file():
            raise ZprunerError(f"{option} {value} is a folder with other files in it (no {MANIFEST}: not a zpruner "
                               "output); zpruner never replaces it: give a new or empty folder")
        if not overwrite:
            raise ZprunerError(f"{option} {value} holds a previous zpruner model; add --overwrite to replace it, "
                               "or give a new folder")
        if not os.access(path, os.W_OK):
            raise ZprunerError(f"{option} {value} is not writable; choose another folder")
    remove_stale_temporaries(path)
    return path


# ---------------------------------------------------------------- model folders

def _temp_prefix(target: Path) -> str:
    return f"{target.name}.tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete temporary folders of ``target`` left by killed zpruner runs: named
    ``<target>.tmp-<pid>-*``, holding zpruner's partial marker or manifest, their process
    gone. Returns what was removed."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.glob(_temp_prefix(target) + "*"):
        pid_text = entry.name[len(_temp_prefix(target)):].split("-", 1)[0]
        ours = entry.is_dir() and ((entry / _PARTIAL).is_file() or (entry / MANIFEST).is_file())
        if not (ours and pid_text.isdigit()) or _alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.warning("removed %s, left by an interrupted zpruner run", entry)
        removed.append(entry)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without the flag
        return False
    raise OSError(code, os.strerror(code), str(b))


def save_folder_atomic(target: str | os.PathLike, write: Callable[[Path], None], manifest: dict,
                       overwrite: bool = False) -> Path:
    """Fill a new folder with ``write(folder)`` plus ``zpruner.json`` and put it at ``target``.

    ``target`` is checked again (``check_model_target``): a folder with foreign files is
    never touched, a previous zpruner output is replaced only with ``overwrite``."""
    target = check_model_target(target, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        (tmp / _PARTIAL).touch()
        _open_mode(tmp, 0o777)
        write(tmp)
        (tmp / _PARTIAL).unlink()
        (tmp / MANIFEST).write_text(dumps_json(manifest, indent=2) + "\n")
        if target.is_dir() and _exchange(tmp, target):
            pass  # tmp now holds the previous output, removed below
        elif target.is_dir() and not any(target.iterdir()):
            os.replace(tmp, target)  # rename(2) replaces an empty folder atomically
        elif target.exists():
            # no atomic exchange here: the previous output is moved aside first (it stays under
            # the temporary name until removed below, so a kill in between loses nothing new)
            aside = target.with_name(f"{tmp.name}-old")
            os.rename(target, aside)
            os.rename(tmp, target)
            tmp = aside
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def create_folder_atomic(target: str | os.PathLike, write: Callable[[Path], None],
                         accept_existing: Callable[[Path], bool]) -> Path:
    """Create the new folder ``target`` with ``write(folder)`` in a temporary sibling, then
    one rename, so no reader ever sees it half written (a shared cache). When another process
    created ``target`` meanwhile, theirs is kept if ``accept_existing(target)``; else the
    rename's error is raised."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        _open_mode(tmp, 0o777)
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not accept_existing(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
