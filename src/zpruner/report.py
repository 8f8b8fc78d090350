"""``zpruner report``: the papers' tables (Markdown) and plots (PNG) from results files.

Input: results as ``zpruner.runner.run`` returns them, one per line of a ``.jsonl``
(``zpruner sweep``) or one per ``.json`` (``zpruner prune --output-json``).

Numbers measured under different protocols never share a table: pruned results are
grouped by model, calibration (source, samples, length) and perplexity evaluation
(dataset, windows, length, data digest), and each group gets its own tables. Dense
perplexity does not depend on calibration, so a dense measurement joins every group with
its model and evaluation. Zero-shot tables are further split by task list and item limit.
The calibration-size table compares sample counts on purpose, so it groups by everything
else.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .checks import is_number
from .config import PruneConfig
from .errors import ZprunerError
from .io import check_output_folder, write_atomic

log = logging.getLogger(__name__)

METHOD_ORDER = ("magnitude", "wanda", "sparsegpt", "ria", "zpruner", "cvr")
UPDATE_ORDER = ("none", "ec-col", "ec-row", "ec", "sparsegpt")
# The statistical-correction paper's ablation, each row adding one ingredient to the last.
ABLATION = (("wanda", "Wanda"), ("cvr", "+ CVR score"), ("cvr+ec-col", "+ EC along columns"),
            ("cvr+ec", "+ EC along rows (full CVR+EC)"))
# Prune fields that place a result in a row, column or group; the others are a method's constants.
NOT_CONSTANTS = {"method", "update", "reallocate", "sparsity", "pattern", "nsamples", "seqlen", "seed",
                 "calibration", "calib_batch_size"}
HINT = "pass the .jsonl written by 'zpruner sweep' or .json files written by 'zpruner prune --output-json'"


# ---------------------------------------------------------------- loading

def _check_result(result, where: str) -> dict:
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
    return result


def _load_file(path: Path) -> list[dict]:
    """A .json file is one result; any other file one result per line. A line that is not
    JSON (a run killed while appending) is skipped with a notice, as the sweep does."""
    if not path.is_file():
        raise ZprunerError(f"results file {path} does not exist or is not a file; {HINT}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ZprunerError(f"cannot read results file {path} ({e}); {HINT}") from None
    if path.suffix == ".json":
        if not text.strip():
            return []
        try:
            return [_check_result(json.loads(text), str(path))]
        except json.JSONDecodeError as e:
            raise ZprunerError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); {HINT}") from None
    results, broken = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            broken.append(number)
            continue
        results.append(_check_result(parsed, f"{path} line {number}"))
    if broken and not results:
        raise ZprunerError(f"{path} line {broken[0]} is not valid JSON, nor is any other line; {HINT}")
    if broken:
        log.warning("%s: line %s is not valid JSON (cut short by a killed run?); skipped",
                    path, ", ".join(map(str, broken)))
    return results


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Every result of ``paths`` (.json: one result; else JSON lines, blank lines ignored), in order."""
    paths = [Path(p) for p in paths]
    results = [r for path in paths for r in _load_file(path)]
    if not results:
        raise ZprunerError(f"no results in {', '.join(map(str, paths)) or '(no file given)'}; {HINT}")
    return results


def config_key(result: dict) -> str:
    """The sweep's key of a result's configuration: a sweep line and the --output-json file
    of the same run match, and unused constants do not tell results apart."""
    from .sweep import run_key

    try:
        return run_key(result["config"])
    except (ZprunerError, TypeError) as exc:
        raise ZprunerError(f"a result's config is not a zpruner configuration ({exc}); {HINT}") from None


def dedupe(results: list[dict]) -> list[dict]:
    """One result per configuration (seed included), the first seen; keys only a later copy
    has (e.g. a sweep's ``protocol``, a ``dense_perplexity``) are kept too."""
    kept: dict[str, dict] = {}
    for result in results:
        key = config_key(result)
        kept[key] = {**result, **kept[key]} if key in kept else result
    return list(kept.values())


