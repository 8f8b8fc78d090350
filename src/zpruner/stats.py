"""Activation statistics of a layer's inputs over calibration tokens, in float32.

One accumulator per prunable matrix: running Σx, Σx² and the token count, plus XᵀX when a
method needs a Hessian. Linear and Conv1D both take inputs [..., d_in]; the reshaping to
[tokens, d_in] is written here once. An expert's matrices see only the tokens routed to it
(``zpruner.experts.observed``).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .kernels import gram
from .experts import Experts, check_seen, observed
from .layers import Matrix


_states = itertools.count(1)  # tokens of XᵀX accumulator contents; 0 is the zero matrix


class Contribution:
    """The sums one input batch adds to a layer's statistics. Computed once per batch and
    merged into every layer fed the very same tensor (q/k/v, gate/up): XᵀX of a shared
    input would otherwise cost as much as the layers' own forward, once per layer.

    XᵀX is accumulated as ``xtx.addmm_(xᵀ, x)``, the product added inside the matrix
    multiply, as the engine always had it: ``xtx += xᵀ @ x`` rounds differently, which
    moved the verified SmolLM2 SparseGPT perplexities by up to 1.9 % (on the CPU, over the
    upper panels only where that gives the same bits: ``zpruner.kernels.gram``). The product
    is not computed once then, it is done once per accumulator *content*: layers fed the same
    inputs in the same order hold bit-identical XᵀX, so the second and third of them copy
    the first one's sum (a d_in² copy, not a tokens × d_in² product). A token per content
    (``ActivationStats.xtx_state``) says when two accumulators hold the same sum.
    """

    def __init__(self, x: torch.Tensor, count: int, s: torch.Tensor, sq: torch.Tensor, flat: torch.Tensor | None):
        self.x, self.count, self.sum, self.sumsq, self.flat = x, count, s, sq, flat
        # accumulator content token before this batch -> (the accumulator that added it, its token after)
        self._added: dict[int, tuple[ActivationStats, int]] = {}

    @classmethod
    def of(cls, x: torch.Tensor, device: torch.device | str, hessian: bool) -> "Contribution":
        flat = x.detach().reshape(-1, x.shape[-1]).to(device, torch.float32)
        return cls(x, flat.shape[0], flat.sum(dim=0), flat.square().sum(dim=0), flat if hessian else None)

    def serves(self, x: torch.Tensor, device: torch.device, hessian: bool) -> bool:
        return self.x is x and self.sum.device == device and (self.flat is not None or not hessian)

    def add_xtx(self, acc: ActivationStats) -> None:
        """acc.xtx += xᵀx, rounded as ``addmm_`` rounds it; copied when another accumulator
        with the same content has added this batch already and not changed since."""
        done = self._added.get(acc.xtx_state)
        if done is not None and done[0].xtx_state == done[1]:
            acc.copy_xtx(done[0])
            acc.xtx_state = done[1]
            return
        before = acc.xtx_state
        acc.add_gram(self.flat)
        acc.xtx_state = next(_states)
        self._added[before] = (acc, acc.xtx_state)


class ActivationStats:
    """Running sums over calibration tokens for one layer with ``d_in`` inputs."""

    def __init__(self, d_in: int, device: torch.device | str = "cpu", hessian: bool = False):
        self.count = 0
        self.sum = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.sumsq = torch.zeros(d_in, dtype=torch.float32, device=device)
        self._xtx = torch.zeros(d_in, d_in, dtype=torch.float32, device=device) if hessian else None
        self._below = None  # panel edges when the part below them awaits ``gram.mirror``
        self.xtx_state = 0  # which content xtx holds (see Contribution); set a new one when changing xtx

    @property
    def xtx(self) -> torch.Tensor | None:
        """Σ xᵀx over all calibration tokens: [d_in, d_in] float32, or None without a Hessian."""
        if self._below is not None:
            gram.mirror(self._xtx, self._below)
            self._below = None
        return self._xtx

    @xtx.setter
    def xtx(self, value: torch.Tensor) -> None:
        self._xtx, self._below = value, None

    def add_gram(self, flat: torch.Tensor) -> None:
        """xtx += flatᵀ flat ([tokens, d_in] float32), rounded as ``addmm_`` rounds it."""
        edges = gram.panels_for(flat)
        if edges is None:
            # whole (this shape's panels would round otherwise, or too few): the upper part
            # gets what it always got; a part below panels (``_below``) is stale either
            # way and overwritten by the mirror when read
            self._xtx.addmm_(flat.t(), flat)
        else:
            gram.add_upper(self._xtx, flat, edges)
            self._below = edges

    def copy_xtx(self, other: "ActivationStats") -> None:
        """This accumulator's XᵀX made equal to other's (both as they are, mirrored or not)."""
        self._xtx.copy_(other._xtx)
        self._below = other._below

    def add(self, x: torch.Tensor) -> None:
        """x: [..., d_in], any float dtype."""
        self.merge(Contribution.of(x, self.sum.device, self._xtx is not None))

    def merge(self, c: "Contribution") -> None:
        self.count += c.count
        self.sum += c.sum
        self.sumsq += c.sumsq
        if self._xtx is not None:
            c.add_xtx(self)

    def xtx_changed(self) -> None:
        """Say that xtx was replaced or changed other than by ``merge`` (a new content token)."""
        self.xtx_state = next(_states)

    @property
    def l2(self) -> torch.Tensor:
        """‖x_j‖₂ over all calibration tokens: [d_in] (Wanda's activation norm)."""
        return self.sumsq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """E[x_j]: [d_in]."""
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """E[x_j²] − E[x_j]², clamped at 0 against rounding: [d_in]."""
        return (self.sumsq / max(self.count, 1) - self.mean.square()).clamp_min(0)


    def absorb(self, other: "ActivationStats") -> None:
        """Add another accumulator's sums (the same d_in) to this one's."""
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.sumsq += other.sumsq.to(self.sumsq.device)
        if self._xtx is not None and other._xtx is not None:
            self.xtx.add_(other.xtx.to(self._xtx.device))
            self.xtx_changed()


def pooled(accs: list[ActivationStats]) -> ActivationStats:
    """One accumulator holding the sums of ``accs`` (every token any of them saw)."""
    first = accs[0]
    out = ActivationStats(first.sum.numel(), first.sum.device, first._xtx is not None)
    for acc in accs:
        out.absorb(acc)
    return out


class Recorded(dict):
    """Matrix name -> its ActivationStats, and in ``tokens`` how many input rows each matrix
    itself received (pooled accumulators count every expert's)."""

    def __init__(self):
        super().__init__()
        self.tokens: dict[str, int] = {}


@contextmanager
def record_inputs(matrices: dict[str, Matrix], hessian: bool = False,
                  pool_experts: bool = False) -> Iterator[Recorded]:
    """Accumulate the inputs of ``matrices`` during every forward run inside the block: a
    linear layer's every input, an expert's the tokens routed to it. With ``pool_experts``
    the experts of one fused parameter (or one expert list position) share one accumulator:
    every token any of them saw (``--expert-stats pooled``)."""
    stats = Recorded()
    shared: dict[str, ActivationStats] = {}
    handles = []
    last: list[Contribution] = []  # the latest input's sums; holds its tensor so identity stays meaningful

    def hook(name: str, acc: ActivationStats, x: torch.Tensor) -> None:
        if not (last and last[0].serves(x, acc.sum.device, hessian)):
            last[:] = [Contribution.of(x, acc.sum.device, hessian)]
        acc.merge(last[0])
        stats.tokens[name] += last[0].count

    for name, matrix in matrices.items():
        d_in = matrix.weight.shape[1]
        if pool_experts and matrix.group is not None:
            acc = shared.setdefault(matrix.group, ActivationStats(d_in, matrix.stored.device, hessian))
        else:
            acc = ActivationStats(d_in, matrix.stored.device, hessian)
        stats[name] = acc
        stats.tokens[name] = 0
        if matrix.layer is not None:
            # a pre-hook: it sees the input even when the pass stops before the layer runs
            # (engine ``forward(inputs_of=...)``)
            handles.append(matrix.layer.register_forward_pre_hook(
                lambda _m, inputs, name=name, acc=acc: hook(name, acc, inputs[0])))

    def on_input(experts: Experts, param: str, expert: int, x: torch.Tensor, _transposed: bool) -> None:
        name = experts.matrix_name(param, expert)
        stats[name].add(x)
        stats.tokens[name] += x.shape[0]

    fused = {id(m.experts): m.experts for m in matrices.values() if m.expert is not None}
    try:
        with observed(list(fused.values()), on_input) as watches:
            yield stats
        check_seen(watches)
    finally:
        last.clear()
        for handle in handles:
            handle.remove()
