"""Model traversal: the decoder blocks, their prunable linears, and [out, in] weight views.

This is the only module that knows how a model is laid out, and it knows it generically:
the decoder blocks are the model's repeated layer ``ModuleList``, never found by name.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .masks import Pattern
from .errors import ZprunerError

PRUNABLE = (nn.Linear, Conv1D)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in execution order.

    Candidates are ModuleLists of at least one element, all of one class, that contain
    linear layers. A list whose class the model declares in ``_no_split_modules`` (every
    transformers decoder does) wins; otherwise the longest one does.
    """
    declared = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or not any(isinstance(m, PRUNABLE) for m in module[0].modules()):
            continue
        candidates.append((type(module[0]).__name__ in declared, len(module), name, module))
    if not candidates:
        raise ZprunerError(
            f"found no repeated decoder blocks in {type(model).__name__}: zpruner needs a causal LM whose "
            "layers are an nn.ModuleList of identical blocks containing nn.Linear or Conv1D layers"
        )
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    return candidates[0][3]


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Prunable layers of one block, by name relative to the block, in definition order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, PRUNABLE)}


def iter_prunable(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(full module name, layer) for every prunable layer of every block.

    Embeddings and the LM head live outside the blocks and are never returned.
    """
    blocks = find_blocks(model)
    prefix = next(name for name, m in model.named_modules() if m is blocks)
    for i, block in enumerate(blocks):
        for name, module in find_linears(block).items():
            yield f"{prefix}.{i}.{name}", module


def weight_view(module: nn.Module) -> torch.Tensor:
    """The layer's weight as W: [out, in], sharing storage (in-place edits reach the layer).

    transformers' Conv1D (GPT-2) stores its weight transposed, as [in, out].
    """
    weight = module.weight.data
    return weight.t() if isinstance(module, Conv1D) else weight


def check_pattern(model: nn.Module, pattern: Pattern) -> None:
    """Fail before any work if an N:M group size does not divide some layer's input size."""
    if not pattern.is_nm:
        return
    for name, module in iter_prunable(model):
        d_in = weight_view(module).shape[1]
        if d_in % pattern.m:
            raise ZprunerError(
                f"pattern {pattern} needs every layer's input size divisible by {pattern.m}, "
                f"but {name} has {d_in} inputs; choose an M that divides it"
            )


def measure_sparsity(model: nn.Module) -> dict:
    """Fraction of exactly-zero weights, counted from the weights themselves."""
    per_layer, zeros, total = {}, 0, 0
    for name, module in iter_prunable(model):
        w = module.weight.data
        layer_zeros = int((w == 0).sum())
        per_layer[name] = layer_zeros / w.numel()
        zeros += layer_zeros
        total += w.numel()
    return {"overall": zeros / total if total else 0.0, "per_layer": per_layer}