# ---------------------------------------------------------------- one result's coordinates

@dataclass(frozen=True)
class Setting:
    """A column: unstructured at ``sparsity``, or N:M (``nm``)."""

    sparsity: float
    nm: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity * 100:g} %"

    @property
    def order(self) -> tuple:
        # unstructured by sparsity, then N:M by sparsity with the larger (less constrained) M first
        return (1, self.sparsity, -self.nm[1]) if self.nm else (0, self.sparsity)


def setting_of(prune: dict) -> Setting:
    pattern = prune.get("pattern", "unstructured")
    if pattern == "unstructured":
        return Setting(round(float(prune["sparsity"]), 4))
    n, m = (int(part) for part in pattern.split(":"))
    return Setting(round(n / m, 4), (n, m))


def method_label(prune: dict) -> str:
    """'wanda', 'cvr+ec', 'magnitude+sparsegpt', 'ria+realloc' ..."""
    label = prune["method"]
    if prune.get("update", "none") != "none":
        label += "+" + prune["update"]
    if prune.get("reallocate"):
        label += "+realloc"
    return label


def _rank(order: tuple, name: str) -> int:
    return order.index(name) if name in order else len(order)


def _eval_key(result: dict, prefix: str = "") -> tuple | None:
    protocol = result.get(prefix + "perplexity_protocol")
    if not protocol:
        return None
    dataset = (result["config"].get("eval") or {}).get("dataset", "wikitext2")
    return dataset, protocol.get("windows"), protocol.get("seqlen"), protocol.get("data_sha256_16")


def _ppl(result: dict, prefix: str = "") -> float | None:
    return (result.get(prefix + "perplexity_protocol") or {}).get("value")


def _zs_key(result: dict, zero_shot: dict | None) -> tuple | None:
    """(item limit, measured tasks): zero-shot numbers are comparable only when both match."""
    if not zero_shot:
        return None
    tasks = tuple(k for k, v in zero_shot.items() if isinstance(v, dict) and k != "skipped")
    return (result["config"].get("zero_shot") or {}).get("limit"), tasks


@dataclass(frozen=True)
class Entry:
    """One pruned result reduced to what the tables need; ``index`` points back to it."""

    index: int
    base: str  # method label
    label: str  # method label + the constants that tell apart results sharing it
    order: tuple
    setting: Setting
    seed: int | None
    nsamples: int | None
    ppl: float | None
    zero_shot: dict | None
    zs_key: tuple | None


def _constants(result: dict) -> dict:
    """The constants that can change this result (PruneConfig.identity: CVR's for cvr, EC's
    clamp for EC updates ...), and the dtype; results written under other defaults of an
    unused constant are the same method."""
    identity = PruneConfig.from_dict(result["config"]["prune"]).identity()
    constants = {k: v for k, v in identity.items() if k not in NOT_CONSTANTS}
    constants["dtype"] = (result["config"].get("model") or {}).get("dtype")
    return constants


def make_entries(results: list[dict], indices: list[int]) -> list[Entry]:
    """Entries of ``results[indices]``. Results with the same method label but different
    constants (CVR's alpha, the EC clamp, the dtype ...) are different methods: their labels
    get the differing constants appended instead of being averaged together."""
    variants: dict[str, list[dict]] = defaultdict(list)
    for i in indices:
        base, constants = method_label(results[i]["config"]["prune"]), _constants(results[i])
        if constants not in variants[base]:
            variants[base].append(constants)
    entries = []
    perplexity_of: set[str] = set()
    for i in indices:
        result = results[i]
        prune, constants = result["config"]["prune"], _constants(result)
        # A configuration measured again with zero-shot tasks added repeats its perplexity
        # measurement: the perplexity tables count the first one only.
        ppl_key = config_key({"config": {**result["config"], "zero_shot": None}})
        ppl = _ppl(result) if ppl_key not in perplexity_of else None
        perplexity_of.add(ppl_key)
        base = method_label(prune)
        differing = sorted(k for k in constants if len({json.dumps(c.get(k)) for c in variants[base]}) > 1)
        suffix = f" ({', '.join(f'{k}={json.dumps(constants.get(k))}' for k in differing)})" if differing else ""
        order = (_rank(METHOD_ORDER, prune["method"]), _rank(UPDATE_ORDER, prune.get("update", "none")),
                 bool(prune.get("reallocate")), base, suffix)
        zero_shot = result.get("zero_shot")
        entries.append(Entry(i, base, base + suffix, order, setting_of(prune), prune.get("seed"),
                             prune.get("nsamples"), ppl, zero_shot, _zs_key(result, zero_shot)))
    return entries


