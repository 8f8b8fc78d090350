"""``prune(model, config)``: one method applied to every decoder block through the engine.

Per linear layer: score -> mask -> update (README, "How it works"), or, for a solver
such as 'sparsegpt', mask and reconstruction together, then the update.
"""
from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import CALIB_BATCH_TOKENS, PruneConfig
from .checkpoint import WorkDir
from .engine import model_device, run_layerwise
from .errors import ZprunerError
from .expert_removal import ExpertTally, experts_to_keep, remove_experts, update_config
from .heldout import Split, heldout_batches, pooled_split, selected_weights, split_recorded
from .experts import check_seen, observed
from .layers import Matrix, block_counts, block_experts, block_prefix, check_pattern, find_matrices
from .masks import keep_mask
from .offload import Blocks
from .progress import bar
from .reallocation import best_permutation
from .registry import get_selection
from .stats import ActivationStats, Recorded, record_inputs
from .weights import checkpoint_names


@dataclass
class PruneReport:
    """Per-layer pruning time (s) by full module name, and the engine's total time."""

    layer_time_s: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    # --reallocate: per layer whose input channels were permuted, the N:M-retained score
    # without and with the permutation
    reallocated: dict[str, dict[str, float]] = field(default_factory=dict)
    # fraction of zeros per layer, counted as each block is checkpointed (a streamed run)
    sparsity: dict[str, float] = field(default_factory=dict)
    # the allocation's target per decoder block (--allocation other than uniform), else empty
    block_sparsity: list[float] = field(default_factory=list)
    # per experts module (full name): routed tokens per expert, fallbacks, removed experts
    experts: dict[str, dict] = field(default_factory=dict)
    # per block index (as text), counted as each block is checkpointed (a streamed run): zeros
    # and totals of the pruned matrices and of every block weight, and what was left alone
    counts: dict[str, dict] = field(default_factory=dict)
    # --select: per matrix, what the selection chose (zpruner.heldout.select's record)
    selection: dict[str, dict] = field(default_factory=dict)


