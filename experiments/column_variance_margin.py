"""How close to a float32 rounding boundary must CVR's column variance be before its
float64 moments may round otherwise than torch's Welford kernel? (columns._TIE_MARGIN)

For LLaMA- and SmolLM2-shaped random layers (W ~ N(0, 1/in), some with a column mean
added), each column's variance from float64 Σx and Σx² (as ``columns.column_variance``
sums them) is compared with ``W.var(dim=0, unbiased=False)``. Per margin m: how many
columns m would send to torch (a boundary within m of the value), and how many of the
others round to another float32 than torch's (a margin too small).

    OMP_NUM_THREADS=2 .venv/bin/python experiments/column_variance_margin.py | tee experiments/out/column_variance_margin.txt
"""
import math

import torch

MARGINS = [1e-9, 1e-10, 1e-11, 1e-12, 1e-13, 0.0]
CASES = [((13824, 5120), 0.0), ((5120, 5120), 0.0), ((13824, 5120), 0.003), ((5120, 13824), 0.0),
         ((1536, 576), 0.0), ((576, 1536), 0.0), ((1536, 576), 0.05), ((28672, 1024), 0.0), ((5120, 5120), 0.01)]

counts = {m: [0, 0] for m in MARGINS}
columns = 0
for seed, (shape, offset) in enumerate(CASES):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(shape[1]) + offset
    n = W.shape[0]
    D = W.double()
    ones = torch.ones(n, dtype=torch.float64)
    total, squares = ones @ D, ones @ D.square()
    variance = (squares - total * total / n) / n
    torchs = W.var(dim=0, unbiased=False)
    columns += W.shape[1]
    for m in MARGINS:
        kept = (variance * (1 + m)).float() == (variance * (1 - m)).float()
        counts[m][0] += int((~kept).sum())
        counts[m][1] += int((kept & (variance.float() != torchs)).sum())
    print(f"{shape[0]}x{shape[1]} offset {offset}: done", flush=True)
print(f"\n{columns} columns; per margin: columns sent to torch, other columns rounding otherwise than torch")
for m, (sent, wrong) in counts.items():
    print(f"  {m:g}: {sent} sent ({sent / columns:.2%}), {wrong} wrong")
