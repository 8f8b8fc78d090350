"""Where the model lives while it is pruned and measured (``--offload``).

- ``none``: the whole model on the compute device (the GPU when there is one, else the CPU).
- ``cpu``: the dense model in CPU memory, one decoder block at a time on the GPU (the way
  SparseGPT's authors pruned 175B on one GPU); on a machine without a GPU, the same as none.
- ``disk``: the model stays in its safetensors files; the model object is built without
  weights (meta device) and one decoder block at a time is read, computed in the compute
  dtype, and taken out again. Embeddings, final norm and LM head are read only while they
  are needed (capturing the first block's inputs; the logits of perplexity).
- ``auto``: none when the model fits the compute device with a margin, else cpu when it
  fits CPU memory and there is a GPU, else disk; said in one log line.

The engine sees any of them through one interface, ``Blocks``: ``outside()`` (the modules
around the blocks, resident for a while), ``load(i)`` and ``done(i)``.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import OFFLOAD_MODES
from .errors import ZprunerError
from .layers import block_counts, block_prefix, find_blocks, find_matrices
from .weights import WeightSource, materialise, module_tensors, release

log = logging.getLogger(__name__)

# Memory beyond the weights that 'none' needs (activations of a block, statistics, the
# allocator's slack), as a fraction of the weights; plus a fixed reserve for Python,
# torch and the tokenizer. 'auto' chooses none only below both.
MARGIN, RESERVE_BYTES = 0.3, 2 << 30


class Blocks:
    """The decoder blocks of a model held whole in memory (offload 'none')."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.blocks = find_blocks(model)

    def __len__(self) -> int:
        return len(self.blocks)

    @contextmanager
    def outside(self, head: bool = True) -> Iterator[None]:
        """The modules around the blocks (embeddings, final norm and, with ``head``, the LM
        head) usable meanwhile."""
        yield

    def load(self, i: int) -> nn.Module:
        return self.blocks[i]

    def done(self, i: int, block: nn.Module) -> None:
        """Block ``i`` is not needed any more for now."""


class MovedBlocks(Blocks):
    """The model in CPU memory; a block moves to the compute device while it works."""

    @contextmanager
    def outside(self, head: bool = True) -> Iterator[None]:
        # whole owner modules move (Module.to keeps tied parameters tied)
        owners = {id(m): m for m in (_owner(self.model, n) for n in _outside_names(self.model))}.values()
        for module in owners:
            module.to(self.device)
        try:
            yield
        finally:
            for module in owners:
                module.to("cpu")

    def load(self, i: int) -> nn.Module:
        return self.blocks[i].to(self.device)

    def done(self, i: int, block: nn.Module) -> None:
        block.to("cpu")


class StreamedBlocks(Blocks):
    """The model built without weights; each block read from ``block_source`` (default:
    ``source``, which also holds the tensors outside the blocks) while it works."""

    def __init__(self, model: nn.Module, device: torch.device, source: WeightSource, dtype: torch.dtype,
                 block_source: WeightSource | None = None):
        super().__init__(model, device)
        self.source, self.dtype = source, dtype
        self.block_source = block_source if block_source is not None else source
        self.prefix = block_prefix(model)
        self.counts: dict[str, dict] = {}  # per block read, its weights counted (``layers.block_counts``)
        self.per_matrix: dict[str, float] = {}

    @contextmanager
    def outside(self, head: bool = True) -> Iterator[None]:
        names = _outside_names(self.model)
        if not head:  # capturing the first block's inputs never reaches the LM head
            output = self.model.get_output_embeddings()
            tied = output is not None and output.weight is self.model.get_input_embeddings().weight
            names = [n for n in names if tied or output is None or _owner(self.model, n) is not output]
        materialise(self.model, [n for n in names if self.source.resolve(n) is not None], self.source, self.dtype,
                    self.device)
        self.model.tie_weights()  # an LM head tied to the embeddings is not stored on its own
        missing = [n for n in names if _tensor(self.model, n).device.type == "meta"]
        if missing:
            raise ZprunerError(f"{self.source.folder} lacks the weights {', '.join(missing[:3])}; the folder "
                               "does not match its config.json")
        try:
            yield
        finally:
            release(self.model)  # every block is released already
            give_back_freed_memory()

    def load(self, i: int) -> nn.Module:
        block = self.blocks[i]
        materialise(self.model, module_tensors(self.model, block), self.block_source, self.dtype, self.device)
        per_matrix, pruned, everything, alone = block_counts(block, f"{self.prefix}.{i}.")
        self.per_matrix.update(per_matrix)
        self.counts[str(i)] = {"pruned": [pruned.zeros, pruned.total], "all": [everything.zeros, everything.total],
                               "left_alone": alone}
        return block

    def counted(self) -> tuple[dict[str, float], dict[str, dict]]:
        """(zeros per matrix, per block counts) of every block, reading the blocks no pass
        has read yet."""
        for i in range(len(self.blocks)):
            if str(i) not in self.counts:
                self.done(i, self.load(i))
        return self.per_matrix, self.counts

    def done(self, i: int, block: nn.Module) -> None:
        release(block)
        give_back_freed_memory()


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None


