"""One run's results: what ``runner.run`` returns and results files hold, typed; run keys,
loading and de-duplication of results files (``zpruner report``, ``zpruner sweep``).

A results file is a ``.json`` (one result, ``zpruner prune --output-json``) or JSON lines
(``zpruner sweep``: one result a line, with the sweep's ``run_key``, ``protocol`` and, for
an adopted file, ``adopted_from``). Only numbers JSON can hold are written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .checks import is_number
from .config import EXECUTION_OPTIONS, SCHEMA_VERSION, PruneConfig, RunConfig  # noqa: F401 (SCHEMA_VERSION: re-exported)
from .errors import ZprunerError

log = logging.getLogger(__name__)

HINT = "pass the .jsonl written by 'zpruner sweep' or .json files written by 'zpruner prune --output-json'"


@dataclass
class RunResult:
    """One run's results. ``config`` is ``RunConfig.to_dict()`` as stored (its
    ``schema_version`` is the file's); the ``dense_`` fields measure the model before
    pruning (``--dense-baseline``); ``run_key``, ``protocol`` and ``adopted_from`` are the
    sweep's line fields. A field is None when the result does not have it.

    ``from_dict(d).to_dict() == d``, key order included: keys that were absent stay absent,
    keys this class does not know are kept in ``extra`` and written back. Both share nested
    values with their argument (no copies)."""

    config: dict[str, Any]
    versions: dict[str, str] | None = None
    calibration_sha256_16: str | None = None
    dense_perplexity: dict[str, float | None] | None = None
    dense_perplexity_protocol: dict[str, Any] | None = None
    dense_zero_shot: dict[str, Any] | None = None
    layer_time_s: dict[str, float] | None = None
    reallocated: dict[str, dict[str, float]] | None = None
    block_sparsity: list[float] | None = None  # an allocation's target per decoder block (not uniform)
    perplexity: dict[str, float | None] | None = None
    perplexity_protocol: dict[str, Any] | None = None
    zero_shot: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None
    experts: dict[str, Any] | None = None  # per MoE experts module: routed tokens, fallbacks, removed experts
    timings_s: dict[str, float] | None = None
    non_finite: list[str] | None = None
    run_key: str | None = None
    protocol: str | None = None
    adopted_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer (or foreign) writer
    _order: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)  # the keys read, in order

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        if not isinstance(d, dict) or not isinstance(d.get("config"), dict):
            raise ZprunerError("not a zpruner result (no 'config' object)")
        result = cls(**{k: v for k, v in d.items() if k in _FIELDS},
                     extra={k: v for k, v in d.items() if k not in _FIELDS})
        result._order = tuple(d)
        return result

    def to_dict(self) -> dict[str, Any]:
        """The keys read by ``from_dict`` in their order (None where they held null), then
        any other field that is set, then ``extra``."""
        values = {name: getattr(self, name) for name in _FIELDS}
        out: dict[str, Any] = {}
        for key in self._order:
            if key in values:
                out[key] = values[key]
            elif key in self.extra:
                out[key] = self.extra[key]
        out.update((k, v) for k, v in values.items() if k not in out and v is not None)
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out

    # ------------------------------------------------------------ what the report reads

    @property
    def schema_version(self) -> int | None:
        return self.config.get("schema_version")

    @property
    def model(self) -> dict[str, Any]:
        return self.config.get("model") or {}

    @property
    def model_name(self) -> str:
        return self.model.get("name", "?")

    @property
    def prune(self) -> dict[str, Any] | None:
        """``config.prune`` as stored; None for a dense (``zpruner eval``) run."""
        return self.config.get("prune")

    @property
    def prune_config(self) -> PruneConfig | None:
        return None if self.prune is None else PruneConfig.from_dict(self.prune)

    @property
    def uses_calibration(self) -> bool:
        """Whether the pruning read calibration data (the configuration says, not the keys present)."""
        prune = self.prune_config
        return prune is not None and prune.needs_calibration

    @property
    def preset(self) -> str | None:
        """The --protocol preset: the sweep line's, else the configuration's."""
        return self.protocol or self.config.get("protocol")

    @property
    def zero_shot_limit(self) -> int | None:
        return (self.config.get("zero_shot") or {}).get("limit")

    def ppl_protocol(self, prefix: str = "") -> dict[str, Any] | None:
        """The perplexity measurement (value, windows, seqlen, data digest); ``prefix``
        'dense_' for the model before pruning."""
        return self.dense_perplexity_protocol if _dense(prefix) else self.perplexity_protocol

    def ppl(self, prefix: str = "") -> float | None:
        return (self.ppl_protocol(prefix) or {}).get("value")

    def eval_key(self, prefix: str = "") -> tuple | None:
        """(dataset, windows, seqlen, data digest): perplexities are comparable when these match."""
        protocol = self.ppl_protocol(prefix)
        if not protocol:
            return None
        dataset = (self.config.get("eval") or {}).get("dataset", "wikitext2")
        return dataset, protocol.get("windows"), protocol.get("seqlen"), protocol.get("data_sha256_16")

    def sweep_line(self, key: str, protocol: str | None, adopted_from: str | None = None) -> dict[str, Any]:
        """This result as a sweep's results line: its key and preset first."""
        head: dict[str, Any] = {"run_key": key, "protocol": protocol}
        if adopted_from is not None:
            head["adopted_from"] = adopted_from
        return {**head, **self.to_dict()}


