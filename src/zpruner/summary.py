"""The few lines ``zpruner prune`` and ``zpruner eval`` print when a run is done."""
from __future__ import annotations

from .results import RunResult


def format_summary(result: RunResult) -> str:
    p = result.prune
    lines = [f"model       {result.model_name}"]
    if p:
        recipe = result.config.get("recipe")
        if isinstance(recipe, dict):  # what --recipe chose (RunConfig.from_options)
            over = recipe.get("overridden_by_options") or {}
            lines.append(f"recipe      {recipe['name']}: " + "  ".join(f"{k} {v}" for k, v in recipe["chose"].items())
                         + (f"  (given instead: {', '.join(f'{k} {v}' for k, v in over.items())})" if over else ""))
        lines.append(f"method      {p['method']}  update {p['update']}  sparsity {p['sparsity']:.2f}  "
                     f"pattern {p['pattern']}" + ("" if p.get("select", "none") == "none" else f"  select {p['select']}"))
        if result.block_sparsity:
            b = result.block_sparsity
            lines.append(f"allocation  {p.get('allocation')}: block sparsity {100 * min(b):.1f} % to {100 * max(b):.1f} %")
    lines += _sparsity_lines(result)
    for dense, label in ((True, "dense"), (False, "pruned" if p else "model")):
        proto = result.ppl_protocol(dense)
        if proto:
            value = "not finite" if proto["value"] is None else f"{proto['value']:10.3f}"
            lines.append(f"perplexity  {label:<7}{value:>10}   ({proto['windows']} windows x {proto['seqlen']} tokens)")
    lines += _zero_shot_table(result)
    lines.append("time        " + "  ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items()))
    return "\n".join(lines)


def percent_below_all(share: float) -> str:
    """One decimal, more where rounding would print 100.0 for a share below one (a router left
    alone is 0.02 % of a block's weights, and it must not read as none)."""
    for digits in (1, 2, 3, 4):
        text = f"{100 * share:.{digits}f}"
        if share >= 1 or float(text) < 100:
            return text
    return text


def _sparsity_lines(result: RunResult) -> list[str]:
    """Zeros over the pruned matrices and over every block weight, both counted from the
    weights (results written before the second count have only the first)."""
    s = result.sparsity
    if "all_block_weights" not in s:
        return [f"sparsity    {100 * s['overall']:.2f} % of block linear weights are zero"]
    lines = [f"sparsity    {100 * s['overall']:.2f} % of the pruned matrices are zero; "
             f"{100 * s['all_block_weights']:.2f} % of all block weights (the pruned matrices hold "
             f"{percent_below_all(s['pruned_share'])} % of them)"]
    reasons = sorted(set(s.get("left_alone", {}).values()))
    if reasons:
        lines.append(f"left alone  {'; '.join(reasons)}")
    removed = [e for e in (result.experts or {}).values() if e.get("removed")]
    if removed:
        counts = sorted({(len(e["removed"]), e["count"]) for e in removed})
        each = ", ".join(f"{r} of {c}" for r, c in counts)
        lines.append(f"experts     removed {each} routed experts in {len(removed)} MoE blocks ({removed[0]['score']}); "
                     f"{100 * s['removed_with_experts']:.2f} % of the blocks' original weights are gone")
    return lines


def _zero_shot_table(result: RunResult) -> list[str]:
    """One row per task: its metric, value ± standard error per measured model, items; then the average."""
    label = "pruned" if result.prune else "model"
    columns = [(name, zs) for zs, name in ((result.dense_zero_shot, "dense"), (result.zero_shot, label))
               if zs is not None]
    if not columns:
        return []
    first = columns[0][1]
    tasks = [name for name in first if name not in ("average", "skipped")]
    lines = [f"zero-shot   {'task':<15}{'metric':<9}" + "".join(f"{name:>17}" for name, _ in columns) + f"{'n':>7}"]
    for task in tasks:
        cells = ""
        for _, entry in columns:
            metric = entry[task]["metric"]
            stderr = entry[task][metric + "_stderr"]
            cells += f"{entry[task][metric]:>10.4f}" + (f" ±{stderr:.3f}" if stderr is not None else " " * 7)
        lines.append(f"            {task:<15}{first[task]['metric']:<9}{cells}{first[task]['n']:>7}")
    lines.append(f"            {'average':<15}{'':<9}" + "".join(f"{entry['average']:>10.4f}{'':7}" for _, entry in columns))
    lines += [f"            skipped {task}: {reason}" for task, reason in first["skipped"].items()]
    return [line.rstrip() for line in lines]
