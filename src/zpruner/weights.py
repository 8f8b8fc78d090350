"""Weights on disk, a few tensors at a time: read them lazily from a model folder's
safetensors shards into a model built without weights (the meta device), take them out
again, and write a model folder shard by shard that ``from_pretrained`` loads.

This is what lets a model larger than memory be pruned: only the tensors of the module at
work are ever materialised (see ``offload.py``).
"""
from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import ZprunerError

INDEX = "model.safetensors.index.json"


class WeightSource:
    """The tensors of a model folder by name (``model.safetensors`` or sharded with an
    index), read on demand.

    Given the ``model`` (built without weights) they are found the way ``from_pretrained``
    finds them: through transformers' checkpoint conversions, so that a mixture-of-experts
    checkpoint that stores one tensor per expert (``experts.3.w1.weight``) gives the model's
    fused parameter (``experts.gate_up_proj``), merged by transformers' own operations.
    Without a model, names are matched with or without the base-model prefix (GPT-2
    checkpoints store ``h.0...`` for ``transformer.h.0...``)."""

    def __init__(self, folder: str | os.PathLike, prefix: str = "", model: nn.Module | None = None):
        self.folder, self.prefix = Path(folder), prefix
        self._headers: dict[Path, tuple[dict, int]] = {}
        index = self.folder / INDEX
        self.files: dict[str, Path] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            for path in sorted(self.folder.glob("*.safetensors")):
                try:
                    with safe_open(path, framework="pt") as f:  # checks the header and the data's length
                        self.files.update(dict.fromkeys(f.keys(), path))
                except (SafetensorError, OSError) as exc:
                    raise ZprunerError(f"weights file {path} is damaged or cut short ({exc})") from None
        if not self.files:
            raise ZprunerError(f"{self.folder} has no safetensors weights")
        self.model = model
        # the model's tensor name -> its stored name, or (converter, [(source pattern, stored name)])
        self.plan: dict[str, str | tuple] = {} if model is None else _conversion_plan(model, list(self.files))

    def _header(self, path: Path) -> tuple[dict, int]:
        if path not in self._headers:
            try:
                self._headers[path] = _header(path)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise ZprunerError(f"weights file {path} is damaged or cut short ({exc})") from None
        return self._headers[path]

    def entry(self, stored: str) -> dict:
        """The header entry (dtype, shape, data_offsets) of the stored tensor ``stored``."""
        header, _ = self._header(self.files[stored])
        if stored not in header:
            raise ZprunerError(f"{self.files[stored]} lacks the tensor {stored} its index names; save the model again")
        return header[stored]

    def resolve(self, name: str) -> str | None:
        """The stored name of the model's tensor ``name`` (the name itself when it is made
        from several stored tensors), or None."""
        if self.model is not None:
            found = self.plan.get(name)
            return found if isinstance(found, str) else name if found is not None else None
        if name in self.files:
            return name
        if self.prefix and name.startswith(self.prefix + "."):
            bare = name[len(self.prefix) + 1:]
            return bare if bare in self.files else None
        prefixed = f"{self.prefix}.{name}" if self.prefix else name
        return prefixed if prefixed in self.files else None

    def read_one(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The model's tensor ``name`` as a new CPU tensor, floating ones in ``dtype`` and
        checked finite. A tensor made from several stored ones (an expert merge) is made by
        its transformers conversion from them, each cast to ``dtype`` first, as loading does."""
        planned = self.plan.get(name) if self.model is not None else None
        if isinstance(planned, tuple):
            converter, sources = planned
            converter = copy.deepcopy(converter)
            for pattern, stored in sources:
                converter.add_tensor(name, stored, pattern, self._read_stored(stored, name, dtype))
            return _converted(converter, name, self.model)
        stored = self.resolve(name)
        if stored is None:
            raise ZprunerError(f"{self.folder} lacks the weight {name}; the folder does not match its config.json")
        return self._read_stored(stored, name, dtype)

    def _read_stored(self, stored: str, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The stored tensor ``stored`` read in chunks of ``CHUNK_BYTES`` with plain reads at
        the offsets the safetensors header gives. Not through safetensors' memory map: its
        pages count as the process's memory while the file is open, and a whole stored copy
        beside the converted one would double the peak; here the peak is the converted tensor
        plus one chunk."""
        path = self.files[stored]
        try:
            header, data_start = self._header(path)
            entry = header[stored]
            source_dtype = _DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            target = dtype if source_dtype.is_floating_point else source_dtype
            out = torch.empty(entry["shape"], dtype=target)
            flat = out.view(-1)
            item = torch.empty((), dtype=source_dtype).element_size()
            step = max(1, CHUNK_BYTES // item)
            buffer = bytearray(min(step * item, end - begin))
            with path.open("rb", buffering=0) as f:
                for first in range(0, flat.numel(), step):
                    count = min(step, flat.numel() - first)
                    view = memoryview(buffer)[:count * item]
                    f.seek(data_start + begin + first * item)
                    if f.readinto(view) != count * item:
                        raise OSError(f"{path} ends inside the tensor {stored}")
                    part = flat[first:first + count]
                    part.copy_(torch.frombuffer(view, dtype=source_dtype, count=count))
                    # per chunk: isfinite of a whole tensor makes full-size temporaries
                    if part.is_floating_point() and not torch.isfinite(part).all():
                        raise ZprunerError(f"weight {name} holds NaN or infinite values; the checkpoint is damaged "
                                           "(or was saved from a diverged run): use an intact copy")
        except (OSError, KeyError, ValueError) as exc:
            raise ZprunerError(f"weights file {path} is damaged or cut short ({exc})") from None
        return out

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``names`` (the model's own) -> CPU tensors as stored, one open per shard file."""
        by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        for name in names:
            stored = self.resolve(name)
            if stored is None:
                raise ZprunerError(f"{self.folder} lacks the weight {name}; the folder does not match its config.json")
            by_file[self.files[stored]].append((name, stored))
        out = {}
        for path, pairs in by_file.items():
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name, stored in pairs:
                        out[name] = f.get_tensor(stored)
            except (SafetensorError, OSError) as exc:
                raise ZprunerError(f"weights file {path} is damaged or cut short ({exc})") from None
        return out


def _conversion_plan(model: nn.Module, stored: list[str]) -> dict[str, str | tuple]:
    """For each of the model's tensors, where ``from_pretrained`` would take it from: a stored
    name (renamed or not), or a converter and its stored sources in loading order."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model) if hasattr(model, "config") else []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    plan: dict[str, str | tuple] = {}
    for key in sorted(stored, key=dot_natural_key):  # the order loading collects experts in
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:
            target, pattern = rename_source_key(key, [], [], prefix, meta)
        if target not in meta:
            continue  # a tensor the model has no place for (unused heads, an MTP layer)
        if pattern is None:
            plan[target] = key
        else:
            plan.setdefault(target, (by_pattern[pattern], []))[1].append((pattern, key))
    return plan


def _converted(converter, name: str, model: nn.Module) -> torch.Tensor:
    """The tensor ``name`` from a converter holding its sources (transformers' operations)."""
    try:
        out = converter.convert(name, model=model, config=getattr(model, "config", None))
        value = out[name]
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        raise ZprunerError(f"the stored tensors of {name} do not convert to the model's ({type(exc).__name__}: "
                           f"{exc}); the folder does not match its config.json") from None
    return value[0] if isinstance(value, list) else value


def check_weights(model: nn.Module, source: WeightSource) -> None:
    """Every parameter of the model (built without weights) has stored tensors of its shape,
    checked from the headers alone: a missing or misshapen weight is one line naming it,
    before any work (``from_pretrained`` would fill a missing one with random values)."""
    tied = _tied_names(model)
    missing, misshapen = [], []
    for name, param in model.named_parameters():
        planned = source.plan.get(name)
        if planned is None:
            if name not in tied:
                missing.append(name)
            continue
        if isinstance(planned, str):
            shape = list(source.entry(planned)["shape"])
        else:
            converter, sources = copy.deepcopy(planned[0]), planned[1]
            for pattern, stored in sources:
                meta = torch.empty(source.entry(stored)["shape"], device="meta")
                converter.add_tensor(name, stored, pattern, meta)
            shape = list(_converted(converter, name, model).shape)
        if shape != list(param.shape):
            misshapen.append(f"{name} is stored as {tuple(shape)}, the model needs {tuple(param.shape)}")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ZprunerError(f"{source.folder} lacks the weights {', '.join(missing[:3])}{more}; the folder does not "
                           "match its config.json (download or save the model again)")
    if misshapen:
        raise ZprunerError(f"{source.folder}: {misshapen[0]}; the weights do not match config.json")


def _tied_names(model: nn.Module) -> set[str]:
    """Parameters the model ties to another one (an LM head tied to the embeddings), which a
    checkpoint stores once."""
    names = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if output is not None and getattr(config, "tie_word_embeddings", False):
        names |= {f"{n}.weight" for n, m in model.named_modules() if m is output}
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    names |= set(tied) if isinstance(tied, (dict, list, set, tuple)) else set()
    return names


def checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (the model's names) as ``save_pretrained`` stores them: transformers'
    conversions reversed (a fused expert parameter split back into one tensor per expert)."""
    from transformers.core_model_loading import revert_weight_conversion

    if not hasattr(model, "config"):
        return tensors
    return revert_weight_conversion(model, tensors)


def stored_layer_count(names: list[str]) -> tuple[str, int] | None:
    """(the prefix of the stored block list, how many blocks its tensors number), read from
    the stored names: the path before an integer component that counts the most distinct
    indices (``model.layers`` in ``model.layers.7.mlp...``); None without numbered tensors."""
    indices: dict[str, set[int]] = defaultdict(set)
    for name in names:
        parts = name.split(".")
        for k, part in enumerate(parts):
            if part.isdigit():
                indices[".".join(parts[:k])].add(int(part))
                break
    if not indices:
        return None
    prefix = max(indices, key=lambda p: len(indices[p]))
    return prefix, max(indices[prefix]) + 1


# Bytes read at a time by WeightSource.read_one
CHUNK_BYTES = 64 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


def module_tensors(model: nn.Module, module: nn.Module) -> list[str]:
    """Full names of ``module``'s parameters and persistent buffers within ``model``."""
    prefix = next(name for name, m in model.named_modules() if m is module)
    prefix = f"{prefix}." if prefix else ""
    names = [prefix + n for n, _ in module.named_parameters()]
    for owner_name, owner in module.named_modules():
        for b in owner._buffers:
            if b not in owner._non_persistent_buffers_set and owner._buffers[b] is not None:
                names.append(prefix + (f"{owner_name}.{b}" if owner_name else b))
    return names


def materialise(model: nn.Module, names: list[str], source: WeightSource, dtype: torch.dtype,
                device: torch.device) -> None:
    """Put the stored tensors ``names`` into ``model`` on ``device``: floating ones in
    ``dtype`` (exactly the cast ``from_pretrained(dtype=...)`` makes), checked finite."""
    for name in names:
        set_module_tensor_to_device(model, name, device, value=source.read_one(name, dtype))


def release(module: nn.Module) -> None:
    """Back to the meta device: the module's parameters take no memory until materialised again."""
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is not None and param.device.type != "meta":
                owner._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)


def round_to(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``t`` (the weight ``name``) in ``dtype``, rounded once. A zero stays a zero and a
    non-zero stays a non-zero: a kept weight too small for ``dtype`` (below float16's 6e-8)
    becomes its smallest value of the same sign, so the sparsity and every N:M group stay
    exact; a value beyond ``dtype``'s range is an error."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    out = t.to(dtype)
    lost = (out == 0) & (t != 0)
    if lost.any():
        info = torch.finfo(dtype)
        smallest = torch.tensor(info.tiny * info.eps, dtype=t.dtype)  # the smallest subnormal
        out[lost] = torch.copysign(smallest, t[lost]).to(dtype)
    if not torch.isfinite(out).all():
        raise ZprunerError(f"weight {name} holds values beyond the range of {str(dtype).removeprefix('torch.')} "
                           f"(up to {torch.finfo(dtype).max:g}); save in bfloat16 or float32 (--save-dtype)")
    return out


def exactly_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` when that holds each of its values exactly (a kept weight of a
    bfloat16 model that pruning only masked), else ``t`` unchanged: a shard stored so reads
    back the very values computed with."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    small = t.to(dtype)
    return small if torch.equal(small.to(t.dtype), t) else t


@contextmanager
def stored_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The model's parameters rounded to ``dtype`` (``round_to``) meanwhile, its config saying
    so (as ``save_pretrained`` writes it); then back in their own dtypes, holding the rounded
    values. In place: a copy of the weights could exceed the memory the model fits in."""
    own = {name: p.dtype for name, p in model.named_parameters()}
    config_dtype = model.config.dtype
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = round_to(p.data, dtype, name)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.data = p.data.to(own[name])
        model.config.dtype = config_dtype


def stored_dtypes(path: Path) -> set[torch.dtype]:
    """The dtypes of the floating tensors of a safetensors file, from its header."""
    header, _ = _header(path)
    dtypes = {_DTYPES.get(entry["dtype"]) for key, entry in header.items() if key != "__metadata__"}
    return {d for d in dtypes if d is None or d.is_floating_point}


def write_shard(folder: Path, file: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None,
                metadata: dict[str, str] | None = None) -> None:
    """One safetensors shard, written under a temporary name and renamed: a shard present is
    complete. Floating tensors go in ``dtype`` (None: each in its own). ``metadata``: strings
    stored in its header beside transformers' ``format``."""
    data = {name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().contiguous().cpu()
            for name, t in tensors.items()}
    tmp = folder / f".{file}.tmp-{os.getpid()}"
    try:
        save_file(data, str(tmp), metadata={"format": "pt", **(metadata or {})})
    except (SafetensorError, OSError) as exc:  # the disk: full (a 7B's float32 shards take 27 GB), read-only
        tmp.unlink(missing_ok=True)
        raise ZprunerError(f"could not write {folder / file} ({exc}); free space there or give another "
                           "--work-dir, then add --resume") from None
    os.replace(tmp, folder / file)


def write_index(folder: Path) -> None:
    """``model.safetensors.index.json`` for the shards in ``folder``, read back from them
    (so a resumed run's shards count too)."""
    weight_map, total = {}, 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                weight_map[name] = path.name
                sl = f.get_slice(name)
                count = 1
                for size in sl.get_shape():
                    count *= size
                total += count * _itemsize(sl.get_dtype())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}.get(dtype, 4)
