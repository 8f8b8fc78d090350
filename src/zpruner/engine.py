"""The layer-wise engine. It knows no method: it carries calibration activations through the
decoder blocks one at a time and lets a callback act on each block in between.

Per block: ``visit(i, block, forward)`` (the callback may run ``forward()`` under its own
hooks to collect statistics, then edit the block's weights; ``forward(limit=k)`` runs only
the first k batches and returns their outputs, to check an edit; ``forward(inputs_of=m)``
runs each batch only as far as the modules m have received their inputs;
``forward(batches=[j, ...])`` runs those batches only), then the block
is run once more, hooks off, to produce the next block's inputs from the edited weights.

Calibration samples travel in batches of ``batch_size``: the model itself is called on each
batch to capture the first block's arguments, so attention masks and position tensors
have the batch's shape whatever the model family does with them.

Where the blocks live is ``offload.Blocks``'s business: in memory, moved to the GPU one at
a time, or read from disk one at a time; the engine only asks for block i and says when it
is done with it.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ZprunerError
from .io import write_failure
from .layers import find_blocks
from .offload import Blocks
from .progress import bar

Forward = Callable[..., "list[torch.Tensor] | None"]
Visit = Callable[[int, nn.Module, Forward], None]


class _Captured(Exception):
    """Raised from the first block's pre-hook: the rest of the model need not run."""


class _InputsSeen(Exception):
    """Raised from a pre-hook once every module a statistics pass watches has its input:
    the rest of the block need not run."""


@dataclass
class BlockCall:
    """How the model called its first decoder block for one sample, hidden states aside.

    ``args``/``kwargs`` are every argument the model passed besides the hidden states
    (attention mask, position ids, rotary position embeddings, cache position, ...),
    replayed unchanged for every block.
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_key: str | None = None  # set when the model passes hidden states by keyword
    returns_tuple: bool = False  # the block returned (hidden, ...), as transformers < 5 and some families do

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_key is None:
            out = block(hidden, *self.args, **self.kwargs)
        else:
            out = block(*self.args, **{**self.kwargs, self.hidden_key: hidden})
        self.returns_tuple = isinstance(out, (tuple, list))
        return out[0] if self.returns_tuple else out


def _share_equal(value: Any, previous: Any) -> Any:
    """``previous`` when it holds equal tensors, so identical per-sample masks and rotary
    tables are stored once (an eager 2048² float mask per sample would cost GBs)."""
    if isinstance(value, torch.Tensor) and isinstance(previous, torch.Tensor):
        same = value.shape == previous.shape and value.dtype == previous.dtype and torch.equal(value, previous)
        return previous if same else value
    if isinstance(value, (tuple, list)) and type(value) is type(previous) and len(value) == len(previous):
        shared = [_share_equal(v, p) for v, p in zip(value, previous)]
        return type(value)(*shared) if hasattr(value, "_fields") else type(value)(shared)
    return value


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, samples: torch.Tensor | list[torch.Tensor], progress: bool = True, batch_size: int = 1,
    device: torch.device | None = None,
) -> tuple[list[torch.Tensor], list[BlockCall]]:
    """Run the model up to its first block for each batch of ``batch_size`` samples
    (samples: [n, seqlen] token ids; the last batch may be smaller), or for each of a list of
    batches ([b, length] each, lengths may differ between batches).

    Returns the first block's hidden-state input per batch and how it was called.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    first = find_blocks(model)[0]
    hidden: list[torch.Tensor] = []
    calls: list[BlockCall] = []

    def hook(_module, args, kwargs):
        if args:
            hidden.append(args[0])
            call = BlockCall(tuple(args[1:]), dict(kwargs))
        else:
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            hidden.append(kwargs[key])
            call = BlockCall((), {k: v for k, v in kwargs.items() if k != key}, key)
        if calls:
            call.args = _share_equal(call.args, calls[-1].args)
            call.kwargs = {k: _share_equal(v, calls[-1].kwargs.get(k)) for k, v in call.kwargs.items()}
        calls.append(call)
        raise _Captured

    device = device if device is not None else model_device(model)
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        batches = samples if isinstance(samples, (list, tuple)) else samples.split(batch_size)
        for batch in bar(batches, desc="capture inputs", unit="batch", disable=not progress,
                          leave=False):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return hidden, calls


