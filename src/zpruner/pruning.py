"""``prune(model, config)``: one method applied to every decoder block through the engine.

Per linear layer: score -> mask -> update (README, "How it works"), or, for a solver
such as 'sparsegpt', mask and reconstruction together, then the update.
"""
from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import PruneConfig
from .checkpoint import WorkDir
from .engine import model_device, run_layerwise
from .errors import ZprunerError
from .layers import check_pattern, find_linears, iter_prunable, weight_view
from .masks import keep_mask
from .offload import Blocks
from .progress import bar
from .reallocation import best_permutation
from .stats import ActivationStats, record_inputs


@dataclass
class PruneReport:
    """Per-layer pruning time (s) by full module name, and the engine's total time."""

    layer_time_s: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    # --reallocate: per layer whose input channels were permuted, the N:M-retained score
    # without and with the permutation
    reallocated: dict[str, dict[str, float]] = field(default_factory=dict)
    # fraction of zeros per layer, counted as each block is checkpointed (a streamed run)
    sparsity: dict[str, float] = field(default_factory=dict)
    # the allocation's target per decoder block (--allocation other than uniform), else empty
    block_sparsity: list[float] = field(default_factory=list)


def pruned_weights(
    W0: torch.Tensor, stats: ActivationStats | None, config: PruneConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', keep) for one dense layer W0: [out, in]; W' float32 with exactly keep's zeros."""
    W0 = W0.float()
    method = config.method_entry
    if method.kind == "solver":
        W, keep = method(W0, stats, sparsity=config.sparsity, pattern=config.parsed_pattern,
                         constants=config.constants)
    else:
        keep = keep_mask(method(W0, stats, constants=config.constants), config.sparsity, config.parsed_pattern,
                         config.group or method.default_group)
        # None stands for W0 masked by keep, made only when needed: EC makes it chunk by
        # chunk in its first pass instead of as a whole-matrix product with a bool mask
        W = None
    # W is this function's own float32 copy (or None): the update may work in place
    return config.update_entry(W0, W, keep, stats, constants=config.constants), keep


@torch.no_grad()
def prune_layer(layer: nn.Module, stats: ActivationStats | None, config: PruneConfig) -> torch.Tensor:
    """Prune and update one layer in place; returns keep: [out, in]."""
    W = weight_view(layer)
    new, keep = pruned_weights(W, stats, config)
    W.copy_(new.to(W.dtype))
    return keep


def permute_inputs(layer: nn.Module, producers: list[nn.Module], perm: torch.Tensor) -> None:
    """Reorder ``layer``'s input channels and, identically, the output rows (and biases) of
    the layers that produce them: y = W[:, perm] · x[perm] is the same function."""
    W = weight_view(layer)
    W.copy_(W[:, perm])
    for producer in producers:
        Wp = weight_view(producer)
        Wp.copy_(Wp[perm])
        if getattr(producer, "bias", None) is not None:
            producer.bias.copy_(producer.bias[perm])


def permute_stats(stats: ActivationStats, perm: torch.Tensor) -> None:
    stats.sum, stats.sumsq = stats.sum[perm], stats.sumsq[perm]
    if stats.xtx is not None:
        stats.xtx = stats.xtx[perm][:, perm]
        stats.xtx_changed()


@torch.no_grad()
def reallocate_inputs(
    layer: nn.Module, layers: dict[str, nn.Module], stats: ActivationStats, config: PruneConfig, forward
) -> dict[str, float] | None:
    """RIA channel reallocation applied so the weights end N:M in the model's own order.

    A permutation of a layer's inputs is only free when it can be folded into the layers
    that produce those inputs (e.g. gate/up rows for down_proj): candidates are the
    block's linears whose output size is this layer's input size, and the permutation is
    kept only if the block's output on a calibration sample is unchanged; otherwise the
    layer gets the plain N:M mask. Returns the retained scores when applied, else None.
    """
    pattern = config.parsed_pattern
    W = weight_view(layer)
    producers = [p for p in layers.values() if p is not layer and weight_view(p).shape[0] == W.shape[1]]
    if not producers:
        return None
    perm, plain, realloc = best_permutation(config.method_entry(W.float(), stats, constants=config.constants),
                                          pattern.n, pattern.m)
    if perm is None:
        return None
    perm = perm.to(W.device)
    before = forward(limit=1)[0]
    permute_inputs(layer, producers, perm)
    after = forward(limit=1)[0]
    if not torch.allclose(after, before, rtol=1e-3, atol=1e-4 * before.abs().max().item()):
        permute_inputs(layer, producers, torch.argsort(perm))  # exact undo: a pure reindexing
        return None
    permute_stats(stats, perm.to(stats.sum.device))
    return {"retained_plain": plain, "retained_reallocated": realloc}


def prune(
    model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None = None, progress: bool = True,
    blocks: Blocks | None = None, checkpoint: WorkDir | None = None, spill: str | os.PathLike | None = None,
) -> PruneReport:
    """Prune ``model`` in place as ``config`` says.

    calibration: [nsamples, seqlen] token ids (see ``zpruner.calibration``); required when
    the method uses activations, ignored otherwise. ``blocks``: where the blocks live
    (``offload``; default: in memory). ``checkpoint``: the work folder of a streamed run,
    which receives every finished block and may already hold the first ones (``--resume``).
    ``spill``: a folder for the calibration activations (``--activations disk``).
    """
    check_pattern(model, config.parsed_pattern)
    report = PruneReport()
    blocks = blocks if blocks is not None else Blocks(model, model_device(model))
    names = {module: name for name, module in iter_prunable(model)}
    start = time.perf_counter()
    dtype = next(model.parameters()).dtype

    def prune_block(i: int, layers: dict[str, nn.Module], stats: dict[str, ActivationStats] | None,
                    forward=None) -> None:
        block_config = config.for_block(report.block_sparsity[i]) if report.block_sparsity else config
        for name, layer in layers.items():
            t = time.perf_counter()
            # popped, so each layer's statistics are freed once it is pruned: with a Hessian
            # they are d_in² floats per layer (888 MB per LLaMA-2-7B block), and the largest
            # layer's solve then runs without the others' beside it
            layer_stats = stats.pop(name) if stats else None
            if config.reallocate:
                gain = reallocate_inputs(layer, layers, layer_stats, block_config, forward)
                if gain is not None:
                    report.reallocated[names[layer]] = gain
            prune_layer(layer, layer_stats, block_config)
            report.layer_time_s[names[layer]] = time.perf_counter() - t

    def finished(i: int, block: nn.Module, hidden: list[torch.Tensor] | None) -> None:
        if checkpoint is not None:  # a model in memory is counted at the end (measure_sparsity), not here
            layers = {names[m]: m for m in find_linears(block).values()}
            report.sparsity.update({name: float((m.weight == 0).float().mean()) for name, m in layers.items()})
            tensors = _block_state(model, block)
            part = {"layer_time_s": {n: report.layer_time_s[n] for n in layers},
                    "reallocated": {n: report.reallocated[n] for n in layers if n in report.reallocated},
                    "sparsity": {n: report.sparsity[n] for n in layers}}
            checkpoint.block_done(i, tensors, dtype, hidden, part)

    first = 0
    if checkpoint is not None and checkpoint.done:
        first = checkpoint.done
        for part, values in checkpoint.reports().items():
            getattr(report, part).update(values)
    if checkpoint is not None and "block_sparsity" in checkpoint.state:
        report.block_sparsity = checkpoint.state["block_sparsity"]
    else:
        def survey(measure):
            return _survey(model, calibration, measure, config, progress, blocks, spill)

        report.block_sparsity = config.allocation_entry(survey, sparsity=config.sparsity,
                                                        pattern=config.parsed_pattern,
                                                        constants=config.constants) or []
        if checkpoint is not None:
            checkpoint.remember("block_sparsity", report.block_sparsity)
    if not config.needs_calibration:
        # Data-free: no reason to run the model at all.
        for i in bar(range(first, len(blocks)), desc="blocks", unit="block", disable=not progress):
            block = blocks.load(i)
            prune_block(i, find_linears(block), None)
            finished(i, block, None)
            blocks.done(i, block)
    else:
        _require_tokens(calibration, f"method '{config.method}'")

        def visit(i: int, block: nn.Module, forward) -> None:
            layers = find_linears(block)
            with record_inputs(layers, hessian=config.uses_hessian) as stats:
                forward(inputs_of=list(layers.values()))
            prune_block(i, layers, stats, forward)

        resume = None
        if first and first < len(blocks):
            resume = (first, checkpoint.activations())
        if first < len(blocks):
            run_layerwise(model, calibration, visit, progress, config.calib_batch_size, last_outputs=False,
                          blocks=blocks, after=finished, resume=resume, spill=spill)
    report.total_s = time.perf_counter() - start
    return report


def _require_tokens(calibration: torch.Tensor | None, who: str) -> None:
    if calibration is None or calibration.ndim != 2 or calibration.shape[0] == 0:
        raise ZprunerError(f"{who} needs calibration token ids of shape [nsamples, seqlen]")


def _survey(model: nn.Module, calibration: torch.Tensor | None, measure, config: PruneConfig, progress: bool,
            blocks: Blocks, spill) -> tuple[list[float], list[int]]:
    """``measure(weights, stats)`` of every block of the dense model, and each block's prunable
    weights: one pass over the calibration data, statistics recorded during the forward that
    carries the activations on (an allocation's survey, before any block is pruned)."""
    _require_tokens(calibration, f"allocation '{config.allocation}'")
    values: list[float] = []
    sizes: list[int] = []
    current: list = []
    with ExitStack() as recording:  # the hooks go however the pass ends
        def visit(_i: int, block: nn.Module, _forward) -> None:
            layers = find_linears(block)
            current[:] = [layers, recording.enter_context(record_inputs(layers))]

        def after(_i: int, _block: nn.Module, _hidden) -> None:
            layers, stats = current
            recording.close()  # this block's hooks off; the stack takes the next block's
            weights = {name: weight_view(layer) for name, layer in layers.items()}
            values.append(measure(weights, stats))
            sizes.append(sum(W.numel() for W in weights.values()))

        run_layerwise(model, calibration, visit, progress, config.calib_batch_size, blocks=blocks, after=after,
                      spill=spill)
    return values, sizes


def _block_state(model: nn.Module, block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's stored tensors under their full names (as save_pretrained names them)."""
    prefix = next(name for name, m in model.named_modules() if m is block)
    return {f"{prefix}.{name}": t for name, t in block.state_dict().items()}
