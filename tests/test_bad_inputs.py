"""Every bad input a user can give: one error line, exit code 2, nothing written, and no
pruning started. The table of bad inputs in docs/robustness.md is generated from these cases:

    ZPRUNER_UPDATE_DOCS=1 .venv/bin/python -m pytest tests/test_bad_inputs.py

rewrites it; without the variable, a test fails when the table and the cases disagree.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import zpruner.runner
import zpruner.workspace
from zpruner.cli import main

TABLE = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"
START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


@dataclass
class Ctx:
    tmp: Path
    model: Path
    data: Path

    def quick(self, model: Path | str | None = None, *extra: str) -> list[str]:
        return ["--model", str(model or self.model), "--data-dir", str(self.data), "--nsamples", "4",
                "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "4", *extra]

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def model_copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.model, self.tmp / name))


@dataclass
class Case:
    what: str  # the user's mistake, as the table shows it
    argv: Callable[[Ctx], list[str]]
    expect: str  # a fragment of the one error line
    code: int = 2
    # what the machine cannot show a test (a read-only folder to root, a full disk), simulated
    simulate: Callable[[Ctx, pytest.MonkeyPatch], None] | None = None


def _prune(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["prune", *c.quick(None, *extra)]


def _file_option(option: str, name: str, content: str | bytes) -> Callable[[Ctx], list[str]]:
    """prune with ``option`` naming a file of ``content``."""
    return lambda c: ["prune", *c.quick(None, option, str(c.file(name, content)))]


def _on_model(make: Callable[[Ctx], Path]) -> Callable[[Ctx], list[str]]:
    return lambda c: ["prune", *c.quick(make(c))]


def _sweep_grid(toml: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["sweep", str(c.file("grid.toml", toml)), "--results", str(c.tmp / "r.jsonl"),
                      "--data-dir", str(c.data)]


def _truncated(c: Ctx) -> Path:
    folder = c.model_copy("truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _empty_weights(c: Ctx) -> Path:
    folder = c.model_copy("empty-weights")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _pickled(c: Ctx) -> Path:
    folder = c.model_copy("pickled")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def _nan_weight(c: Ctx) -> Path:
    folder = c.model_copy("nan-weight")
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _no_blocks(c: Ctx) -> Path:
    folder = c.model_copy("no-blocks")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if ".layers." not in k}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _config_says(name: str, **changes) -> Callable[[Ctx], Path]:
    """A copy of the model whose config.json says ``changes`` (its weights as they were)."""
    def make(c: Ctx) -> Path:
        folder = c.model_copy(name)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


def _weights_edited(name: str, edit: Callable[[dict], None]) -> Callable[[Ctx], Path]:
    """A copy of the model whose safetensors hold ``edit(tensors)``."""
    def make(c: Ctx) -> Path:
        folder = c.model_copy(name)
        state = load_file(folder / "model.safetensors")
        edit(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    return make


def _transpose_up_proj(state: dict) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name].t().contiguous()


def _no_eos(c: Ctx) -> Path:
    folder = c.model_copy("no-eos")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("eos_token", None)
            data.pop("eos_token_id", None)
            path.write_text(json.dumps(data))
    return folder


def _with_arc_easy(c: Ctx) -> Path:
    """The data directory plus one arc_easy item in the local layout of shared/data."""
    data = Path(shutil.copytree(c.data, c.tmp / "data"))
    item = {"query": "Question: which is a river?", "choices": ["the Nile", "a king"], "gold": 0}
    c.file("data/tasks/arc_easy/arc_easy.jsonl", json.dumps(item) + "\n")
    return data


def _custom_code(c: Ctx) -> Path:
    """A model whose config maps to Python files of its own (nothing here runs them)."""
    folder = c.model_copy("custom-code")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mything", architectures=["MyModel"],
                  auto_map={"AutoConfig": "configuration_mything.MyConfig",
                            "AutoModelForCausalLM": "modeling_mything.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_mything.py").write_text("raise SystemExit('custom code ran')\n")
    (folder / "modeling_mything.py").write_text("raise SystemExit('custom code ran')\n")
    return folder


def _previous_output(c: Ctx) -> Path:
    folder = c.tmp / "previous"
    folder.mkdir()
    (folder / "zpruner.json").write_text("{}\n")
    (folder / "model.safetensors").write_bytes(b"old model")
    return folder


def _thesis(c: Ctx) -> Path:
    c.file("precious/thesis.tex", "x\n")
    return c.tmp / "precious"


def _results_line(c: Ctx, prune: dict) -> Path:
    line = {"config": {"model": {"name": "m"}, "prune": prune, "eval": {"dataset": "wikitext2"}},
            "perplexity_protocol": {"value": 3.0, "windows": 1, "seqlen": 8}}
    return c.file("hostile.jsonl", json.dumps(line) + "\n")


def _link(name: str, to: str | Path) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        (c.tmp / name).symlink_to(to)
        return c.tmp / name
    return make


def _fifo(c: Ctx) -> Path:
    os.mkfifo(c.tmp / "pipe.json")
    return c.tmp / "pipe.json"


def _report_with(name: str, make: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    """report into a folder where ``make(folder / name)`` put something beforehand."""
    def argv(c: Ctx) -> list[str]:
        out = c.tmp / "out"
        out.mkdir()
        make(out / name)
        return ["report", str(_results_line(c, None)), "--out", str(out)]
    return argv


def _read_only(name: str) -> Callable[[Ctx, pytest.MonkeyPatch], None]:
    """The folder ``name`` under the case's folder, read-only as access(2) tells it (root may
    write anywhere: a chmod would not show the case)."""
    def simulate(c: Ctx, m: pytest.MonkeyPatch) -> None:
        real = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path) == c.tmp / name:
                return False
            return real(path, mode, *args, **kwargs)
        m.setattr(os, "access", access)
    return simulate


def _free_space(space: int) -> Callable[[Ctx, pytest.MonkeyPatch], None]:
    def simulate(c: Ctx, m: pytest.MonkeyPatch) -> None:
        m.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=space // 4096, f_frsize=4096))
    return simulate


def _folder(c: Ctx, name: str) -> Path:
    (c.tmp / name).mkdir()
    return c.tmp / name


LATIN1 = "caf\xe9 ".encode("latin-1") * 400

CASES = [
    # where the pruned model and the results go
    Case("`--save` onto a folder holding other files", lambda c: ["prune", *c.quick(), "--save", str(_thesis(c))],
         "zpruner never replaces it"),
    Case("`--save` onto a previous zpruner model, without `--overwrite`",
         lambda c: ["prune", *c.quick(), "--save", str(_previous_output(c))], "add --overwrite"),
    Case("`--save \"\"` (an unset shell variable)", _prune("--save", ""), "--save is empty"),
    Case("`--save` onto an existing file", lambda c: ["prune", *c.quick(), "--save", str(c.file("f.bin", "x"))],
         "is an existing file"),
    Case("`--save` into a folder that does not exist", lambda c: ["prune", *c.quick(), "--save",
                                                                  str(c.tmp / "no" / "such" / "dir")],
         "does not exist; create it first"),
    Case("`--output-json` pointing at a folder", lambda c: ["prune", *c.quick(), "--output-json", str(c.tmp)],
         "is a folder"),
    Case("`--output-json \"\"`", _prune("--output-json", ""), "--output-json is empty"),
    Case("`--output-json` into a folder that does not exist",
         lambda c: ["prune", *c.quick(), "--output-json", str(c.tmp / "nope" / "r.json")], "does not exist"),
    Case("`sweep --results` pointing at a folder", lambda c: ["sweep", "--results", str(c.tmp), "--models",
                                                              str(c.model)], "is a folder"),
    Case("`report --out` onto an existing file",
         lambda c: ["report", str(_results_line(c, None)), "--out", str(c.file("taken", "x"))], "is an existing file"),
    # outputs zpruner never writes through or replaces
    Case("`--output-json` a symbolic link to a file", lambda c: [
        "prune", *c.quick(), "--output-json", str(_link("r.json", c.file("victim.txt", "mine"))(c))],
        "is a symbolic link to <tmp>/victim.txt; zpruner writes only regular files"),
    Case("`--output-json` a symbolic link to /proc/self/fd/1", lambda c: [
        "prune", *c.quick(), "--output-json", str(_link("out.json", "/proc/self/fd/1")(c))],
        "is a symbolic link to /proc/self/fd/1"),
    Case("`--output-json /dev/null` (a character device)", _prune("--output-json", "/dev/null"),
         "/dev/null is a character device"),
    Case("`--output-json` a FIFO", lambda c: ["prune", *c.quick(), "--output-json", str(_fifo(c))],
         "is a named pipe (FIFO)"),
    Case("`--output-json` an existing file zpruner did not write",
         lambda c: ["prune", *c.quick(), "--output-json", str(c.file("notes.json", '{"mine": 1}'))],
         "is an existing file that zpruner did not write"),
    Case("`sweep --results` a symbolic link", lambda c: [
        "sweep", "--results", str(_link("r.jsonl", c.file("victim.txt", "mine"))(c)), "--models", str(c.model)],
        "--results <tmp>/r.jsonl is a symbolic link"),
    Case("`--save` a symbolic link to an empty folder",
         lambda c: ["prune", *c.quick(), "--save", str(_link("m", _folder(c, "real"))(c))],
         "--save <tmp>/m is a symbolic link to <tmp>/real"),
    Case("`report` into a folder with a report.md it did not write",
         _report_with("report.md", lambda p: p.write_text("# my notes\n")),
         "report.md exists and zpruner report did not write it (or it was edited since); add --overwrite"),
    Case("`report --overwrite` where report.md is a symbolic link",
         lambda c: [*_report_with("report.md", lambda p: p.symlink_to(c.file("victim.md", "mine")))(c),
                    "--overwrite"], "report.md is a symbolic link"),
    # paths that are not what they must be
    Case("`--data-dir` a file", lambda c: ["prune", *c.quick(), "--data-dir", str(c.file("d.txt", "x"))],
         "(--data-dir) is a file, not a folder"),
    Case("`ZPRUNER_DATA_DIR` a file", lambda c: [f"env:ZPRUNER_DATA_DIR={c.file('d.txt', 'x')}", "prune",
                                                 *c.quick()[:2], *c.quick()[4:]],
         "($ZPRUNER_DATA_DIR) is a file, not a folder"),
    Case("`--save` under a file", lambda c: ["prune", *c.quick(), "--save", str(c.file("f.txt", "x") / "m")],
         "<tmp>/f.txt is a file, not a folder"),
    Case("`--work-dir` a file", lambda c: ["prune", *c.quick(), "--offload", "disk", "--work-dir",
                                            str(c.file("w.txt", "x"))], "--work-dir <tmp>/w.txt is an existing file"),
    Case("`--work-dir` read-only (simulated)",
         lambda c: ["prune", *c.quick(), "--offload", "disk", "--work-dir", str(_folder(c, "ro"))],
         "folder <tmp>/ro is not writable", simulate=_read_only("ro")),
    Case("`ZPRUNER_CACHE` read-only, before a .gguf conversion (simulated)",
         lambda c: [f"env:ZPRUNER_CACHE={_folder(c, 'ro')}", "prune",
                    *c.quick(c.file("m.gguf", b"GGUF\x03\x00garbage"))],
         "the cache ($ZPRUNER_CACHE) <tmp>/ro/gguf: folder <tmp>/ro is not writable", simulate=_read_only("ro")),
    Case("`--output-json` equal to `--save`",
         lambda c: ["prune", *c.quick(), "--save", str(c.tmp / "m"), "--output-json", str(c.tmp / "m")],
         "--output-json <tmp>/m is --save <tmp>/m"),
    Case("`--work-dir` equal to `--save`",
         lambda c: ["prune", *c.quick(), "--save", str(c.tmp / "m"), "--work-dir", str(c.tmp / "m")],
         "--work-dir <tmp>/m is --save <tmp>/m"),
    Case("`--work-dir` inside `--save`",
         lambda c: ["prune", *c.quick(), "--save", str(c.tmp / "m"), "--work-dir", str(c.tmp / "m" / "w")],
         "--work-dir <tmp>/m/w is inside --save <tmp>/m"),
    Case("`--save` inside `--work-dir`",
         lambda c: ["prune", *c.quick(), "--save", str(_folder(c, "w") / "m"), "--work-dir", str(c.tmp / "w")],
         "--save <tmp>/w/m is inside --work-dir <tmp>/w: the work folder is removed when the run ends"),
    Case("too little free disk space for `--save` (simulated)",
         lambda c: ["prune", *c.quick(), "--save", str(c.tmp / "m")], "which has 64.0 KiB free",
         simulate=_free_space(64 << 10)),
    Case("too little free disk space for the work folder (simulated)",
         lambda c: ["prune", *c.quick(), "--offload", "disk", "--work-dir", str(c.tmp / "w")],
         "the work folder <tmp>/w", simulate=_free_space(64 << 10)),
    Case("`--save-dtype float64`", _prune("--save-dtype", "float64"), "save dtype 'float64' is unknown"),
    # numbers
    Case("`--cvr-alpha nan`", _prune("--method", "cvr", "--cvr-alpha", "nan"), "not a finite number"),
    Case("`--ria-exponent nan`", _prune("--method", "ria", "--ria-exponent", "nan"), "not a finite number"),
    Case("`--cvr-eps nan`", _prune("--method", "cvr", "--cvr-eps", "nan"), "not a finite number"),
    Case("`--cvr-alpha -1`", _prune("--method", "cvr", "--cvr-alpha", "-1"), "must be a finite number >= 0"),
    Case("`--damp inf`", _prune("--method", "sparsegpt", "--damp", "inf"), "not a finite number"),
    Case("`--damp 0`", _prune("--method", "sparsegpt", "--damp", "0"), "must be a finite number > 0"),
    Case("`--sparsity 1.5`", _prune("--sparsity", "1.5"), "sparsity 1.5 is out of range"),
    Case("`--sparsity -0.1`", _prune("--sparsity", "-0.1"), "sparsity -0.1 is out of range"),
    Case("`--sparsity nan`", _prune("--sparsity", "nan"), "not a finite number"),
    Case("`--cvr-eps -inf` (a negative number as its own word)", _prune("--method", "cvr", "--cvr-eps", "-inf"),
         "argument --cvr-eps: -inf is not a finite number"),
    Case("`--cvr-eps=-inf`", _prune("--method", "cvr", "--cvr-eps=-inf"), "argument --cvr-eps: -inf is not a finite"),
    Case("`--damp -1e-3`", _prune("--method", "sparsegpt", "--damp", "-1e-3"), "must be a finite number > 0"),
    Case("`--seed -1` (Python's random takes it as seed 1)", _prune("--seed", "-1"),
         "argument --seed: -1 is negative; a seed is an integer >= 0"),
    Case("`sweep --seeds -1,2`", lambda c: ["sweep", "--results", str(c.tmp / "r.jsonl"), "--models", str(c.model),
                                           "--seeds", "-1,2"], "argument --seeds: -1 is negative"),
    Case("`--ec-clamp 2`", _prune("--update", "ec", "--ec-clamp", "2"), "is not a range LO,HI"),
    Case("`--ec-clamp nan,2`", _prune("--update", "ec", "--ec-clamp", "nan,2"), "is not a range LO,HI"),
    Case("`--ec-clamp 1.2,2`", _prune("--update", "ec", "--ec-clamp", "1.2,2"), "must contain 1"),
    Case("`--select heldout` without a reconstruction", _prune("--method", "wanda", "--select", "heldout"),
         "chooses how strongly a reconstruction is applied"),
    Case("`--select heldout --offload disk` (generated held-out text)",
         _prune("--method", "admm", "--select", "heldout", "--offload", "disk"), "use --heldout-texts 0"),
    Case("`--select heldout --heldout-texts 0` with one calibration batch",
         _prune("--method", "admm", "--select", "heldout", "--heldout-texts", "0", "--nsamples", "2",
                "--calib-batch-size", "2"), "at least 2 calibration batches"),
    Case("`--heldout-texts -1`", _prune("--method", "admm", "--select", "heldout", "--heldout-texts", "-1"),
         "argument --heldout-texts: -1 is negative"),
    Case("`--heldout-ridges 0,10`", _prune("--method", "admm", "--select", "heldout", "--heldout-ridges", "0,10"),
         "0 < LO <= HI"),
    Case("`--recipe best`", _prune("--recipe", "best"), "recipe 'best' is unknown"),
    Case("`--eval-seqlen 1`", _prune("--eval-seqlen", "1"), "a window of 1 token predicts nothing"),
    Case("`--nsamples 0`", _prune("--nsamples", "0"), "not a positive integer"),
    Case("`--seqlen 100000` (longer than the model's context)", _prune("--seqlen", "100000"),
         "exceeds the model's context"),
    # method choices
    Case("`--method obs`", _prune("--method", "obs"), "method 'obs' is unknown"),
    Case("`--update obs`", _prune("--update", "obs"), "update 'obs' is unknown"),
    Case("`--pattern 3:2`", _prune("--pattern", "3:2"), "pattern 3:2 is invalid"),
    Case("`--pattern 2:5` on a model whose layer widths are not multiples of 5", _prune("--pattern", "2:5"), "divisible by 5"),
    Case("`--pattern 2:4 --sparsity 0.6`", _prune("--pattern", "2:4", "--sparsity", "0.6"), "fixes sparsity at 0.5"),
    Case("`--method sparsegpt --update sparsegpt`", _prune("--method", "sparsegpt", "--update", "sparsegpt"),
         "already reconstructs"),
    Case("`--reallocate` without an N:M pattern", _prune("--reallocate"), "--reallocate needs an N:M --pattern"),
    Case("`--limit` without `--tasks`", _prune("--limit", "10"), "add --tasks"),
    Case("`--tasks bogus`", _prune("--tasks", "bogus"), "task 'bogus' is unknown"),
    # models
    Case("`--model` path that does not exist", lambda c: ["prune", *c.quick(c.tmp / "nope")], "does not exist"),
    Case("`--model` folder without config.json", lambda c: ["prune", *c.quick(c.file("empty/x", "").parent)],
         "has no config.json"),
    Case("a truncated model.safetensors", _on_model(_truncated), "is damaged or cut short"),
    Case("an empty model.safetensors", _on_model(_empty_weights), "is damaged or cut short"),
    Case("pickled weights only (pytorch_model.bin)", _on_model(_pickled), "holds pickled weights"),
    Case("NaN in a weight", _on_model(_nan_weight), "weight model.layers.1.mlp.up_proj.weight holds NaN"),
    Case("a model without repeated decoder blocks", _on_model(_no_blocks), "found no repeated decoder blocks"),
    Case("a config with 3 layers and weights for 2", _on_model(_config_says("three", num_hidden_layers=3)),
         "config.json declares 3 decoder layers but"),
    Case("the same with `--offload disk`",
         lambda c: ["prune", *c.quick(_config_says("three", num_hidden_layers=3)(c)), "--offload", "disk"],
         "config.json declares 3 decoder layers but"),
    Case("a config with `num_hidden_layers` 1000000 and weights for 2",
         _on_model(_config_says("million", num_hidden_layers=1000000)), "declares 1000000 decoder layers but"),
    Case("a weight missing from the safetensors",
         _on_model(_weights_edited("missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))),
         "lacks the weights model.layers.1.mlp.up_proj.weight"),
    Case("a safetensors header with a transposed shape", _on_model(_weights_edited("transposed", _transpose_up_proj)),
         "model.layers.1.mlp.up_proj.weight is stored as (64, 96), the model needs (96, 64)"),
    Case("the same with `--offload disk`",
         lambda c: ["prune", *c.quick(_weights_edited("transposed", _transpose_up_proj)(c)), "--offload", "disk"],
         "model.layers.1.mlp.up_proj.weight is stored as (64, 96), the model needs (96, 64)"),
    Case("zero-shot `--tasks` with a tokenizer that has no eos token",
         lambda c: ["prune", *c.quick(_no_eos(c)), "--tasks", "arc_easy", "--data-dir", str(_with_arc_easy(c))],
         "no end-of-sequence token"),
    Case("a model with its own code, without `--trust-remote-code`", _on_model(_custom_code),
         "add --trust-remote-code if you trust its author"),
    Case("a damaged .gguf file", lambda c: ["prune", *c.quick(c.file("broken.gguf", b"GGUF\x03\x00garbage"))],
         "not a readable GGUF model"),
    Case("`--device meta`", _prune("--device", "meta"), "device 'meta' cannot run a model"),
    Case("`--device tpu-please`", _prune("--device", "tpu-please"), "is not understood"),
    # text
    Case("non-UTF-8 `--calibration` text", _file_option("--calibration", "l.txt", LATIN1),
         "is not UTF-8 text"),
    Case("non-UTF-8 `--eval-dataset` text", _file_option("--eval-dataset", "l.txt", LATIN1),
         "is not UTF-8 text"),
    Case("a JSONL line whose \"text\" is a number",
         _file_option("--calibration", "n.jsonl", '{"text": 5}\n'),
         '"text" must be a string'),
    Case("a JSONL line whose \"text\" is null",
         _file_option("--calibration", "n.jsonl", '{"text": null}\n'),
         '"text" must be a string'),
    Case("a JSONL line that is not JSON", _file_option("--calibration", "b.jsonl", "{oops\n"),
         'is not a JSON object with a "text" field'),
    Case("`--calibration` file that does not exist", _prune("--calibration", "nope.txt"), "nor an existing file"),
    Case("`--calibration` file that is neither .txt nor .jsonl",
         _file_option("--calibration", "c.csv", "a,b"), "must end in .txt or .jsonl"),
    Case("calibration text shorter than `--seqlen`",
         _file_option("--calibration", "short.txt", "far too short"),
         "calibration text too short"),
    Case("evaluation text shorter than one window",
         _file_option("--eval-dataset", "short.txt", "far too short"),
         "fewer than one window"),
    Case("`--data-dir` that does not exist", lambda c: ["prune", *c.quick(), "--data-dir", str(c.tmp / "nope")],
         "data directory"),
    Case("`ZPRUNER_CACHE` pointing at a file (with a .gguf model)",
         lambda c: [f"env:ZPRUNER_CACHE={c.file('cachefile', 'x')}", "prune",
                    *c.quick(c.file("m.gguf", b"GGUF\x03\x00garbage"))], "is a file; point $ZPRUNER_CACHE"),
    # sweep grids
    Case("grid `seeds = [\"x\"]`", _sweep_grid('seeds = ["x"]\n'), "seed (--seed) must be an integer"),
    Case("grid `seeds = [-1]`", _sweep_grid('seeds = [-1]\n'), "seed (--seed) must be an integer >= 0, got -1"),
    Case("grid `nsamples = [\"x\"]`", _sweep_grid('nsamples = ["x"]\n'), "nsamples (--nsamples) must be an integer"),
    Case("grid `seqlen = \"abc\"`", _sweep_grid('seqlen = "abc"\n'), "seqlen (--seqlen) must be an integer"),
    Case("grid `ec_clamp = 5`", _sweep_grid("ec_clamp = 5\n"), "must be two finite numbers LO,HI"),
    Case("grid `sparsities = [1.5]`", _sweep_grid("sparsities = [1.5]\n"), "sparsity 1.5 is out of range"),
    Case("grid `methods = [3]`", _sweep_grid("methods = [3]\n"), "method 3 is unknown"),
    Case("grid with an unknown setting", _sweep_grid("colour = 'red'\n"), "unknown"),
    Case("grid file that is not valid TOML", _sweep_grid("seeds = [\n"), "is not valid TOML"),
    # report
    Case("`report` on a file that does not exist", lambda c: ["report", str(c.tmp / "none.jsonl")], "does not exist"),
    Case("`report` on a file with no JSON line", lambda c: ["report", str(c.file("x.jsonl", "a\nb\n"))],
         "nor is any other line"),
    Case("`report` on a result whose sparsity is text",
         lambda c: ["report", str(_results_line(c, {"method": "wanda", "sparsity": "half"}))],
         "not a valid pruning configuration"),
    Case("Ctrl-C during pruning", _prune(), "interrupted; finished outputs are kept", code=130),
]


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _never_prune(*args, **kwargs):
    raise AssertionError("pruning started although the input was bad")


def run_case(case: Case, ctx: Ctx, capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, the stderr text) of ``case``, with pruning made to fail the test if it starts."""
    monkeypatch.chdir(ctx.tmp)
    monkeypatch.setenv("ZPRUNER_CACHE", str(ctx.tmp / "cache"))
    argv = case.argv(ctx)
    capsys.readouterr()  # what building the case's model printed (transformers' progress bars) is not the case's
    while argv[0].startswith("env:"):
        name, value = argv.pop(0)[4:].split("=", 1)
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(zpruner.workspace, "prune", _interrupt if case.code == 130 else _never_prune)
    before = _snapshot(ctx.tmp)
    with monkeypatch.context() as simulated:
        if case.simulate is not None:
            case.simulate(ctx, simulated)
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    err = capsys.readouterr().err
    after = _snapshot(ctx.tmp)
    created = [str(p) for p in after if p not in before]
    assert not created, f"{case.what}: wrote {created}"
    changed = [str(p) for p in before if after.get(p) != before[p]]
    assert not changed, f"{case.what}: changed {changed}"
    return code, err