# ---------------------------------------------------------------- grouping

@dataclass
class Group:
    """Results measured under one protocol. ``calibration`` is (source, nsamples, seqlen);
    nsamples is None in a calibration-size group."""

    model: str
    calibration: tuple | None
    eval: tuple | None
    entries: list[Entry]
    dense: list[tuple[int, float]] = field(default_factory=list)  # (result index, perplexity)
    dense_members: list[int] = field(default_factory=list)  # dense-only results of this protocol
    dense_zero_shot: dict[tuple, list[tuple[int, dict]]] = field(default_factory=dict)


def _model(result: dict) -> str:
    return (result["config"].get("model") or {}).get("name", "?")


def _dense_pools(results: list[dict]) -> tuple[dict, dict, dict]:
    """Dense measurements by (model, eval key) and by (model, zero-shot key). Dense-only runs
    are preferred; else the ``dense_*`` baselines of pruned runs, which repeat one
    measurement per run, so each distinct value counts once."""
    members, ppl, zs = defaultdict(list), defaultdict(list), defaultdict(list)
    baseline_ppl, baseline_zs = defaultdict(dict), defaultdict(dict)
    for i, result in enumerate(results):
        model = _model(result)
        if result["config"].get("prune") is None:
            members[model, _eval_key(result)].append(i)
            # the same evaluation of the same dense model, repeated beside other measurements
            # (e.g. a dense run with zero-shot tasks), is one measurement
            value = _ppl(result)
            if value is not None and all(round(v, 9) != round(value, 9) for _, v in ppl[model, _eval_key(result)]):
                ppl[model, _eval_key(result)].append((i, value))
            if _zs_key(result, result.get("zero_shot")):
                zs[model, _zs_key(result, result["zero_shot"])].append((i, result["zero_shot"]))
            continue
        if _ppl(result, "dense_") is not None:
            baseline_ppl[model, _eval_key(result, "dense_")].setdefault(round(_ppl(result, "dense_"), 9),
                                                                         (i, _ppl(result, "dense_")))
        dense_zs = result.get("dense_zero_shot")
        if _zs_key(result, dense_zs):
            baseline_zs[model, _zs_key(result, dense_zs)].setdefault(json.dumps(dense_zs, sort_keys=True),
                                                                      (i, dense_zs))
    for pool, baseline in ((ppl, baseline_ppl), (zs, baseline_zs)):
        for key, values in baseline.items():
            pool.setdefault(key, list(values.values()))
    return members, ppl, zs


def _calibration(result: dict, with_nsamples: bool = True) -> tuple:
    prune = result["config"]["prune"]
    return prune.get("calibration"), prune.get("nsamples") if with_nsamples else None, prune.get("seqlen")


def _uses_calibration(result: dict) -> bool:
    # the runner records a calibration digest exactly when the method read calibration data
    return "calibration_sha256_16" in result