def pruned_weights(
    W0: torch.Tensor, stats: ActivationStats | None, config: PruneConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', keep) for one dense layer W0: [out, in]; W' float32 with exactly keep's zeros."""
    W0 = W0.float()
    method = config.method_entry
    if method.kind == "solver":
        W, keep = method(W0, stats, sparsity=config.sparsity, pattern=config.parsed_pattern,
                         constants=config.constants, **_solver_group(config))
    else:
        keep = keep_mask(method(W0, stats, constants=config.constants), config.sparsity, config.parsed_pattern,
                         config.group or method.default_group)
        # None stands for W0 masked by keep, made only when needed: EC makes it chunk by
        # chunk in its first pass instead of as a whole-matrix product with a bool mask
        W = None
    # W is this function's own float32 copy (or None): the update may work in place
    return config.update_entry(W0, W, keep, stats, constants=config.constants), keep


def _solver_group(config: PruneConfig) -> dict:
    """A solver that compares its mask over a group (one with a default_group) gets it."""
    group = config.group or config.method_entry.default_group
    return {} if group is None else {"group": group}


@torch.no_grad()
def prune_matrix(matrix: Matrix, stats: ActivationStats | Split | None, config: PruneConfig) -> tuple[torch.Tensor, dict | None]:
    """Prune and update one matrix in place; returns (keep: [out, in], the selection's record or None)."""
    W = matrix.weight
    split = isinstance(stats, Split)
    new, keep, *record = selected_weights(W, stats, config, _solver_group(config)) if split else \
        pruned_weights(W, stats, config)
    W.copy_(new.to(W.dtype))
    return keep, record[0] if record else None


def permute_inputs(layer: nn.Module, producers: list[nn.Module], perm: torch.Tensor) -> None:
    """Reorder ``layer``'s input channels and, identically, the output rows (and biases) of
    the layers that produce them: y = W[:, perm] · x[perm] is the same function."""
    W = Matrix.of(layer).weight
    W.copy_(W[:, perm])
    for producer in producers:
        Wp = Matrix.of(producer).weight
        Wp.copy_(Wp[perm])
        if getattr(producer, "bias", None) is not None:
            producer.bias.copy_(producer.bias[perm])


def permute_stats(stats: ActivationStats | Split, perm: torch.Tensor) -> None:
    if isinstance(stats, Split):
        return stats.each(lambda part: permute_stats(part, perm))
    stats.sum, stats.sumsq = stats.sum[perm], stats.sumsq[perm]
    if stats.xtx is not None:
        stats.xtx = stats.xtx[perm][:, perm]
        stats.xtx_changed()


@torch.no_grad()
def reallocate_inputs(
    matrix: Matrix, matrices: dict[str, Matrix], stats: ActivationStats, config: PruneConfig, forward
) -> dict[str, float] | None:
    """RIA channel reallocation applied so the weights end N:M in the model's own order.

    A permutation of a layer's inputs is only free when it can be folded into the layers
    that produce those inputs (e.g. gate/up rows for down_proj): candidates are the
    block's linear layers whose output size is this layer's input size, and the permutation
    is kept only if the block's output on a calibration sample is unchanged; otherwise the
    layer gets the plain N:M mask. Experts' slices are not permuted. Returns the retained
    scores when applied, else None.
    """
    if matrix.layer is None:
        return None
    pattern = config.parsed_pattern
    W = matrix.weight
    producers = [m.layer for m in matrices.values()
                 if m.layer is not None and m.layer is not matrix.layer and m.weight.shape[0] == W.shape[1]]
    if not producers:
        return None
    perm, plain, realloc = best_permutation(config.method_entry(W.float(), stats, constants=config.constants),
                                          pattern.n, pattern.m)
    if perm is None:
        return None
    perm = perm.to(W.device)
    before = forward(limit=1)[0]
    permute_inputs(matrix.layer, producers, perm)
    after = forward(limit=1)[0]
    if not torch.allclose(after, before, rtol=1e-3, atol=1e-4 * before.abs().max().item()):
        permute_inputs(matrix.layer, producers, torch.argsort(perm))  # exact undo: a pure reindexing
        return None
    permute_stats(stats, perm.to(stats.sum.device))
    return {"retained_plain": plain, "retained_reallocated": realloc}


def prune(
    model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None = None, progress: bool = True,
    blocks: Blocks | None = None, checkpoint: WorkDir | None = None, spill: str | os.PathLike | None = None,
) -> PruneReport:
    """Prune ``model`` in place as ``config`` says.

    calibration: [nsamples, seqlen] token ids (see ``zpruner.calibration``); required when
    the method uses activations, ignored otherwise. ``blocks``: where the blocks live
    (``offload``; default: in memory). ``checkpoint``: the work folder of a streamed run,
    which receives every finished block and may already hold the first ones (``--resume``).
    ``spill``: a folder for the calibration activations (``--activations disk``).
    """
    check_pattern(model, config.parsed_pattern)
    report = PruneReport()
    blocks = blocks if blocks is not None else Blocks(model, model_device(model))
    prefix = block_prefix(model)
    start = time.perf_counter()
    dtype = next(model.parameters()).dtype
    first = _resume_report(model, blocks, checkpoint, report)
    report.block_sparsity = _allocation(model, calibration, config, progress, blocks, spill, checkpoint)
    step = _BlockStep(model, config, report, prefix)

    def finished(i: int, block: nn.Module, hidden: list[torch.Tensor] | None) -> None:
        if checkpoint is not None:  # a model in memory is counted at the end (measure_sparsity), not here
            checkpoint.block_done(i, _block_state(model, block), dtype, hidden, step.block_report(i, block))

    if not config.needs_calibration:
        # Data-free: no reason to run the model at all.
        for i in bar(range(first, len(blocks)), desc="blocks", unit="block", disable=not progress):
            block = blocks.load(i)
            step.prune_block(i, block, find_matrices(block), None)
            finished(i, block, None)
            blocks.done(i, block)
    else:
        _require_tokens(calibration, f"method '{config.method}'")
        samples = calibration  # with --select heldout, held-out batches too (and which batches they are)
        if get_selection(config.select).needs_split:
            samples, step.parts = heldout_batches(model, calibration, config, type(blocks) is not Blocks,
                                                  CALIB_BATCH_TOKENS)
        resume = (first, checkpoint.activations()) if 0 < first < len(blocks) else None
        if first < len(blocks):
            run_layerwise(model, samples, step.visit, progress, config.calib_batch_size, last_outputs=False,
                          blocks=blocks, after=finished, resume=resume, spill=spill)
    report.total_s = time.perf_counter() - start
    return report


class _BlockStep:
    """What ``prune`` does to one block: remove whole experts (``--prune-experts``), record
    the statistics of its matrices (experts on their own tokens), prune them."""

    def __init__(self, model: nn.Module, config: PruneConfig, report: PruneReport, prefix: str):
        self.model, self.config, self.report, self.prefix = model, config, report, prefix
        self.parts: tuple[list[int], list[int]] | None = None  # --select heldout: (fitted, held-out) batches

    def visit(self, i: int, block: nn.Module, forward) -> None:
        config = self.config
        if config.prune_experts > 0 and block_experts(block):
            self.remove_experts(i, block, forward)
        matrices = find_matrices(block)
        linear_only = all(m.expert is None for m in matrices.values())
        recorded = []
        for batches in self.parts or [None]:  # one pass, or one per part of a held-out split
            with record_inputs(matrices, hessian=config.uses_hessian,
                               pool_experts=config.expert_stats == "pooled") as stats:
                # a pass that stops once every layer has its input, where no experts must run to the end
                forward(inputs_of=[m.layer for m in matrices.values()] if linear_only else None, batches=batches)
            recorded.append(stats)
        stats = recorded[0] if len(recorded) == 1 else split_recorded(*recorded, calibration=config.heldout_texts == 0)
        self.report_experts(i, block, matrices, stats)
        self.prune_block(i, block, matrices, stats, forward)

    def prune_block(self, i: int, block: nn.Module, matrices: dict[str, Matrix],
                    stats: dict[str, ActivationStats] | None, forward=None) -> None:
        config, report = self.config, self.report
        block_config = config.for_block(report.block_sparsity[i]) if report.block_sparsity else config
        for name, matrix in matrices.items():
            full = f"{self.prefix}.{i}.{name}"
            t = time.perf_counter()
            # popped, so each matrix's statistics are freed once it is pruned: with a Hessian
            # they are d_in² floats per layer (888 MB per LLaMA-2-7B block), and the largest
            # layer's solve then runs without the others' beside it
            matrix_stats = stats.pop(name) if stats else None
            if config.reallocate:
                gain = reallocate_inputs(matrix, matrices, matrix_stats, block_config, forward)
                if gain is not None:
                    report.reallocated[full] = gain
            _, record = prune_matrix(matrix, matrix_stats, block_config)
            if record is not None:
                report.selection[full] = record
            report.layer_time_s[full] = time.perf_counter() - t

    def remove_experts(self, i: int, block: nn.Module, forward) -> None:
        """Score the experts on the calibration tokens (one observed pass of the dense
        block), keep the best ``1 - prune_experts`` of them in every experts module."""
        config = self.config
        experts = block_experts(block)
        tallies = {ex.name: ExpertTally.empty(ex.count) for ex in experts}

        def on_input(ex, param: str, expert: int, x: torch.Tensor, _transposed: bool) -> None:
            if param == ex.params[0]:
                tallies[ex.name].tokens[expert] += x.shape[0]

        def on_output(ex, expert: int, contribution: torch.Tensor) -> None:
            tallies[ex.name].contribution[expert] += float(contribution.float().norm(dim=-1).sum())

        with observed(experts, on_input, on_output) as watches:
            forward()
        check_seen(watches)
        for ex in experts:
            tally = tallies[ex.name]
            scores = tally.score(config.expert_score, config.seed + i)
            keep = experts_to_keep(scores, config.prune_experts)
            before = ex.count
            removed = remove_experts(block, ex, keep)
            update_config(self.model.config, before, ex.count)
            self.report.experts[f"{self.prefix}.{i}.{ex.name}"] = {
                "count": before, "kept": keep, "removed": [e for e in range(before) if e not in keep],
                "removed_weights": removed, "score": config.expert_score, "scores": scores,
                "routed_tokens_dense": tally.tokens}

    def report_experts(self, i: int, block: nn.Module, matrices: dict[str, Matrix], stats: Recorded) -> None:
        """Per experts module: each expert's routed tokens; an expert whose statistics are too
        thin for the method (fewer tokens than ``min_tokens``) gets the pooled ones, named."""
        experts = block_experts(block)
        for ex in experts:
            entry = self.report.experts.setdefault(f"{self.prefix}.{i}.{ex.name}", {})
            entry["tokens"] = [stats.tokens[n] for n in _first_matrix_of_each_expert(ex, matrices)]
            entry["stats"] = self.config.expert_stats
            entry["fallback"] = {}
        if self.config.expert_stats == "pooled":
            return
        groups: dict[str, list[str]] = {}
        for name, matrix in matrices.items():
            if matrix.group is not None:
                groups.setdefault(matrix.group, []).append(name)
        for names in groups.values():
            thin = [n for n in names if stats.tokens[n] < min_tokens(self.config, matrices[n])]
            if not thin:
                continue
            shared = pooled_split([stats[n] for n in names])
            for name in thin:
                m = matrices[name]
                fallbacks = self.report.experts[f"{self.prefix}.{i}.{m.experts.name}"]["fallback"]
                fallbacks[name] = (f"pooled statistics: {stats.tokens[name]} routed tokens, the method needs "
                                   f"{min_tokens(self.config, m)}")
                stats[name] = shared

    def block_report(self, i: int, block: nn.Module) -> dict:
        """The checkpoint's record of block ``i``: its matrices' times, reallocations,
        zeros, and its experts' report (a resumed run reads it back)."""
        per_matrix, pruned, everything, alone = block_counts(block, f"{self.prefix}.{i}.")
        self.report.sparsity.update(per_matrix)
        names = set(per_matrix)
        experts = {k: v for k, v in self.report.experts.items() if k.startswith(f"{self.prefix}.{i}.")}
        counts = {"pruned": [pruned.zeros, pruned.total], "all": [everything.zeros, everything.total],
                  "left_alone": alone}
        self.report.counts[str(i)] = counts
        return {"layer_time_s": {n: self.report.layer_time_s[n] for n in names if n in self.report.layer_time_s},
                "reallocated": {n: self.report.reallocated[n] for n in names if n in self.report.reallocated},
                "selection": {n: self.report.selection[n] for n in names if n in self.report.selection},
                "sparsity": per_matrix, "experts": experts, "counts": {str(i): counts}}


def _first_matrix_of_each_expert(ex, matrices: dict[str, Matrix]) -> list[str]:
    """The name of each expert's first matrix (the one that reads the routed tokens)."""
    if ex.fused:
        return [ex.matrix_name(ex.params[0], e) for e in range(ex.count)]
    first = next(n for n, m in matrices.items() if m.experts is ex)  # "<experts>.0.<layer>"
    layer = first[len(ex.name) + 1:].split(".", 1)[1]
    return [f"{ex.name}.{j}.{layer}" for j in range(ex.count)]


def min_tokens(config: PruneConfig, matrix: Matrix) -> int:
    """Tokens an expert's statistics need: one for an activation norm; d_in for a Hessian
    (XᵀX of fewer tokens than inputs is singular, and a reconstruction on it fits those
    few tokens rather than the expert's function)."""
    return matrix.weight.shape[1] if config.uses_hessian else 1


def _resume_report(model: nn.Module, blocks: Blocks, checkpoint: WorkDir | None, report: PruneReport) -> int:
    """The first block to prune: after those a checkpoint holds, whose report is taken over
    (and whose experts, where some were removed, are removed from the model's structure too)."""
    if checkpoint is None or not checkpoint.done:
        return 0
    for part, values in checkpoint.reports().items():
        getattr(report, part).update(values)
    prefix = block_prefix(model)
    for i in range(checkpoint.done):
        block = blocks.blocks[i]
        for ex in block_experts(block):
            kept = report.experts.get(f"{prefix}.{i}.{ex.name}", {}).get("kept")
            if kept is not None and len(kept) < ex.count:
                before = ex.count
                remove_experts(block, ex, kept)
                update_config(model.config, before, ex.count)
    return checkpoint.done


def _allocation(model: nn.Module, calibration, config: PruneConfig, progress: bool, blocks: Blocks, spill,
                checkpoint: WorkDir | None) -> list[float]:
    """Each block's sparsity under ``--allocation`` ([] for uniform), measured once on the
    dense model and kept in the checkpoint for a resumed run."""
    if checkpoint is not None and "block_sparsity" in checkpoint.state:
        return checkpoint.state["block_sparsity"]

    def survey(measure):
        return _survey(model, calibration, measure, config, progress, blocks, spill)

    shares = config.allocation_entry(survey, sparsity=config.sparsity, pattern=config.parsed_pattern,
                                     constants=config.constants) or []
    if checkpoint is not None:
        checkpoint.remember("block_sparsity", shares)
    return shares


def _require_tokens(calibration: torch.Tensor | None, who: str) -> None:
    if calibration is None or calibration.ndim != 2 or calibration.shape[0] == 0:
        raise ZprunerError(f"{who} needs calibration token ids of shape [nsamples, seqlen]")


def _survey(model: nn.Module, calibration: torch.Tensor | None, measure, config: PruneConfig, progress: bool,
            blocks: Blocks, spill) -> tuple[list[float], list[int]]:
    """``measure(weights, stats)`` of every block of the dense model, and each block's prunable
    weights: one pass over the calibration data, statistics recorded during the forward that
    carries the activations on (an allocation's survey, before any block is pruned)."""
    _require_tokens(calibration, f"allocation '{config.allocation}'")
    values: list[float] = []
    sizes: list[int] = []
    current: list = []
    with ExitStack() as recording:  # the hooks go however the pass ends
        def visit(_i: int, block: nn.Module, _forward) -> None:
            matrices = find_matrices(block)
            current[:] = [matrices, recording.enter_context(record_inputs(matrices))]

        def after(_i: int, _block: nn.Module, _hidden) -> None:
            matrices, stats = current
            recording.close()  # this block's hooks off; the stack takes the next block's
            weights = {name: matrix.weight for name, matrix in matrices.items()}
            values.append(measure(weights, stats))
            sizes.append(sum(W.numel() for W in weights.values()))

        run_layerwise(model, calibration, visit, progress, config.calib_batch_size, blocks=blocks, after=after,
                      spill=spill)
    return values, sizes


def _block_state(model: nn.Module, block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's stored tensors under their full names, as save_pretrained names them."""
    prefix = next(name for name, m in model.named_modules() if m is block)
    return checkpoint_names(model, {f"{prefix}.{name}": t for name, t in block.state_dict().items()})
