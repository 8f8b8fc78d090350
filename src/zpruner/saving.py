"""The pruned model written to ``--save``, in the dtype asked for (by default the model's
own): from the model in memory (``save_pretrained``), or from a streamed run's work folder
(its block shards plus the tensors outside the blocks). Either way each weight is rounded
once at the end (``weights.round_to``), and the folder is swapped in when complete
(``io.save_folder_atomic``)."""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .io import save_folder_atomic
from .weights import checkpoint_names, round_to, stored_dtypes, stored_in, write_index, write_shard


def save_model(directory: str | os.PathLike, model: nn.Module, tokenizer, manifest: dict, overwrite: bool,
               dtype: torch.dtype | None = None) -> None:
    """save_pretrained (safetensors) and the tokenizer, swapped in when complete (zpruner.io);
    the weights rounded once to ``dtype`` (default: as they are). The model keeps its dtype,
    and holds the saved values afterwards (``weights.stored_in``)."""
    def write(folder: Path) -> None:
        with stored_in(model, dtype or next(model.parameters()).dtype):
            model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    save_folder_atomic(directory, write, manifest, overwrite)


def save_streamed(target: str | os.PathLike, model: nn.Module, tokenizer, work, blocks, manifest: dict,
                  overwrite: bool, dtype: torch.dtype | None = None) -> None:
    """The saved model from a streamed run, its weights in ``dtype`` (default: the compute
    dtype): the work folder's block shards (hard links when stored in ``dtype`` and on the
    same file system, else copies; rounded once where stored in another dtype) plus the
    tensors outside the blocks, an index, config and tokenizer; in place atomically like any
    ``--save`` (zpruner.io)."""
    dtype = dtype or next(model.parameters()).dtype

    def write(folder: Path) -> None:
        for shard in work.shards():
            _save_shard(shard, folder, dtype)
        inside = next(name for name, m in model.named_modules() if m is blocks.blocks) + "."
        with blocks.outside():
            # named_parameters lists a tied LM head once, under the embeddings' name, as save_pretrained does
            outside = {n: round_to(t, dtype, n) for n, t in [*model.named_parameters(), *_persistent_buffers(model)]
                       if not n.startswith(inside)}
            write_shard(folder, "model-outside.safetensors", checkpoint_names(model, outside), None)
        write_index(folder)
        config = copy.deepcopy(model.config)
        config.dtype = str(dtype).removeprefix("torch.")  # as save_pretrained writes it
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    save_folder_atomic(target, write, manifest, overwrite)


def _save_shard(shard: Path, folder: Path, dtype: torch.dtype) -> None:
    """A block shard of the work folder into the saved model's ``folder``, in ``dtype``."""
    if stored_dtypes(shard) <= {dtype}:
        try:
            os.link(shard, folder / shard.name)
        except OSError:
            shutil.copy2(shard, folder / shard.name)
        return
    write_shard(folder, shard.name, {n: round_to(t, dtype, n) for n, t in load_file(shard).items()}, None)


def _persistent_buffers(model: nn.Module):
    for owner_name, owner in model.named_modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                yield (f"{owner_name}.{name}" if owner_name else name), buffer
