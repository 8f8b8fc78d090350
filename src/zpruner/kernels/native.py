"""Compiled CPU kernels: C files of this package, built on first use with the machine's C
compiler and called through ctypes.

Why: some of zpruner's per-layer work is a chain of cheap elementwise ops that torch runs
as one pass over memory each (Z-Pruner's score: thirteen per chunk of rows), or a Python
loop of small ops (SparseGPT's columns). Fusing them needs a compiled loop.
``torch.compile`` was measured and lost to the eager chain on the CPU
(benchmarks/ec_fused.py); a plain C loop needs no torch headers, so it builds in about a
second, and ctypes releases the GIL, so rowpass's worker threads run it in parallel.

Everything here is optional: with no compiler, a failed build, or ``ZPRUNER_NATIVE=0`` in
the environment, ``load`` returns None and callers keep their eager path (logged once, at
info level). Every kernel gives its eager path's bits, so a result does not depend on
which ran (a kernel whose sums could not, EC's, was removed); ``used()`` names those that
did, for the record of a run. Built libraries are cached in ``native/`` under
``$ZPRUNER_CACHE`` (default ``~/.cache/zpruner``, where models are cached too), keyed by
the source, the compiler and the CPU, since they are built for this CPU
(``-march=native``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# -ffp-contract=off: no fused multiply-add, so a*b+c rounds twice as torch's two ops do.
# -fno-math-errno only lets sqrtf be one instruction (same value).
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c11", "-shared", "-fPIC"]
TUNING = ["-march=native"]  # dropped if the compiler does not know it

POINTER, INT, INT64, FLOAT, DOUBLE = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_double


def enabled() -> bool:
    return os.environ.get("ZPRUNER_NATIVE", "1") != "0"


def fits(*tensors: torch.Tensor, dtype: torch.dtype = torch.float32, layout: str = "contiguous") -> bool:
    """Whether every tensor is what a kernel's pointer arithmetic assumes: on the CPU, of
    ``dtype``, and laid out as ``layout`` says ("contiguous"; "rows": each row contiguous,
    rows any distance apart; "any")."""
    if layout not in ("contiguous", "rows", "any"):
        raise ValueError(f"layout {layout!r}: use 'contiguous', 'rows' or 'any'")

    def laid_out(t: torch.Tensor) -> bool:
        return layout == "any" or (t.is_contiguous() if layout == "contiguous" else t.stride(-1) == 1)

    return all(t.device.type == "cpu" and t.dtype == dtype and laid_out(t) for t in tensors)


_used: set[str] = set()  # names of the kernels handed out since reset_used()


def load(name: str, signatures: tuple[tuple, ...]) -> ctypes.CDLL | None:
    """The library built from ``<name>.c`` beside this file, with ``signatures`` ((function,
    argument ctypes[, result ctype]) tuples) declared; None when it cannot be built or
    native code is off. Callers load a kernel where they are about to run it: a library
    returned here is recorded as used."""
    library = _loaded(name, signatures)
    if library is not None:
        _used.add(name)
    return library


def used() -> list[str]:
    """The kernels (their C files' names) loaded to run since ``reset_used()``, or since the
    process started, sorted."""
    return sorted(_used)


def reset_used() -> None:
    """Start a new record for ``used()`` (at the start of a run)."""
    _used.clear()


@functools.cache
def _loaded(name: str, signatures: tuple[tuple, ...]) -> ctypes.CDLL | None:
    """``load`` without the record, built and loaded once per process."""
    if not enabled():
        log.info("native %s off (ZPRUNER_NATIVE=0): using the eager torch path", name)
        return None
    try:
        library = ctypes.CDLL(str(_built(Path(__file__).with_name(f"{name}.c"))))
        for function, argtypes, *result in signatures:
            getattr(library, function).argtypes = list(argtypes)
            getattr(library, function).restype = result[0] if result else None
    except (OSError, ValueError, subprocess.SubprocessError, AttributeError) as error:
        log.info("native %s unavailable (%s): using the eager torch path", name, str(error).strip()[:300])
        return None
    return library


def _compiler() -> list[str]:
    """$CC as given; else the compiler Python was built with, if this machine has it (a
    conda Python names its own toolchain's, often absent); else ``cc``."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    python_cc = shlex.split(sysconfig.get_config_var("CC") or "")
    return python_cc if python_cc and shutil.which(python_cc[0]) else ["cc"]


def _cpu() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("ZPRUNER_CACHE") or Path.home() / ".cache" / "zpruner") / "native"


def _built(source: Path) -> Path:
    compiler = _compiler()
    key = hashlib.sha256("\0".join([source.read_text(), *compiler, *FLAGS, platform.machine(), _cpu()]).encode())
    target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: another process may be loading the target.
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{source.stem}-", suffix=".so")
    os.close(handle)
    try:
        for tuning in (TUNING, []):
            run = subprocess.run([*compiler, *FLAGS, *tuning, str(source), "-o", partial, "-lm"],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                break
        else:
            raise OSError(f"{shlex.join(compiler)} failed: {run.stderr}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
