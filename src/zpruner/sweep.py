"""``zpruner sweep``: a grid of runs, one JSON line per finished run, resumable.

The grid is models x methods x updates x patterns x sparsities x calibration sizes x seeds,
from command-line lists and/or a TOML or YAML file. Each configuration has a key (a hash
of everything that changes its numbers); a configuration whose key is already in the
results file is not run again, so an interrupted sweep resumes where it stopped and a
deleted line is re-run alone. Runs on one model share a ``Workspace``: the model is loaded
once, each run starts from the dense weights kept in memory, and the calibration windows,
evaluation tokens and task data are built once. The dense model is measured once per
model and protocol, as its own line.
"""
from __future__ import annotations

import fcntl
import itertools
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

import yaml
from tqdm.auto import tqdm

from .checks import check_bool
from .config import RunConfig, options
from .errors import ZprunerError
from .executors import LocalExecutor
from .io import check_output_file, dumps_json, refuse_special, write_failure
from .patterns import Pattern
from .progress import bar as progress_bar
from .options import Option
from .registry import constants
from .results import RunResult, config_key, json_lines, read_result, replace_non_finite, run_key, skipped_line

log = logging.getLogger(__name__)

AXES = ("models", "methods", "updates", "patterns", "sparsities", "nsamples", "seeds")  # Grid's lists


def axis_options() -> dict[str, Option]:
    """Grid list -> the run option each of its values is (zpruner.config's schema)."""
    return {o.axis: o for o in options() if o.grid == "axis"}


def settings() -> tuple[str, ...]:
    """The fixed settings a grid may give (the command line's spelling, with underscores):
    the run options that are grid settings, whether to measure the dense model, and the
    registered methods' constants (zpruner.registry.constants)."""
    return (*(o.name for o in options() if o.grid == "setting"), "dense", *constants())


def check_setting(name: str, value: Any) -> None:
    """A grid file's fixed setting: its type and range, as the option or registered constant
    of the same name, alone (before any combination is built)."""
    if name == "dense":
        check_bool(name, value)
        return
    for o in options():
        if o.name == name:
            o.check(value)
            return
    if name not in constants():
        raise ZprunerError(f"option '{name}' is unknown")
    if value is not None:
        constants()[name].validate(value)


@dataclass
class Grid:
    """Lists to combine (``AXES``) and fixed ``settings``. An N:M pattern fixes its own
    sparsity, so ``sparsities`` applies to 'unstructured' only. ``nsamples`` None = the
    protocol's (else 128)."""

    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    methods: list[str] = field(default_factory=lambda: ["wanda"])
    updates: list[str] = field(default_factory=lambda: ["none"])
    patterns: list[str] = field(default_factory=lambda: ["unstructured"])
    sparsities: list[float] = field(default_factory=lambda: [0.5])
    nsamples: list[int | None] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [0])
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in AXES:
            value = getattr(self, name)
            if not isinstance(value, list):
                setattr(self, name, value := [value])
            if not value:
                raise ZprunerError(f"grid '{name}' is empty; give at least one value")
        unknown = set(self.settings) - set(settings())
        if unknown:
            raise ZprunerError(f"grid setting(s) {', '.join(sorted(unknown))} unknown; "
                               f"lists: {', '.join(AXES)}; settings: {', '.join(settings())}")
        if self.settings.get("limit") is not None and self.settings.get("tasks") is None:
            raise ZprunerError("--limit sets up zero-shot tasks; add --tasks (e.g. --tasks paper)")
        # Every value alone, before any combination: a wrong type or range stops the sweep
        # with one line, and plan_grid's skipped list keeps only refused combinations.
        for axis, opt in axis_options().items():
            for value in getattr(self, axis):
                opt.check(value)
        for name, value in self.settings.items():
            check_setting(name, value)

    def merged(self, overrides: dict[str, Any]) -> "Grid":
        """This grid with every non-None ``overrides`` value (command-line options) in place."""
        lists = {name: overrides.get(name) or getattr(self, name) for name in AXES}
        fixed = {**self.settings, **{k: v for k, v in overrides.items() if k in settings() and v is not None}}
        return Grid(**lists, settings=fixed)


