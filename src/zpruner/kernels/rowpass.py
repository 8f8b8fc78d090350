"""Passes over a weight matrix [out, in] in chunks of rows, with reused scratch buffers.

Why: on a CPU an elementwise op over a cached chunk costs a few milliseconds per 100 MB,
but every full-size temporary costs a fresh allocation, which the C allocator serves
from new pages (above its 32 MB mmap threshold) and the kernel then zero-fills on first
touch: about ten times the op itself (measured here: 40 ms against 3 ms for a
5120 x 5120 float32 matrix). Formulas written as chains of whole-matrix expressions
(``(W - mu).square().sum(0)``) pay that once per intermediate. The scores and EC instead
walk the matrix in chunks of rows, doing the same elementwise arithmetic in place in a
chunk-sized buffer that stays in cache; per-row statistics finish within a chunk, and
per-column ones are summed over the chunks (float32 reassociation only).

On the CPU the chunks are shared out over the torch thread count as Python threads, each
running its ops on one thread (torch releases the GIL inside an op). Why not torch's own
intra-op threads: every op is then a parallel region ending in a barrier, and on a busy
machine the barrier waits for whichever thread the OS has descheduled; with 20-30 small
ops per chunk a 5120 x 5120 Z-Pruner score took 5.7 s on 2 threads against 0.45 s on 1
(load average 5 on 2 cores). Chunks handed out on demand stall nobody.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

# About 1 M elements (4 MB of float32) per chunk: a core's 2 MB L2 plus its share of L3,
# and large enough that the per-op dispatch cost (microseconds) stays small against the work.
CHUNK_ELEMENTS = 1 << 20

T = TypeVar("T")


def chunk_rows(n_rows: int, n_cols: int) -> int:
    return min(n_rows, max(1, CHUNK_ELEMENTS // max(n_cols, 1)))


def row_slices(n_rows: int, n_cols: int, rows: int | None = None) -> Iterator[slice]:
    """Consecutive row ranges covering [0, n_rows), each ``rows`` long (default: about
    ``CHUNK_ELEMENTS`` large)."""
    rows = rows or chunk_rows(n_rows, n_cols)
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


class Scratch:
    """Reusable chunk-sized float32 buffers: ``get(i, rows)`` is buffer i's first rows."""

    def __init__(self, like: torch.Tensor, count: int = 1, rows: int | None = None):
        rows = rows or chunk_rows(*like.shape)
        self.buffers = [torch.empty(rows, like.shape[1], dtype=torch.float32, device=like.device) for _ in range(count)]

    def get(self, i: int, rows: int) -> torch.Tensor:
        return self.buffers[i][:rows]


def map_chunks(
    fn: Callable[[slice, Scratch], T], like: torch.Tensor, buffers: int = 1, rows: int | None = None,
    workers: int | None = None,
) -> list[T]:
    """[fn(rows, scratch) for every chunk of rows of ``like`` ([out, in])], in chunk order.

    fn must only write to its own rows and its scratch. On the CPU the chunks run on as
    many Python threads as torch has threads, each with its own scratch and one torch
    thread; elsewhere (a GPU queues the ops anyway) one after the other. ``rows``: rows
    per chunk, default about ``CHUNK_ELEMENTS`` elements (buffers=0 for no scratch);
    ``workers``: threads, default torch's thread count.
    """
    slices = list(row_slices(*like.shape, rows))
    workers = min(workers or torch.get_num_threads(), len(slices)) if like.device.type == "cpu" else 1
    if workers <= 1:
        scratch = Scratch(like, buffers, slices[0].stop - slices[0].start)
        return [fn(rows, scratch) for rows in slices]
    # A fresh scratch per chunk costs nothing measurable: chunk-sized blocks come back from
    # the allocator's free lists, already touched, unlike whole-matrix ones.
    return list(_pool(workers).map(lambda r: fn(r, Scratch(like, buffers, r.stop - r.start)), slices))


def map_threads(fn: Callable[[T], object], items: list[T], workers: int | None = None) -> list:
    """[fn(item) for item in items], in order, each on one torch thread: on up to
    ``workers`` (default torch's thread count) Python threads (for pieces of work that must
    each run on one torch thread to keep their bits, yet need not wait for one another)."""
    workers = min(workers or torch.get_num_threads(), len(items))
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [fn(item) for item in items]
        finally:
            torch.set_num_threads(threads)
    return list(_pool(workers).map(fn, items))


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per worker count, its threads on one torch thread each. Long-
    lived because a new OS thread pays for its own OpenMP and MKL set-up on its first ops
    (measured: a new pool per SparseGPT block made the solve 8x slower)."""
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zpruner-rows",
                                             initializer=_one_torch_thread)
    return _pools[workers]


def _one_torch_thread() -> None:
    # torch sets a thread's count lazily, to the process-wide count of the moment, at the
    # thread's first parallel op. Without this get_num_threads (which runs that set-up now)
    # a later torch.set_num_threads(2) in the main thread would give these threads two
    # threads each, and a share's sum would then be split in two (other bits).
    torch.get_num_threads()
    torch.set_num_threads(1)


def mask_as_float(keep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """keep (bool) as 0.0/1.0 in ``out``. Read as uint8: torch converts bool to float on a
    slow scalar path (measured 8x slower than from uint8, the same bytes)."""
    return out.copy_(keep.view(torch.uint8))


def masked_copy(W: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W·keep for float32 W: [out, in], as a new tensor made chunk by chunk: the bits of
    ``W * keep`` (-0.0 where a negative weight is dropped included) at about half its time
    on a 13B-sized layer, as the mask goes through ``mask_as_float``."""
    out = torch.empty_like(W)

    def fill(rows: slice, scratch: Scratch) -> None:
        torch.mul(W[rows], mask_as_float(keep[rows], scratch.get(0, rows.stop - rows.start)), out=out[rows])

    map_chunks(fill, W)
    return out


def sum_parts(parts: list) -> torch.Tensor:
    """Σ of per-chunk partial results, in chunk order (so the result does not depend on
    which thread finished first)."""
    total = parts[0].clone() if isinstance(parts[0], torch.Tensor) else parts[0]
    for p in parts[1:]:
        total = total + p
    return total