def _groups(results: list[dict], with_nsamples: bool) -> list[Group]:
    members, ppl, zs = _dense_pools(results)
    indices: dict[tuple, list[int]] = defaultdict(list)  # insertion order = first appearance
    data_free: dict[tuple, list[int]] = defaultdict(list)
    for i, result in enumerate(results):
        if result["config"].get("prune") is None:
            continue
        if _uses_calibration(result):
            indices[_model(result), _calibration(result, with_nsamples), _eval_key(result)].append(i)
        else:
            data_free[_model(result), _eval_key(result)].append(i)
    # A data-free method (magnitude) is the same whatever the calibration, and a sweep runs
    # it once: it joins every protocol group of its model and evaluation. It shows no trend
    # over calibration sizes, so it stays out of those groups.
    for (model, eval_key), free in data_free.items():
        targets = [k for k in indices if k[0] == model and k[2] == eval_key] if with_nsamples else []
        for key in targets:
            indices[key] = indices[key] + free
        if not targets:
            indices[model, None, eval_key] = free
    if with_nsamples:  # dense-only results with no pruned result of their protocol are reported alone
        for model, eval_key in members:
            if not any(k[0] == model and k[2] == eval_key for k in indices):
                indices[model, None, eval_key] = []
    groups = []
    for (model, calibration, eval_key), group_indices in indices.items():
        groups.append(Group(model, calibration, eval_key, make_entries(results, group_indices),
                            ppl.get((model, eval_key), []), members.get((model, eval_key), []),
                            {key[1]: values for key, values in zs.items() if key[0] == model}))
    return groups


def protocol_groups(results: list[dict]) -> list[Group]:
    return _groups(results, with_nsamples=True)


def calibration_series(group: Group) -> dict[tuple, dict[int, list[tuple[Any, float]]]]:
    """{(order, label, setting): {nsamples: [(seed, perplexity)]}} for the methods and
    sparsities measured with >= 2 calibration sizes (the others show no trend)."""
    series: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for e in group.entries:
        if e.ppl is not None and e.nsamples is not None:
            series[(e.order, e.setting.order), e.label, e.setting][e.nsamples].append((e.seed, e.ppl))
    return {key: dict(points) for key, points in sorted(series.items(), key=lambda kv: kv[0][0]) if len(points) >= 2}


def calibration_groups(results: list[dict]) -> list[Group]:
    """Groups by everything but the number of calibration samples, kept when some method
    and sparsity was measured with >= 2 sample counts."""
    return [g for g in _groups(results, with_nsamples=False) if calibration_series(g)]


# ---------------------------------------------------------------- Markdown

def fmt_cell(values: list[tuple[Any, float]], scale: float = 1.0) -> str:
    """'66.84'; several measurements: mean, count and sample standard deviation."""
    if not values:
        return ""
    xs = [v * scale for _, v in values]
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return f"{mean:.2f}"
    # a repeated seed (or a dense model measured twice) is not seed variation
    seeds = [s for s, _ in values]
    what = "seeds" if None not in seeds and len(set(seeds)) == len(seeds) else "runs"
    return f"{mean:.2f} ({len(xs)} {what}, ±{statistics.stdev(xs):.2f} std)"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _join(values: Iterable) -> str:
    values = sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))
    return ", ".join(str(v) for v in values) or "?"


def _describe_eval(eval_key: tuple | None) -> str:
    if eval_key is None:
        return "no perplexity evaluation"
    dataset, windows, seqlen, digest = eval_key
    return f"{dataset} {windows} windows × {seqlen} tokens" + (f" (data sha256/16 {digest})" if digest else "")


def protocol_line(results: list[dict], used: set[int], eval_key: tuple | None, zs: str | None = None) -> str:
    """What the numbers of a table were measured under, derived from the results it used."""
    used_results = [results[i] for i in sorted(used)]
    pruned = [r["config"]["prune"] for r in used_results if r["config"].get("prune") and _uses_calibration(r)]
    data_free = [r["config"]["prune"] for r in used_results if r["config"].get("prune") and not _uses_calibration(r)]
    parts = [f"model {_join(_model(r) for r in used_results)}"]
    if pruned:
        seeds = {p.get("seed") for p in pruned}
        parts.append(f"calibration {_join(p.get('calibration') for p in pruned)}, "
                     f"{_join(p.get('nsamples') for p in pruned)} samples × {_join(p.get('seqlen') for p in pruned)} "
                     f"tokens, seed{'s' if len(seeds) > 1 else ''} {_join(seeds)}")
    if data_free:
        parts.append(f"no calibration data used by {_join(method_label(p) for p in data_free)}")
    parts.append("evaluation " + _describe_eval(eval_key))
    if zs:
        parts.append(zs)
    presets = {r.get("protocol") or r["config"].get("protocol") for r in used_results} - {None}
    if presets:
        parts.append(f"preset {_join(presets)}")
    return f"Protocol: {'; '.join(parts)}. Results used: {len(used_results)}."


