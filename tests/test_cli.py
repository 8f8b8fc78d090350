"""End to end through the CLI on tiny models, and the errors a user gets for bad input."""
import json
import subprocess
import sys

import pytest
import transformers

from zpruner.cli import main
from zpruner.layers import iter_matrices


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def quick(model_dir, data_dir, *extra):
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--nsamples", "4", "--seqlen", "32",
            "--eval-seqlen", "32", "--eval-windows", "4", "--quiet", *extra]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("magnitude", "2:4"), ("wanda", "4:8")])
def test_prune_end_to_end(capsys, tmp_path, tiny_model_dir, tiny_data_dir, family, method, pattern):
    out_json, save = tmp_path / "r.json", tmp_path / "pruned"
    code, out, err = run_cli(capsys, "prune", *quick(tiny_model_dir(family), tiny_data_dir),
                             "--method", method, "--pattern", pattern, "--dense-baseline",
                             "--output-json", str(out_json), "--save", str(save))
    assert code == 0, err
    results = json.loads(out_json.read_text())
    assert results["config"]["prune"]["method"] == method
    assert results["config"]["schema_version"] == 1
    assert results["sparsity"]["overall"] == pytest.approx(0.5)
    assert all(v == pytest.approx(0.5) for v in results["sparsity"]["per_layer"].values())
    assert len(results["sparsity"]["per_layer"]) == len(results["layer_time_s"]) > 0
    assert results["perplexity"]["wikitext2"] > 1.0
    assert results["dense_perplexity"]["wikitext2"] > 1.0
    assert set(results["timings_s"]) == {"load", "calibration", "pruning", "eval", "zero_shot"}
    assert {"zpruner", "torch", "transformers"} <= set(results["versions"])
    assert "perplexity" in out and "sparsity" in out

    # The saved model reloads with plain transformers and has the same zeros.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(save)
    layers = dict(iter_matrices(reloaded))
    assert set(layers) == set(results["sparsity"]["per_layer"])
    for name, layer in layers.items():
        w = layer.weight
        assert (w == 0).float().mean().item() == pytest.approx(0.5)
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            assert ((w.reshape(w.shape[0], -1, m) == 0).sum(-1) == n).all()
    assert json.loads((save / "zpruner.json").read_text())["config"]["prune"]["pattern"] == pattern
    assert not list(tmp_path.glob("*.tmp*"))


