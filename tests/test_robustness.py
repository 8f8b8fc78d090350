"""Issue 32's cases that need more than a command line: negative seeds through the Python
API and grids, a full disk (ENOSPC simulated), SIGTERM during a save, disk space checked up
front, and the non-result lines of a results file."""
from __future__ import annotations

import pytest

from zpruner import PruneConfig
from zpruner.errors import ZprunerError
from zpruner.sweep import Grid


def test_negative_seeds_are_refused_everywhere():
    """random.Random(-1) draws what random.Random(1) draws: a negative seed is another's alias."""
    with pytest.raises(ZprunerError, match=r"seed \(--seed\) must be an integer >= 0, got -1"):
        PruneConfig(seed=-1)
    with pytest.raises(ZprunerError, match=r"seed \(--seed\) must be an integer >= 0, got -1"):
        Grid(seeds=[0, -1])
    assert PruneConfig(seed=0).seed == 0


def test_a_line_that_is_no_json_object_is_skipped_by_report_and_sweep_alike(tmp_path, caplog, monkeypatch):
    """`[]` (or 3, or "x") cannot be a result, like a line cut short by a kill: the report and
    the sweep both skip it with a notice and read the rest; before, the report refused the
    whole file where the sweep skipped the line."""
    import logging
    from pathlib import Path

    from zpruner.results import config_key, load_results
    from zpruner.sweep import read_done

    monkeypatch.setattr(logging.getLogger("zpruner"), "propagate", True)  # the CLI turns it off
    fixture = Path(__file__).parent / "data" / "report_results.jsonl"
    first = fixture.read_text().splitlines()[0]
    path = tmp_path / "results.jsonl"
    path.write_text(f"{first}\n[]\n3\n")
    with caplog.at_level("WARNING", logger="zpruner"):
        results = load_results([path]).results
        report_said = caplog.text
        caplog.clear()
        done = read_done(path)
        sweep_said = caplog.text
    assert len(results) == 1 and done == {config_key(results[0])}
    for said in (report_said, sweep_said):
        assert "line 2 is not a JSON object; skipped" in said and "line 3 is not a JSON object; skipped" in said


# ---------------------------------------------------------------- full disk, SIGTERM

def quick(model_dir, data_dir, *extra):
    """prune argv on a tiny model (which the fixture builds beforehand, printing its progress)."""
    return ["prune", "--model", str(model_dir), "--data-dir", str(data_dir), "--nsamples", "4", "--seqlen", "32",
            "--eval-seqlen", "32", "--eval-windows", "2", "--quiet", *extra]


