"""zpruner sweep --executor ray: the same results file as --executor local, resumable, with
failing runs and dying workers reported. One local Ray instance (2 CPUs) serves the module."""
import json
import os
import sys
from pathlib import Path

import pytest

from zpruner.cli import main
from zpruner.errors import ZprunerError
from zpruner.executors import RayExecutor, SweepWorker
from zpruner.sweep import Grid, plan, run_sweep

from test_sweep import lines, sweep_args


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no reporting attempts from test machines
        # The smallest object store Ray accepts: the results passed back are a few kB.
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
        yield ray
        ray.shutdown()


def by_key(path):
    return {entry["run_key"]: entry for entry in lines(path)}


def measured(entry):
    """What a run measured and of what; not how long it took."""
    return {k: entry.get(k) for k in ("run_key", "config", "perplexity", "perplexity_protocol", "sparsity",
                                  "calibration_sha256_16")}


def test_ray_sweep_gives_the_local_results_and_resumes(capsys, tmp_path, ray_instance, tiny_model_dir,
                                                       tiny_data_dir):
    model_dir = tiny_model_dir("llama")
    grid = ("--methods", "wanda,magnitude", "--patterns", "unstructured,2:4", "--no-dense")
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main(sweep_args(model_dir, tiny_data_dir, local, *grid)) == 0
    capsys.readouterr()
    argv = sweep_args(model_dir, tiny_data_dir, remote, *grid, "--executor", "ray")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ran 4," in out
    first = by_key(remote)
    assert len(first) == 4
    # one progress line per finished run, naming its key
    assert all(sum(f"] {key} " in line for line in out.splitlines()) == 1 for key in first)
    # the same configurations, keys and numbers, whichever executor ran them
    assert {key: measured(entry) for key, entry in first.items()} == {
        key: measured(entry) for key, entry in by_key(local).items()}

    text = remote.read_text()
    assert main(argv) == 0  # nothing left to run
    assert "ran 0, skipped 4 already in" in capsys.readouterr().out
    assert remote.read_text() == text

    # Delete one line: exactly that configuration runs again, with the same numbers.
    gone = sorted(first)[1]
    remote.write_text("".join(line + "\n" for line in text.splitlines() if json.loads(line)["run_key"] != gone))
    assert main(argv) == 0
    assert "ran 1," in capsys.readouterr().out
    after = lines(remote)
    assert len(after) == 4 and after[-1]["run_key"] == gone
    assert measured(after[-1]) == measured(first[gone])


def test_ray_sweep_reports_a_failing_run_and_completes_the_others(capsys, tmp_path, ray_instance, tiny_model_dir,
                                                                  tiny_data_dir):
    results = tmp_path / "r.jsonl"
    # 2:5 cannot split the tiny model's 64 input channels: those runs raise in their worker.
    argv = sweep_args(tiny_model_dir("llama"), tiny_data_dir, results, "--methods", "magnitude,wanda",
                      "--patterns", "2:5,unstructured,2:4", "--executor", "ray")
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "ran 5, skipped 0 already in" in captured.out and "failed 2" in captured.out
    failures = [line for line in captured.err.splitlines() if "failed:" in line]
    assert len(failures) == 2 and all("2:5" in line and "64" in line for line in failures)
    entries = lines(results)
    assert len(entries) == 5  # the dense model and the four runs that can happen
    assert "2:5" not in {e["config"]["prune"]["pattern"] for e in entries if e["config"]["prune"]}


def dying_worker(marker_dir: Path):
    """A SweepWorker whose process dies: on its first 'unstructured' run (then that run
    succeeds on the replacement), and on every 2:4 run. Defined in a function so that Ray
    ships the class itself to the workers, which cannot import this test module."""

    class DyingWorker(SweepWorker):
        def run(self, config):
            marker = marker_dir / "died-once"
            if config.prune.pattern == "2:4" or not marker.exists():
                marker.touch()
                os._exit(1)
            return super().run(config)

    return DyingWorker


def test_a_dead_worker_is_replaced_and_its_run_retried_once(tmp_path, ray_instance, tiny_model_dir, tiny_data_dir):
    grid = Grid(models=[str(tiny_model_dir("llama"))], methods=["magnitude"], patterns=["unstructured", "2:4"],
                settings={"seqlen": 32, "eval_seqlen": 32, "eval_windows": 4, "dense": False})
    configs = plan(grid, str(tiny_data_dir)).configs
    results, echoed = tmp_path / "r.jsonl", []
    executor = RayExecutor(worker=dying_worker(tmp_path))
    summary = run_sweep(configs, results, progress=False, echo=echoed.append, executor=executor)
    assert len(summary.ran) == 1 and "magnitude 50%" in summary.ran[0]
    [failure] = summary.failed
    assert "2:4" in failure and "died twice" in failure
    assert [e["config"]["prune"]["pattern"] for e in lines(results)] == ["unstructured"]


def test_ray_executor_without_ray_is_one_clear_error(capsys, monkeypatch, tmp_path, tiny_model_dir, tiny_data_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as when it is not installed
    results = tmp_path / "r.jsonl"
    assert main(sweep_args(tiny_model_dir("llama"), tiny_data_dir, results, "--executor", "ray")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install 'zpruner[ray]'" in err
    assert not results.exists()


def test_ray_options_without_the_ray_executor_are_refused(capsys, tmp_path):
    assert main(["sweep", "--results", str(tmp_path / "r.jsonl"), "--ray-address", "auto", "--dry-run"]) == 2
    assert "--ray-address: options of --executor ray" in capsys.readouterr().err


def test_a_run_the_cluster_cannot_hold_is_refused_before_waiting(capsys, tmp_path, ray_instance, tiny_model_dir,
                                                                 tiny_data_dir):
    results = tmp_path / "r.jsonl"
    # The module's Ray instance has 2 CPUs and no GPU: Ray itself would queue such a worker forever.
    argv = sweep_args(tiny_model_dir("llama"), tiny_data_dir, results, "--executor", "ray", "--gpus-per-run", "1")
    assert main(argv) == 2
    assert "cannot hold a run of 1 CPUs and 1 GPUs" in capsys.readouterr().err
    assert not results.exists()


def test_a_worker_that_cannot_start_stops_the_sweep_with_the_reason(tmp_path, ray_instance, tiny_model_dir,
                                                                    tiny_data_dir):
    class UnstartableWorker(SweepWorker):  # as on a node whose environment lacks zpruner
        def __init__(self, cwd, threads):
            raise ModuleNotFoundError("No module named 'zpruner'")

    model = str(tiny_model_dir("llama"))
    configs = plan(Grid(models=[model], methods=["magnitude"], settings={"eval_windows": 2, "dense": False}),
                   str(tiny_data_dir)).configs
    with pytest.raises(ZprunerError, match="could not start .*No module named 'zpruner'.*every node needs zpruner"):
        run_sweep(configs, tmp_path / "r.jsonl", progress=False, echo=lambda line: None,
                  executor=RayExecutor(worker=UnstartableWorker))
    assert not (tmp_path / "r.jsonl").exists()
