"""Which results share a table: a result's coordinates (method label, setting, seed),
the protocol groups, the dense measurements of each group, the calibration-size groups."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..registry import UPDATES
from ..results import RunResult, config_key



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
    """'wanda', 'cvr+ec', 'magnitude+sparsegpt', 'ria+realloc', 'admm+owl' ..."""
    label = prune["method"]
    if prune.get("update", "none") != "none":
        label += "+" + prune["update"]
    if prune.get("reallocate"):
        label += "+realloc"
    if prune.get("allocation", "uniform") != "uniform":
        label += "+" + prune["allocation"]
    if prune.get("select", "none") != "none":
        label += "+" + prune["select"]
    return label


def _rank(order: tuple, name: str) -> int:
    return order.index(name) if name in order else len(order)


def zs_key(result: RunResult, zero_shot: dict | None) -> tuple | None:
    """(item limit, measured tasks): zero-shot numbers are comparable only when both match."""
    if not zero_shot:
        return None
    tasks = tuple(k for k, v in zero_shot.items() if isinstance(v, dict) and k != "skipped")
    return result.zero_shot_limit, tasks


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


# Rows in the papers' order; other registered methods follow (by name), updates in their
# registration order (the ablation's: none, ec-col, ec-row, ec, then sparsegpt).
METHOD_ORDER = ("magnitude", "wanda", "sparsegpt", "ria", "zpruner", "cvr", "admm")


def _constants(result: RunResult) -> dict:
    """What tells apart results of one method label: the comparison group, the constants of
    the method and update it used (the registry's), and the dtype; results written under
    other defaults of an unused constant are the same method."""
    config = result.prune_config
    return {"group": config.group, **config.used_constants(), "dtype": result.model.get("dtype")}


def make_entries(results: list[RunResult], indices: list[int]) -> list[Entry]:
    """Entries of ``results[indices]``. Results with the same method label but different
    constants (CVR's alpha, the EC clamp, the dtype ...) are different methods: their labels
    get the differing constants appended instead of being averaged together."""
    variants: dict[str, list[dict]] = defaultdict(list)
    for i in indices:
        base, constants = method_label(results[i].prune), _constants(results[i])
        if constants not in variants[base]:
            variants[base].append(constants)
    entries = []
    perplexity_of: set[str] = set()
    for i in indices:
        result = results[i]
        prune, constants = result.prune, _constants(result)
        # A configuration measured again with zero-shot tasks added repeats its perplexity
        # measurement: the perplexity tables count the first one only.
        ppl_key = config_key(RunResult({**result.config, "zero_shot": None}))
        ppl = result.ppl() if ppl_key not in perplexity_of else None
        perplexity_of.add(ppl_key)
        base = method_label(prune)
        differing = sorted(k for k in constants if len({json.dumps(c.get(k)) for c in variants[base]}) > 1)
        suffix = f" ({', '.join(f'{k}={json.dumps(constants.get(k))}' for k in differing)})" if differing else ""
        order = (_rank(METHOD_ORDER, prune["method"]), _rank(tuple(UPDATES), prune.get("update", "none")),
                 bool(prune.get("reallocate")), prune.get("allocation", "uniform") != "uniform", base, suffix)
        entries.append(Entry(i, base, base + suffix, order, setting_of(prune), prune.get("seed"),
                             prune.get("nsamples"), ppl, result.zero_shot, zs_key(result, result.zero_shot)))
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


def _dense_pools(results: list[RunResult]) -> tuple[dict, dict, dict]:
    """Dense measurements by (model, eval key) and by (model, zero-shot key). Dense-only runs
    are preferred; else the ``dense_*`` baselines of pruned runs, which repeat one
    measurement per run, so each distinct value counts once."""
    members, ppl, zs = defaultdict(list), defaultdict(list), defaultdict(list)
    baseline_ppl, baseline_zs = defaultdict(dict), defaultdict(dict)
    for i, result in enumerate(results):
        model = result.model_name
        if result.prune is None:
            members[model, result.eval_key()].append(i)
            # the same evaluation of the same dense model, repeated beside other measurements
            # (e.g. a dense run with zero-shot tasks), is one measurement
            value = result.ppl()
            if value is not None and all(round(v, 9) != round(value, 9) for _, v in ppl[model, result.eval_key()]):
                ppl[model, result.eval_key()].append((i, value))
            if zs_key(result, result.zero_shot):
                zs[model, zs_key(result, result.zero_shot)].append((i, result.zero_shot))
            continue
        dense_ppl = result.ppl(dense=True)
        if dense_ppl is not None:
            baseline_ppl[model, result.eval_key(dense=True)].setdefault(round(dense_ppl, 9), (i, dense_ppl))
        dense_zs = result.dense_zero_shot
        if zs_key(result, dense_zs):
            baseline_zs[model, zs_key(result, dense_zs)].setdefault(json.dumps(dense_zs, sort_keys=True),
                                                                    (i, dense_zs))
    for pool, baseline in ((ppl, baseline_ppl), (zs, baseline_zs)):
        for key, values in baseline.items():
            pool.setdefault(key, list(values.values()))
    return members, ppl, zs


def _calibration(result: RunResult, with_nsamples: bool = True) -> tuple:
    prune = result.prune
    return prune.get("calibration"), prune.get("nsamples") if with_nsamples else None, prune.get("seqlen")


def _join_data_free(indices: dict[tuple, list[int]], data_free: dict[tuple, list[int]], with_nsamples: bool) -> None:
    """A data-free method (magnitude) is the same whatever the calibration, and a sweep runs
    it once: it joins every protocol group of its model and evaluation. It shows no trend
    over calibration sizes, so it stays out of those groups."""
    for (model, eval_key), free in data_free.items():
        targets = [k for k in indices if k[0] == model and k[2] == eval_key] if with_nsamples else []
        for key in targets:
            indices[key] = indices[key] + free
        if not targets:
            indices[model, None, eval_key] = free


def _groups(results: list[RunResult], with_nsamples: bool) -> list[Group]:
    members, ppl, zs = _dense_pools(results)
    indices: dict[tuple, list[int]] = defaultdict(list)  # insertion order = first appearance
    data_free: dict[tuple, list[int]] = defaultdict(list)
    for i, result in enumerate(results):
        if result.prune is None:
            continue
        if result.uses_calibration:
            indices[result.model_name, _calibration(result, with_nsamples), result.eval_key()].append(i)
        else:
            data_free[result.model_name, result.eval_key()].append(i)
    _join_data_free(indices, data_free, with_nsamples)
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


def protocol_groups(results: list[RunResult]) -> list[Group]:
    return _groups(results, with_nsamples=True)


def calibration_series(group: Group) -> dict[tuple, dict[int, list[tuple[Any, float]]]]:
    """{(order, label, setting): {nsamples: [(seed, perplexity)]}} for the methods and
    sparsities measured with >= 2 calibration sizes (the others show no trend)."""
    series: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for e in group.entries:
        if e.ppl is not None and e.nsamples is not None:
            series[(e.order, e.setting.order), e.label, e.setting][e.nsamples].append((e.seed, e.ppl))
    return {key: dict(points) for key, points in sorted(series.items(), key=lambda kv: kv[0][0]) if len(points) >= 2}


def calibration_groups(results: list[RunResult]) -> list[Group]:
    """Groups by everything but the number of calibration samples, kept when some method
    and sparsity was measured with >= 2 sample counts."""
    return [g for g in _groups(results, with_nsamples=False) if calibration_series(g)]


def headline_settings(group: Group) -> list[Setting]:
    """The columns of Tables 1 and 5: 50 % unstructured and the N:M patterns, as in the
    papers (other sparsities are Table 4's); every setting when 50 % was not measured."""
    settings = sorted({e.setting for e in group.entries if e.ppl is not None}, key=lambda s: s.order)
    headline = [s for s in settings if s.nm or s.sparsity == 0.5]
    return headline if any(s.nm is None for s in headline) else settings