def _ppl_table(group: Group, settings: list[Setting], rows: list[tuple[str, str]]) -> tuple[list[str], set[int]]:
    """Perplexity, rows = (label, shown name), columns = ``settings``; empty rows and columns dropped."""
    cells: dict[tuple, list] = defaultdict(list)
    used: set[int] = set()
    for e in group.entries:
        if e.ppl is not None and e.setting in settings and e.label in dict(rows):
            cells[e.label, e.setting].append((e.seed, e.ppl))
            used.add(e.index)
    settings = [s for s in settings if any((label, s) in cells for label, _ in rows)]
    body = [[name] + [fmt_cell(cells.get((label, s), [])) for s in settings]
            for label, name in rows if any((label, s) in cells for s in settings)]
    if group.dense and body:
        body.insert(0, ["dense"] + [fmt_cell(group.dense)] * len(settings))
        used.update(i for i, _ in group.dense)
    if not body:
        return [], used
    return _table(["method"] + [s.label for s in settings], body), used


def _labels(entries: list[Entry]) -> list[tuple[str, str]]:
    return [(label, label) for _, label in sorted({(e.order, e.label) for e in entries})]


def _zero_shot_table(group: Group, key: tuple) -> tuple[list[str], set[int], str]:
    limit, tasks = key
    rows: dict[tuple, list[tuple[Any, dict]]] = defaultdict(list)
    for _, zs in group.dense_zero_shot.get(key, []):
        rows[(), "dense", "—"].append((None, zs))
    for e in group.entries:
        if e.zs_key == key:
            rows[(e.order, e.setting.order), e.label, e.setting.label].append((e.seed, e.zero_shot))
    used = {i for i, _ in group.dense_zero_shot.get(key, [])} | {e.index for e in group.entries if e.zs_key == key}

    def cell(measured: list[tuple[Any, dict]], task: str) -> str:
        values = [(seed, zs[task][zs[task].get("metric", "acc")]) for seed, zs in measured]
        return fmt_cell([(s, v) for s, v in values if v is not None], scale=100)

    body = [[name, setting] + [cell(measured, t) for t in tasks]
            + [fmt_cell([(seed, zs["average"]) for seed, zs in measured], scale=100)]
            for (_, name, setting), measured in sorted(rows.items())]
    measured = [zs for values in rows.values() for _, zs in values]
    counts = {t: {zs[t].get("n") for zs in measured} for t in tasks}
    if len({n for ns in counts.values() for n in ns}) == 1:
        items = f"{next(iter(counts[tasks[0]]))} items per task"
    else:
        items = "items per task: " + ", ".join(f"{t} {_join(ns)}" for t, ns in counts.items())
    metrics = _join(zs[t].get("metric", "acc") for zs in measured for t in tasks)
    zs_text = f"zero-shot limit {limit if limit is not None else 'none (all items)'}, {items}, metric {metrics}"
    return _table(["method", "sparsity", *tasks, "average"], body, 2), used, zs_text


def _image(name: str | None, alt: str) -> list[str]:
    return ["", f"![{alt}]({name})"] if name else []


def _group_heading(group: Group) -> str:
    calibration = "no calibration"
    if group.calibration:
        source, nsamples, seqlen = group.calibration
        calibration = f"calibration {source} {nsamples if nsamples is not None else 'N'} × {seqlen}"
    return f"{group.model}, {calibration}, {_describe_eval(group.eval)}"


