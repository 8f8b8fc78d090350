"""zpruner sweep (grid, resume, shared workspace) and the --protocol presets."""
import json
import re

import pytest

from zpruner.cli import build_parser, config_from_args, main
from zpruner.config import ModelConfig, PruneConfig, RunConfig
from zpruner.errors import ZprunerError
from zpruner.protocols import PROTOCOLS, expand
from zpruner.results import run_key
from zpruner.runner import Workspace, run
from zpruner.sweep import plan, read_grid


def sweep_args(model_dir, data_dir, results, *extra):
    return ["sweep", "--results", str(results), "--models", str(model_dir), "--data-dir", str(data_dir),
            "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "4", "--nsamples", "4", "--quiet", *extra]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sweep_runs_each_configuration_once_and_resumes(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    results = tmp_path / "results.jsonl"
    # 2 methods x 2 patterns = 4 pruned runs, plus the dense model measured once
    argv = sweep_args(tiny_model_dir("llama"), tiny_data_dir, results,
                      "--methods", "wanda,magnitude", "--patterns", "unstructured,2:4", "--no-dense")
    assert main(argv) == 0
    first = lines(results)
    assert len(first) == 4
    assert len({entry["run_key"] for entry in first}) == 4
    assert {(e["config"]["prune"]["method"], e["config"]["prune"]["pattern"]) for e in first} == {
        ("wanda", "unstructured"), ("wanda", "2:4"), ("magnitude", "unstructured"), ("magnitude", "2:4")}
    assert all(e["sparsity"]["overall"] == pytest.approx(0.5) for e in first)
    capsys.readouterr()

    # the report shows every run in Table 1
    assert main(["report", str(results), "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for entry in first:
        assert f"{entry['perplexity']['wikitext2']:.2f}" in report
    capsys.readouterr()

    assert main(argv) == 0  # nothing left to run
    assert "4 already in" in capsys.readouterr().out
    assert lines(results) == first

    # Delete one line: exactly that configuration runs again, with the same numbers.
    kept = [line for line in results.read_text().splitlines() if json.loads(line)["run_key"] != first[1]["run_key"]]
    results.write_text("\n".join(kept) + "\n")
    assert main(argv) == 0
    assert "ran 1," in capsys.readouterr().out
    after = lines(results)
    assert len(after) == 4 and after[-1]["run_key"] == first[1]["run_key"]
    assert after[-1]["perplexity"] == pytest.approx(first[1]["perplexity"], rel=1e-5)


def test_sweep_measures_dense_once_and_each_run_starts_from_dense_weights(tmp_path, tiny_model_dir, tiny_data_dir):
    """A run inside a sweep gives the numbers it gives alone: the shared workspace restores
    the dense weights between runs (magnitude 2:4 after wanda 70 %: any leftover zeros
    would change both sparsity and perplexity)."""
    results = tmp_path / "r.jsonl"
    model_dir = tiny_model_dir("llama")
    assert main(sweep_args(model_dir, tiny_data_dir, results, "--methods", "wanda,magnitude",
                           "--patterns", "unstructured", "--sparsities", "0.7,0.3")) == 0
    entries = lines(results)
    dense = [e for e in entries if e["config"]["prune"] is None]
    assert len(dense) == 1 and dense[0]["sparsity"]["overall"] < 0.01
    last = entries[-1]["config"]["prune"]
    assert (last["method"], last["sparsity"]) == ("magnitude", 0.3)
    solo = tmp_path / "solo.json"
    assert main(["prune", "--model", str(model_dir), "--data-dir", str(tiny_data_dir), "--method", "magnitude",
                 "--sparsity", "0.3", "--seqlen", "32", "--nsamples", "4", "--eval-seqlen", "32",
                 "--eval-windows", "4", "--quiet", "--output-json", str(solo)]) == 0
    solo_result = json.loads(solo.read_text())
    assert entries[-1]["sparsity"]["overall"] == pytest.approx(solo_result["sparsity"]["overall"])
    assert entries[-1]["perplexity"]["wikitext2"] == pytest.approx(solo_result["perplexity"]["wikitext2"], rel=1e-5)
    assert entries[-1]["run_key"] == run_key(config_from_args(build_parser().parse_args(
        ["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.3", "--seqlen", "32",
         "--nsamples", "4", "--eval-seqlen", "32", "--eval-windows", "4"])))


def test_workspace_without_dense_copy_refuses_a_second_pruned_run(tmp_path, tiny_model_dir, tiny_data_dir):
    model = ModelConfig(str(tiny_model_dir("llama")))
    workspace = Workspace(model, str(tiny_data_dir))
    config = RunConfig(model, PruneConfig("magnitude", seqlen=32, nsamples=2), None, str(tiny_data_dir))
    run(config, progress=False, workspace=workspace)
    with pytest.raises(ZprunerError, match="keep_dense=True"):
        run(config, progress=False, workspace=workspace)


def test_grid_file_and_options(tmp_path):
    toml = tmp_path / "grid.toml"
    toml.write_text('methods = ["wanda", "sparsegpt"]\nupdates = ["none", "sparsegpt"]\n'
                    'patterns = ["unstructured", "4:8"]\nsparsities = [0.5, 0.7]\nprotocol = "quick"\n'
                    'seeds = 1\ncvr_alpha = 0.5\n')
    [grid] = read_grid(toml)
    planned = plan(grid)
    prune = [c.prune for c in planned.configs if c.prune is not None]
    # wanda: none/sparsegpt x (2 sparsities + 4:8) = 6; sparsegpt: none x 3 = 3 (its own update refused)
    assert len(prune) == 9
    assert len([c for c in planned.configs if c.prune is None]) == 1
    assert {p.seed for p in prune} == {1} and {p.cvr_alpha for p in prune} == {0.5}
    assert {(p.nsamples, p.seqlen) for p in prune} == {(64, 512)}
    assert {p.sparsity for p in prune if p.pattern == "4:8"} == {0.5}  # N:M ignores the sparsity list
    assert len(planned.skipped) == 3 and all("already reconstructs" in s for s in planned.skipped)
    assert all(c.eval.seqlen == 512 and c.eval.windows == 64 and c.protocol == "quick" for c in planned.configs)

    # options override the file; the YAML spelling gives the same grid
    merged = grid.merged({"methods": ["magnitude"], "nsamples": [16, 32], "protocol": None})
    magnitude = [c.prune for c in plan(merged).configs if c.prune is not None]
    # magnitude alone is data-free: not repeated per calibration size; with sparsegpt it is
    assert len([p for p in magnitude if p.update == "none"]) == 3
    assert sorted(p.nsamples for p in magnitude if p.update == "sparsegpt") == [16, 16, 16, 32, 32, 32]
    yaml_file = tmp_path / "grid.yaml"
    yaml_file.write_text("methods: [wanda, sparsegpt]\nupdates: [none, sparsegpt]\npatterns: [unstructured, '4:8']\n"
                         "sparsities: [0.5, 0.7]\nprotocol: quick\nseeds: 1\ncvr_alpha: 0.5\n")
    assert [run_key(c) for c in plan(read_grid(yaml_file)).configs] == [run_key(c) for c in planned.configs]


@pytest.mark.parametrize("content,message", [
    ("methods = ['wandaa']", "method 'wandaa' is unknown"),
    ("patterns = ['3:2']", "pattern 3:2 is invalid"),
    ("sparsities = [1.5]", "sparsity 1.5 is out of range"),
    ("colour = 'blue'", "grid setting\\(s\\) colour unknown"),
    ("methods = []", "'methods' is empty"),
    ("methods = [", "not valid TOML"),
    ("protocol = 'fast'", "protocol 'fast' is unknown"),
])
def test_bad_grid_is_one_clear_error(capsys, tmp_path, content, message):
    grid, results = tmp_path / "g.toml", tmp_path / "r.jsonl"
    grid.write_text(content + "\n")
    assert main(["sweep", str(grid), "--results", str(results), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err)
    assert not results.exists()


def test_sweep_into_missing_folder_fails_before_running(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    results = tmp_path / "nowhere" / "r.jsonl"
    assert main(sweep_args(tiny_model_dir("llama"), tiny_data_dir, results)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_interrupted_line_is_ignored_and_rerun(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    results = tmp_path / "r.jsonl"
    argv = sweep_args(tiny_model_dir("llama"), tiny_data_dir, results, "--methods", "magnitude", "--no-dense")
    assert main(argv) == 0
    complete = results.read_text()
    results.write_text(complete[: len(complete) // 2])  # the process died while writing
    assert main(argv) == 0
    entries = [line for line in results.read_text().splitlines() if line.strip()]
    assert json.loads(entries[-1])["run_key"] == json.loads(complete)["run_key"]


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_presets_expand_to_the_documented_options(name):
    args = build_parser().parse_args(["prune", "--protocol", name])
    config = config_from_args(args)
    documented = {"quick": (64, 512, 512, 64), "paper": (128, 2048, 2048, None)}[name]
    assert (config.prune.nsamples, config.prune.seqlen, config.eval.seqlen, config.eval.windows) == documented
    assert config.protocol == name


def test_explicit_options_win_over_the_preset():
    args = build_parser().parse_args(["prune", "--protocol", "quick", "--nsamples", "16", "--eval-windows", "8"])
    config = config_from_args(args)
    assert (config.prune.nsamples, config.prune.seqlen, config.eval.seqlen, config.eval.windows) == (16, 512, 512, 8)
    # no preset: zpruner's defaults (the papers' calibration; evaluation at the model's context)
    config = config_from_args(build_parser().parse_args(["prune"]))
    assert (config.prune.nsamples, config.prune.seqlen, config.eval.seqlen, config.eval.windows) == (128, 2048, None,
                                                                                                     None)
    assert expand("paper", {"eval_windows": 3})["eval_windows"] == 3
    eval_config = config_from_args(build_parser().parse_args(["eval", "--protocol", "quick"]))
    assert (eval_config.eval.seqlen, eval_config.eval.windows, eval_config.prune) == (512, 64, None)


def test_run_key_ignores_paths_and_batching_but_not_settings():
    base = RunConfig(ModelConfig("m"), PruneConfig("wanda", seqlen=512), data_dir="/a", output_json="/x.json")
    same = RunConfig(ModelConfig("m"), PruneConfig("wanda", seqlen=512, calib_batch_size=1), data_dir="/b")
    other = RunConfig(ModelConfig("m"), PruneConfig("wanda", seqlen=512, seed=1))
    assert run_key(base) == run_key(same) != run_key(other)
    assert run_key(base) != run_key(RunConfig(ModelConfig("m"), PruneConfig("wanda", seqlen=256)))


def test_run_key_counts_a_whole_number_and_its_float_as_one_setting():
    # a grid file may say admm_rho = 1 where the CLI stores 1.0: the same run either way
    def key(**kw):
        return run_key(RunConfig(ModelConfig("m"), PruneConfig("admm", **kw)))

    assert key(constants={"admm_rho": 1}, sparsity=0) == key(constants={"admm_rho": 1.0}, sparsity=0.0)
    assert key(constants={"admm_rho": 1}) != key(constants={"admm_rho": 2})


def test_adopted_single_runs_are_not_run_again(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    model_dir, solo, results = tiny_model_dir("llama"), tmp_path / "solo.json", tmp_path / "r.jsonl"
    assert main(["prune", "--model", str(model_dir), "--data-dir", str(tiny_data_dir), "--pattern", "2:4",
                 "--seqlen", "32", "--nsamples", "4", "--eval-seqlen", "32", "--eval-windows", "4", "--quiet",
                 "--output-json", str(solo)]) == 0
    argv = sweep_args(model_dir, tiny_data_dir, results, "--patterns", "2:4,4:8", "--no-dense", "--adopt", str(solo))
    assert main([*argv, "--dry-run"]) == 0  # a dry run writes nothing
    assert not results.exists()
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"adopted {solo}" in out and "ran 1," in out  # 4:8 only
    entries = lines(results)
    assert [e.get("adopted_from") for e in entries] == [str(solo), None]
    assert entries[0]["perplexity"] == json.loads(solo.read_text())["perplexity"]