def _snapshot(folder: Path) -> dict[Path, object]:
    """What is in ``folder`` (the GGUF cache left out): a file's bytes, a link's target, a
    FIFO's or device's kind; never read through a link or from a pipe."""
    seen = {}
    for path in folder.rglob("*"):
        if path.is_relative_to(folder / "cache"):
            continue
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            seen[path.relative_to(folder)] = ("link", os.readlink(path))
        elif stat.S_ISREG(mode):
            seen[path.relative_to(folder)] = path.read_bytes()
        else:
            seen[path.relative_to(folder)] = stat.S_IFMT(mode)
    return seen


def _normalise(text: str, ctx: Ctx) -> str:
    for path, name in ((ctx.tmp, "<tmp>"), (ctx.model, "<model>"), (ctx.data, "<data>")):
        text = text.replace(str(path), name)
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture
def ctx(tmp_path, tiny_model_dir, tiny_data_dir):
    work = tmp_path / "work"
    work.mkdir()
    return Ctx(work, tiny_model_dir("llama"), tiny_data_dir)


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_gets_one_line_and_its_exit_code(case, ctx, capsys, monkeypatch):
    code, err = run_case(case, ctx, capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, err
    assert len(lines) == 1 and case.expect in _normalise(lines[0], ctx), err
    assert "Traceback" not in err


def test_the_precious_folder_is_untouched(ctx, capsys, monkeypatch):
    code, _ = run_case(CASES[0], ctx, capsys, monkeypatch)
    assert code == 2
    assert (ctx.tmp / "precious" / "thesis.tex").read_text() == "x\n"


def test_the_docs_table_is_generated_from_these_cases(tmp_path, tiny_model_dir, tiny_data_dir, capsys, monkeypatch):
    rows = ["| the input | exit | what zpruner says |", "|---|---:|---|"]
    for i, case in enumerate(CASES):
        work = tmp_path / f"case{i}"
        work.mkdir()
        ctx = Ctx(work, tiny_model_dir("llama"), tiny_data_dir)
        with monkeypatch.context() as m:
            code, err = run_case(case, ctx, capsys, m)
        message = _normalise(err, ctx).replace("|", "\\|")
        rows.append(f"| {case.what} | {code} | `{message}` |")
    table = "\n".join(rows)
    text = TABLE.read_text()
    if START not in text or END not in text:
        pytest.fail(f"docs/robustness.md lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    generated = f"{head}{START}\n{table}\n{END}{tail}"
    if os.environ.get("ZPRUNER_UPDATE_DOCS"):
        TABLE.write_text(generated)
        text = generated
    assert text == generated, ("docs/robustness.md's bad-input table differs from the cases; regenerate it with "
                               "ZPRUNER_UPDATE_DOCS=1 .venv/bin/python -m pytest tests/test_bad_inputs.py")
    assert len(CASES) >= 40


def test_dev_null_stays_a_character_device(ctx, capsys, monkeypatch):
    case = next(c for c in CASES if c.what.startswith("`--output-json /dev/null`"))
    assert run_case(case, ctx, capsys, monkeypatch)[0] == 2
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
