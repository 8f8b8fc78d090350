"""Outputs: --save never destroys a user's files and survives SIGKILL; results JSON is strict;
permissions follow the umask; a damaged cache is rebuilt; bars are throttled in logs."""
from __future__ import annotations

import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers

from zpruner.cli import main
from zpruner.errors import ZprunerError
from zpruner.io import MANIFEST, check_model_target, save_folder_atomic, write_json_atomic
from zpruner.progress import LOG_INTERVAL_S, bar
from zpruner.results import replace_non_finite
from zpruner.temporaries import remove_stale_temporaries


def quick(model_dir, data_dir, *extra):
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--nsamples", "4", "--seqlen", "32",
            "--eval-seqlen", "32", "--eval-windows", "2", "--quiet", *extra]


def _write_marker(text: str):
    return lambda folder: (folder / "weights.txt").write_text(text)


# ---------------------------------------------------------------- zpruner.io on its own

def test_save_into_new_empty_and_previous_folders(tmp_path):
    new = tmp_path / "new"
    save_folder_atomic(new, _write_marker("one"), {"v": 1})
    assert (new / "weights.txt").read_text() == "one" and json.loads((new / MANIFEST).read_text()) == {"v": 1}

    empty = tmp_path / "empty"
    empty.mkdir()
    save_folder_atomic(empty, _write_marker("two"), {"v": 2})
    assert (empty / "weights.txt").read_text() == "two"

    with pytest.raises(ZprunerError, match="add --overwrite"):
        save_folder_atomic(new, _write_marker("three"), {"v": 3})
    assert (new / "weights.txt").read_text() == "one"  # untouched without overwrite
    save_folder_atomic(new, _write_marker("three"), {"v": 3}, overwrite=True)
    assert (new / "weights.txt").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # nothing left beside them


def test_foreign_folder_is_never_replaced_even_with_overwrite(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(ZprunerError, match="zpruner never replaces it"):
            save_folder_atomic(precious, _write_marker("model"), {}, overwrite=overwrite)
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


# KeyboardInterrupt: Ctrl-C; the disk's errors become one line naming the target
@pytest.mark.parametrize("failure, raised", [(OSError(errno.ENOSPC, "No space left on device"), ZprunerError),
                                             (KeyboardInterrupt(), KeyboardInterrupt)])
def test_a_failing_write_leaves_nothing_and_keeps_the_previous_model(tmp_path, failure, raised):
    target = tmp_path / "m"
    save_folder_atomic(target, _write_marker("old"), {})

    def broken(folder):
        (folder / "half").write_text("partial")
        raise failure

    with pytest.raises(raised):
        save_folder_atomic(target, broken, {}, overwrite=True)
    assert (target / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def _temporary(parent: Path, name: str, pid: int, token: str, marker_token: str | None = None) -> Path:
    """A folder as zpruner names and marks its temporaries (``marker_token``: a marker that
    does not match the name)."""
    folder = parent / f"{name}{pid}-{token}"
    folder.mkdir()
    (folder / ".zpruner-partial").write_text(json.dumps({"pid": pid, "token": marker_token or token}))
    (folder / "model.safetensors").write_text("half a model")
    return folder


def test_stale_temporaries_of_dead_runs_only_are_removed(tmp_path):
    target, dead = tmp_path / "m", _dead_pid()
    stale = _temporary(tmp_path, "m.tmp-", dead, "abc")
    live = _temporary(tmp_path, "m.tmp-", os.getpid(), "def")
    forged = _temporary(tmp_path, "m.tmp-", dead, "ghi", marker_token="other")  # a marker of another name
    foreign = tmp_path / f"m.tmp-{dead}-user"  # the user's own folder of a similar name
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert remove_stale_temporaries(target) == [stale]
    assert not stale.exists() and live.exists() and forged.exists() and (foreign / "notes.txt").exists()


def test_a_users_backup_named_like_a_temporary_survives_overwrite(tmp_path, capsys, tiny_model_dir, tiny_data_dir):
    """Issue 32: a complete model the user saved as X.tmp-20240101-backup (a zpruner output,
    with zpruner.json and an old-style empty marker) beside --save X --overwrite."""
    out, backup = tmp_path / "X", tmp_path / "X.tmp-20240101-backup"
    base = ["prune", *quick(tiny_model_dir("llama"), tiny_data_dir), "--no-eval", "--save"]
    assert main([*base, str(backup)]) == 0
    (backup / ".zpruner-partial").touch()
    before = {p.name: p.read_bytes() for p in backup.iterdir()}
    assert main([*base, str(out)]) == 0
    assert main([*base, str(out), "--overwrite", "--sparsity", "0.3"]) == 0
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "X.tmp-20240101-backup"]


def test_a_killed_work_folder_creation_is_removed_when_a_run_starts(tmp_path, tiny_model_dir, tiny_data_dir):
    work, dead = tmp_path / "w", _dead_pid()
    stale = _temporary(tmp_path, ".w.tmp-", dead, "abc")
    users = tmp_path / f".w.tmp-{dead}-mine"
    users.mkdir()
    argv = ["prune", *quick(tiny_model_dir("llama"), tiny_data_dir), "--no-eval", "--offload", "disk",
            "--work-dir", str(work)]
    assert main(argv) == 0
    assert not stale.exists() and users.exists() and not work.exists()


def test_a_killed_cache_conversion_is_removed_before_the_next(tmp_path):
    from zpruner.io import create_folder_atomic

    target, dead = tmp_path / "cache" / "model-1234", _dead_pid()
    target.parent.mkdir()
    stale = _temporary(target.parent, "model-1234.tmp-", dead, "abc")
    create_folder_atomic(target, _write_marker("converted"), lambda existing: False)
    assert not stale.exists()
    assert sorted(p.name for p in target.iterdir()) == ["weights.txt"]  # the marker went with the temporary name


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        save_folder_atomic(tmp_path / "m", _write_marker("x"), {})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


def test_empty_and_dot_targets_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ZprunerError, match="is empty"):
        check_model_target("", overwrite=True)
    with pytest.raises(ZprunerError, match="never replaces it"):
        check_model_target(".", overwrite=True)
    assert (tmp_path / "keep.txt").exists()


