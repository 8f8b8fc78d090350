"""The work folder of a pruning run streamed block by block (``--offload disk|cpu``).

It holds the pruned blocks as safetensors shards, one per block, written as each block is
finished, and in ``state/`` the activations that enter the next block plus ``state.json``
(the run's key, its options, the blocks done, their per-layer report). A run killed at any
point leaves a consistent folder: a shard is renamed into place complete, then the
activations, then the state; the state is what counts. ``--resume`` continues after the
last block the state records and gives the same bits as a run never interrupted (the
activations are stored exactly, and every step is deterministic given them).

At the end the shards become the saved model's (moved, not copied, when the folder is
beside ``--save``), and the work folder is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ZprunerError
from .io import dumps_json, save_folder_atomic, write_atomic
from .layers import iter_prunable
from .weights import write_index, write_shard

STATE = "state"


def block_file(i: int) -> str:
    return f"model-block-{i:05d}.safetensors"


def default_work_dir(save: str | None, output_json: str | None, model: str) -> Path:
    """Beside ``--save`` (so the shards move into it by a rename), else in the temp folder
    under a name from the model and the results file, so the same command finds it again."""
    if save:
        target = Path(save).expanduser().resolve()
        return target.with_name(target.name + ".zpruner-work")
    tag = hashlib.sha256(f"{model}\0{output_json or ''}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"zpruner-work-{tag}"


class WorkDir:
    """One streamed run's checkpoint folder; ``key`` names the run's options (``run_key``)."""

    def __init__(self, path: Path, key: str, options: dict, resume: bool, nblocks: int):
        self.path, self.key, self.nblocks = path, key, nblocks
        state_file = path / STATE / "state.json"
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ZprunerError(f"the checkpoint {state_file} is unreadable ({exc}); delete {path} to start over")
            if not resume:
                raise ZprunerError(f"{path} holds an unfinished run ({state['done']} of {state['blocks']} blocks "
                                   "pruned); add --resume to continue it, or delete that folder to start over")
            if state["key"] != key:
                raise ZprunerError(f"--resume: the unfinished run in {path} had other options "
                                   f"({_differences(state['options'], options)}); resume it with its own options, "
                                   "or delete that folder to start over")
            self.state = state
        else:
            if resume:
                raise ZprunerError(f"--resume: there is no unfinished run to resume in {path}")
            if path.exists() and any(path.iterdir()):
                raise ZprunerError(f"the work folder {path} exists and is not a zpruner checkpoint; move it away "
                                   "or give another --work-dir")
            (path / STATE).mkdir(parents=True, exist_ok=True)
            self.state = {"key": key, "options": options, "blocks": nblocks, "done": 0, "layer_time_s": {},
                          "reallocated": {}, "sparsity": {}}
            self._write_state()

    @property
    def done(self) -> int:
        return self.state["done"]

    def activations(self) -> list[torch.Tensor] | None:
        """The inputs of block ``done`` per calibration batch, or None (no block done yet, or
        a data-free method)."""
        path = self.path / STATE / "activations.safetensors"
        if self.done == 0 or not path.is_file():
            return None
        try:
            stored = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise ZprunerError(f"the checkpoint {path} is damaged ({exc}); delete {self.path} to start over") from None
        return [stored[f"batch{j}"] for j in range(len(stored))]

    def block_done(self, i: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                   hidden: list[torch.Tensor] | None, report: dict) -> None:
        """Record block ``i`` as finished: its pruned tensors, the next block's inputs and the
        report of its layers (``layer_time_s``, ``reallocated``, ``sparsity``)."""
        write_shard(self.path, block_file(i), tensors, dtype)
        if hidden is not None and i + 1 < self.nblocks:
            tmp = self.path / STATE / f".activations.tmp-{os.getpid()}"
            save_file({f"batch{j}": h.detach().contiguous().cpu() for j, h in enumerate(hidden)}, str(tmp))
            os.replace(tmp, self.path / STATE / "activations.safetensors")
        for part, values in report.items():
            self.state[part].update(values)
        self.state["done"] = i + 1
        self._write_state()

    def remember(self, name: str, value) -> None:
        """Keep a fact of the run that a resumed run must reuse (e.g. the per-block
        sparsities of an allocation, measured on the dense model before block 0)."""
        self.state[name] = value
        self._write_state()

    def _write_state(self) -> None:
        write_atomic(self.path / STATE / "state.json", lambda f: f.write((dumps_json(self.state, indent=1)).encode()))

    def shards(self) -> list[Path]:
        return [self.path / block_file(i) for i in range(self.nblocks)]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _differences(before: dict, now: dict) -> str:
    keys = sorted(set(before) | set(now))
    changed = [f"{k}: {json.dumps(before.get(k))} then, {json.dumps(now.get(k))} now" for k in keys
               if before.get(k) != now.get(k)]
    return "; ".join(changed) or "another key"


def checkpoint_options(config) -> dict:
    """What a resumed run must share with the run it continues (all that its run key covers),
    as JSON values, for telling the user which option differs."""
    options = {"model": config.model.name, "dtype": config.model.dtype, **config.prune.identity(),
               "calib_batch_size": config.prune.calib_batch_size}
    return json.loads(dumps_json(options))


def sparsity_of(model: nn.Module, fractions: dict[str, float]) -> dict:
    """``layers.measure_sparsity``'s numbers from the fraction of zeros per layer counted
    while each block was resident (a streamed model's weights are not in memory at the end)."""
    per_layer, zeros, total = {}, 0, 0
    for name, module in iter_prunable(model):
        size = module.weight.numel()
        per_layer[name] = fractions[name]
        zeros += round(fractions[name] * size)
        total += size
    return {"overall": zeros / total if total else 0.0, "per_layer": per_layer}


def save_streamed(target: str | os.PathLike, model: nn.Module, tokenizer, work: WorkDir, blocks, manifest: dict,
                  overwrite: bool) -> None:
    """The saved model from a streamed run: the work folder's block shards (hard links when
    on the same file system, else copies) plus the tensors outside the blocks, an index,
    config and tokenizer; in place atomically like any ``--save`` (zpruner.io)."""
    dtype = next(model.parameters()).dtype

    def write(folder: Path) -> None:
        for shard in work.shards():
            try:
                os.link(shard, folder / shard.name)
            except OSError:
                shutil.copy2(shard, folder / shard.name)
        inside = next(name for name, m in model.named_modules() if m is blocks.blocks) + "."
        with blocks.outside():
            # named_parameters lists a tied LM head once, under the embeddings' name, as save_pretrained does
            outside = {n: t for n, t in [*model.named_parameters(), *_persistent_buffers(model)]
                       if not n.startswith(inside)}
            write_shard(folder, "model-outside.safetensors", outside, dtype)
        write_index(folder)
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    save_folder_atomic(target, write, manifest, overwrite)


def _persistent_buffers(model: nn.Module):
    for owner_name, owner in model.named_modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                yield (f"{owner_name}.{name}" if owner_name else name), buffer
