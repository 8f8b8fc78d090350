"""Hashes of pruned_weights for every method x update x pattern on fixed layers and fixed
statistics: run it with PYTHONPATH pointing at two versions of src/ (e.g.
`git archive REV src | tar -x -C /tmp/rev`) to see whether a change moved any bit.

    PYTHONPATH=/tmp/rev/src OMP_NUM_THREADS=1 .venv/bin/python experiments/bit_identity.py > /tmp/rev.txt
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python experiments/bit_identity.py | diff /tmp/rev.txt -
    ... experiments/bit_identity.py zpruner sparsegpt   # only these methods

What it covers, and why:
- the statistics are added in several batches, as the engine adds one calibration window
  at a time: with a single batch, ``xtx += xᵀx`` and ``xtx.addmm_(xᵀ, x)`` give the same
  Hessian, and the change between them (which moved SparseGPT's verified results) is missed;
  the Hessian's own hash is the first line;
- a random layer and the same layer on a coarse grid (dequantized weights tie by the
  dozen, and ties decide masks);
- the Z-Pruner score itself: its N:M masks hide most last-bit changes on one layer, not on
  a whole model.
Thread count: before restore-arith, the Z-Pruner score depended on torch's thread count;
it now computes its whole-matrix means as torch does on two threads, whatever the count
(``zpruner.kernels.reductions.matrix_mean``). Compare its score line with an older version's on two
threads (``torch.set_num_threads(2)`` before this script's code), every other line on one.
"""
import hashlib
import sys

import torch

from zpruner.config import PruneConfig
from zpruner.pruning import pruned_weights
from zpruner.stats import ActivationStats

METHODS = ["magnitude", "wanda", "ria", "cvr", "zpruner", "sparsegpt"]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:12]


torch.manual_seed(0)
W = torch.randn(576, 1536) * 0.02
X = torch.randn(4096, 1536) * torch.rand(1536) * 3
st = ActivationStats(1536, hessian=True)
for x in X.split(512):
    st.add(x)
print("xtx", digest(st.xtx), flush=True)
only = sys.argv[1:] or METHODS
for name, layer in [("rand", W), ("tied", (W / 0.002).round() * 0.002)]:
    if "zpruner" in only:
        from zpruner import scores

        print(f"{name} zpruner score {digest(scores.get_score('zpruner')(layer, st, constants={}))}", flush=True)
    for method in [m for m in METHODS if m in only]:
        for update in ["none", "ec"]:
            for pattern in ["unstructured", "4:8", "2:4"]:
                Wp, keep = pruned_weights(layer.clone(), st, PruneConfig(method, pattern=pattern, update=update))
                print(f"{name} {method}+{update} {pattern} {digest(Wp)} {digest(keep)}", flush=True)
