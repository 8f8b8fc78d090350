"""Short runs of the real SmolLM2-135M on the offline data (skipped when either is absent)."""
import copy
import math

import pytest
import torch

from zpruner import PruneConfig, calibration_windows, eval_tokens, load_texts, measure_sparsity, perplexity, prune
from zpruner.models import alias_path, cache_dir

pytestmark = pytest.mark.real_model

EVAL_SEQLEN, EVAL_WINDOWS = 512, 4


@pytest.fixture(scope="module")
def wikitext(smollm2, shared_data):
    return eval_tokens(smollm2[1], load_texts("wikitext2", shared_data))


@pytest.fixture(scope="module")
def calibration(smollm2, shared_data):
    return calibration_windows(smollm2[1], load_texts("c4", shared_data), nsamples=8, seqlen=256, seed=0)


@pytest.fixture(scope="module")
def dense_ppl(smollm2, wikitext):
    return perplexity(smollm2[0], wikitext, EVAL_SEQLEN, EVAL_WINDOWS, progress=False).value


def pruned_ppl(smollm2, wikitext, calibration, method, **options):
    model = copy.deepcopy(smollm2[0])
    config = PruneConfig(method=method, sparsity=0.5, nsamples=8, seqlen=256, **options)
    prune(model, config, calibration, progress=False)
    assert measure_sparsity(model)["overall"] == pytest.approx(0.5, abs=1e-4)
    return perplexity(model, wikitext, EVAL_SEQLEN, EVAL_WINDOWS, progress=False).value


def test_wikitext_tokenizes_as_the_protocol_says(wikitext):
    assert wikitext.shape == (1, 304_986)  # 148 windows of 2048 (docs/data.md)


def test_gguf_is_converted_once_to_plain_safetensors(smollm2):
    converted = [p for p in (cache_dir() / "gguf").glob(alias_path("smollm2-135m").stem + "-*") if p.is_dir()]
    assert converted and (converted[0] / "model.safetensors").is_file()
    assert "quantization_config" not in (converted[0] / "config.json").read_text()


def test_dense_perplexity_is_sane(dense_ppl):
    # SmolLM2-135M scores ~21.6 at 2048 tokens; shorter windows see less context.
    assert math.isfinite(dense_ppl) and 10 < dense_ppl < 60


@pytest.fixture(scope="module")
def magnitude_ppl(smollm2, wikitext, calibration):
    return pruned_ppl(smollm2, wikitext, calibration, "magnitude")


def test_wanda_beats_magnitude_and_loses_to_dense(smollm2, wikitext, calibration, dense_ppl, magnitude_ppl):
    wanda = pruned_ppl(smollm2, wikitext, calibration, "wanda")
    assert dense_ppl < wanda
    assert wanda * 1.5 < magnitude_ppl, (dense_ppl, wanda, magnitude_ppl)


@pytest.mark.parametrize("method,update", [("ria", "none"), ("zpruner", "none"), ("cvr", "ec"), ("sparsegpt", "none")])
def test_every_activation_method_beats_magnitude(smollm2, wikitext, calibration, dense_ppl, magnitude_ppl, method, update):
    ppl = pruned_ppl(smollm2, wikitext, calibration, method, update=update)
    assert dense_ppl < ppl < magnitude_ppl / 1.5, (dense_ppl, ppl, magnitude_ppl)


def test_cvr_column_variance_is_torchs_on_every_smollm2_layer(smollm2):
    """The fast column variance leaves the verified CVR cells as they are: same bits here."""
    from zpruner.layers import iter_matrices
    from zpruner.kernels.columns import column_variance

    for name, layer in iter_matrices(smollm2[0]):
        W = layer.weight
        assert torch.equal(column_variance(W), W.var(dim=0, unbiased=False)), name


def test_calibration_windows_come_from_c4(smollm2, shared_data, calibration):
    texts = load_texts("c4", shared_data)
    assert calibration.shape == (8, 256)
    assert torch.equal(calibration, calibration_windows(smollm2[1], texts, 8, 256, 0))


def test_cli_prunes_saves_and_reloads_smollm2(smollm2, shared_data, tmp_path, capsys):
    import json

    import transformers

    from zpruner.cli import main
    from zpruner.layers import iter_matrices

    save, first, second = tmp_path / "smollm2-2of4", tmp_path / "a.json", tmp_path / "b.json"
    common = ["--data-dir", str(shared_data), "--eval-seqlen", "256", "--eval-windows", "4", "--quiet"]
    assert main(["prune", "--model", "smollm2-135m", "--method", "wanda", "--pattern", "2:4", "--nsamples", "8",
                 "--seqlen", "128", "--save", str(save), "--output-json", str(first), *common]) == 0
    assert main(["eval", "--model", str(save), "--output-json", str(second), *common]) == 0
    pruned, reloaded = json.loads(first.read_text()), json.loads(second.read_text())
    # Q4_1 dequantization leaves a few exact zeros of its own: they count too.
    assert pruned["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-4)
    assert len(pruned["sparsity"]["per_layer"]) == 30 * 7
    assert reloaded["perplexity"]["wikitext2"] == pytest.approx(pruned["perplexity"]["wikitext2"], rel=1e-4)
    model = transformers.AutoModelForCausalLM.from_pretrained(save)
    for _name, layer in iter_matrices(model):
        groups = layer.weight.reshape(layer.weight.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all()  # >= : the pre-existing zeros again
    # embeddings and the tied head are never pruned
    assert torch.equal(model.model.embed_tokens.weight, smollm2[0].model.embed_tokens.weight)
