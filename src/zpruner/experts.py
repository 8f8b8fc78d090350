"""Mixture-of-experts blocks: where the routed experts and their routers are, and which
tokens each expert sees (removing whole experts: ``zpruner.expert_removal``).

transformers 5 stores the experts of most families as fused 3-D parameters of one module
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``; gpt-oss
and Llama 4 transposed, ``[E, in, out]``); older code and some remote code keep an
``nn.ModuleList`` of expert MLPs. Both are found from the structure alone: a fused expert
parameter is a 3-D parameter of a module that is not a convolution; an expert list is a
``ModuleList`` of two or more modules of one class that contain linear layers. The block
that owns the experts is the *MoE module*; in it, outside the experts, a linear layer or
tensor with a dimension equal to the number of experts is part of the *router* (a linear
layer with one output is a shared expert's gate). Routers are never pruned.

Which tokens an expert sees is observed, not re-implemented: while the experts module runs
(in its eager implementation, which every transformers family has), a
``TorchFunctionMode`` watches the torch calls on its fused parameters. An expert's slice
``W[e]`` fed to ``linear(x, W[e])`` is an ``[out, in]`` matrix and ``x`` its input; fed to
``x @ W[e]`` it is ``[in, out]``; the whole parameter fed to ``bmm(x, W)`` (Llama 4: every
token to every expert, scaled by its routing weight, zero when not routed) gives expert e
the rows ``x[e]`` that are not all zero. The mode changes no computation: the block's
output under observation is its output (tests check this on every family).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ZprunerError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(eq=False)
class Experts:
    """The routed experts of one MoE module, as found in a decoder block."""

    name: str  # the experts container's name within the block
    module: nn.Module  # the container: a module with fused 3-D parameters, or an nn.ModuleList
    params: tuple[str, ...]  # its fused 3-D parameters, in definition order (empty for a ModuleList)
    count: int  # E, the number of routed experts
    parent_name: str  # the MoE module (experts, router, shared experts), within the block
    parent: nn.Module
    transposed: dict[str, bool | None] = field(default_factory=dict)  # per fused parameter: stored [E, in, out]?
    declared: set[str] = field(default_factory=set)  # the parameters whose layout the module declares

    @property
    def fused(self) -> bool:
        return bool(self.params)

    def matrix_name(self, param: str, expert: int) -> str:
        return f"{self.name}.{param}[{expert}]"


def _hidden_size(module: nn.Module) -> int | None:
    """The model's hidden size as the experts module knows it (its config, or an attribute)."""
    config = getattr(module, "config", None)
    for value in (getattr(config, "hidden_size", None), getattr(module, "hidden_size", None),
                  getattr(module, "hidden_dim", None)):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def find_experts(block: nn.Module) -> list[Experts]:
    """The routed experts of every MoE module in ``block`` (none in a dense block)."""
    found = []
    modules = dict(block.named_modules())
    for name, module in modules.items():
        if isinstance(module, _CONVS):
            continue
        fused = tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() == 3)
        if fused:
            counts = {getattr(module, n).shape[0] for n in fused}
            if len(counts) != 1:
                raise ZprunerError(f"{type(module).__name__} at {name} holds 3-D parameters with different numbers "
                                   f"of experts ({sorted(counts)}); zpruner cannot tell its experts apart")
            layouts = {n: _layout(module, n, fused, _hidden_size(module)) for n in fused}
            experts = Experts(name, module, fused, counts.pop(), "", block,
                              {n: t for n, (t, _) in layouts.items()}, {n for n, (_, d) in layouts.items() if d})
            found.append(_with_parent(experts, modules))
        elif isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1 \
                and any(isinstance(m, nn.Linear) for m in module[0].modules()) and name:
            listed = _with_parent(Experts(name, module, (), len(module), "", block), modules)
            if router_tensors(block, [listed]):  # a list of like modules is a list of experts only beside a router
                found.append(listed)
    return found


def _with_parent(experts: Experts, modules: dict[str, nn.Module]) -> Experts:
    parent_name = experts.name.rpartition(".")[0]
    experts.parent_name, experts.parent = parent_name, modules[parent_name]
    return experts