def test_saved_model_evaluates_to_the_same_perplexity(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    out1, out2, save = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m"
    assert main(["prune", *quick(tiny_model_dir("llama"), tiny_data_dir), "--save", str(save),
                 "--output-json", str(out1)]) == 0
    assert main(["eval", "--model", str(save), "--data-dir", str(tiny_data_dir), "--eval-seqlen", "32",
                 "--eval-windows", "4", "--quiet", "--output-json", str(out2)]) == 0
    pruned, reloaded = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert reloaded["perplexity"]["wikitext2"] == pytest.approx(pruned["perplexity"]["wikitext2"], rel=1e-5)
    assert reloaded["sparsity"]["overall"] == pytest.approx(0.5)


def test_same_seed_same_result_other_seed_other_mask(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    results = []
    for seed in (0, 0, 1):
        out = tmp_path / f"r{len(results)}.json"
        assert main(["prune", *quick(tiny_model_dir("llama"), tiny_data_dir), "--seed", str(seed),
                     "--output-json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["calibration_sha256_16"] == results[1]["calibration_sha256_16"]
    assert results[0]["perplexity"] == results[1]["perplexity"]
    assert results[0]["calibration_sha256_16"] != results[2]["calibration_sha256_16"]


def test_eval_dense_reports_perplexity_and_zero_sparsity(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "dense.json"
    code, stdout, err = run_cli(capsys, "eval", "--model", str(tiny_model_dir("gpt_neox")), "--data-dir",
                                str(tiny_data_dir), "--eval-seqlen", "32", "--quiet", "--output-json", str(out))
    assert code == 0, err
    results = json.loads(out.read_text())
    assert results["config"]["prune"] is None
    assert results["perplexity"]["wikitext2"] > 1.0
    assert results["sparsity"]["overall"] == 0.0


def test_per_layer_group_for_wanda_and_custom_sparsity(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "r.json"
    assert main(["prune", *quick(tiny_model_dir("qwen2"), tiny_data_dir), "--group", "layer",
                 "--sparsity", "0.7", "--no-eval", "--output-json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["sparsity"]["overall"] == pytest.approx(0.7, abs=1e-3)
    assert "perplexity" not in results


def _expect_error(capsys, tmp_path, argv, message):
    out_json = tmp_path / "r.json"
    code = main([*argv, "--output-json", str(out_json)])
    _, err = capsys.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not out_json.exists()


@pytest.mark.parametrize("content", [b"GGUF" + bytes(range(256)) * 4, b"GGUF\x03\x00\x00\x00garbage", b""])
def test_corrupt_gguf(capsys, tmp_path, tiny_data_dir, monkeypatch, content):
    monkeypatch.setenv("ZPRUNER_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    _expect_error(capsys, tmp_path, ["prune", *quick(bad, tiny_data_dir)], "not a readable GGUF model")
    assert not list((tmp_path / "cache").rglob("config.json"))


def test_missing_data_without_hub_names_the_option(capsys, tmp_path, tiny_model_dir, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.delenv("ZPRUNER_DATA_DIR", raising=False)
    # offline for sure, at once: the clients read the variables when they are first imported,
    # so setting HF_HUB_OFFLINE now would leave them trying the network until a timeout
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    argv = ["eval", "--model", str(tiny_model_dir("llama")), "--eval-seqlen", "32", "--quiet"]
    _expect_error(capsys, tmp_path, argv, "--data-dir")


def test_console_script_help_documents_every_option():
    exe = [sys.executable, "-m", "zpruner.cli"]
    text = subprocess.run([*exe, "prune", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--model", "--method", "--update", "--reallocate", "--ria-exponent", "--cvr-alpha", "--cvr-eps",
                   "--ec-clamp", "--blocksize", "--damp", "--sparsity", "--pattern", "--nsamples", "--seqlen", "--seed",
                   "--eval-seqlen", "--eval-windows", "--data-dir", "--output-json", "--save", "--dtype", "--device",
                   "--tasks", "--limit", "--batch-size", "--offload", "--resume", "--work-dir", "--activations"):
        assert option in text
    bad = subprocess.run([*exe, "prune", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_local_text_file_as_eval_corpus_and_resave(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the river city played music"] * 40))
    out, save = tmp_path / "r.json", tmp_path / "m"
    base = [*quick(tiny_model_dir("mistral"), tiny_data_dir), "--eval-dataset", str(corpus), "--save", str(save)]
    assert main(["prune", *base, "--sparsity", "0.3"]) == 0
    assert main(["prune", *base, "--sparsity", "0.6", "--output-json", str(out)]) == 2  # refuses to replace it
    assert not out.exists()
    assert main(["prune", *base, "--sparsity", "0.6", "--output-json", str(out), "--overwrite"]) == 0  # replaces it
    results = json.loads(out.read_text())
    assert results["perplexity"][str(corpus)] > 1.0
    assert results["perplexity_protocol"]["windows"] >= 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(save)
    zeros = sum(int((m.weight == 0).sum()) for _, m in iter_matrices(reloaded))
    total = sum(m.weight.numel() for _, m in iter_matrices(reloaded))
    assert zeros / total == pytest.approx(38 / 64)  # per row: floor(0.6 · 64 inputs) = 38 (down_proj: 57/96)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "m", "r.json"]


def test_eval_batch_size_does_not_change_perplexity(tiny_model_dir, tiny_data_dir, tmp_path):
    values = []
    for batch in ("1", "3"):
        out = tmp_path / f"b{batch}.json"
        assert main(["eval", "--model", str(tiny_model_dir("llama")), "--data-dir", str(tiny_data_dir),
                     "--eval-seqlen", "32", "--eval-windows", "5", "--eval-batch-size", batch, "--quiet",
                     "--output-json", str(out)]) == 0
        values.append(json.loads(out.read_text())["perplexity_protocol"])
    assert values[0]["windows"] == values[1]["windows"] == 5
    assert values[0]["value"] == pytest.approx(values[1]["value"], rel=1e-5)


@pytest.mark.parametrize("method,update,pattern", [("cvr", "ec", "unstructured"), ("sparsegpt", "none", "2:4"),
                                                   ("zpruner", "sparsegpt", "4:8"), ("ria", "ec-row", "2:4")])
def test_methods_and_updates_end_to_end(capsys, tmp_path, tiny_model_dir, tiny_data_dir, method, update, pattern):
    out_json = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "prune", *quick(tiny_model_dir("qwen2"), tiny_data_dir), "--method", method,
                             "--update", update, "--pattern", pattern, "--ec-clamp", "0.8,1.25",
                             "--output-json", str(out_json))
    assert code == 0, err
    results = json.loads(out_json.read_text())
    prune = results["config"]["prune"]
    assert (prune["method"], prune["update"], prune["ec_clamp"]) == (method, update, [0.8, 1.25])
    assert results["sparsity"]["overall"] == pytest.approx(0.5)
    assert set(results["layer_time_s"]) == set(results["sparsity"]["per_layer"])
    assert f"update {update}" in out


def test_reallocate_is_recorded(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    out_json = tmp_path / "r.json"
    assert main(["prune", *quick(tiny_model_dir("llama"), tiny_data_dir), "--method", "ria", "--pattern", "2:4",
                 "--reallocate", "--output-json", str(out_json)]) == 0
    results = json.loads(out_json.read_text())
    assert results["config"]["prune"]["reallocate"] is True
    assert results["reallocated"] and all(k.endswith("mlp.down_proj") for k in results["reallocated"])
