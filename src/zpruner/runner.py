"""One ``zpruner prune`` / ``zpruner eval`` run: load, calibrate, prune, evaluate, write.

Outputs are written to a temporary path and renamed when complete, so a failed run never
leaves a half-written model or results file behind.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .checkpoint import WorkDir, checkpoint_options, default_work_dir, save_streamed, sparsity_of
from .config import STREAMED_ZERO_SHOT, EvalConfig, RunConfig
from .data import token_digest
from .errors import ZprunerError
from .evaluate import perplexity
from .io import check_model_target, check_output_file, save_folder_atomic, write_json_atomic
from .layers import check_pattern, find_blocks, measure_sparsity
from .results import replace_non_finite, run_key
from .workspace import Workspace
from .zeroshot import run_tasks

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import transformers

    return {
        "zpruner": importlib.metadata.version("zpruner"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": importlib.metadata.version("lm_eval"),
        "python": platform.python_version(),
    }


class Timer(dict):
    """Seconds spent per named phase."""

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


def check_output_paths(config: RunConfig) -> None:
    """Refuse before any work when an output could not be written at the end."""
    if config.output_json is not None:
        check_output_file("--output-json", config.output_json)
    if config.save is not None:
        check_model_target(config.save, config.overwrite)


def save_model(directory: str | os.PathLike, model: nn.Module, tokenizer, manifest: dict, overwrite: bool) -> None:
    """save_pretrained (safetensors) and the tokenizer, swapped in when complete (zpruner.io)."""
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    save_folder_atomic(directory, write, manifest, overwrite)


def check_context(model: nn.Module, seqlen: int, option: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ZprunerError(f"{option} {seqlen} exceeds the model's context of {limit} tokens; lower {option}")


def eval_seqlen(model: nn.Module, config: EvalConfig) -> int:
    """The asked window, else the model's context capped at 2048 (the papers' setting)."""
    if config.seqlen is not None:
        return config.seqlen
    return min(2048, getattr(model.config, "max_position_embeddings", 2048) or 2048)


def _perplexity_entry(model, tokens: torch.Tensor, config: EvalConfig, progress: bool, blocks) -> dict:
    result = perplexity(model, tokens, eval_seqlen(model, config), config.windows, config.batch_size, progress,
                        blocks)
    return {"value": result.value, "windows": result.windows, "seqlen": result.seqlen, "predicted_tokens": result.tokens}


def _check_model(model: nn.Module, tokenizer, config: RunConfig, streamed: bool) -> None:
    if config.zero_shot is not None and streamed:
        raise ZprunerError(STREAMED_ZERO_SHOT)
    if config.zero_shot is not None and tokenizer.eos_token_id is None:
        raise ZprunerError(f"the tokenizer of '{config.model.name}' has no end-of-sequence token, which lm-eval "
                           "needs for zero-shot tasks; set eos_token in its tokenizer_config.json or drop --tasks")
    find_blocks(model)  # results count sparsity over the blocks, pruned or not
    if config.prune is not None:
        check_pattern(model, config.prune.parsed_pattern)
        check_context(model, config.prune.seqlen, "--seqlen")
    if config.eval is not None:
        check_context(model, eval_seqlen(model, config.eval), "--eval-seqlen")


def warn_partial(sparsity: dict, pruned: bool) -> None:
    """One line when the pruned matrices are less than 90 % of the blocks' weights: what was
    left alone, so that no one reads a sparsity over part of the model as the model's."""
    share = sparsity.get("pruned_share", 1.0)
    if not pruned or share >= 0.9:
        return
    reasons: dict[str, int] = {}
    for why in sparsity["left_alone"].values():
        reasons[why] = reasons.get(why, 0) + 1
    left = "; ".join(f"{why} ({n} tensor{'s' if n > 1 else ''})" for why, n in sorted(reasons.items()))
    log.warning("the pruned matrices hold %.1f %% of the blocks' weights: %.2f %% of all block weights are zero; "
                "left alone: %s", 100 * share, 100 * sparsity["all_block_weights"], left)


def check_eval_length(tokens: torch.Tensor, seqlen: int, dataset: str) -> None:
    """Before pruning: the evaluation text must hold one window."""
    if tokens.shape[1] < seqlen:
        raise ZprunerError(f"evaluation text '{dataset}' has {tokens.shape[1]} tokens, fewer than one window of "
                           f"{seqlen}; lower --eval-seqlen or give a longer --eval-dataset")


