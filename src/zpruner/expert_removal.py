"""Removing whole experts from mixture-of-experts blocks (``--prune-experts``): which ones
(REAP, routed-token frequency, or a seeded draw), and the surgery that takes them out of
the fused parameters, the router and the config together, so that the saved folder loads
with ``from_pretrained`` and computes what the edited model in memory computes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import EXPERT_SCORES
from .errors import ZprunerError
from .experts import Experts, find_experts, router_tensors


@dataclass
class ExpertTally:
    """Per expert of one experts module: routed tokens, and the sum over them of the norm
    of its contribution to the MoE output (REAP's router weight × ‖expert output‖₂)."""

    tokens: list[int]
    contribution: list[float]

    @classmethod
    def empty(cls, count: int) -> "ExpertTally":
        return cls([0] * count, [0.0] * count)

    def score(self, criterion: str, seed: int) -> list[float]:
        """Higher is kept. 'reap': mean contribution norm over routed tokens (Lasby et al.
        2025, arXiv 2510.13999); 'frequency': routed tokens; 'random': a seeded draw."""
        if criterion == "reap":
            return [c / t if t else 0.0 for c, t in zip(self.contribution, self.tokens)]
        if criterion == "frequency":
            return [float(t) for t in self.tokens]
        if criterion == "random":
            gen = torch.Generator().manual_seed(seed)
            return torch.rand(len(self.tokens), generator=gen, dtype=torch.float64).tolist()
        raise ZprunerError(f"expert score '{criterion}' is unknown; choose one of {', '.join(EXPERT_SCORES)}")


def experts_to_keep(scores: list[float], fraction: float) -> list[int]:
    """The indices kept when ``fraction`` of the experts go: the highest scores, ties by index,
    at least one expert; in their original order."""
    count = len(scores)
    removed = min(count - 1, math.floor(fraction * count + 1e-9))
    order = sorted(range(count), key=lambda e: (-scores[e], e))
    return sorted(order[:count - removed])


def remove_experts(block: nn.Module, ex: Experts, keep: list[int]) -> int:
    """Keep only the experts ``keep`` of ``ex`` in ``block``: the fused parameters' rows, the
    router's rows and tensors indexed by expert, and the modules' expert counts (top-k
    lowered to the experts left if needed). The caller updates the model's config. Returns
    how many weights of two or more dimensions went."""
    if not ex.fused:
        raise ZprunerError(f"--prune-experts: the experts at {ex.name} are a list of modules; zpruner removes "
                           "experts stored as fused parameters only")
    everyone = find_experts(block)
    if sum(other.parent_name == ex.parent_name for other in everyone) > 1:
        raise ZprunerError(f"--prune-experts: the MoE module at {ex.parent_name or 'the block'} holds several "
                           "groups of experts (JetMoE's); zpruner removes experts from one group per module only")
    index = torch.tensor(keep, dtype=torch.long)
    before = ex.count
    size_before = _block_weights(block)
    with torch.no_grad():
        for name in ex.params:
            _replace(ex.module, name, getattr(ex.module, name), 0, index)
        for tensor_name in router_tensors(block, [ex]):
            owner_name, _, attr = tensor_name.rpartition(".")
            owner = block.get_submodule(owner_name) if owner_name else block
            tensor = getattr(owner, attr)
            if before in tensor.shape:
                _replace(owner, attr, tensor, list(tensor.shape).index(before), index)
        for module in ex.parent.modules():
            _recount(module, before, len(keep))
    ex.count = len(keep)
    return size_before - _block_weights(block)


def _recount(module: nn.Module, before: int, after: int) -> None:
    """A module's expert counts from ``before`` to ``after`` (a router's output features,
    attributes named for experts) and its top-k at most ``after``."""
    if isinstance(module, nn.Linear) and module.out_features == before:
        module.out_features = after
    for attr, value in list(vars(module).items()):
        if _counts_routed_experts(attr, value, before):
            setattr(module, attr, after)
        elif attr in ("top_k", "num_experts_per_tok") and isinstance(value, int) and value > after:
            setattr(module, attr, after)


def _counts_routed_experts(attr: str, value, count: int) -> bool:
    """Whether the attribute ``attr`` is the number of routed experts (``count``): an int
    named for experts, not a per-token or shared-expert count."""
    return (not attr.startswith("_") and isinstance(value, int) and not isinstance(value, bool) and value == count
            and "expert" in attr and "per_tok" not in attr and "shared" not in attr)


def _block_weights(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters() if p.dim() >= 2)


def _replace(owner: nn.Module, attr: str, tensor: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    kept = tensor.index_select(dim, index.to(tensor.device))
    if isinstance(tensor, nn.Parameter):
        setattr(owner, attr, nn.Parameter(kept, requires_grad=tensor.requires_grad))
    else:
        owner._buffers[attr] = kept


def update_config(config, before: int, after: int) -> list[str]:
    """The config's expert counts (fields named for experts, not per-token counts) from
    ``before`` to ``after``; top-k kept <= ``after``. Returns the fields changed."""
    changed = []
    for attr, value in list(vars(config).items()):
        if _counts_routed_experts(attr, value, before):
            setattr(config, attr, after)
            changed.append(attr)
    top_k = getattr(config, "num_experts_per_tok", None)
    if isinstance(top_k, int) and top_k > after:
        config.num_experts_per_tok = after
        changed.append("num_experts_per_tok")
    groups = getattr(config, "n_group", None)
    if isinstance(groups, int) and groups > 1:
        raise ZprunerError(f"this model routes tokens to groups of experts (n_group={groups}); removing single "
                           "experts would leave groups of different sizes, which it does not support")
    return changed