def _layout(module: nn.Module, name: str, params: tuple[str, ...], hidden_size: int | None) -> tuple[bool | None, bool]:
    """(whether the fused parameter ``name`` stores each expert as ``[in, out]``, whether the
    module declares it). Declared by transformers' ``is_transposed``; else guessed from where
    the hidden size H sits, the first parameter reading H and the last writing it (gate_up,
    then down); None when the shape cannot tell. The observation confirms or sets it."""
    declared = getattr(module, "is_transposed", None)
    if isinstance(declared, bool):
        return declared, True
    _, a, b = getattr(module, name).shape
    if hidden_size is None or a == b or len(params) < 2 or name not in (params[0], params[-1]):
        return None, False
    reads_hidden = name == params[0]
    if hidden_size not in (a, b):
        return None, False
    return (a == hidden_size) == reads_hidden, False


def router_tensors(block: nn.Module, experts: list[Experts]) -> dict[str, str]:
    """Tensors of the MoE modules that are the router's (name within the block -> why they
    are left alone): every tensor outside the experts with a dimension equal to the number
    of experts, and a linear layer with one output (a shared expert's gate)."""
    found: dict[str, str] = {}
    containers = {ex.name for ex in experts}
    for ex in experts:
        prefix = f"{ex.parent_name}." if ex.parent_name else ""
        for name, module in ex.parent.named_modules():
            full = prefix + name if name else ex.parent_name
            if any(full == c or full.startswith(c + ".") for c in containers):  # experts, not routers
                continue
            for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                tensor_name = f"{full}.{pname}" if full else pname
                if ex.count in tensor.shape:
                    found[tensor_name] = "router"
                elif isinstance(module, nn.Linear) and module.out_features == 1 and pname == "weight":
                    found[tensor_name] = "router (a shared expert's gate)"
    return found


# ------------------------------------------------------------------ observation

_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_BMM = {torch.bmm, torch.Tensor.bmm}
_TRANSPOSE = {torch.Tensor.t, torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__}
_SAME_VALUES = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.contiguous, torch.Tensor.type_as,
                torch.Tensor.clone, torch.Tensor.detach}
_MUL = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul}
_GROUPED = {getattr(torch, "_grouped_mm", None), getattr(torch.nn.functional, "grouped_mm", None)} - {None}

# on_input(experts, param, expert, x: [tokens, d_in], transposed); on_output(experts, expert, contribution: [tokens, H])
OnInput = Callable[[Experts, str, int, torch.Tensor, bool], None]
OnOutput = Callable[[Experts, int, torch.Tensor], None]


def _expert_index(index) -> int | None:
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
        return int(index.item())
    return None


