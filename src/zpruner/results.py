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
from .config import SCHEMA_VERSION, PruneConfig, RunConfig, options  # noqa: F401 (SCHEMA_VERSION: re-exported)
from .errors import ZprunerError

log = logging.getLogger(__name__)

HINT = "pass the .jsonl written by 'zpruner sweep' or .json files written by 'zpruner prune --output-json'"


@dataclass
class Measurement:
    """What measuring one model gave: its perplexity on ``dataset`` (the protocol entry:
    value, windows, seqlen, predicted_tokens, data_sha256_16) and its zero-shot accuracies
    (``zpruner.zeroshot.run_tasks``). A part is None when it was not measured."""

    perplexity: dict[str, Any] | None = None
    dataset: str | None = None
    zero_shot: dict[str, Any] | None = None
    # the results file's "perplexity" object ({dataset: value}) as read, written back as it was
    stored: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def ppl(self) -> float | None:
        return (self.perplexity or {}).get("value")

    def json(self, prefix: str) -> dict[str, Any]:
        """The results file's keys of this measurement (``prefix`` 'dense_' before pruning)."""
        out: dict[str, Any] = {}
        if self.perplexity is not None or self.stored is not None:
            out[prefix + "perplexity"] = self.stored if self.stored is not None else {self.dataset: self.ppl}
            out[prefix + "perplexity_protocol"] = self.perplexity
        if self.zero_shot is not None:
            out[prefix + "zero_shot"] = self.zero_shot
        return out

    @classmethod
    def read(cls, d: dict[str, Any], prefix: str) -> Measurement | None:
        parts = [d.get(prefix + k) for k in ("perplexity", "perplexity_protocol", "zero_shot")]
        if all(part is None for part in parts):
            return None
        stored, protocol, zero_shot = parts
        dataset = next(iter(stored)) if isinstance(stored, dict) and stored else None
        return cls(protocol, dataset, zero_shot, stored)


_MEASURED_KEYS = {prefix + k for prefix in ("", "dense_") for k in ("perplexity", "perplexity_protocol", "zero_shot")}


@dataclass
class RunResult:
    """One run's results, as ``runner.run`` returns them and results files hold them.
    ``config`` is ``RunConfig.to_dict()`` as stored (its ``schema_version`` is the file's);
    ``dense`` measures the model before pruning (``--dense-baseline``), ``measured`` the
    model after (or as it is, for ``zpruner eval``); ``run_key``, ``protocol`` and
    ``adopted_from`` are the sweep's line fields. A field is None when the result does not
    have it. Dicts only at the files' boundary: ``to_dict`` and ``from_dict``.

    ``from_dict(d).to_dict() == d``, key order included: keys that were absent stay absent,
    keys this class does not know are kept in ``extra`` and written back. Both share nested
    values with their argument (no copies)."""

    config: dict[str, Any]
    versions: dict[str, str] | None = None
    calibration_sha256_16: str | None = None
    dense: Measurement | None = None
    layer_time_s: dict[str, float] | None = None
    reallocated: dict[str, dict[str, float]] | None = None
    block_sparsity: list[float] | None = None  # an allocation's target per decoder block (not uniform)
    selection: dict[str, dict] | None = None  # --select: per matrix, what was chosen (zpruner.heldout)
    measured: Measurement | None = None
    sparsity: dict[str, Any] | None = None
    experts: dict[str, Any] | None = None  # per MoE experts module: routed tokens, fallbacks, removed experts
    timings_s: dict[str, float] | None = None
    offload: str | None = None  # where the weights lived (zpruner.offload)
    peak_rss_bytes: int | None = None  # the process's own high-water mark
    native_kernels: list[str] | None = None  # the compiled CPU kernels that ran (zpruner.kernels.native)
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
        plain = {k: v for k, v in d.items() if k in _FIELDS}
        result = cls(**plain, dense=Measurement.read(d, "dense_"), measured=Measurement.read(d, ""),
                     extra={k: v for k, v in d.items() if k not in _FIELDS and k not in _MEASURED_KEYS})
        result._order = tuple(d)
        return result

    def to_dict(self) -> dict[str, Any]:
        """The keys read by ``from_dict`` in their order (None where they held null), then
        every other part that is set in the fields' order, then ``extra``."""
        values: dict[str, Any] = {}
        for name in _ALL_FIELDS:
            if name == "dense" or name == "measured":
                part = getattr(self, name)
                values.update(part.json("dense_" if name == "dense" else "") if part is not None else {})
            else:
                values[name] = getattr(self, name)
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

    def measurement(self, dense: bool = False) -> Measurement | None:
        return self.dense if dense else self.measured

    def ppl_protocol(self, dense: bool = False) -> dict[str, Any] | None:
        """The perplexity measurement (value, windows, seqlen, data digest) of the model after
        pruning, or with ``dense`` before it."""
        return (self.measurement(dense) or Measurement()).perplexity

    def ppl(self, dense: bool = False) -> float | None:
        return (self.measurement(dense) or Measurement()).ppl

    @property
    def zero_shot(self) -> dict[str, Any] | None:
        return (self.measured or Measurement()).zero_shot

    @property
    def dense_zero_shot(self) -> dict[str, Any] | None:
        return (self.dense or Measurement()).zero_shot

    def eval_key(self, dense: bool = False) -> tuple | None:
        """(dataset, windows, seqlen, data digest): perplexities are comparable when these match."""
        protocol = self.ppl_protocol(dense)
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


_ALL_FIELDS = tuple(f.name for f in fields(RunResult) if f.name not in ("extra", "_order"))
_FIELDS = tuple(name for name in _ALL_FIELDS if name not in ("dense", "measured"))  # a file's keys as they are


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
    d.pop("schema_version", None)
    for opt in options("run"):  # where data and outputs live, how the run executes
        if not opt.keyed:
            d.pop(opt.field, None)
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
NOT_OBJECT = object()  # json_lines' value of a line that parses to something else than an object
SKIPPED = {NOT_JSON: "is not valid JSON", NOT_OBJECT: "is not a JSON object"}


def skipped_line(path: Path, number: int, kind) -> None:
    """The notice of a results line that json_lines found to be no object."""
    log.warning("%s: line %d %s%s; skipped", path, number, SKIPPED[kind],
                " (cut short by a killed run?)" if kind is NOT_JSON else "")


def json_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of each non-blank line of a JSON-lines text; the value
    is ``NOT_JSON`` where the line does not parse (a run killed while appending) and
    ``NOT_OBJECT`` where it is JSON but no object (``[]``): no result either way, so the
    sweep and the report both skip such a line with a notice (``SKIPPED`` says why)."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            yield number, NOT_JSON
            continue
        yield number, parsed if isinstance(parsed, dict) else NOT_OBJECT


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
    results, skipped = [], {}
    for number, parsed in json_lines(text):
        if not isinstance(parsed, dict):  # NOT_JSON or NOT_OBJECT
            skipped[number] = parsed
        else:
            results.append(_check_result(parsed, f"{path} line {number}"))
    if skipped and not results:
        number, kind = next(iter(skipped.items()))
        raise ZprunerError(f"{path} line {number} {SKIPPED[kind]}, nor is any other line a result; {HINT}")
    for number, kind in skipped.items():
        skipped_line(path, number, kind)
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