def _enospc_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _enospc(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def _one_error_line(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def test_a_full_disk_at_an_in_memory_save_is_one_line(capsys, monkeypatch, tmp_path, tiny_model_dir, tiny_data_dir):
    import transformers.modeling_utils

    from zpruner.cli import main

    save = tmp_path / "m"
    argv = quick(tiny_model_dir("llama"), tiny_data_dir, "--no-eval", "--save", str(save))
    capsys.readouterr()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _enospc_safetensors)
    assert main(argv) == 2
    _one_error_line(capsys, f"could not write the model to {save}", "the disk is full")
    assert list(tmp_path.iterdir()) == []  # no model, no temporary


@pytest.mark.parametrize("where", ["shard", "activations", "state", "spilled activations"])
def test_a_full_disk_under_the_work_dir_is_one_line(where, capsys, monkeypatch, tmp_path, tiny_model_dir,
                                                    tiny_data_dir):
    import os

    import zpruner.checkpoint
    import zpruner.weights
    from zpruner.cli import main

    extra = []
    if where == "shard":
        monkeypatch.setattr(zpruner.weights, "save_file", _enospc_safetensors)
    elif where == "activations":
        monkeypatch.setattr(zpruner.checkpoint, "save_file", _enospc_safetensors)
    elif where == "state":
        original = zpruner.checkpoint.WorkDir._state_bytes

        def full_after_the_first(self, f):  # the first state (no block done) is written, the next is not
            if self.state["done"]:
                _enospc()
            original(self, f)

        monkeypatch.setattr(zpruner.checkpoint.WorkDir, "_state_bytes", full_after_the_first)
    else:
        monkeypatch.setattr(os, "posix_fallocate", _enospc)
        extra = ["--activations", "disk"]
    work = tmp_path / "w"
    argv = quick(tiny_model_dir("llama"), tiny_data_dir, "--no-eval", "--offload", "disk", "--work-dir", str(work),
                 *extra)
    capsys.readouterr()
    assert main(argv) == 2
    _one_error_line(capsys, str(work), "No space left on device")


def test_sigterm_during_a_save_leaves_no_temporary_folder(capsys, monkeypatch, tmp_path, tiny_model_dir,
                                                          tiny_data_dir):
    import os
    import signal
    import time

    import zpruner.saving
    from zpruner.cli import main

    original = zpruner.saving.save_folder_atomic

    def terminated_while_writing(target, write, manifest, overwrite=False):
        def write_then_sigterm(folder):
            write(folder)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next instruction; this line is never left normally
            raise AssertionError("SIGTERM did not stop the save")
        return original(target, write_then_sigterm, manifest, overwrite)

    monkeypatch.setattr(zpruner.saving, "save_folder_atomic", terminated_while_writing)
    previous = signal.getsignal(signal.SIGTERM)
    save = tmp_path / "m"
    argv = quick(tiny_model_dir("llama"), tiny_data_dir, "--no-eval", "--save", str(save))
    capsys.readouterr()
    assert main(argv) == 128 + 15
    _one_error_line(capsys, "terminated (SIGTERM); finished outputs are kept, unfinished ones removed")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == previous  # main() gives the handler back


# ---------------------------------------------------------------- disk space, up front

def _free(space: int):
    import os
    import types

    real = os.statvfs

    def statvfs(path):
        return types.SimpleNamespace(f_bavail=space // 4096, f_frsize=4096, real=real(path))
    return statvfs


@pytest.mark.parametrize("offload, what", [("none", "--save"), ("disk", "the work folder")])
def test_too_little_disk_space_is_refused_before_pruning(offload, what, capsys, monkeypatch, tmp_path,
                                                         tiny_model_dir, tiny_data_dir):
    import os

    import zpruner.workspace
    from zpruner.cli import main

    argv = quick(tiny_model_dir("llama"), tiny_data_dir, "--offload", offload, "--save", str(tmp_path / "m"))
    capsys.readouterr()

    def never(*args, **kwargs):
        raise AssertionError("pruning started")

    monkeypatch.setattr(zpruner.workspace, "prune", never)
    monkeypatch.setattr(os, "statvfs", _free(1 << 20))
    assert main(argv) == 2
    line = _one_error_line(capsys, what, "about", "which has 1.0 MiB free; free space there")
    assert str(tmp_path) in line
    assert list(tmp_path.iterdir()) == []


def test_the_estimate_is_the_weights_in_the_save_dtype(tiny_model_dir, tmp_path):
    """A float32 model: about its safetensors' size; in bfloat16 about half; a streamed run
    that only masks links its shards into --save (the blocks counted once, in the work folder)."""
    import torch

    from zpruner import RunConfig
    from zpruner.config import ModelConfig
    from zpruner.models import load_model
    from zpruner.preflight import SPACE_RESERVE_BYTES, space_needed

    model, _ = load_model(ModelConfig(str(tiny_model_dir("llama")), device="cpu"))
    stored = (tiny_model_dir("llama") / "model.safetensors").stat().st_size
    config = RunConfig(prune=PruneConfig("magnitude"), save=str(tmp_path / "m"))
    [(what, _, f32)] = space_needed(config, model, torch.float32, torch.float32, None)
    [(_, _, bf16)] = space_needed(config, model, torch.float32, torch.bfloat16, None)
    assert what.startswith("--save") and stored <= f32 - SPACE_RESERVE_BYTES <= 1.1 * stored
    assert bf16 - SPACE_RESERVE_BYTES == pytest.approx((f32 - SPACE_RESERVE_BYTES) / 2, rel=0.01)
    (work, _, in_work), (_, _, in_save) = space_needed(config, model, torch.float32, torch.float32, tmp_path / "w")
    assert work.startswith("the work folder") and in_work + in_save - SPACE_RESERVE_BYTES <= 1.06 * stored
