"""--save writes the model in its own dtype (its config's), rounded once at the end, zeros
staying zeros and N:M staying N:M, whatever dtype pruning computed in; --save-dtype says
otherwise. On a GPU, --dtype auto is the model's own dtype."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from zpruner.checkpoint import WorkDir
from zpruner.cli import main
from zpruner.errors import ZprunerError
from zpruner.models import resolve_dtype, save_dtype
from zpruner.weights import round_to

from test_offload import assert_same_weights, quick


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny llama saved in bfloat16, as a bfloat16-trained family is published."""
    source = tiny_model_dir("llama")
    folder = tmp_path_factory.mktemp("tiny-llama-bf16")
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def prune(tmp_path, tiny_data_dir):
    """Run zpruner prune --save tmp_path/NAME on a model: the results."""
    def run(model: Path, name: str, *options: str) -> dict:
        out = tmp_path / f"{name}.json"
        argv = quick(model, tiny_data_dir, "--output-json", str(out), "--save", str(tmp_path / name), *options)
        assert main(argv) == 0
        return json.loads(out.read_text())
    return run


@pytest.mark.parametrize("offload", ["none", "disk"])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_a_bfloat16_model_pruned_on_the_cpu_is_saved_in_bfloat16(bf16_model, prune, tmp_path, offload, pattern):
    results = prune(bf16_model, "m", "--device", "cpu", "--offload", offload, "--pattern", pattern)
    saved = tmp_path / "m"
    assert json.loads((saved / "config.json").read_text())["dtype"] == "bfloat16"
    weights, source = tensors(saved), tensors(bf16_model)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert size(saved) <= 1.05 * size(bf16_model)  # float32 would be twice the input
    for name, fraction in results["sparsity"]["per_layer"].items():
        W = weights[name + ".weight"]
        assert fraction == 0.5 and int((W == 0).sum()) == W.numel() // 2  # the results' sparsity, exactly
        if pattern == "2:4":
            assert ((W.reshape(W.shape[0], -1, 4) == 0).sum(-1) == 2).all()  # every group of 4
        kept = W != 0
        assert torch.equal(W[kept], source[name + ".weight"][kept])  # only masked: the source's own bits
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
    assert reloaded.dtype == torch.bfloat16


def test_disk_and_memory_save_the_same_bits_when_pruning_changes_the_weights(bf16_model, prune, tmp_path, monkeypatch):
    """EC rescales the kept weights (float32 values a bfloat16 does not hold): a streamed run
    stores them in float32 in its work folder, so it measures what the in-memory run measures,
    and rounds them once at the save, to the bits of the in-memory save."""
    kept_shards = []
    monkeypatch.setattr(WorkDir, "remove", lambda self: kept_shards.extend(self.shards()))
    options = ("--method", "zpruner", "--update", "ec", "--pattern", "2:4", "--device", "cpu")
    none = prune(bf16_model, "none", "--offload", "none", *options)
    disk = prune(bf16_model, "disk", "--offload", "disk", *options)
    assert disk["perplexity"] == none["perplexity"] and disk["sparsity"] == none["sparsity"]
    assert_same_weights(tmp_path / "none", tmp_path / "disk")
    assert {t.dtype for t in tensors(tmp_path / "disk").values()} == {torch.bfloat16}
    with safe_open(kept_shards[0], framework="pt") as f:
        stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert stored["model.layers.0.mlp.down_proj.weight"] == "F32"  # rescaled by EC
    assert stored["model.layers.0.input_layernorm.weight"] == "BF16"  # untouched


def test_a_masked_bfloat16_block_is_stored_in_bfloat16_in_the_work_folder(bf16_model, prune, tmp_path, monkeypatch):
    kept_shards = []
    monkeypatch.setattr(WorkDir, "remove", lambda self: kept_shards.extend(self.shards()))
    prune(bf16_model, "m", "--offload", "disk", "--device", "cpu")
    for shard in kept_shards:
        with safe_open(shard, framework="pt") as f:
            assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}


def test_save_dtype_says_otherwise(bf16_model, prune, tmp_path):
    prune(bf16_model, "m", "--save-dtype", "float32", "--device", "cpu")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in tensors(tmp_path / "m").values()} == {torch.float32}


def test_a_float32_model_is_saved_as_before(tiny_model_dir, prune, tmp_path):
    prune(tiny_model_dir("llama"), "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in tensors(tmp_path / "m").values()} == {torch.float32}


def test_rounding_keeps_zeros_zero_and_kept_weights_kept():
    W = torch.tensor([[0.0, 1e-9, -0.0, 0.25], [3.0, 0.0, -2e-10, 0.0]])  # two zeros in each row's group of 4
    for dtype in (torch.bfloat16, torch.float16):
        rounded = round_to(W, dtype, "w")
        assert rounded.dtype == dtype
        assert torch.equal(rounded == 0, W == 0)  # float16 flushes 1e-9 to zero; round_to does not
        assert torch.equal(torch.sign(rounded.float()), torch.sign(W))
    assert round_to(W, torch.float32, "w") is W
    with pytest.raises(ZprunerError, match="weight big holds values beyond the range of float16"):
        round_to(torch.tensor([1e6]), torch.float16, "big")


def test_auto_dtype_is_float32_on_the_cpu_and_the_models_own_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for own in (torch.float16, torch.bfloat16, torch.float32, None):
        assert resolve_dtype("auto", cpu, own) == torch.float32
    assert resolve_dtype("auto", gpu, torch.float16) == torch.float16
    assert resolve_dtype("auto", gpu, torch.bfloat16) == torch.bfloat16  # float16 could overflow it
    assert resolve_dtype("auto", gpu, torch.float32) == torch.float32
    assert resolve_dtype("auto", gpu, None) == torch.float32
    assert save_dtype("auto", torch.bfloat16) == torch.bfloat16 and save_dtype("auto", None) == torch.float32
    assert save_dtype("float16", torch.bfloat16) == torch.float16