def headline_settings(group: Group) -> list[Setting]:
    """The columns of Tables 1 and 5: 50 % unstructured and the N:M patterns, as in the
    papers (other sparsities are Table 4's); every setting when 50 % was not measured."""
    settings = sorted({e.setting for e in group.entries if e.ppl is not None}, key=lambda s: s.order)
    headline = [s for s in settings if s.nm or s.sparsity == 0.5]
    return headline if any(s.nm is None for s in headline) else settings


def group_sections(results: list[dict], group: Group, sparsity_plot: str | None = None,
                   pattern_plot: str | None = None) -> list[str]:
    """Tables 1, 2, 4 and 5 of one protocol group (those it has data for)."""
    out: list[str] = []

    def emit(title: str, table: list[str], used: set[int], zs: str | None = None, extra: list[str] = ()):
        if table:
            out.extend(["", f"### {title}", "", *table, "", protocol_line(results, used, group.eval, zs), *extra])

    settings = sorted({e.setting for e in group.entries if e.ppl is not None}, key=lambda s: s.order)
    headline = headline_settings(group)
    labels = _labels(group.entries)
    if settings:
        emit("Table 1 — perplexity by method and sparsity pattern", *_ppl_table(group, headline, labels),
             extra=_image(pattern_plot, "perplexity by method and sparsity pattern"))
    elif group.dense:
        emit("Dense perplexity", _table(["method", "perplexity"], [["dense", fmt_cell(group.dense)]]),
             {i for i, _ in group.dense})
    zs_keys = list(dict.fromkeys(e.zs_key for e in group.entries if e.zs_key))
    if not group.entries:  # a dense-only group shows its own zero-shot results
        zs_keys = list(dict.fromkeys(_zs_key(results[i], results[i].get("zero_shot")) for i in group.dense_members))
    for key in filter(None, zs_keys):
        table, used, zs_text = _zero_shot_table(group, key)
        emit("Table 2 — zero-shot accuracy (%)", table, used, zs_text)
    unstructured = [s for s in settings if s.nm is None]
    if len(unstructured) >= 2:
        swept = {e.label for e in group.entries if e.ppl is not None and e.setting.nm is None}
        swept = {label for label in swept
                 if len({e.setting for e in group.entries if e.label == label and e.setting.nm is None}) >= 2}
        table, used = _ppl_table(group, unstructured, [(label, name) for label, name in labels if label in swept])
        emit("Table 4 — perplexity across unstructured sparsity", table, used,
             extra=_image(sparsity_plot, "perplexity versus unstructured sparsity"))
    bases = {e.label: e.base for e in group.entries if e.ppl is not None}
    ablation = [(label, name + label[len(base):]) for base, name in ABLATION
                for label, _ in labels if bases.get(label) == base]
    # an ablation starts from Wanda and swaps in the CVR score; later steps are optional
    if {"wanda", "cvr"} <= {bases[label] for label, _ in ablation}:
        emit("Table 5 — ablation", *_ppl_table(group, headline, ablation))
    return out


def calibration_section(results: list[dict], group: Group, plot: str | None = None) -> list[str]:
    """Perplexity by method × number of calibration samples (the statistical-correction paper's Figure 2)."""
    series = calibration_series(group)
    sizes = sorted({n for points in series.values() for n in points})
    body = [[label, setting.label] + [fmt_cell(points.get(n, [])) for n in sizes]
            for (_, label, setting), points in series.items()]
    used = {e.index for e in group.entries if any(e.label == k[1] and e.setting == k[2] for k in series)}
    if group.dense:
        body.insert(0, ["dense", "—"] + [fmt_cell(group.dense)] * len(sizes))
        used.update(i for i, _ in group.dense)
    table = _table(["method", "sparsity", *(f"{n} samples" for n in sizes)], body, 2)
    return ["", f"### Perplexity by number of calibration samples — {_group_heading(group)}", "", *table, "",
            protocol_line(results, used, group.eval), *_image(plot, "perplexity versus calibration samples")]


