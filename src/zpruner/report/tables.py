"""The report's Markdown: cells, tables, protocol lines, the sections of a protocol group
and of a calibration-size group, and the whole report.md."""
from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from ..results import RunResult, dedupe
from .grouping import (Entry, Group, Setting, calibration_groups, calibration_series, headline_settings, method_label,
                       protocol_groups, zs_key)

# The statistical-correction paper's ablation, each row adding one ingredient to the last.
ABLATION = (("wanda", "Wanda"), ("cvr", "+ CVR score"), ("cvr+ec-col", "+ EC along columns"),
            ("cvr+ec", "+ EC along rows (full CVR+EC)"))


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


def protocol_line(results: list[RunResult], used: set[int], eval_key: tuple | None, zs: str | None = None) -> str:
    """What the numbers of a table were measured under, derived from the results it used."""
    used_results = [results[i] for i in sorted(used)]
    pruned = [r.prune for r in used_results if r.prune and r.uses_calibration]
    data_free = [r.prune for r in used_results if r.prune and not r.uses_calibration]
    parts = [f"model {_join(r.model_name for r in used_results)}"]
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
    presets = {r.preset for r in used_results} - {None}
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


def _best_table(group: Group, settings: list[Setting]) -> tuple[list[str], set[int]]:
    """Per sparsity setting, the configuration with the lowest perplexity, beside SparseGPT's
    (the baseline to beat) when it was measured in the same group."""
    cells: dict[tuple, list[Entry]] = defaultdict(list)
    for e in group.entries:
        if e.ppl is not None:
            cells[e.setting, e.label].append(e)
    body, used = [], set()
    for setting in settings:
        means = {label: statistics.fmean(e.ppl for e in es) for (s, label), es in cells.items() if s == setting}
        if len(means) < 2:
            continue
        best = min(means, key=means.get)
        reference = means.get("sparsegpt")
        body.append([setting.label, best, f"{means[best]:.2f}", "" if reference is None else f"{reference:.2f}",
                     "" if reference is None else f"{means[best] / reference:.3f}"])
        used.update(e.index for label in (best, "sparsegpt") for e in cells.get((setting, label), []))
    if not body:
        return [], used
    return _table(["sparsity", "best configuration", "perplexity", "sparsegpt", "× sparsegpt"], body, 2), used


def _allocation_table(results: list[RunResult], group: Group) -> tuple[list[str], set[int]]:
    """The per-block sparsities of results pruned with a non-uniform allocation (OWL)."""
    body, used = [], set()
    for e in sorted(group.entries, key=lambda e: (e.order, e.setting.order)):
        blocks = results[e.index].block_sparsity
        if blocks:
            body.append([e.label, e.setting.label, f"{min(blocks) * 100:.1f}", f"{max(blocks) * 100:.1f}",
                         " ".join(f"{x * 100:.1f}" for x in blocks)])
            used.add(e.index)
    if not body:
        return [], used
    return _table(["method", "sparsity", "min %", "max %", "per block, first to last (%)"], body, 2), used


def _image(name: str | None, alt: str) -> list[str]:
    return ["", f"![{alt}]({name})"] if name else []


def _group_heading(group: Group) -> str:
    calibration = "no calibration"
    if group.calibration:
        source, nsamples, seqlen = group.calibration
        calibration = f"calibration {source} {nsamples if nsamples is not None else 'N'} × {seqlen}"
    return f"{group.model}, {calibration}, {_describe_eval(group.eval)}"


def group_sections(results: list[RunResult], group: Group, sparsity_plot: str | None = None,
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
        zs_keys = list(dict.fromkeys(zs_key(results[i], results[i].zero_shot) for i in group.dense_members))
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
    emit("Best configuration per sparsity", *_best_table(group, settings))
    emit("Per-block sparsity of non-uniform allocations", *_allocation_table(results, group))
    bases = {e.label: e.base for e in group.entries if e.ppl is not None}
    ablation = [(label, name + label[len(base):]) for base, name in ABLATION
                for label, _ in labels if bases.get(label) == base]
    # an ablation starts from Wanda and swaps in the CVR score; later steps are optional
    if {"wanda", "cvr"} <= {bases[label] for label, _ in ablation}:
        emit("Table 5 — ablation", *_ppl_table(group, headline, ablation))
    return out


def calibration_section(results: list[RunResult], group: Group, plot: str | None = None) -> list[str]:
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


def build_report(results: list[RunResult], inputs: Iterable[tuple[str, int]] = (), plots: dict | None = None,
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


def build_tables(results: Iterable[RunResult | dict]) -> str:
    """The Markdown tables of ``results`` (results or their dicts; deduplicated here),
    without plots or input list."""
    return build_report(dedupe([r if isinstance(r, RunResult) else RunResult.from_dict(r) for r in results]))


