"""Streaming a model from disk block by block (--offload disk): the same weights and
perplexity as the in-memory run, checkpoints and --resume, and the errors around them."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from zpruner.checkpoint import WorkDir
from zpruner.cli import main
from zpruner.weights import WeightSource

CASES = [("wanda", "none", "unstructured"), ("wanda", "none", "2:4"), ("sparsegpt", "none", "unstructured"),
         ("sparsegpt", "none", "2:4"), ("zpruner", "ec", "unstructured"), ("zpruner", "ec", "2:4")]


def quick(model_dir, data_dir, *extra):
    return ["prune", "--model", str(model_dir), "--data-dir", str(data_dir), "--nsamples", "4", "--seqlen", "32",
            "--eval-seqlen", "32", "--eval-windows", "4", "--quiet", *extra]


def weights(folder) -> dict[str, torch.Tensor]:
    source = WeightSource(folder)
    return source.read(sorted(source.files))


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def run_both(tmp_path, model_dir, data_dir, *options):
    results = {}
    for mode in ("none", "disk"):
        out, save = tmp_path / f"{mode}.json", tmp_path / mode
        assert main(quick(model_dir, data_dir, *options, "--dense-baseline", "--offload", mode,
                          "--output-json", str(out), "--save", str(save))) == 0
        results[mode] = json.loads(out.read_text())
    return results


@pytest.mark.parametrize("method,update,pattern", CASES)
def test_disk_gives_the_in_memory_weights_and_perplexity(tmp_path, tiny_model_dir, tiny_data_dir, method, update,
                                                          pattern):
    results = run_both(tmp_path, tiny_model_dir("llama"), tiny_data_dir, "--method", method, "--update", update,
                       "--pattern", pattern)
    assert (results["none"]["offload"], results["disk"]["offload"]) == ("none", "disk")
    assert_same_weights(tmp_path / "none", tmp_path / "disk")
    for key in ("perplexity", "dense_perplexity"):
        assert results["disk"][key]["wikitext2"] == pytest.approx(results["none"][key]["wikitext2"], rel=1e-5)
    assert results["disk"]["sparsity"] == results["none"]["sparsity"]
    assert not list(tmp_path.glob("*.zpruner-work*"))  # the work folder goes once the model is saved


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_disk_streams_other_families(tmp_path, tiny_model_dir, tiny_data_dir, family):
    """GPT-2 (Conv1D, tuple-returning blocks) and OPT (learned positions, final projection)."""
    results = run_both(tmp_path, tiny_model_dir(family), tiny_data_dir, "--method", "wanda")
    assert_same_weights(tmp_path / "none", tmp_path / "disk")
    assert results["disk"]["perplexity"]["wikitext2"] == pytest.approx(results["none"]["perplexity"]["wikitext2"],
                                                                       rel=1e-5)


def test_streamed_model_loads_with_transformers(tmp_path, tiny_model_dir, tiny_data_dir):
    from transformers import AutoModelForCausalLM

    save = tmp_path / "m"
    assert main(quick(tiny_model_dir("llama"), tiny_data_dir, "--offload", "disk", "--no-eval", "--save", str(save),
                      "--method", "magnitude")) == 0
    model = AutoModelForCausalLM.from_pretrained(save)
    assert json.loads((save / "model.safetensors.index.json").read_text())["weight_map"]
    assert (model.model.layers[1].mlp.down_proj.weight == 0).float().mean().item() == pytest.approx(0.5)
    assert (save / "zpruner.json").is_file()


def _kill_after(block: int, exc: type[BaseException]):
    """WorkDir.block_done that stops the run right after block ``block`` is checkpointed."""
    original = WorkDir.block_done

    def block_done(self, i, *args, **kwargs):
        original(self, i, *args, **kwargs)
        if i == block:
            raise exc("stopped after block %d" % i)

    return block_done


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_resume_after_a_stop_equals_an_uninterrupted_run(monkeypatch, capsys, tmp_path, tiny_model_dir,
                                                         tiny_data_dir, method):
    model_dir = tiny_model_dir("llama")
    full = tmp_path / "full"
    assert main(quick(model_dir, tiny_data_dir, "--method", method, "--offload", "disk", "--save", str(full),
                      "--output-json", str(tmp_path / "full.json"))) == 0
    resumed = tmp_path / "resumed"
    args = quick(model_dir, tiny_data_dir, "--method", method, "--offload", "disk", "--save", str(resumed),
                 "--output-json", str(tmp_path / "resumed.json"))
    with monkeypatch.context() as m:
        m.setattr(WorkDir, "block_done", _kill_after(0, KeyboardInterrupt))
        assert main(args) == 130
    work = tmp_path / "resumed.zpruner-work"
    assert json.loads((work / "state" / "state.json").read_text())["done"] == 1 and not resumed.exists()
    capsys.readouterr()
    assert main(args) == 2  # the same command without --resume does not silently start over
    err = capsys.readouterr().err
    assert "holds an unfinished run (1 of 2 blocks pruned); add --resume" in err and len(err.splitlines()) == 1
    assert main(args + ["--resume"]) == 0
    assert_same_weights(full, resumed)
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "resumed"))
    assert a["perplexity"] == b["perplexity"] and a["sparsity"] == b["sparsity"]
    assert set(a["layer_time_s"]) == set(b["layer_time_s"])
    assert not work.exists()


def test_resume_after_sigkill(tmp_path, tiny_model_dir, tiny_data_dir):
    """A real SIGKILL right after block 0's checkpoint, then --resume, equals the full run."""
    model_dir = tiny_model_dir("llama")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(quick(model_dir, tiny_data_dir, "--offload", "disk", "--no-eval", "--save", str(full))) == 0
    args = quick(model_dir, tiny_data_dir, "--offload", "disk", "--no-eval", "--save", str(resumed))
    script = ("import os, signal, sys\n"
              "from zpruner.checkpoint import WorkDir\n"
              "original = WorkDir.block_done\n"
              "def block_done(self, i, *a, **k):\n"
              "    original(self, i, *a, **k)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "WorkDir.block_done = block_done\n"
              "from zpruner.cli import main\n"
              f"sys.exit(main({args!r}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not resumed.exists()
    assert main(args + ["--resume"]) == 0
    assert_same_weights(full, resumed)


def test_resume_with_other_options_is_refused(monkeypatch, capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    model_dir = tiny_model_dir("llama")
    save = tmp_path / "m"
    args = quick(model_dir, tiny_data_dir, "--offload", "disk", "--save", str(save))
    with monkeypatch.context() as m:
        m.setattr(WorkDir, "block_done", _kill_after(0, KeyboardInterrupt))
        assert main(args + ["--sparsity", "0.5"]) == 130
    capsys.readouterr()
    assert main(args + ["--sparsity", "0.6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "had other options (sparsity: 0.5 then, 0.6 now)" in err


@pytest.mark.parametrize("extra,message", [
    (["--offload", "none", "--resume"], "--resume needs --offload disk"),
    (["--offload", "disk", "--resume"], "there is no unfinished run to resume"),
    (["--offload", "disk", "--tasks", "arc_easy"], "zero-shot tasks (--tasks) run through lm-eval on the whole model"),
    (["--offload", "tape"], "offload 'tape' is unknown; choose one of auto, none, cpu, disk"),
])
def test_offload_errors(capsys, tmp_path, tiny_model_dir, tiny_data_dir, extra, message):
    model_dir = tiny_model_dir("llama")
    capsys.readouterr()
    try:
        code = main(quick(model_dir, tiny_data_dir, "--save", str(tmp_path / "m"), *extra))
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_auto_keeps_a_small_model_in_memory(monkeypatch, capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "r.json"
    args = [a for a in quick(tiny_model_dir("llama"), tiny_data_dir, "--output-json", str(out)) if a != "--quiet"]
    assert main(args) == 0
    assert json.loads(out.read_text())["offload"] == "none"
    assert "offload auto" not in capsys.readouterr().err  # only a run that must stream says so


def test_disk_equals_none_on_smollm2(tmp_path, smollm2, shared_data):
    """The real model (30 blocks, tied LM head), 2:4 Wanda: the same bits and perplexity."""
    results = {}
    for mode in ("none", "disk"):
        out = tmp_path / f"{mode}.json"
        assert main(["prune", "--model", "smollm2-135m", "--data-dir", str(shared_data), "--method", "wanda",
                     "--pattern", "2:4", "--nsamples", "4", "--seqlen", "128", "--eval-seqlen", "128",
                     "--eval-windows", "2", "--quiet", "--offload", mode, "--save", str(tmp_path / mode),
                     "--output-json", str(out)]) == 0
        results[mode] = json.loads(out.read_text())
    assert_same_weights(tmp_path / "none", tmp_path / "disk")
    assert results["disk"]["perplexity"]["wikitext2"] == pytest.approx(results["none"]["perplexity"]["wikitext2"],
                                                                       rel=1e-5)
    assert os.path.getsize(tmp_path / "disk" / "model.safetensors.index.json") > 0


def test_auto_streams_a_model_larger_than_memory(monkeypatch, capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    """With (pretended) 1 GiB of free memory, auto streams, says so in one line, and gives
    the in-memory weights."""
    from zpruner import offload

    model_dir = tiny_model_dir("llama")
    assert main(quick(model_dir, tiny_data_dir, "--offload", "none", "--save", str(tmp_path / "none"))) == 0
    monkeypatch.setattr(offload, "available_ram", lambda: 1 << 30)
    capsys.readouterr()
    out = tmp_path / "auto.json"
    args = [a for a in quick(model_dir, tiny_data_dir, "--save", str(tmp_path / "auto"), "--output-json", str(out))
            if a != "--quiet"]
    assert main(args) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "offload auto" in line]
    assert len(said) == 1 and said[0].startswith("zpruner: offload auto: disk (weights 0.0 GiB in the compute dtype")
    assert json.loads(out.read_text())["offload"] == "disk"
    assert_same_weights(tmp_path / "none", tmp_path / "auto")



def test_eval_streams_the_saved_model(tmp_path, tiny_model_dir, tiny_data_dir):
    """zpruner eval --offload disk of a saved pruned model: its perplexity and sparsity as in memory."""
    model_dir = tiny_model_dir("llama")
    save = tmp_path / "m"
    assert main(quick(model_dir, tiny_data_dir, "--pattern", "2:4", "--save", str(save), "--no-eval")) == 0
    results = {}
    for mode in ("none", "disk"):
        out = tmp_path / f"{mode}.json"
        args = ["eval", "--model", str(save), "--data-dir", str(tiny_data_dir), "--eval-seqlen", "32",
                "--eval-windows", "4", "--quiet", "--offload", mode, "--output-json", str(out)]
        assert main(args) == 0
        results[mode] = json.loads(out.read_text())
    assert results["disk"]["perplexity"]["wikitext2"] == pytest.approx(results["none"]["perplexity"]["wikitext2"],
                                                                       rel=1e-5)
    assert results["disk"]["sparsity"] == results["none"]["sparsity"]
    assert results["disk"]["sparsity"]["overall"] == pytest.approx(0.5)


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_activations_on_disk_give_the_same_weights(tmp_path, tiny_model_dir, tiny_data_dir, offload):
    model_dir = tiny_model_dir("llama")
    for activations in ("memory", "disk"):
        assert main(quick(model_dir, tiny_data_dir, "--method", "sparsegpt", "--offload", offload, "--no-eval",
                          "--activations", activations, "--save", str(tmp_path / activations))) == 0
    assert_same_weights(tmp_path / "memory", tmp_path / "disk")


def test_weight_source_reads_in_chunks_exactly(monkeypatch, tmp_path):
    """read_one equals safetensors' own reading (bfloat16 -> float32 cast included), names a
    NaN, and refuses a file cut inside a tensor."""
    from safetensors.torch import save_file

    from zpruner import weights
    from zpruner.errors import ZprunerError

    monkeypatch.setattr(weights, "CHUNK_BYTES", 40)  # many chunks, the last one partial
    tensors = {"a.weight": torch.randn(7, 9).to(torch.bfloat16), "b.bias": torch.arange(13, dtype=torch.int64),
               "c.weight": torch.randn(5, 3)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = WeightSource(tmp_path)
    assert torch.equal(source.read_one("a.weight", torch.float32), tensors["a.weight"].float())
    assert torch.equal(source.read_one("b.bias", torch.float32), tensors["b.bias"])
    assert torch.equal(source.read_one("c.weight", torch.float32), tensors["c.weight"])
    bad = tmp_path / "bad"
    bad.mkdir()
    poisoned = torch.randn(6, 6)
    poisoned[4, 5] = float("nan")
    save_file({"w": poisoned}, str(bad / "model.safetensors"))
    with pytest.raises(ZprunerError, match="weight w holds NaN"):
        WeightSource(bad).read_one("w", torch.float32)
    data = (tmp_path / "model.safetensors").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes(data[:-30])
    with pytest.raises(ZprunerError, match="damaged or cut short"):
        source = WeightSource(cut)
        for name in sorted(source.files):
            source.read_one(name, torch.float32)
