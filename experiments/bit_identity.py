"""Hash of pruned_weights for several method x update x pattern combinations on one fixed
layer and fixed statistics: run it with PYTHONPATH pointing at two versions of src/ (e.g.
`git archive REV src | tar -x -C /tmp/rev`) to see whether a change moved any bit.

    PYTHONPATH=/tmp/rev/src OMP_NUM_THREADS=1 .venv/bin/python experiments/bit_identity.py
"""
import hashlib

import torch

from zpruner.config import PruneConfig
from zpruner.pruning import pruned_weights
from zpruner.stats import ActivationStats

torch.manual_seed(0)
W = torch.randn(576, 1536) * 0.02
X = torch.randn(4096, 1536) * torch.rand(1536) * 3
st = ActivationStats(1536, hessian=True)
st.add(X)
out = []
for method, update, pattern in [("zpruner","none","4:8"),("zpruner","ec","2:4"),("wanda","ec","unstructured"),("sparsegpt","none","4:8"),("cvr","ec","unstructured"),("ria","ec","2:4"),("zpruner","none","unstructured")]:
    cfg = PruneConfig(method, pattern=pattern, update=update)
    Wp, keep = pruned_weights(W.clone(), st, cfg)
    out.append(f"{method}+{update} {pattern} {hashlib.sha256(Wp.numpy().tobytes()).hexdigest()[:12]} {hashlib.sha256(keep.numpy().tobytes()).hexdigest()[:12]}")
print("\n".join(out))