def build_report(results: list[dict], inputs: Iterable[tuple[str, int]] = (), plots: dict | None = None,
                 title: str | None = None) -> str:
    """The whole report.md for deduplicated ``results``. ``inputs``: (file, results read);
    ``plots``: {("sparsity", group index) or ("calibration", index): file name} to embed."""
    plots = plots or {}
    inputs = list(inputs)
    groups, calibration = protocol_groups(results), calibration_groups(results)
    files = " ".join(name for name, _ in inputs)
    read = sum(n for _, n in inputs)
    out = [f"# {title or 'zpruner report'}", ""]
    if inputs:
        out += [f"Produced by `zpruner report {files}` from {len(results)} distinct results "
                f"({read} read; a configuration present more than once counts once):", ""]
        out += [f"- `{name}`: {n} result{'s' if n != 1 else ''}" for name, n in inputs] + [""]
    out.append("Cells are perplexities (lower is better; the dataset is in each protocol line) or zero-shot "
               "accuracies in percent (higher is better). "
               "A cell with several seeds shows their mean, their number and the sample standard deviation; "
               "one seed shows its value. Results under different protocols (model, calibration source, samples "
               "or length, evaluation windows, length or data, zero-shot limit) are never in one table.")
    for i, group in enumerate(groups):
        prefix = f"Group {i + 1}: " if len(groups) > 1 else ""
        out += ["", f"## {prefix}{_group_heading(group)}"]
        out += group_sections(results, group, plots.get(("sparsity", i)), plots.get(("pattern", i)))
    if calibration:
        out += ["", "## Calibration size"]
        for j, group in enumerate(calibration):
            out += calibration_section(results, group, plots.get(("calibration", j)))
    return "\n".join(out) + "\n"


def build_tables(results: list[dict]) -> str:
    """The Markdown tables of ``results`` (deduplicated here), without plots or input list."""
    return build_report(dedupe(results))


# ---------------------------------------------------------------- plots

def _line_plot(series: dict[str, dict[float, list[float]]], dense: list[float], xlabel: str, ylabel: str,
               x_log2: bool = False):
    """Mean ± std per x, log y, dense as a dashed line; a matplotlib Figure (no pyplot, no display)."""
    import matplotlib
    from matplotlib import ticker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    # tab20 beyond 10 lines: the default cycle repeats its 10 colours
    ax.set_prop_cycle(color=[matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"](i % 20)
                             for i in range(len(series))] or ["C0"])
    for name, points in series.items():
        xs = sorted(points)
        means = [statistics.fmean(points[x]) for x in xs]
        stds = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    if dense:
        ax.axhline(statistics.fmean(dense), linestyle="--", color="black", label="dense")
    ax.set_yscale("log")
    # plain numbers (60, 80, 100) read better than 6 × 10^1 on perplexity axes
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if x_log2:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for points in series.values() for x in points}))
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _finite(values: Iterable[tuple[Any, float]]) -> list[float]:
    return [v for _, v in values if v is not None and math.isfinite(v)]


