"""Smallest and median column variance Var_i W_ij over SmolLM2-135M's block linears: the
scale CVR's eps is compared with (experiments/open_constants.md).

    .venv/bin/python experiments/weight_column_variance.py | tee experiments/out/weight_column_variance.txt
"""
import torch

from zpruner import ModelConfig, load_model
from zpruner.layers import iter_matrices

model, _ = load_model(ModelConfig("smollm2-135m"))
variances = torch.cat([layer.weight.float().var(dim=0, unbiased=False) for _, layer in iter_matrices(model)])
print(f"columns {variances.numel()}  min {variances.min().item():.3g}  "
      f"1st percentile {variances.quantile(0.01).item():.3g}  median {variances.median().item():.3g}")
