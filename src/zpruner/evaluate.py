"""Perplexity with the protocol of the SparseGPT / Wanda / RIA / Z-Pruner papers.

The corpus, tokenised once, is cut into non-overlapping windows of ``seqlen`` tokens (the
remainder dropped); perplexity = exp(mean next-token NLL over all predicted tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .engine import model_device, streamed_logits
from .offload import Blocks
from .errors import ZprunerError
from .progress import bar


@dataclass
class Perplexity:
    value: float
    windows: int
    seqlen: int
    tokens: int  # predicted tokens: windows · (seqlen − 1)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    blocks: Blocks | None = None,
) -> Perplexity:
    """tokens: [1, N] ids. Uses the first ``windows`` windows (all when None). With
    ``blocks`` (offload cpu or disk) the windows go through the model block by block."""
    available = tokens.shape[1] // seqlen
    if available == 0:
        raise ZprunerError(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    count = available if windows is None else min(windows, available)
    windows_ids = tokens[0, : count * seqlen].reshape(count, seqlen)
    if blocks is None:
        device = model_device(model)
        all_logits = (model(batch.to(device), use_cache=False).logits for batch in windows_ids.split(batch_size))
    else:
        device = blocks.device
        all_logits = streamed_logits(model, windows_ids, batch_size, blocks, progress)
    was_training = model.training
    model.eval()
    nll, predicted = 0.0, 0
    try:
        windows_bar = bar(total=count, desc="perplexity", unit="window", disable=not progress, leave=False)
        for batch, logits in zip(windows_ids.split(batch_size), all_logits):
            batch = batch.to(device)
            logits = logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            predicted += batch[:, 1:].numel()
            windows_bar.update(batch.shape[0])
        windows_bar.close()
    finally:
        model.train(was_training)
    return Perplexity(math.exp(nll / predicted), count, seqlen, predicted)