def plot_ppl_by_pattern(group: Group):
    """Table 1 as grouped bars: perplexity (log) per method, one bar per 50 % / N:M setting,
    dense as a dashed line; None when the group has no pruned perplexity."""
    import matplotlib
    from matplotlib.figure import Figure

    settings = headline_settings(group)
    cells: dict[str, dict[Setting, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in sorted(group.entries, key=lambda e: e.order):
        if e.ppl is not None and math.isfinite(e.ppl) and e.setting in settings:
            cells[e.label][e.setting].append(e.ppl)
    if not cells:
        return None
    fig = Figure(figsize=(min(12.0, max(6.4, 0.3 * len(cells) * len(settings) + 1.5)), 4.4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(settings)
    colours = matplotlib.colormaps["tab10"]
    for j, setting in enumerate(settings):
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(cells))]
        heights = [statistics.fmean(points[setting]) if points.get(setting) else 0.0 for points in cells.values()]
        ax.bar(xs, heights, width, label=setting.label, color=colours(j % 10))
    dense = _finite(group.dense)
    if dense:
        ax.axhline(statistics.fmean(dense), linestyle="--", color="black", label="dense")
    ax.set_yscale("log")
    ax.set_xticks(range(len(cells)), list(cells), rotation=30, ha="right")
    dataset = group.eval[0] if group.eval else ""
    ax.set_ylabel(f"{dataset} perplexity (log)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_ppl_vs_sparsity(group: Group):
    """Perplexity versus unstructured sparsity, one line per method label; None below 2 sparsities."""
    series: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in group.entries:
        if e.setting.nm is None and e.ppl is not None and math.isfinite(e.ppl):
            series[e.order, e.label][e.setting.sparsity * 100].append(e.ppl)
    # a method measured at one sparsity is a dot, not a curve: Table 1 has it
    series = {key: points for key, points in series.items() if len(points) >= 2}
    if not series:
        return None
    dataset = group.eval[0] if group.eval else ""
    return _line_plot({label: points for (_, label), points in sorted(series.items())}, _finite(group.dense),
                      "unstructured sparsity (%)", f"{dataset} perplexity (log)")


def plot_ppl_vs_calibration(group: Group):
    """Perplexity versus calibration samples, one line per method label and sparsity; None
    when nothing was measured with >= 2 sample counts."""
    series = {f"{label} {setting.label}": {n: _finite(values) for n, values in points.items()}
              for (_, label, setting), points in calibration_series(group).items()}
    series = {name: {n: v for n, v in points.items() if v} for name, points in series.items()}
    if not any(len(points) >= 2 for points in series.values()):
        return None
    dataset = group.eval[0] if group.eval else ""
    return _line_plot(series, _finite(group.dense), "calibration samples", f"{dataset} perplexity (log)",
                      x_log2=True)


# ---------------------------------------------------------------- writing

def write_report(paths: list[str | os.PathLike], out_dir: str | os.PathLike, title: str | None = None) -> list[Path]:
    """Write ``out_dir/report.md`` and its PNG plots; returns the written files, report.md first.

    Every file goes to a temporary name first and is renamed when complete; report.md is
    renamed last, so it never links a plot that is not there."""
    per_file = [(str(p), _load_file(Path(p))) for p in paths]
    results = dedupe([r for _, rs in per_file for r in rs])
    if not results:
        raise ZprunerError(f"no results in {', '.join(str(p) for p in paths) or '(no file given)'}; {HINT}")
    out = check_output_folder("--out", out_dir)
    try:
        return _write_report(results, per_file, out, title)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # _check_result covers what the tables read; this names any remaining oddity in one line
        raise ZprunerError(f"a result in {', '.join(str(p) for p in paths)} is not shaped as zpruner writes it "
                           f"({type(exc).__name__}: {exc}); {HINT}") from exc


def _write_report(results: list[dict], per_file: list, out: Path, title: str | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    groups, calibration = protocol_groups(results), calibration_groups(results)
    figures = {}
    for kind, plot, group_list in (("pattern", plot_ppl_by_pattern, groups),
                                   ("sparsity", plot_ppl_vs_sparsity, groups),
                                   ("calibration", plot_ppl_vs_calibration, calibration)):
        for i, group in enumerate(group_list):
            figure = plot(group)
            if figure is not None:
                suffix = f"_{i + 1}" if len(group_list) > 1 else ""
                figures[kind, i] = (f"ppl_{'by' if kind == 'pattern' else 'vs'}_{kind}{suffix}.png", figure)
    written = []
    for name, figure in figures.values():
        write_atomic(out / name, lambda f, fig=figure: fig.savefig(f, format="png", dpi=120))
        written.append(out / name)
    markdown = build_report(results, [(name, len(rs)) for name, rs in per_file],
                            {key: name for key, (name, _) in figures.items()}, title)
    write_atomic(out / "report.md", lambda f: f.write(markdown.encode()))
    return [out / "report.md", *written]
