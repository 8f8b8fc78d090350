"""Traversal, devices and dtypes on tiny models."""
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from conftest import FAMILIES, build_tiny_model
from zpruner import PruneConfig, measure_sparsity, prune
from zpruner.errors import ZprunerError
from zpruner.layers import Matrix, find_blocks, find_matrices, iter_matrices
from zpruner.models import resolve_device, resolve_dtype, resolve_source

EXPECTED_LINEARS = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
}
EXPECTED_LINEARS["qwen2"] = EXPECTED_LINEARS["mistral"] = EXPECTED_LINEARS["llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_linears_found_without_names(family):
    model = build_tiny_model(family, vocab_size=300)
    blocks = find_blocks(model)
    assert len(blocks) == 2
    assert set(find_matrices(blocks[0])) == EXPECTED_LINEARS[family]
    names = [name for name, _ in iter_matrices(model)]
    assert len(names) == 2 * len(EXPECTED_LINEARS[family])
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)


def test_conv1d_weight_view_is_out_by_in_and_shares_storage():
    layer = Conv1D(nf=6, nx=4)  # 4 inputs, 6 outputs, stored [4, 6]
    view = Matrix(layer, transposed=True).weight
    assert view.shape == (6, 4)
    view[0, 1] = 0.0
    assert layer.weight[1, 0] == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_prunes_exactly(dtype):
    model = build_tiny_model("llama", vocab_size=300).to(dtype)
    calibration = torch.randint(3, 300, (2, 32))
    prune(model, PruneConfig("wanda", 0.5, nsamples=2, seqlen=32), calibration, progress=False)
    assert measure_sparsity(model)["overall"] == pytest.approx(0.5)
    assert next(model.parameters()).dtype == dtype


def test_wanda_uses_the_activations():
    """Same weights, different calibration text: different masks."""
    masks = []
    for seed in (0, 1):
        model = build_tiny_model("llama", vocab_size=300)
        calibration = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(seed))
        prune(model, PruneConfig("wanda", 0.5, nsamples=2, seqlen=32), calibration, progress=False)
        masks.append(torch.cat([(m.weight == 0).flatten() for _, m in iter_matrices(model)]))
    assert not torch.equal(masks[0], masks[1])


def test_magnitude_needs_no_calibration_and_matches_global_threshold():
    model = build_tiny_model("gpt2", vocab_size=300)
    original = {n: m.weight.clone() for n, m in iter_matrices(model)}
    prune(model, PruneConfig("magnitude", 0.3), None, progress=False)
    for name, layer in iter_matrices(model):
        w, w0 = layer.weight, original[name]
        pruned = w0[w == 0].abs()
        assert pruned.numel() == int(0.3 * w0.numel())
        assert pruned.max() <= w0[w != 0].abs().min()


def test_wanda_without_calibration_is_an_error():
    with pytest.raises(ZprunerError, match="needs calibration"):
        prune(build_tiny_model("llama", vocab_size=300), PruneConfig("wanda"), None, progress=False)


def test_device_and_dtype_resolution():
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda"), torch.float16) == torch.float16  # a float16 model's own
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32  # no dtype in its config
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ZprunerError, match="not understood"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ZprunerError, match="sees no CUDA device; use --device cpu"):
            resolve_device("cuda")


def test_model_sources(tmp_path):
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_source(str(tmp_path)) == tmp_path
    with pytest.raises(ZprunerError, match="does not exist"):
        resolve_source("./missing-model")
    with pytest.raises(ZprunerError, match="does not exist"):
        resolve_source("weights.gguf")
