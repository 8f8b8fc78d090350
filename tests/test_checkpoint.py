"""The checkpoint of a streamed run (--offload disk) holds together or is refused: a kill
between any two writes of a block step, then --resume, gives the bits of a run never
interrupted; an edited or damaged state is one error line, never a traceback or a wrong model."""
import json
import signal
import subprocess
import sys

import pytest

from zpruner.checkpoint import WorkDir
from zpruner.cli import main

from test_offload import _kill_after, assert_same_weights, quick

KILL_AT_REPLACE = """
import os, signal, sys
count = [0]
original = os.replace
def replace(src, dst, *a, **k):
    original(src, dst, *a, **k)
    if "zpruner-work" in str(dst):
        count[0] += 1
        if count[0] == {k}:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from zpruner.cli import main
sys.exit(main({args!r}))
"""


def test_a_kill_between_any_two_writes_then_resume_gives_the_same_bits(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                       capsys):
    """SIGKILL right after each rename into the work folder (shard, activations, state), in
    turn, until a run gets through; each killed run resumed gives the uninterrupted bits."""
    model_dir = tiny_model_dir("llama")
    full = tmp_path / "full"
    assert main(quick(model_dir, tiny_data_dir, "--offload", "disk", "--no-eval", "--save", str(full))) == 0
    kills = 0
    for k in range(1, 20):
        save = tmp_path / f"killed{k}"
        args = quick(model_dir, tiny_data_dir, "--offload", "disk", "--no-eval", "--save", str(save))
        proc = subprocess.run([sys.executable, "-c", KILL_AT_REPLACE.format(k=k, args=args)], capture_output=True,
                              text=True, timeout=600)
        if proc.returncode == 0:  # fewer renames than k: every gap has been tried
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        kills += 1
        assert not save.exists()
        capsys.readouterr()
        code = main(args + ["--resume"])
        if code == 2:  # refused in one line (killed before the work folder existed); the plain rerun works
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and "no unfinished run to resume" in err, err
            assert main(args) == 0
        else:
            assert code == 0, f"resume after the kill at rename {k}"
        assert_same_weights(full, save)
        assert not (tmp_path / f"killed{k}.zpruner-work").exists()
    # two blocks: the state, then per block its shard, the next block's activations (not
    # after the last) and the state
    assert kills >= 6


@pytest.fixture
def stopped(monkeypatch, tmp_path, tiny_model_dir, tiny_data_dir):
    """A run stopped after block 0 of 2: (its arguments, its work folder)."""
    args = quick(tiny_model_dir("llama"), tiny_data_dir, "--offload", "disk", "--no-eval", "--save",
                 str(tmp_path / "m"))
    with monkeypatch.context() as m:
        m.setattr(WorkDir, "block_done", _kill_after(0, KeyboardInterrupt))
        assert main(args) == 130
    return args, tmp_path / "m.zpruner-work"


def _edit_state(work, change) -> None:
    path = work / "state" / "state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def _set(key, value):
    def change(state):
        state[key] = value
    return change


EDITS = {
    "done -1": (_set("done", -1), "blocks done -1: not a whole number from 0 to 2"),
    "done 2": (_set("done", 2), "lists block 1 as finished, but its shard model-block-00001.safetensors is missing"),
    "done 8": (_set("done", 8), "blocks done 8: not a whole number from 0 to 2"),
    "done 100": (_set("done", 100), "blocks done 100: not a whole number from 0 to 2"),
    'done "x"': (_set("done", "x"), "blocks done 'x': not a whole number"),
    "done []": (_set("done", []), "blocks done []: not a whole number"),
    "done true": (_set("done", True), "blocks done True: not a whole number"),
    "no key": (lambda s: s.pop("key"), "lacks the run's key or options"),
    "blocks 3": (_set("blocks", 3), "was made for 3 blocks and this model has 2"),
    "not an object": (None, "is not a JSON object"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_state_is_refused_in_one_line(stopped, capsys, edit):
    args, work = stopped
    change, message = EDITS[edit]
    if change is None:
        (work / "state" / "state.json").write_text("[1, 2]")
    else:
        _edit_state(work, change)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and not (work.parent / "m").exists()


def test_activations_of_another_block_are_refused(stopped, capsys):
    """The next block's inputs renamed under the name of the block being resumed."""
    args, work = stopped
    state = work / "state"
    (state / "activations-00001.safetensors").rename(state / "activations-00002.safetensors")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "lacks the activations that enter block 1" in err and len(err.strip().splitlines()) == 1


def test_a_shard_of_another_run_is_refused(stopped, tmp_path, tiny_model_dir, tiny_data_dir, capsys, monkeypatch):
    args, work = stopped
    other = quick(tiny_model_dir("llama"), tiny_data_dir, "--offload", "disk", "--no-eval", "--sparsity", "0.6",
                  "--save", str(tmp_path / "o"))
    with monkeypatch.context() as m:
        m.setattr(WorkDir, "block_done", _kill_after(0, KeyboardInterrupt))
        assert main(other) == 130
    (tmp_path / "o.zpruner-work" / "model-block-00000.safetensors").replace(work / "model-block-00000.safetensors")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another run or block" in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_with_no_finished_block_does_not_block_a_rerun(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                    monkeypatch):
    args = quick(tiny_model_dir("llama"), tiny_data_dir, "--offload", "disk", "--no-eval", "--save",
                 str(tmp_path / "m"))
    with monkeypatch.context() as m:
        m.setattr(WorkDir, "block_done", _kill_after(-1, KeyboardInterrupt))
        m.setattr("zpruner.pruning.prune_matrix", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert main(args) == 130
    assert json.loads((tmp_path / "m.zpruner-work" / "state" / "state.json").read_text())["done"] == 0
    assert main(args) == 0  # without --resume: nothing was finished, nothing is lost by starting over
    assert (tmp_path / "m" / "zpruner.json").is_file()


def test_a_users_empty_work_dir_stays(tmp_path, tiny_model_dir, tiny_data_dir):
    work = tmp_path / "mine"
    work.mkdir()
    assert main(quick(tiny_model_dir("llama"), tiny_data_dir, "--offload", "disk", "--no-eval", "--work-dir",
                      str(work), "--save", str(tmp_path / "m"))) == 0
    assert work.is_dir() and not any(work.iterdir())