# ---------------------------------------------------------------- results JSON

def test_non_finite_numbers_become_null_with_where_they_were():
    results = {"perplexity": {"wikitext2": math.inf}, "perplexity_protocol": {"value": math.nan, "windows": 2},
               "zero_shot": {"boolq": {"acc": 0.5, "acc_stderr": math.nan}}, "sparsity": {"overall": 0.5}}
    found = replace_non_finite(results)
    assert results["perplexity"]["wikitext2"] is None and results["perplexity_protocol"]["value"] is None
    assert results["zero_shot"]["boolq"] == {"acc": 0.5, "acc_stderr": None}
    assert found == results["non_finite"] == ["perplexity.wikitext2 = inf", "perplexity_protocol.value = nan",
                                              "zero_shot.boolq.acc_stderr = nan"]
    json.loads(json.dumps(results, allow_nan=False))


def test_a_nan_never_reaches_a_results_file(tmp_path):
    with pytest.raises(ZprunerError, match="non-finite"):
        write_json_atomic(tmp_path / "r.json", {"value": math.nan})
    assert list(tmp_path.iterdir()) == []


def test_diverged_perplexity_is_reported_as_not_finite(capsys, tmp_path, tiny_model_dir, tiny_data_dir,
                                                       monkeypatch):
    import zpruner.runner
    from zpruner.evaluate import Perplexity

    def infinite(*args, **kwargs):
        return Perplexity(math.inf, 2, 32, 62)

    monkeypatch.setattr(zpruner.runner, "perplexity", infinite)
    out = tmp_path / "r.json"
    assert main(["prune", *quick(tiny_model_dir("llama"), tiny_data_dir), "--output-json", str(out)]) == 0
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())  # strict: a bare NaN/Infinity token would not parse here
    assert results["perplexity_protocol"]["value"] is None
    assert "perplexity_protocol.value = inf" in results["non_finite"]
    assert "not finite" in stdout


# ---------------------------------------------------------------- the CLI's --save, SIGKILLed

