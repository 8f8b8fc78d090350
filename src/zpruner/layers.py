"""Model traversal: the decoder blocks, their prunable weight matrices, and what is left alone.

This is the only module that knows how a model is laid out, and it knows it generically:
the decoder blocks are the model's repeated layer ``ModuleList``, never found by name. A
block's prunable matrices are its linear layers (``nn.Linear``, transformers' ``Conv1D``)
and each routed expert's slice of a fused expert parameter (``zpruner.experts``); routers
are never pruned. Every other parameter of two or more dimensions in a block is listed as
left alone, with the reason, so that reported sparsity covers the whole block.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ZprunerError
from .experts import Experts, find_experts, router_tensors
from .masks import Pattern

PRUNABLE = (nn.Linear, Conv1D)


@dataclass(eq=False)
class Matrix:
    """One prunable weight matrix of a block, W: [out, in], a view of the model's storage.

    A linear layer (``owner`` the layer, ``param`` 'weight'), or expert ``expert`` of the
    fused parameter ``owner.<param>`` ``[E, ...]``. ``transposed``: stored as ``[in, out]``
    (GPT-2's Conv1D, gpt-oss and Llama 4 experts). ``experts``: the MoE experts it belongs
    to (None for a linear layer).
    """

    owner: nn.Module
    param: str = "weight"
    expert: int | None = None
    transposed: bool = False
    experts: Experts | None = None
    # the matrices whose statistics pool (``--expert-stats pooled``): the experts of one fused
    # parameter, or one layer's copies across an expert list; None outside experts
    group: str | None = None

    @classmethod
    def of(cls, layer: nn.Module) -> "Matrix":
        """A linear layer's weight (GPT-2's Conv1D stores it transposed, as [in, out])."""
        return cls(layer, transposed=isinstance(layer, Conv1D))

    @property
    def stored(self) -> torch.Tensor:
        """The parameter's data as stored, this expert's slice of it."""
        data = getattr(self.owner, self.param).data
        return data if self.expert is None else data[self.expert]

    @property
    def weight(self) -> torch.Tensor:
        """W: [out, in], sharing storage (in-place edits reach the model)."""
        stored = self.stored
        return stored.t() if self.transposed else stored

    @property
    def layer(self) -> nn.Module | None:
        """The linear layer, or None for an expert's slice."""
        return self.owner if self.expert is None else None


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


def block_experts(block: nn.Module) -> list[Experts]:
    """The routed experts of a block (cached on it: found once, their observed layout kept)."""
    cached = block.__dict__.get("_zpruner_experts")
    if cached is None or any(ex.module is not block.get_submodule(ex.name) for ex in cached):
        cached = find_experts(block)
        block.__dict__["_zpruner_experts"] = cached
    return cached


def find_matrices(block: nn.Module) -> dict[str, Matrix]:
    """Prunable matrices of one block, by name relative to the block, in definition order:
    linear layers (routers excepted), then each expert's slices of its fused parameters
    (``mlp.experts.down_proj[3]``)."""
    experts = block_experts(block)
    routers = {name.rpartition(".")[0] for name in router_tensors(block, experts)}
    found: dict[str, Matrix] = {}
    for name, module in block.named_modules():
        if isinstance(module, PRUNABLE) and name not in routers:
            listed = next((ex for ex in experts if not ex.fused and name.startswith(ex.name + ".")), None)
            group = None if listed is None else f"{listed.name}.*.{name[len(listed.name) + 1:].split('.', 1)[1]}"
            found[name] = Matrix(module, transposed=isinstance(module, Conv1D), experts=listed, group=group)
    for ex in experts:
        for param in ex.params:
            for e in range(ex.count):
                found[ex.matrix_name(param, e)] = Matrix(ex.module, param, e, bool(ex.transposed.get(param)), ex,
                                                         f"{ex.name}.{param}")
    return found