@torch.no_grad()
def run_layerwise(
    model: nn.Module, samples: torch.Tensor | list[torch.Tensor], visit: Visit | None = None, progress: bool = True,
    batch_size: int = 1, last_outputs: bool = True, blocks: Blocks | None = None,
    after: Callable[[int, nn.Module, list[torch.Tensor]], None] | None = None,
    resume: tuple[int, list[torch.Tensor]] | None = None, spill: str | os.PathLike | None = None,
) -> list[torch.Tensor]:
    """Carry ``samples`` through every decoder block, ``batch_size`` at a time; returns the
    last block's outputs per batch ([b, seqlen, hidden] each, in sample order).

    Memory beyond the model: the hidden states of every sample (overwritten in place as
    the blocks advance), one batch's activations inside the block, plus whatever ``visit``
    keeps for the current block. ``last_outputs=False`` skips the last block's final run
    (pruning needs no outputs after it) and returns its inputs instead.
    ``blocks``: where the blocks live (default: all in memory). ``after(i, block, hidden)``
    runs once block i is final and ``hidden`` holds the next block's inputs (a checkpoint);
    ``resume=(k, hidden)`` starts at block k with those inputs (from such a checkpoint).
    ``spill``: a folder where the hidden states live in a memory-mapped file instead of in
    memory (``--activations disk``); the same values, read and written through the page cache.
    """
    blocks = blocks if blocks is not None else Blocks(model, model_device(model))
    was_training = model.training
    model.eval()  # dropout off: block outputs must be the model's deterministic ones
    try:
        with blocks.outside(head=False):
            hidden, calls = capture_block_inputs(model, samples, progress, batch_size, blocks.device)
        start = 0
        if resume is not None:
            start, saved = resume
            if [h.shape for h in saved] != [h.shape for h in hidden]:
                raise ZprunerError("the checkpoint's activations do not match this run's calibration batches")
            hidden = [h.to(blocks.device) for h in saved]
        if spill is not None:
            hidden = spilled(hidden, Path(spill))
        for i in bar(range(start, len(blocks)), desc="blocks", unit="block", disable=not progress):
            block = blocks.load(i)
            if visit is not None:
                visit(i, block, lambda limit=None, inputs_of=None, batches=None, block=block:
                      _forward(block, calls, hidden, False, limit, inputs_of, batches))
            if last_outputs or i < len(blocks) - 1:
                _forward(block, calls, hidden, keep=True)
            if after is not None:
                after(i, block, hidden)
            blocks.done(i, block)
    finally:
        model.train(was_training)
    return hidden


class Spilled(list):
    """Hidden states backed by a file: block outputs are copied into them, not swapped in."""