def read_grid(path: str | os.PathLike) -> list[Grid]:
    """The grids of a .toml or .yaml/.yml file: the ``AXES`` as lists (or single values) and
    the settings (``settings()``) as single values at the top level; optionally a list ``grids`` of
    tables, each a grid of its own on top of the top-level values (a paper's table is
    often a union: e.g. wanda, sparsegpt with update none, plus cvr with update ec)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZprunerError(f"grid file {path} does not exist")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        else:
            raise ZprunerError(f"grid file {path} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ZprunerError(f"grid file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ZprunerError(f"grid file {path} must be a mapping of option names to values")
    parts = data.pop("grids", [{}])
    if not isinstance(parts, list) or not parts or not all(isinstance(part, dict) for part in parts):
        raise ZprunerError(f"grid file {path}: 'grids' must be a non-empty list of tables")
    grids = []
    for part in parts:
        merged = {**data, **part}
        grids.append(Grid(**{k: v for k, v in merged.items() if k in AXES},
                          settings={k: v for k, v in merged.items() if k not in AXES}))
    return grids


@dataclass
class Plan:
    configs: list[RunConfig]
    skipped: list[str]  # combinations that cannot run, with the reason


def plan(grids: Grid | list[Grid], data_dir: str | None = None) -> Plan:
    """The union of the grids' configurations (see ``plan_grid``), each once, in order."""
    configs: dict[str, RunConfig] = {}
    skipped: dict[str, None] = {}
    for grid in [grids] if isinstance(grids, Grid) else grids:
        part = plan_grid(grid, data_dir)
        for config in part.configs:
            configs.setdefault(run_key(config), config)
        skipped.update(dict.fromkeys(part.skipped))
    return Plan(list(configs.values()), list(skipped))


def plan_grid(grid: Grid, data_dir: str | None = None) -> Plan:
    """Every configuration of ``grid`` once, the dense model of each model first.

    Combinations the methods refuse (e.g. sparsegpt with update sparsegpt) are listed in
    ``skipped`` instead of stopping the sweep; a method that uses no calibration data runs
    once, not once per calibration size and seed.
    """
    options = dict(grid.settings)
    protocol, dense = options.pop("protocol", None), options.pop("dense", True)
    configs: dict[str, RunConfig] = {}
    skipped: list[str] = []
    for model_name in grid.models:
        common = {**options, "model": model_name, "data_dir": data_dir}
        if dense:
            config = RunConfig.from_options(protocol, prune=False, **common)
            configs.setdefault(run_key(config), config)
        for nsamples, seed, method, update, pattern in itertools.product(
                grid.nsamples, grid.seeds, grid.methods, grid.updates, grid.patterns):
            nm = Pattern.parse(pattern).is_nm
            for sparsity in [None] if nm else grid.sparsities:
                try:
                    config = RunConfig.from_options(protocol, **common, nsamples=nsamples, seed=seed, method=method,
                                                    update=update, pattern=pattern, sparsity=sparsity)
                except ZprunerError as exc:  # each value alone was checked: a combination
                    label = f"{model_name} {method} update={update} {pattern}" + ("" if nm else f" {sparsity}")
                    skipped.append(f"{label}: {exc}")
                    continue
                configs.setdefault(run_key(config), config)  # a data-free method's key ignores calibration
    return Plan(list(configs.values()), skipped)


def read_done(path: Path) -> set[str]:
    """Keys of the runs already in the results file, recomputed from each line's config
    (so files written by older versions still count). A line that does not parse (a run
    killed while writing) is ignored with a warning, so that run happens again."""
    done: set[str] = set()
    if not path.exists():
        return done
    for lineno, parsed in json_lines(path.read_text(encoding="utf-8")):
        if not isinstance(parsed, dict):  # NOT_JSON or NOT_OBJECT
            skipped_line(path, lineno, parsed)
            continue
        try:
            done.add(config_key(parsed))
        except ZprunerError:  # a result this sweep cannot read: its configuration runs again
            log.warning("%s: line %d is not a sweep result line; ignored", path, lineno)
    return done