def left_alone(block: nn.Module) -> dict[str, tuple[str, int]]:
    """Parameters of two or more dimensions in ``block`` that no matrix covers, by name
    relative to the block: (why, number of weights)."""
    experts = block_experts(block)
    routers = router_tensors(block, experts)
    covered = {id(m.owner.weight) for m in find_matrices(block).values() if m.expert is None}
    covered |= {id(getattr(ex.module, p)) for ex in experts for p in ex.params}
    modules = dict(block.named_modules())
    out = {}
    for name, param in block.named_parameters():
        if param.dim() < 2 or id(param) in covered:
            continue
        owner = modules[name.rpartition(".")[0]]
        if name in routers:
            why = routers[name]
        elif isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            why = "convolution (SSM or short convolution)"
        elif isinstance(owner, nn.Embedding):
            why = "embedding"
        elif any(ex.fused and owner is ex.module for ex in experts):
            why = "expert bias"
        else:
            why = f"not a linear map zpruner recognises ({type(owner).__name__})"
        out[name] = (why, param.numel())
    return out


def block_prefix(model: nn.Module) -> str:
    blocks = find_blocks(model)
    return next(name for name, m in model.named_modules() if m is blocks)


def iter_matrices(model: nn.Module) -> Iterator[tuple[str, Matrix]]:
    """(full name, matrix) for every prunable matrix of every block.

    Embeddings and the LM head live outside the blocks and are never returned.
    """
    prefix = block_prefix(model)
    for i, block in enumerate(find_blocks(model)):
        for name, matrix in find_matrices(block).items():
            yield f"{prefix}.{i}.{name}", matrix


def check_pattern(model: nn.Module, pattern: Pattern) -> None:
    """Fail before any work if an N:M group size does not divide some matrix's input size."""
    if not pattern.is_nm:
        return
    for name, matrix in iter_matrices(model):
        d_in = matrix.weight.shape[1]
        if d_in % pattern.m:
            raise ZprunerError(
                f"pattern {pattern} needs every layer's input size divisible by {pattern.m}, "
                f"but {name} has {d_in} inputs; choose an M that divides it"
            )


@dataclass
class Count:
    """Zero weights and all weights of some matrices."""

    zeros: int = 0
    total: int = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.zeros += int((tensor == 0).sum())
        self.total += tensor.numel()

    @property
    def fraction(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def block_counts(block: nn.Module, prefix: str) -> tuple[dict[str, float], Count, Count, dict[str, str]]:
    """One block's sparsity, counted from its weights: (fraction of zeros per prunable
    matrix by full name, the pruned matrices' count, every 2-D+ parameter's count, what is
    left alone by full name -> why)."""
    per_matrix, pruned, everything = {}, Count(), Count()
    for name, matrix in find_matrices(block).items():
        w = matrix.stored
        zeros = int((w == 0).sum())
        per_matrix[f"{prefix}{name}"] = zeros / w.numel()
        pruned.zeros += zeros
        pruned.total += w.numel()
    everything.zeros, everything.total = pruned.zeros, pruned.total
    alone = {}
    for name, (why, _) in left_alone(block).items():
        everything.add(block.get_parameter(name).data)
        alone[f"{prefix}{name}"] = why
    # expert biases and routers aside, a fused parameter's slices are the matrices counted above
    return per_matrix, pruned, everything, alone


def sparsity_summary(per_matrix: dict[str, float], pruned: Count, everything: Count, alone: dict[str, str]) -> dict:
    """The results' ``sparsity``: ``overall`` over the pruned matrices, ``all_block_weights``
    over every parameter of two or more dimensions in the blocks, ``pruned_share`` the pruned
    matrices' share of those weights, and what was left alone with why."""
    return {"overall": pruned.fraction, "all_block_weights": everything.fraction,
            "all_block_weights_total": everything.total,
            "pruned_share": pruned.total / everything.total if everything.total else 0.0,
            "per_layer": per_matrix, "left_alone": alone}


def measure_sparsity(model: nn.Module) -> dict:
    """Fraction of exactly-zero weights, counted from the weights themselves: over the
    prunable matrices (``overall``, ``per_layer``) and over every block weight."""
    prefix = block_prefix(model)
    per_matrix, pruned, everything, alone = {}, Count(), Count(), {}
    for i, block in enumerate(find_blocks(model)):
        matrices, p, e, a = block_counts(block, f"{prefix}.{i}.")
        per_matrix.update(matrices)
        alone.update(a)
        for total, part in ((pruned, p), (everything, e)):
            total.zeros += part.zeros
            total.total += part.total
    return sparsity_summary(per_matrix, pruned, everything, alone)