# Runs `zpruner prune` with one step of the save slowed down, so the test can kill it there:
# 'write' pauses once the new folder is complete but not yet in place, 'exchange' once the
# folders are swapped but the previous model not yet removed.
DRIVER = """
import sys, time
from pathlib import Path
import zpruner.io as zio
from zpruner.cli import main

flag, where, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
if where == "write":
    original_save = zio.save_folder_atomic

    def slow_save(target, write, manifest, overwrite=False):
        def slow_write(folder):
            write(folder)
            flag.write_text("paused")
            time.sleep(120)
        return original_save(target, slow_write, manifest, overwrite)

    import zpruner.saving
    zpruner.saving.save_folder_atomic = slow_save
else:
    original_exchange = zio._exchange

    def slow_exchange(a, b):
        done = original_exchange(a, b)
        flag.write_text("paused")
        time.sleep(120)
        return done

    zio._exchange = slow_exchange
sys.exit(main(argv))
"""


def _kill_during_save(tmp_path: Path, where: str, argv: list[str]) -> None:
    flag = tmp_path / "paused.flag"
    flag.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(flag), where, *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not flag.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its save ({proc.returncode}): {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run never reached its save")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _sparsity_of(folder: Path) -> float:
    return json.loads((folder / MANIFEST).read_text())["config"]["prune"]["sparsity"]


@pytest.mark.parametrize("where", ["write", "exchange"])
def test_sigkill_during_save_keeps_a_complete_model_and_the_next_run_cleans_up(tmp_path, tiny_model_dir,
                                                                               tiny_data_dir, where, capsys):
    out = tmp_path / "work" / "OUT"
    out.parent.mkdir()
    base = ["prune", *quick(tiny_model_dir("llama"), tiny_data_dir), "--no-eval", "--save", str(out)]

    # a kill while a first save is under way: OUT is absent
    _kill_during_save(tmp_path, "write", [*base, "--sparsity", "0.3"])
    assert not out.exists()
    assert main([*base, "--sparsity", "0.3"]) == 0  # the next run removes the killed run's folder
    assert [p.name for p in out.parent.iterdir()] == ["OUT"]
    assert _sparsity_of(out) == 0.3

    # a kill while replacing a previous model: OUT is a complete model at every moment
    _kill_during_save(tmp_path, where, [*base, "--sparsity", "0.6", "--overwrite"])
    expected = 0.3 if where == "write" else 0.6  # after the exchange the new model is already in place
    assert _sparsity_of(out) == expected
    transformers.AutoModelForCausalLM.from_pretrained(out)  # loads: complete, not half-written
    assert any(p.name.startswith("OUT.tmp-") for p in out.parent.iterdir())  # what the kill left
    assert main([*base, "--sparsity", "0.5", "--overwrite"]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["OUT"]  # no *.tmp-* left behind
    assert _sparsity_of(out) == 0.5


# ---------------------------------------------------------------- the GGUF cache

def test_damaged_cache_entry_is_detected_and_removed_with_a_notice(tmp_path, monkeypatch, caplog):
    import torch
    from safetensors.torch import save_file

    import zpruner.models as models

    monkeypatch.setenv("ZPRUNER_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    target = models.cache_dir() / "gguf" / f"tiny-{models._file_digest(gguf)}"
    target.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, target / "model.safetensors")
    (target / "config.json").write_text("{}")
    files = {p.name: p.stat().st_size for p in target.iterdir()}
    (target / models.SOURCE_RECORD).write_text(json.dumps({"gguf": str(gguf), "files": files}))
    assert models._cache_damage(target) is None
    assert models.convert_gguf(gguf) == target  # intact: used as it is

    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # cut short, as a full disk leaves it
    assert "wrong size" in models._cache_damage(target)
    monkeypatch.setattr(models.logging.getLogger("zpruner"), "propagate", True)
    caplog.set_level("WARNING")
    # the stand-in is no GGUF file, so the conversion that follows the notice stops at once
    with pytest.raises(ZprunerError, match="not a readable GGUF model"):
        models.convert_gguf(gguf)
    assert "is damaged" in caplog.text and "converting again" in caplog.text
    assert not target.exists()


# ---------------------------------------------------------------- progress in logs

def test_bars_are_throttled_when_stderr_is_not_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def lines_written(stream) -> int:
        for _ in bar(range(40), file=stream, desc="x"):
            time.sleep(0.01)  # 0.4 s in all: a terminal bar redraws several times
        return stream.getvalue().count("\r")

    assert lines_written(io.StringIO()) == 2  # a log gets the start and the end only
    assert lines_written(Terminal()) > 2
    assert bar(range(3), file=io.StringIO()).mininterval == LOG_INTERVAL_S