def run(config: RunConfig, progress: bool = True, workspace: Workspace | None = None) -> dict:
    """Run ``config`` (prune when ``config.prune`` is set, else evaluate as is); returns the results.

    Every input is checked (options, model, calibration text, zero-shot task data) before
    the first long phase. Perplexity and zero-shot accuracy measure the model as it is:
    after pruning, the pruned one (and with ``dense_baseline`` the dense one first).
    ``workspace`` lets consecutive runs on one model share its loading and data (zpruner.sweep).
    Under ``offload`` disk the model is streamed block by block (zpruner.offload), with a
    checkpoint after each block in the work folder (``--resume``).
    """
    check_output_paths(config)
    if config.prune is None and config.save is not None:
        raise ZprunerError("--save needs pruning; 'zpruner eval' only measures a model")
    if workspace is None:
        workspace = Workspace(config.model, config.data_dir, offload_mode=config.offload)
    elif (workspace.model_config, workspace.data_dir) != (config.model, config.data_dir):
        raise ZprunerError("this run's model or data directory differs from its workspace's")
    timer = Timer()
    results: dict = {"config": config.to_dict(), "versions": versions()}
    with timer.phase("zero_shot"):
        zero_shot_tasks = workspace.zero_shot_tasks(config.zero_shot)
    with timer.phase("load"):
        model, tokenizer = workspace.dense_model()
    _check_model(model, tokenizer, config, workspace.streamed)
    work = None
    if config.prune is not None and workspace.streamed:
        work = WorkDir(Path(config.work_dir).expanduser() if config.work_dir else
                       default_work_dir(config.save, config.output_json, config.model.name),
                       run_key(config), checkpoint_options(config), config.resume, len(find_blocks(model)),
                       config.prune.needs_calibration)
    elif config.resume:
        raise ZprunerError(f"--resume: this run is not streamed (offload {workspace.mode}); only --offload disk "
                           "keeps checkpoints")
    calibration = None
    if config.prune is not None:
        with timer.phase("calibration"):
            calibration = workspace.calibration(config.prune)
        if calibration is not None:
            results["calibration_sha256_16"] = token_digest(calibration)
    tokens = None
    if config.eval is not None:
        with timer.phase("eval"):
            tokens, digest = workspace.eval_tokens(config.eval.dataset)
        check_eval_length(tokens, eval_seqlen(model, config.eval), config.eval.dataset)

    def measure(prefix: str) -> None:
        """Every requested measurement of the model as it is now, under keys starting with ``prefix``."""
        if tokens is not None:
            with timer.phase("eval"):
                entry = {**_perplexity_entry(model, tokens, config.eval, progress, workspace.blocks),
                         "data_sha256_16": digest}
            results[prefix + "perplexity"] = {config.eval.dataset: entry["value"]}
            results[prefix + "perplexity_protocol"] = entry
        if zero_shot_tasks is not None:
            zs = config.zero_shot
            with timer.phase("zero_shot"):
                results[prefix + "zero_shot"] = run_tasks(model, tokenizer, zero_shot_tasks, zs.limit,
                                                          zs.batch_size, progress)

    if config.prune is None or config.dense_baseline:
        measure("" if config.prune is None else "dense_")
    report = None
    if config.prune is not None:
        with timer.phase("pruning"):
            spill = None
            if config.activations == "disk":
                spill = str(work.path / "state") if work is not None else tempfile.gettempdir()
            report = workspace.prune(config.prune, calibration, progress, work, spill)
        results["layer_time_s"] = report.layer_time_s
        if config.prune.reallocate:
            results["reallocated"] = report.reallocated
        if report.block_sparsity:
            results["block_sparsity"] = report.block_sparsity
        if report.selection:
            results["selection"] = report.selection
        measure("")
    if workspace.streamed:  # counted as each block was pruned, or read (zpruner eval)
        results["sparsity"] = sparsity_of(*((report.sparsity, report.counts) if report else workspace.blocks.counted()))
    else:
        results["sparsity"] = measure_sparsity(model)
    if report is not None and report.experts:
        results["experts"] = report.experts
        removed = sum(entry.get("removed_weights", 0) for entry in report.experts.values())
        if removed:  # of the blocks' weights before experts were removed: zeros and removed experts together
            s = results["sparsity"]
            total = s["all_block_weights_total"] + removed
            s["removed_with_experts"] = (s["all_block_weights"] * s["all_block_weights_total"] + removed) / total
    warn_partial(results["sparsity"], config.prune is not None)
    results["timings_s"] = {k: timer.get(k, 0.0) for k in ("load", "calibration", "pruning", "eval", "zero_shot")}
    results["offload"] = workspace.mode
    # the process's own high-water mark (Linux reports KiB): what this run needed, measured not estimated
    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    replace_non_finite(results)
    manifest = {"config": results["config"], "versions": results["versions"]}
    if config.save is not None and work is not None:
        save_streamed(config.save, model, tokenizer, work, workspace.blocks, manifest, config.overwrite)
    elif config.save is not None:
        save_model(config.save, model, tokenizer, manifest, config.overwrite)
    if config.output_json is not None:
        write_json_atomic(config.output_json, results)
    if work is not None:
        work.remove()
    return results
