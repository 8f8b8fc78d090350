"""CPU fast paths of zpruner's methods: the same results as the formulas in ``scores.py``,
``masks.py``, ``updates.py`` and ``sparsegpt.py``, in less time and memory.

The method modules keep the papers' formulas, written to be read; the code here computes
them the way a CPU wants. Each fast version gives its formula's bits (or, for EC's column
sums across chunks, float32 reassociation within 1e-6), whatever the thread count and
whether or not a C compiler is there: tests/test_fast_paths.py and tests/test_native.py
hold them to it. How they are reached: the scores' through ``Registry.accelerate`` (the
registered method runs its fast version where it applies), the others through one
dispatch point in their method module (``masks.drop_lowest``, the registered EC updates,
SparseGPT's block loop).

Why they exist, measured (benchmarks/README.md and the scripts it describes):
- ``rowpass``: passes over a weight matrix in chunks of rows on a pool of threads, each on
  one torch thread. A full-size temporary costs about ten times the op that fills it
  (fresh pages, zero-filled on first touch), and torch's intra-op barriers stall on a
  busy machine.
- ``score_passes``: RIA, Z-Pruner and CVR as such passes, in place; ``reductions``:
  Z-Pruner's whole-matrix means and stds at torch's two-thread bits on any thread count
  (the verified results were measured on two threads); ``columns``: the column norms and
  variances at torch's bits, 2.5 to 14 times faster than torch's CPU kernels.
- ``selection``: a row's k lowest scores by top-k a chunk of rows at a time, and a whole
  layer by a threshold search instead of a top-k whose buffers cost gigabytes.
- ``energy``: energy compensation in one or two chunked passes per axis instead of about
  twenty whole-matrix expressions.
- ``sparsegpt_columns``: SparseGPT's column loop compiled; ``lapack``: its inverse-Hessian
  factor with torch's own LAPACK routines without torch's triangle copies; ``gram``: XᵀX
  over its upper panels where a probe shows ``addmm_``'s bits.
- ``native``: builds the ``*_kernel.c`` files here on first use and loads them through
  ctypes; optional (no compiler, or ``ZPRUNER_NATIVE=0``: the torch passes run, with the
  same bits), and ``native.used()`` records which ran.

Modules here import nothing from the method modules; those import them.
"""