_FIELDS = tuple(f.name for f in fields(RunResult) if f.name not in ("extra", "_order"))


def _dense(prefix: str) -> bool:
    if prefix not in ("", "dense_"):
        raise ValueError(f"prefix must be '' or 'dense_', got {prefix!r}")
    return prefix == "dense_"


def replace_non_finite(results: dict) -> list[str]:
    """Replace every NaN or infinity in ``results`` by None (JSON has no such numbers) and
    list where they were under ``results["non_finite"]``; a diverged pruned model has an
    infinite perplexity, which must read as "not measurable", never as a number."""
    found: list[str] = []

    def walk(value, where: str):
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{where} = {value}")
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    results.update(walk(results, ""))
    if found:
        results["non_finite"] = found
        log.warning("not finite, written as null: %s (the pruned model diverged)", "; ".join(found))
    return found


# ---------------------------------------------------------------- keys

def run_key(config: RunConfig | dict) -> str:
    """16 hex digits naming what a run measures: the model, the pruning configuration's
    ``identity``, the evaluation and zero-shot settings; not where its data or outputs
    live. Takes a RunConfig or the ``config`` dict stored in a results file (older files
    lack newer fields: absent and None count the same)."""
    d = config.to_dict() if isinstance(config, RunConfig) else dict(config)
    # a recipe's choices are in ``prune``: the same options with or without --recipe are one run
    for name in ("data_dir", "output_json", "save", "overwrite", "protocol", "recipe", "schema_version",
                 "dense_baseline", *EXECUTION_OPTIONS):
        d.pop(name, None)
    if d.get("prune") is not None:
        d["prune"] = PruneConfig.from_dict(d["prune"]).identity()
    d = _without_none(json.loads(json.dumps(d)))
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def config_key(result: RunResult | Any) -> str:
    """The sweep's key of a result's configuration: a sweep line and the --output-json file
    of the same run match, and unused constants do not tell results apart. ``result``: a
    RunResult, or a parsed line of a results file (anything else is a ZprunerError)."""
    config = result.config if isinstance(result, RunResult) else result.get("config") if isinstance(
        result, dict) else None
    try:
        return run_key(config)
    except (ZprunerError, TypeError, ValueError, AttributeError) as exc:
        raise ZprunerError(f"a result's config is not a zpruner configuration ({exc}); {HINT}") from None


def dedupe(results: list[RunResult]) -> list[RunResult]:
    """One result per configuration (seed included), the first seen; keys only a later copy
    has (e.g. a sweep's ``protocol``, a ``dense_perplexity``) are kept too."""
    kept: dict[str, RunResult] = {}
    for result in results:
        key = config_key(result)
        kept[key] = RunResult.from_dict({**result.to_dict(), **kept[key].to_dict()}) if key in kept else result
    return list(kept.values())