class _Watch(TorchFunctionMode):
    """The torch calls of one experts module's forward, attributed to its experts."""

    def __init__(self, experts: Experts, on_input: OnInput, on_output: OnOutput | None):
        super().__init__()
        self.experts, self.on_input, self.on_output = experts, on_input, on_output
        self.params = {id(getattr(experts.module, n)): n for n in experts.params}
        self.views: dict[int, tuple[torch.Tensor, str, int, bool]] = {}  # id -> (tensor, param, expert, transposed)
        self.outputs: dict[int, tuple[torch.Tensor, int]] = {}  # an expert's last product, before its weighting
        self.seen: set[str] = set()
        self.width: int | None = None  # the experts' input (and output) width

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GROUPED and any(id(a) in self.params for a in args if isinstance(a, torch.Tensor)):
            raise ZprunerError(f"{type(self.experts.module).__name__} ran a grouped matrix product; zpruner observes "
                               "experts in their eager implementation (model.set_experts_implementation('eager'))")
        out = func(*args, **kwargs)
        first = args[0] if args else None
        if func is torch.Tensor.__getitem__ and id(first) in self.params:
            expert = _expert_index(args[1])
            if expert is not None:
                self.views[id(out)] = (out, self.params[id(first)], expert, False)
        elif func in _TRANSPOSE | _SAME_VALUES and id(first) in self.views:
            _, param, expert, transposed = self.views[id(first)]
            self.views[id(out)] = (out, param, expert, transposed ^ (func in _TRANSPOSE))
        elif func in _LINEAR and len(args) >= 2 and id(args[1]) in self.views:
            self._product(args[0], args[1], out, linear=True)
        elif func in _MATMUL and len(args) >= 2 and id(args[1]) in self.views:
            self._product(args[0], args[1], out, linear=False)
        elif func in _BMM and len(args) >= 2 and id(args[1]) in self.params:
            self._batched(args[0], self.params[id(args[1])], out)
        elif func in _MUL and self.on_output is not None:
            self._weighted(args, out)
        return out

    def _product(self, x: torch.Tensor, view: torch.Tensor, out: torch.Tensor, linear: bool) -> None:
        _, param, expert, transposed = self.views[id(view)]
        # linear(x, W) reads W as [out, in]; x @ W as [in, out]
        stored_transposed = transposed ^ (not linear)
        self._input(param, expert, x.reshape(-1, x.shape[-1]), stored_transposed)
        self._maybe_output(expert, out)

    def _batched(self, x: torch.Tensor, param: str, out: torch.Tensor) -> None:
        """bmm(x: [E, T, in], W: [E, in, out]): every token to every expert; a token not
        routed to expert e enters it as a zero row."""
        for expert in range(x.shape[0]):
            routed = x[expert].ne(0).any(dim=-1)
            self._input(param, expert, x[expert][routed], True)
            self._maybe_output(expert, out[expert][routed])

    def _input(self, param: str, expert: int, x: torch.Tensor, transposed: bool) -> None:
        if param not in self.experts.declared:
            self.experts.transposed[param] = transposed
        elif self.experts.transposed[param] != transposed:
            raise ZprunerError(f"{type(self.experts.module).__name__}.{param} is used as "
                               f"{'[in, out]' if transposed else '[out, in]'} per expert, but its module declares "
                               "the other layout; zpruner cannot prune it safely")
        if self.width is None:
            self.width = x.shape[-1]
        self.seen.add(param)
        self.on_input(self.experts, param, expert, x, transposed)

    def _maybe_output(self, expert: int, out: torch.Tensor) -> None:
        if self.on_output is not None and self.width is not None and out.shape[-1] == self.width:
            self.outputs[id(out)] = (out, expert)

    def _weighted(self, args, out: torch.Tensor) -> None:
        """An expert's output times a per-token weight [tokens, 1] is its contribution."""
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        for i, t in enumerate(tensors):
            if id(t) in self.outputs and len(tensors) == 2 and tensors[1 - i].shape[-1:] == (1,):
                _, expert = self.outputs.pop(id(t))
                self.on_output(self.experts, expert, out.reshape(-1, out.shape[-1]))
                return

    def finish(self) -> None:
        """Outputs never weighted afterwards are contributions as they are (Llama 4 weights
        the input instead)."""
        if self.on_output is not None:
            for out, expert in self.outputs.values():
                self.on_output(self.experts, expert, out.reshape(-1, out.shape[-1]))
        self.outputs.clear()
        self.views.clear()


@contextmanager
def observed(experts: list[Experts], on_input: OnInput, on_output: OnOutput | None = None) -> Iterator[list[_Watch]]:
    """While inside, every forward of the fused experts modules reports each expert's inputs
    (and, with ``on_output``, its contribution to the MoE output per routed token)."""
    watches, originals = [], []
    for ex in experts:
        if not ex.fused:
            continue
        watch = _Watch(ex, on_input, on_output)
        original = ex.module.forward

        def forward(*args, _original=original, _watch=watch, **kwargs):
            with _watch:
                out = _original(*args, **kwargs)
            _watch.finish()
            return out

        ex.module.forward = forward
        watches.append(watch)
        originals.append(ex.module)
    try:
        yield watches
    finally:
        for module in originals:
            del module.forward


def check_seen(watches: list[_Watch]) -> None:
    """After an observed pass: every fused parameter was seen in use (else zpruner cannot
    tell which tokens its experts see)."""
    for watch in watches:
        unseen = [p for p in watch.experts.params if p not in watch.seen]
        if unseen and watch.seen:
            raise ZprunerError(f"{type(watch.experts.module).__name__} at {watch.experts.name} used "
                               f"{', '.join(unseen)} in a way zpruner does not recognise; its experts cannot be "
                               "pruned on their own tokens")


def use_eager_experts(model: nn.Module) -> None:
    """The experts' eager implementation: the one zpruner can observe, and the same for
    pruning and measuring (transformers picks grouped_mm by default where it can)."""
    setter = getattr(model, "set_experts_implementation", None)
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if setter is not None and can_set is not None and can_set():
        config = getattr(model, "config", None)
        if getattr(config, "_experts_implementation", "eager") != "eager":
            setter("eager")
