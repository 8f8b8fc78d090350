"""The work folder of a pruning run streamed block by block (``--offload disk|cpu``).

It holds the pruned blocks as safetensors shards, one per block, written as each block is
finished, and in ``state/`` the activations that enter the next block plus ``state.json``
(the run's key, its options, the number of blocks done).

A block step writes, in this order: the block's shard, the next block's input activations
(``state/activations-<i+1>``), then ``state.json``, the single commit point; then the
activations of the block just done are removed. Each file goes in under a temporary name
and one rename, and every shard and activations file carries the run key and its block
index in its safetensors metadata (the shard also its layers' report). A run killed
between any two of those writes therefore leaves either the old commit with everything it
needs, or the new one: ``--resume`` reads ``state.json``, checks that every file it names
is there and belongs to this run and block, redoes the block in progress, and gives the
bits of a run never interrupted (the activations are stored exactly and every step is
deterministic given them). A checkpoint that does not hold together (an edited or damaged
``state.json``, a missing or foreign file) is refused in one line, never resumed.

At the end the shards become the saved model's (zpruner.saving: hard-linked when the folder
is on the same file system as ``--save`` and they are in the save dtype), and the work
folder is removed: the whole of it when zpruner created it, only zpruner's files when the
user had made it (empty) beforehand.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import ZprunerError
from .io import dumps_json, write_atomic
from .layers import Count, sparsity_summary
from .temporaries import discard_temporary, empty_folder, make_temporary, remove_stale_temporaries, unmark
from .weights import exactly_in, write_shard

log = logging.getLogger(__name__)

STATE = "state"
STATE_FILE = "state.json"
LOCK = ".zpruner-lock"
# the layout of a work folder: a checkpoint of another layout is refused, never misread
FORMAT = 2
REPORT_PARTS = ("layer_time_s", "reallocated", "sparsity", "experts", "counts", "selection")
OPTIONAL_PARTS = ("selection",)  # absent from the shards of runs without it (and of older versions)


def block_file(i: int) -> str:
    return f"model-block-{i:05d}.safetensors"


def activations_file(i: int) -> str:
    """The inputs of block ``i``."""
    return f"activations-{i:05d}.safetensors"


def default_work_dir(save: str | None, output_json: str | None, model: str) -> Path:
    """Beside ``--save`` (so the shards move into it by a rename), else in the temp folder
    under a name from the model and the results file, so the same command finds it again."""
    if save:
        target = Path(save).expanduser().resolve()
        return target.with_name(target.name + ".zpruner-work")
    tag = hashlib.sha256(f"{model}\0{output_json or ''}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"zpruner-work-{tag}"


def _temp_prefix(work: Path) -> str:
    """The name of a work folder being created (hidden: it is no checkpoint yet)."""
    return f".{work.name}.tmp-"


def _metadata(path: Path) -> dict[str, str] | None:
    """A safetensors file's metadata, or None when the file is missing or not whole."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return None


