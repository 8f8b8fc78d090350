"""``prune(model, config)``: one method applied to every decoder block through the engine."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import PruneConfig
from .engine import run_layerwise
from .errors import ZprunerError
from .layers import check_pattern, find_blocks, find_linears, iter_prunable, weight_view
from .masks import keep_mask
from .scores import Score, get_score
from .stats import ActivationStats, record_inputs


@dataclass
class PruneReport:
    """Per-layer pruning time (s) by full module name, and the engine's total time."""

    layer_time_s: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0


@torch.no_grad()
def prune_layer(layer: nn.Module, score: Score, stats: ActivationStats | None, config: PruneConfig) -> torch.Tensor:
    """Score, mask and zero one layer in place; returns keep: [out, in]."""
    W = weight_view(layer)
    S = score.fn(W.float(), stats)
    keep = keep_mask(S, config.sparsity, config.parsed_pattern, config.group or score.default_group)
    W.mul_(keep.to(W.device))
    return keep


def prune(
    model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None = None, progress: bool = True
) -> PruneReport:
    """Prune ``model`` in place as ``config`` says.

    calibration: [nsamples, seqlen] token ids (see ``zpruner.data.calibration_windows``);
    required when the method uses activations, ignored otherwise.
    """
    score = get_score(config.method)
    check_pattern(model, config.parsed_pattern)
    report = PruneReport()
    names = {module: name for name, module in iter_prunable(model)}
    start = time.perf_counter()

    def prune_block(layers: dict[str, nn.Module], stats: dict[str, ActivationStats] | None) -> None:
        for name, layer in layers.items():
            t = time.perf_counter()
            prune_layer(layer, score, stats[name] if stats else None, config)
            report.layer_time_s[names[layer]] = time.perf_counter() - t

    if not score.needs_activations:
        # Data-free: no reason to run the model at all.
        for block in tqdm(find_blocks(model), desc="blocks", unit="block", disable=not progress):
            prune_block(find_linears(block), None)
    else:
        if calibration is None or calibration.ndim != 2 or calibration.shape[0] == 0:
            raise ZprunerError(f"method '{config.method}' needs calibration token ids of shape [nsamples, seqlen]")

        def visit(_i: int, block: nn.Module, forward) -> None:
            layers = find_linears(block)
            with record_inputs(layers) as stats:
                forward()
            prune_block(layers, stats)

        run_layerwise(model, calibration, visit, progress)
    report.total_s = time.perf_counter() - start
    return report