# ---------------------------------------------------------------- loading

def _check_result(result, where: str) -> RunResult:
    """The parts of a result every table reads, checked once here so a hand-edited or
    foreign file gets one line naming where, not a traceback from deep in a table."""
    config = result.get("config") if isinstance(result, dict) else None
    if not isinstance(config, dict):
        raise ZprunerError(f"{where} is not a zpruner result (no 'config' object); {HINT}")
    model = config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ZprunerError(f"{where}: config.model.name is missing or not a text; {HINT}")
    for part in ("prune", "eval", "zero_shot"):
        if config.get(part) is not None and not isinstance(config[part], dict):
            raise ZprunerError(f"{where}: config.{part} must be an object or null; {HINT}")
    if config.get("prune") is not None:
        try:
            PruneConfig.from_dict(config["prune"])
        except (ZprunerError, TypeError) as exc:
            raise ZprunerError(f"{where}: config.prune is not a valid pruning configuration ({exc})") from None
    for key in ("perplexity_protocol", "dense_perplexity_protocol"):
        entry = result.get(key)
        if entry is None:
            continue
        if not isinstance(entry, dict) or (entry.get("value") is not None and not is_number(entry["value"])):
            raise ZprunerError(f"{where}: {key}.value must be a number or null; {HINT}")
    return RunResult.from_dict(result)


NOT_JSON = object()  # json_lines' value of a line that does not parse


def json_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines text; the value
    is ``NOT_JSON`` where the line does not parse (a run killed while appending)."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError:
            yield number, NOT_JSON


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ZprunerError(f"results file {path} does not exist or is not a file; {HINT}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ZprunerError(f"cannot read results file {path} ({e}); {HINT}") from None


def _parse_json(text: str, path: Path) -> RunResult:
    try:
        return _check_result(json.loads(text), str(path))
    except json.JSONDecodeError as e:
        raise ZprunerError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); {HINT}") from None


def read_result(path: str | os.PathLike) -> RunResult:
    """The one result of a .json file (``zpruner prune --output-json``), checked."""
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise ZprunerError(f"{path} is empty; {HINT}")
    return _parse_json(text, path)


def _load_file(path: Path) -> list[RunResult]:
    """A .json file is one result; any other file one result per line. A line that is not
    JSON (a run killed while appending) is skipped with a notice, as the sweep does."""
    text = _read_text(path)
    if path.suffix == ".json":
        return [_parse_json(text, path)] if text.strip() else []
    results, broken = [], []
    for number, parsed in json_lines(text):
        if parsed is NOT_JSON:
            broken.append(number)
        else:
            results.append(_check_result(parsed, f"{path} line {number}"))
    if broken and not results:
        raise ZprunerError(f"{path} line {broken[0]} is not valid JSON, nor is any other line; {HINT}")
    if broken:
        log.warning("%s: line %s is not valid JSON (cut short by a killed run?); skipped",
                    path, ", ".join(map(str, broken)))
    return results


@dataclass
class Loaded:
    """What ``load_results`` read: every result in order, and (file as given, results read) a file."""

    results: list[RunResult]
    inputs: list[tuple[str, int]]

    def distinct(self) -> list[RunResult]:
        return dedupe(self.results)


def load_results(paths: Iterable[str | os.PathLike]) -> Loaded:
    """Every result of ``paths`` (.json: one result; else JSON lines, blank lines ignored), in
    order, each checked; a ZprunerError when there is none."""
    paths = [str(p) for p in paths]
    per_file = [(p, _load_file(Path(p))) for p in paths]
    results = [r for _, rs in per_file for r in rs]
    if not results:
        raise ZprunerError(f"no results in {', '.join(paths) or '(no file given)'}; {HINT}")
    return Loaded(results, [(p, len(rs)) for p, rs in per_file])