class WorkDir:
    """One streamed run's checkpoint folder; ``key`` names the run's options (``run_key``);
    ``carries_activations``: whether the run passes activations from block to block (every
    method that reads calibration data), so that a resumable state must hold them.
    ``save_dtype``: the dtype the model will be saved in; a pruned tensor that it holds
    exactly is stored in it (a bfloat16 model only masked on the CPU: half the float32 size,
    and the shard is the saved model's as it is), any other in the compute dtype, so that
    reading a shard back always gives the very values the run computed with."""

    def __init__(self, path: Path, key: str, options: dict, resume: bool, nblocks: int,
                 carries_activations: bool = True, save_dtype: torch.dtype | None = None):
        self.path, self.key, self.nblocks, self.save_dtype = path, key, nblocks, save_dtype
        state_file = path / STATE / STATE_FILE
        if path.exists() and not path.is_dir():
            raise ZprunerError(f"the work folder {path} is a file; give a folder as --work-dir")
        # a work folder killed while being created holds an empty state: nothing worth a notice
        remove_stale_temporaries(path, _temp_prefix(path), logging.DEBUG)
        self._lock = self._take_lock() if path.is_dir() else None
        if state_file.is_file():
            state = self._read_state(state_file, options)
            if state["done"] == 0:
                # nothing finished: starting over loses nothing, whatever the options were
                log.info("the work folder %s holds no finished block; starting over", path)
                self._clear()
                self._start(options, state.get("created", True))
            elif not resume:
                raise ZprunerError(f"{path} holds an unfinished run ({state['done']} of {state['blocks']} blocks "
                                   "pruned); add --resume to continue it, or delete that folder to start over")
            else:
                self.state = state
                self._check_files()
                if carries_activations:
                    self.check_activations()
                self._remove_stale()
        else:
            if resume:
                raise ZprunerError(f"--resume: there is no unfinished run to resume in {path}")
            if path.exists() and any(p.name != LOCK for p in path.iterdir()):
                raise ZprunerError(f"the work folder {path} exists and is not a zpruner checkpoint; move it away "
                                   "or give another --work-dir")
            self._start(options, created=not path.exists())

    # ------------------------------------------------------------ opening

    def _take_lock(self):
        """An exclusive lock on the folder for this process's life: two runs writing one
        checkpoint would each resume into the other's blocks."""
        try:
            handle = open(self.path / LOCK, "a+b")  # noqa: SIM115 (held until the process ends)
        except OSError as exc:
            raise ZprunerError(f"cannot write in the work folder {self.path} ({exc.strerror}); "
                               "give a writable --work-dir") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ZprunerError(f"another zpruner run is using the work folder {self.path}; wait for it to end "
                               "or give another --work-dir") from None
        return handle

    @property
    def created(self) -> bool:
        """Whether zpruner made the folder (else the user made it, empty, and it stays)."""
        return self.state.get("created", True)

    def _start(self, options: dict, created: bool) -> None:
        """A new checkpoint with nothing done, made whole before it appears under its name."""
        self.state = {"format": FORMAT, "key": self.key, "options": options, "blocks": self.nblocks, "done": 0,
                      "created": created}
        if self.path.is_dir():  # the user's empty folder, or a cleared one
            (self.path / STATE).mkdir(exist_ok=True)
            self._write_state()
            return
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = make_temporary(parent, _temp_prefix(self.path))
        except OSError as exc:
            raise ZprunerError(f"cannot create the work folder {self.path} ({exc.strerror}); give a writable "
                               "--work-dir") from None
        try:
            (tmp / STATE).mkdir()
            write_atomic(tmp / STATE / STATE_FILE, self._state_bytes)
            os.rename(tmp, self.path)
        except BaseException:
            discard_temporary(tmp)
            raise
        unmark(self.path)
        self._lock = self._take_lock()

    def _refuse(self, why: str) -> ZprunerError:
        return ZprunerError(f"the checkpoint in {self.path} {why}; delete that folder to start over")

    def _read_state(self, state_file: Path, options: dict) -> dict:
        """``state.json`` checked field by field: a damaged or edited state is an error, never
        a traceback or a resume from the wrong place."""
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise self._refuse(f"is unreadable ({STATE}/{STATE_FILE}: {exc})") from None
        if not isinstance(state, dict):
            raise self._refuse(f"is damaged ({STATE}/{STATE_FILE} is not a JSON object)")
        if state.get("format") != FORMAT:
            raise self._refuse("was written by another version of zpruner")
        key, blocks, done = state.get("key"), state.get("blocks"), state.get("done")
        if not isinstance(key, str) or not isinstance(state.get("options"), dict):
            raise self._refuse(f"is damaged ({STATE}/{STATE_FILE} lacks the run's key or options)")
        if key != self.key:
            raise ZprunerError(f"--resume: the unfinished run in {self.path} had other options "
                               f"({_differences(state['options'], options)}); resume it with its own options, "
                               "or delete that folder to start over")
        if isinstance(blocks, bool) or blocks != self.nblocks:
            raise self._refuse(f"was made for {blocks!r} blocks and this model has {self.nblocks}")
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= blocks:
            raise self._refuse(f"is damaged (blocks done {done!r}: not a whole number from 0 to {blocks})")
        if not isinstance(state.get("created", True), bool):
            raise self._refuse(f"is damaged (created is {state['created']!r}, not true or false)")
        allocation = state.get("block_sparsity")
        # [] for a uniform allocation, else a fraction per block
        if allocation is not None and not (isinstance(allocation, list) and len(allocation) in (0, blocks) and all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1 for s in allocation)):
            raise self._refuse(f"is damaged (block_sparsity is not {blocks} fractions)")
        return state

    def _check_files(self) -> None:
        """Every file the state names is there, whole, and this run's: the shards of the
        blocks done (their reports read now) and the activations entering the next block."""
        self._reports: dict[str, dict] = {part: {} for part in REPORT_PARTS}
        for i in range(self.done):
            meta = _metadata(self.path / block_file(i))
            if meta is None:
                raise self._refuse(f"lists block {i} as finished, but its shard {block_file(i)} is missing or "
                                   "cut short")
            if meta.get("zpruner_key") != self.key or meta.get("zpruner_block") != str(i):
                raise self._refuse(f"holds a shard {block_file(i)} that belongs to another run or block")
            try:
                report = json.loads(meta["zpruner_report"])
                for part in REPORT_PARTS:
                    self._reports[part].update(report.get(part, {}) if part in OPTIONAL_PARTS else report[part])
            except (KeyError, ValueError, TypeError, AttributeError):
                raise self._refuse(f"holds a shard {block_file(i)} without its report") from None

    def check_activations(self) -> None:
        """The inputs of block ``done`` are there and are this run's (runs that carry
        activations; data-free methods have none)."""
        if self.done == 0 or self.done == self.nblocks:
            return
        meta = _metadata(self.path / STATE / activations_file(self.done))
        if meta is None:
            raise self._refuse(f"lacks the activations that enter block {self.done} "
                               f"({STATE}/{activations_file(self.done)} is missing or cut short)")
        if meta.get("zpruner_key") != self.key or meta.get("zpruner_block") != str(self.done):
            raise self._refuse(f"holds activations ({STATE}/{activations_file(self.done)}) of another run or block")

    def _remove_stale(self) -> None:
        """What a killed step left beside the commit: other blocks' activations, temporaries."""
        keep = activations_file(self.done)
        for entry in (self.path / STATE).iterdir():
            if entry.name != STATE_FILE and entry.name != keep and entry.is_file():
                entry.unlink(missing_ok=True)
        for entry in self.path.iterdir():
            if entry.is_file() and entry.name.startswith(".model-block-") and ".tmp-" in entry.name:
                entry.unlink(missing_ok=True)

    # ------------------------------------------------------------ the run

    @property
    def done(self) -> int:
        return self.state["done"]

    def reports(self) -> dict[str, dict]:
        """The per-layer report of the blocks already done (``layer_time_s``, ``reallocated``,
        ``sparsity``), as their shards carry it."""
        return getattr(self, "_reports", {part: {} for part in REPORT_PARTS})

    def activations(self) -> list[torch.Tensor] | None:
        """The inputs of block ``done`` per calibration batch, or None (no block done yet)."""
        if self.done == 0:
            return None
        self.check_activations()
        path = self.path / STATE / activations_file(self.done)
        try:
            stored = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise self._refuse(f"holds damaged activations ({exc})") from None
        try:
            return [stored[f"batch{j}"] for j in range(len(stored))]
        except KeyError:
            raise self._refuse(f"holds damaged activations ({STATE}/{activations_file(self.done)})") from None

    def block_done(self, i: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                   hidden: list[torch.Tensor] | None, report: dict) -> None:
        """Record block ``i`` as finished: its pruned tensors, the next block's inputs and the
        report of its layers (``layer_time_s``, ``reallocated``, ``sparsity``)."""
        tag = {"zpruner_key": self.key, "zpruner_block": str(i)}
        stored = {name: exactly_in(t.to(dtype) if t.is_floating_point() else t, self.save_dtype or dtype)
                  for name, t in tensors.items()}
        write_shard(self.path, block_file(i), stored, None, {**tag, "zpruner_report": dumps_json(report)})
        if hidden is not None and i + 1 < self.nblocks:
            name = activations_file(i + 1)
            tmp = self.path / STATE / f".{name}.tmp-{os.getpid()}"
            try:
                save_file({f"batch{j}": h.detach().contiguous().cpu() for j, h in enumerate(hidden)}, str(tmp),
                          metadata={"zpruner_key": self.key, "zpruner_block": str(i + 1)})
                os.replace(tmp, self.path / STATE / name)
            except (SafetensorError, OSError) as exc:
                tmp.unlink(missing_ok=True)
                raise ZprunerError(f"could not write {self.path / STATE / name} ({exc}); free space there or give "
                                   "another --work-dir, then add --resume") from None
        self.state["done"] = i + 1
        self._write_state()
        (self.path / STATE / activations_file(i)).unlink(missing_ok=True)
        for part in REPORT_PARTS:
            self.reports()[part].update(report.get(part, {}))

    def remember(self, name: str, value) -> None:
        """Keep a fact of the run that a resumed run must reuse (e.g. the per-block
        sparsities of an allocation, measured on the dense model before block 0)."""
        self.state[name] = value
        self._write_state()

    def _state_bytes(self, f) -> None:
        f.write(dumps_json(self.state, indent=1).encode())

    def _write_state(self) -> None:
        try:
            write_atomic(self.path / STATE / STATE_FILE, self._state_bytes)
        except OSError as exc:
            raise ZprunerError(f"could not write the checkpoint in {self.path} ({exc.strerror}); free space there "
                               "or give another --work-dir, then add --resume") from None

    def shards(self) -> list[Path]:
        return [self.path / block_file(i) for i in range(self.nblocks)]

    def _clear(self) -> None:
        """Everything zpruner wrote in the folder, the folder itself kept."""
        empty_folder(self.path, keep=LOCK)

    def remove(self) -> None:
        """The work folder once the run is saved: all of it when zpruner made it, else its
        contents (the user's own empty folder stays)."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self._clear()
            (self.path / LOCK).unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _differences(before: dict, now: dict) -> str:
    keys = sorted(set(before) | set(now))
    changed = [f"{k}: {json.dumps(before.get(k))} then, {json.dumps(now.get(k))} now" for k in keys
               if before.get(k) != now.get(k)]
    return "; ".join(changed) or "another key"


def checkpoint_options(config) -> dict:
    """What a resumed run must share with the run it continues (all that its run key covers),
    as JSON values, for telling the user which option differs."""
    options = {"model": config.model.name, "dtype": config.model.dtype, **config.prune.identity(),
               "calib_batch_size": config.prune.calib_batch_size}
    return json.loads(dumps_json(options))


def sparsity_of(per_matrix: dict[str, float], counts: dict[str, dict]) -> dict:
    """``layers.measure_sparsity``'s numbers from what was counted while each block was
    resident (a streamed model's weights are not in memory at the end): the fraction of
    zeros per matrix and, per block, the zeros and totals of its pruned matrices and of all
    its weights, and what it left alone."""
    pruned, everything, alone = Count(), Count(), {}
    for block in counts.values():
        for total, (zeros, size) in ((pruned, block["pruned"]), (everything, block["all"])):
            total.zeros += zeros
            total.total += size
        alone.update(block["left_alone"])
    return sparsity_summary(per_matrix, pruned, everything, alone)
