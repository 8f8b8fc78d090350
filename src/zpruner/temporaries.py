"""Temporary folders that a killed run's successor can remove safely.

A temporary folder is named ``<prefix><pid>-<token>``, the token random, and holds a
marker file with the same pid and token, written first and removed last. A leftover is
removed only when its marker proves zpruner made it under that very name and its process
is gone: never a running run's folder, nor a user's folder that merely has such a name (a
backup ``model.tmp-20240101-backup``).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".zpruner-partial"  # in a temporary folder: the pid and token of its name


def temp_prefix(target: Path) -> str:
    return f"{target.name}.tmp-"


def mark(folder: Path, pid: int, token: str) -> None:
    """Write the marker that proves zpruner made ``folder`` to be removed under the name
    ``...<pid>-<token>`` (see ``_proven_pid``)."""
    (folder / MARKER).write_text(json.dumps({"pid": pid, "token": token}) + "\n")


def make_temporary(parent: Path, prefix: str) -> Path:
    """A new folder ``<prefix><pid>-<token>`` in ``parent`` (mode 0700), marked as zpruner's:
    the token is random, so no folder a user named can carry the same name and marker."""
    while True:
        token = secrets.token_hex(8)
        folder = parent / f"{prefix}{os.getpid()}-{token}"
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue
        mark(folder, os.getpid(), token)
        return folder


def unmark(folder: Path) -> None:
    """The marker out of a folder that took its final name (it is not a temporary any more)."""
    (folder / MARKER).unlink(missing_ok=True)


def _proven_pid(entry: Path, prefix: str) -> int | None:
    """The process that made the temporary folder ``entry``, when its marker proves that
    zpruner made it: a marker whose pid and token are exactly those of the folder's name.
    A name that merely matches (a user's ``model.tmp-20240101-backup``) proves nothing."""
    if entry.is_symlink() or not entry.is_dir():
        return None
    try:
        marker = json.loads((entry / MARKER).read_text(encoding="utf-8"))
        pid, token = marker["pid"], marker["token"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (type(pid) is int and isinstance(token, str) and entry.name == f"{prefix}{pid}-{token}"):
        return None
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def empty_folder(folder: Path, keep: str) -> None:
    """Remove everything in ``folder`` but the entry named ``keep`` (a link is removed, never
    followed)."""
    for entry in folder.iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def discard_temporary(folder: Path) -> None:
    """Remove a marked temporary folder, its marker last: a removal cut short by a kill
    leaves a folder that is still provably zpruner's, which the next run removes."""
    if not folder.is_dir() or folder.is_symlink():
        return
    empty_folder(folder, keep=MARKER)
    unmark(folder)
    try:
        folder.rmdir()
    except OSError:
        pass  # something appeared meanwhile: left in place rather than removed unseen


def remove_stale_temporaries(target: Path, prefix: str | None = None, level: int = logging.WARNING) -> list[Path]:
    """Delete the temporary folders of ``target`` (named ``<prefix><pid>-<token>``, by
    default ``<target>.tmp-``) that killed zpruner runs left: only those whose marker proves
    zpruner made them, and whose process is gone; each said in a log line at ``level``.
    Returns what was removed."""
    prefix = temp_prefix(target) if prefix is None else prefix
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in sorted(target.parent.glob(glob.escape(prefix) + "*")):
        pid = _proven_pid(entry, prefix)
        if pid is None or _alive(pid):
            continue
        discard_temporary(entry)
        log.log(level, "removed %s, left by an interrupted zpruner run", entry)
        removed.append(entry)
    return removed
