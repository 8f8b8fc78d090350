"""Writing outputs so that a failed or killed run never destroys or half-writes anything.

Every file goes to a sibling temporary name and is renamed into place when complete (a
rename within one folder is atomic). A model folder is written beside its target and
swapped in; an existing folder is replaced only when it is a previous zpruner output and
the caller allows it, and never goes missing on Linux (the two folders are exchanged
atomically with ``renameat2``). A temporary folder carries the writer's process id and a
random token in its name and in a marker file inside (zpruner.temporaries), so the next run
removes a killed run's leftovers, never a running one's, nor a user's folder that merely has
a similar name.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from safetensors import SafetensorError

from .errors import ZprunerError
from .temporaries import discard_temporary, make_temporary, mark, remove_stale_temporaries, temp_prefix, unmark

MANIFEST = "zpruner.json"  # written last into every saved model: marks a complete zpruner output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_mode(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; outputs get the permissions open() would give."""
    os.chmod(path, mode & ~_umask())


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary sibling of ``path``, then rename it into place. A link,
    device or pipe at ``path`` is refused (checked again here: the run may have been long);
    a failed write's error names ``path``."""
    path = Path(path).expanduser()
    refuse_special("output", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        _open_mode(Path(tmp), 0o666)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name when it has none (a write's ENOSPC names no file)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, str(path))


def describe_os_error(exc: OSError) -> str:
    """One line for an error of the disk: the path, what happened, what to do."""
    where = f"{exc.filename}: " if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return f"{where}{reason} (the disk is full); free space there or choose another place"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{reason} (not writable); choose another place"
    return f"{where}{reason}"


def write_failure(what: str, exc: Exception) -> ZprunerError:
    """A failed write of ``what`` (an OSError, or safetensors' error for the same causes) as one line."""
    reason = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
    if "No space left" in reason and "disk is full" not in reason:
        reason += " (the disk is full); free space there or choose another place"
    return ZprunerError(f"could not write {what}: {reason}")


def dumps_json(payload, **kwargs) -> str:
    """Strict JSON: a NaN or infinity raises instead of writing a token no parser accepts."""
    try:
        return json.dumps(payload, allow_nan=False, **kwargs)
    except ValueError as exc:
        raise ZprunerError(f"internal error: a non-finite number reached a results file ({exc})") from exc


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    text = dumps_json(payload, indent=2) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def is_results_file(path: Path) -> bool:
    """Whether ``path`` holds results zpruner wrote (``--output-json``): a JSON object with
    the run's ``config`` and ``versions``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("config"), dict) and "versions" in data


# ---------------------------------------------------------------- checks before any work

_NOT_REGULAR = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def _special_kind(path: Path) -> str | None:
    """What is at ``path`` when zpruner must not write there: a link (followed, a write could
    replace ``/dev/null`` or land anywhere), a device, a pipe or a socket. None for nothing,
    a regular file or a folder."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    for test, kind in _NOT_REGULAR:
        if test(mode):
            return f"{kind} to {os.readlink(path)}" if test is stat.S_ISLNK else kind
    return None


def refuse_special(option: str, path: Path) -> None:
    kind = _special_kind(path)
    if kind is not None:
        raise ZprunerError(f"{option} {path} is {kind}; zpruner writes only regular files and folders of its own: "
                           "give a new path")


def _unfollowed(value: str | os.PathLike) -> Path:
    """``value`` as an absolute path whose last part is not followed if it is a link."""
    path = Path(value).expanduser()
    if path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_parent(option: str, path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        existing = _nearest_existing(parent)
        if existing.exists() and not existing.is_dir():
            raise ZprunerError(f"{option} {path}: {existing} is a file, not a folder; give a path inside a folder")
        raise ZprunerError(f"{option} {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZprunerError(f"{option} {path}: folder {parent} is not writable; choose another place")


def check_output_file(option: str, value: str | os.PathLike, own: Callable[[Path], bool] | None = None) -> Path:
    """A file path the run will write at its end: refused now if that write could not succeed,
    or would go through a link or into a device. With ``own``, an existing non-empty file is
    replaced only when ``own(path)`` says zpruner wrote it."""
    if not str(value).strip():
        raise ZprunerError(f"{option} is empty (an unset shell variable?); give a file path")
    path = _unfollowed(value)
    refuse_special(option, path)
    if path.is_dir():
        raise ZprunerError(f"{option} {value} is a folder; give a file path such as {path / 'results.json'}")
    _check_parent(option, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ZprunerError(f"{option} {value} exists and is not writable; choose another file")
    if own is not None and path.exists() and path.stat().st_size and not own(path):
        raise ZprunerError(f"{option} {value} is an existing file that zpruner did not write; zpruner replaces only "
                           "its own results: give a new file path")
    return path


def check_output_folder(option: str, value: str | os.PathLike) -> Path:
    """A folder the run will write files into (created if missing); a link to a folder is
    that folder."""
    if not str(value).strip():
        raise ZprunerError(f"{option} is empty (an unset shell variable?); give a folder")
    path = _unfollowed(value)
    if not path.is_dir():
        refuse_special(option, path)  # a link to no folder, a device
    if path.exists() and not path.is_dir():
        raise ZprunerError(f"{option} {value} is an existing file; give a folder")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise ZprunerError(f"{option} {value}: {existing} is a file, not a folder; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ZprunerError(f"{option} {value}: folder {existing} is not writable; choose another place")
    return path.resolve()


def check_model_target(value: str | os.PathLike, overwrite: bool, option: str = "--save") -> Path:
    """Where a model folder will go: absent, empty, or (with ``overwrite``) a previous
    zpruner output. Anything else is refused, so no run can delete a user's files."""
    if not str(value).strip():
        raise ZprunerError(f"{option} is empty (an unset shell variable?); give a new folder for the model")
    path = _unfollowed(value)
    refuse_special(option, path)  # even a link to a folder: the swap would replace the link, not the folder
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


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def same_file_system(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (or the folders they will be created in) are on one file system."""
    return os.stat(_nearest_existing(a)).st_dev == os.stat(_nearest_existing(b)).st_dev


def check_free_space(needs: list[tuple[str, Path, int]]) -> None:
    """Each (what, where, bytes) that a run will write: refused now when the file system it
    goes to has less free space (``statvfs``; what a user may write) than all of them that go
    there together."""
    by_device: dict[int, list[tuple[str, Path, int]]] = {}
    for what, where, size in needs:
        by_device.setdefault(os.stat(_nearest_existing(where)).st_dev, []).append((what, where, size))
    for items in by_device.values():
        total, where = sum(size for _, _, size in items), _nearest_existing(items[0][1])
        fs = os.statvfs(where)
        free = fs.f_bavail * fs.f_frsize
        if total > free:
            if len(items) == 1:
                whats = f"{items[0][0]} needs about {_size(total)}"
            else:
                whats = " and ".join(f"{what} ({_size(size)})" for what, _, size in items)
                whats += f" need about {_size(total)} together"
            raise ZprunerError(f"{whats} on the file system of {where}, which has {_size(free)} free; free space "
                               "there or choose another place")


# ---------------------------------------------------------------- model folders

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


def _token(temporary: Path) -> str:
    return temporary.name.rsplit("-", 1)[1]


def _put_in_place(tmp: Path, target: Path) -> Path | None:
    """Move the finished folder ``tmp`` to ``target``; returns the folder left to remove (an
    earlier output at ``target``, moved under a marked temporary name), or None."""
    if not target.exists():
        os.rename(tmp, target)
        return None
    if not any(target.iterdir()):
        os.replace(tmp, target)  # rename(2) replaces an empty folder atomically
        return None
    # the earlier output takes tmp's name: marked first, so a kill right after the exchange
    # leaves it provably zpruner's (the mark in the new output is removed below)
    mark(target, os.getpid(), _token(tmp))
    if _exchange(tmp, target):
        return tmp
    # no atomic exchange here: the earlier output is moved aside first, under a marked
    # temporary name of its own, so a kill in between loses nothing
    token = secrets.token_hex(8)
    aside = target.parent / f"{temp_prefix(target)}{os.getpid()}-{token}"
    mark(target, os.getpid(), token)
    os.rename(target, aside)
    os.rename(tmp, target)
    return aside


def save_folder_atomic(target: str | os.PathLike, write: Callable[[Path], None], manifest: dict,
                       overwrite: bool = False) -> Path:
    """Fill a new folder with ``write(folder)`` plus ``zpruner.json`` and put it at ``target``.

    ``target`` is checked again (``check_model_target``): a folder with foreign files is
    never touched, a previous zpruner output is replaced only with ``overwrite``."""
    target = check_model_target(target, overwrite)
    tmp = make_temporary(target.parent, temp_prefix(target))
    leftover = tmp
    try:
        _open_mode(tmp, 0o777)
        try:
            write(tmp)
            (tmp / MANIFEST).write_text(dumps_json(manifest, indent=2) + "\n")
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
            raise write_failure(f"the model to {target}", exc) from None
        leftover = _put_in_place(tmp, target)
        unmark(target)
    finally:
        if leftover is not None:
            discard_temporary(leftover)
    return target


def create_folder_atomic(target: str | os.PathLike, write: Callable[[Path], None],
                         accept_existing: Callable[[Path], bool]) -> Path:
    """Create the new folder ``target`` with ``write(folder)`` in a temporary sibling, then
    one rename, so no reader ever sees it half written (a shared cache). When another process
    created ``target`` meanwhile, theirs is kept if ``accept_existing(target)``; else the
    rename's error is raised. ``write`` finds zpruner's hidden marker in the folder: what it
    records of the folder's files should leave out hidden ones."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = make_temporary(target.parent, temp_prefix(target))
    try:
        _open_mode(tmp, 0o777)
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not accept_existing(target):
                raise
        else:
            unmark(target)
    finally:
        discard_temporary(tmp)
    return target