def spilled(hidden: list[torch.Tensor], folder: Path) -> Spilled:
    """``hidden`` moved into one memory-mapped file under ``folder`` (same dtypes, shapes and
    values); the file is unlinked at once, so it goes when the tensors do, whatever happens."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=folder)
    total = sum(h.numel() * h.element_size() for h in hidden)
    try:
        # the blocks now, not as pages are first written: a full disk under a memory map is
        # a SIGBUS that kills the process, under fallocate one error line
        os.posix_fallocate(fd, 0, max(total, 1))
    except OSError as exc:
        os.unlink(name)
        raise write_failure(f"the calibration activations to {folder} (--activations disk)", exc) from None
    finally:
        os.close(fd)
    storage = torch.from_file(name, shared=True, size=total, dtype=torch.uint8)
    os.unlink(name)
    out, offset = Spilled(), 0
    for h in hidden:
        size = h.numel() * h.element_size()
        view = storage[offset:offset + size].view(h.dtype).view(h.shape)
        view.copy_(h)
        out.append(view)
        offset += size
    return out


@torch.no_grad()
def streamed_logits(model: nn.Module, windows: torch.Tensor, batch_size: int, blocks: Blocks,
                    progress: bool = True) -> Iterator[torch.Tensor]:
    """Yield the logits of each batch of ``batch_size`` windows (token ids [n, seqlen]; each
    [b, seqlen, vocab]), computed block by block (every batch through block i, then block
    i+1), so that only one block is resident.

    The model's own forward then turns the last hidden states into logits: its blocks are
    bypassed (the last one returns the streamed result), so the final norm, any projection
    and the LM head are the model's own code, whatever the family.
    """
    was_training = model.training
    model.eval()
    try:
        with blocks.outside(head=False):
            hidden, calls = capture_block_inputs(model, windows, False, batch_size, blocks.device)
        for i in bar(range(len(blocks)), desc="blocks", unit="block", disable=not progress, leave=False):
            block = blocks.load(i)
            _forward(block, calls, hidden, keep=True)
            blocks.done(i, block)
        with blocks.outside():
            for j, batch in enumerate(windows.split(batch_size)):
                with _bypassed(blocks.blocks, hidden[j], calls[j]):
                    logits = model(batch.to(blocks.device), use_cache=False).logits
                yield logits
    finally:
        model.train(was_training)


@contextmanager
def _bypassed(blocks: nn.ModuleList, last_hidden: torch.Tensor, call: BlockCall) -> Iterator[None]:
    """The blocks skipped: each returns its input, the last one ``last_hidden``."""
    def passthrough(last: bool):
        def forward(*args, **kwargs):
            out = last_hidden if last else (args[0] if call.hidden_key is None else kwargs[call.hidden_key])
            return (out,) if call.returns_tuple else out
        return forward

    for i, block in enumerate(blocks):
        block.forward = passthrough(i == len(blocks) - 1)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _forward(
    block: nn.Module, calls: list[BlockCall], hidden: list[torch.Tensor], keep: bool, limit: int | None = None,
    inputs_of: list[nn.Module] | None = None, batches: list[int] | None = None,
) -> list[torch.Tensor] | None:
    """Run the block on every batch (keep: the outputs become the next inputs), or on
    the first ``limit`` batches only, returning their outputs; or, given ``inputs_of``,
    on every batch only as far as those modules have received their inputs. ``batches``
    (indices, without ``keep`` or ``limit``): only those batches, e.g. a statistics pass
    over part of the calibration data (``zpruner.heldout``)."""
    if batches is not None:
        if keep or limit is not None:
            raise ValueError("a forward over some batches only produces no outputs")
        calls, hidden = [calls[j] for j in batches], [hidden[j] for j in batches]
    if inputs_of and not keep and limit is None:
        _run_for_inputs(block, calls, hidden, list(inputs_of))
        return None
    outputs = []
    for j, call in enumerate(calls[:limit]):
        out = call.run(block, hidden[j])
        if keep and isinstance(hidden, Spilled):
            hidden[j].copy_(out)  # into its file: no second copy of the activations in memory
        elif keep:
            hidden[j] = out
        elif limit is not None:
            outputs.append(out)
    return outputs if limit is not None else None


def _run_for_inputs(block: nn.Module, calls: list[BlockCall], hidden: list[torch.Tensor],
                    modules: list[nn.Module]) -> None:
    """Every batch through the block until each of ``modules`` has been called, not to the end.

    A statistics pass only needs the modules' inputs, and the last one (LLaMA's down_proj)
    is a large share of a block's work. The first batch runs whole and tells the order in
    which the modules are called; the stop applies only if each was called exactly once.
    In a later batch the last module's pre-hook raises once every module has been called
    exactly once in that batch. That hook is registered after the caller's own hooks, so
    those (the statistics) have seen the input by then. A module called twice (a shared
    layer) or not at all (an unrouted expert) therefore costs the saving, never an input.
    """
    order: list[nn.Module] = []

    def complete() -> bool:
        return len(order) == len(modules) and len({id(m) for m in order}) == len(modules)

    def stop(_module, _args) -> None:
        if complete():
            raise _InputsSeen

    handles = [m.register_forward_pre_hook(lambda m, _args: order.append(m)) for m in modules]
    try:
        for j, call in enumerate(calls):
            if j == 1 and complete():
                handles.append(order[-1].register_forward_pre_hook(stop))
            order.clear()
            try:
                call.run(block, hidden[j])
            except _InputsSeen:
                pass
    finally:
        for handle in handles:
            handle.remove()