def append_line(path: Path, entry: dict) -> None:
    """One complete line per finished run, written with a single call under an exclusive
    lock, so sweeps sharing a results file never interleave or split lines."""
    data = (dumps_json(entry) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:  # ELOOP: a link put there since the check
        raise write_failure(f"--results {path}", exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            refuse_special("--results", path)
            raise ZprunerError(f"--results {path} is not a regular file; give a new path")
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a run died mid-line: start a fresh one
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def adopt(paths: list[str | os.PathLike], results: str | os.PathLike) -> list[str]:
    """Append single-run results (``zpruner prune/eval --output-json``) to a sweep's results
    file, keyed like the sweep's own lines, so the sweep does not run them again. Returns
    the files added; a file whose configuration is already there is left out."""
    path = Path(results).expanduser()
    done = read_done(path)
    added = []
    for source in paths:
        result = read_result(source)
        key = config_key(result)
        if key in done:
            continue
        done.add(key)
        line = result.to_dict()
        replace_non_finite(line)  # files written before zpruner refused NaN may hold one
        append_line(path, RunResult.from_dict(line).sweep_line(key, result.config.get("protocol"), str(source)))
        added.append(str(source))
    return added


def describe(config: RunConfig) -> str:
    p = config.prune
    if p is None:
        return f"{config.model.name} dense"
    what = (p.method + ("" if p.update == "none" else f"+{p.update}") + ("+realloc" if p.reallocate else "")
            + ("" if p.allocation == "uniform" else f"+{p.allocation}") + ("" if p.select == "none" else f"+{p.select}"))
    pattern = p.pattern if p.parsed_pattern.is_nm else f"{100 * p.sparsity:g}%"
    return f"{config.model.name} {what} {pattern} n={p.nsamples}x{p.seqlen} seed={p.seed}"


@dataclass
class SweepSummary:
    planned: int
    already_done: int
    ran: list[str]
    failed: list[str]


def run_sweep(configs: list[RunConfig], results: str | os.PathLike, progress: bool = True,
              echo: Callable[[str], None] = print, executor=None) -> SweepSummary:
    """Run every configuration whose key is not yet in ``results``, appending a line each.

    ``executor`` runs them (zpruner.executors; default: here, one after another). A run that
    fails is reported and the sweep goes on; it writes nothing, so the next sweep tries it
    again. Lines are written here, in this process, whatever ran them.
    """
    path = check_output_file("--results", results)
    done = read_done(path)
    todo = sorted((c for c in configs if run_key(c) not in done), key=lambda c: c.model.name)  # dense first per model
    summary = SweepSummary(len(configs), len(configs) - len(todo), [], [])
    echo(f"sweep: {len(configs)} configurations, {summary.already_done} already in {path}, {len(todo)} to run")

    def still_todo(config: RunConfig) -> bool:  # another sweep on the same file may have finished it meanwhile
        return run_key(config) not in read_done(path)

    executor = executor if executor is not None else LocalExecutor()
    with progress_bar(total=len(todo), desc="sweep", unit="run", disable=not progress or not todo) as bar:
        for i, outcome in enumerate(executor.map(todo, progress, still_todo), 1):
            bar.update()
            if outcome.skipped:
                continue
            config, key = outcome.config, run_key(outcome.config)
            if outcome.error is not None:
                summary.failed.append(f"{describe(config)}: {outcome.error}")
                line = f"[{i}/{len(todo)}] {key} {describe(config)}: failed: {outcome.error}"
            else:
                result = outcome.result
                append_line(path, result.sweep_line(key, config.protocol))
                summary.ran.append(describe(config))
                ppl = result.ppl()
                zs = (result.zero_shot or {}).get("average")
                line = (f"[{i}/{len(todo)}] {key} {describe(config)}"
                        + (f"  ppl {ppl:.3f}" if ppl is not None else "")
                        + (f"  zero-shot avg {zs:.4f}" if zs is not None else "")
                        + f"  ({outcome.seconds:.0f} s)")
            with tqdm.external_write_mode():  # the line above the bar, not through it
                echo(line)
    return summary