def give_back_freed_memory() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim). A block's tensors are
    freed when it is released, but glibc keeps much of that memory for reuse: measured on
    the 7B model, resident memory grew by 60-100 MB with every block read and released,
    and returned to the start after one malloc_trim."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _outside_names(model: nn.Module) -> list[str]:
    """The model's stored tensors outside the decoder blocks (embeddings, norms, LM head)."""
    blocks = find_blocks(model)
    inside = next(name for name, m in model.named_modules() if m is blocks) + "."
    return [n for n in module_tensors(model, model) if not n.startswith(inside)]


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    return getattr(_owner(model, name), name.rpartition(".")[2])


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The model's weights in ``dtype``, counted from the (possibly weightless) model."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in model.parameters())


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can hand out without swapping)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def fits(weights: int, free: int) -> bool:
    return weights * (1 + MARGIN) + RESERVE_BYTES <= free


def choose(requested: str, weights: int, device: torch.device) -> str:
    """The offload mode for a model of ``weights`` bytes (compute dtype) on ``device``."""
    if requested not in OFFLOAD_MODES:
        raise ZprunerError(f"offload '{requested}' is unknown; choose one of {', '.join(OFFLOAD_MODES)}")
    ram = available_ram()
    gib = 1 << 30
    if requested != "auto":
        if requested == "none" and device.type == "cpu" and not fits(weights, ram):
            log.warning("offload none: the model takes %.1f GiB and %.1f GiB of memory are available; "
                        "--offload disk would keep one block in memory", weights / gib, ram / gib)
        return requested
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        mode = "none" if fits(weights, free) else "cpu" if fits(weights, ram) else "disk"
        where = f"{free / gib:.1f} GiB free on {device}, {ram / gib:.1f} GiB of CPU memory available"
    else:
        mode = "none" if fits(weights, ram) else "disk"
        where = f"{ram / gib:.1f} GiB of memory available"
    # an ordinary run (the model fits) says nothing; the results record the choice either way
    log.log(logging.DEBUG if mode == "none" else logging.INFO,
            "offload auto: %s (weights %.1f GiB in the compute dtype; %s; none needs the weights x %.1f + %.0f GiB)",
            mode, weights / gib, where, 1 + MARGIN, RESERVE_BYTES / gib)
    return mode


def disk_peak_bytes(model: nn.Module, dtype: torch.dtype, tokens: int, hessian: bool) -> int:
    """Memory a run streamed from disk needs, by the sizes that dominate it (the README's
    formula): the larger of

    - one decoder block in the compute dtype, plus its stored bfloat16 copy while it is
      read, plus its layers' input statistics: Σx and Σx² per layer; for a Hessian method
      XᵀX per layer, or, while the largest layer is solved, its XᵀX and the factorisation's
      working copies, 3 such matrices in all (``inverse_hessian_factor`` peaked at 3.07
      times its input at d_in 11008 with torch.linalg's functions, 2.07 with the LAPACK
      routines it calls directly on the CPU: benchmarks/factor_memory.py); on the CPU the
      first block's statistics pass also holds one more XᵀX of its widest layer, the
      panel probe's (``zpruner.kernels.gram.agrees``);
    - the modules outside the blocks (embeddings and LM head, resident while the first
      block's inputs are captured and while logits are computed);

    plus the hidden states of the ``tokens`` calibration tokens and ``RESERVE_BYTES``."""
    size = torch.empty((), dtype=dtype).element_size()
    blocks = find_blocks(model)
    inside = {id(p) for p in blocks.parameters()}
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks) * (size + 2)
    widest = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    d_ins = [m.weight.shape[1] for m in find_matrices(widest).values()]
    if hessian:
        stats = max(sum(d * d * 4 for d in d_ins) + max(d_ins) ** 2 * 4, 3 * max(d_ins) ** 2 * 4)
    else:
        stats = sum(2 * d * 4 for d in d_ins)
    outside = sum(p.numel() for p in model.parameters() if id(p) not in inside) * size
    hidden = getattr(model.config, "hidden_size", None) or d_ins[0]
    return max(block + stats, outside) + tokens * hidden * size + RESERVE_BYTES
