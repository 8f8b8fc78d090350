"""One ``zpruner prune`` / ``zpruner eval`` run: load, calibrate, prune, evaluate, write.

Outputs are written to a temporary path and renamed when complete, so a failed run never
leaves a half-written model or results file behind.
"""
from __future__ import annotations

import importlib.metadata
import logging
import platform
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoint import WorkDir, checkpoint_options, default_work_dir, sparsity_of
from .config import RunConfig
from .data import resolve_data_dir, token_digest
from .errors import ZprunerError
from .evaluate import perplexity
from .io import check_free_space, write_json_atomic
from .kernels import native
from .layers import find_blocks, measure_sparsity
from .models import save_dtype
from .preflight import _check_model, check_eval_length, check_output_paths, eval_seqlen, space_needed
from .pruning import PruneReport
from .results import Measurement, RunResult, replace_non_finite, run_key
from .saving import save_model, save_streamed
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


def warn_partial(sparsity: dict) -> None:
    """One line when the pruned matrices are less than 90 % of the blocks' weights: what was
    left alone, so that no one reads a sparsity over part of the model as the model's."""
    share = sparsity.get("pruned_share", 1.0)
    if share >= 0.9:
        return
    reasons: dict[str, int] = {}
    for why in sparsity["left_alone"].values():
        reasons[why] = reasons.get(why, 0) + 1
    left = "; ".join(f"{why} ({n} tensor{'s' if n > 1 else ''})" for why, n in sorted(reasons.items()))
    log.warning("the pruned matrices hold %.1f %% of the blocks' weights: %.2f %% of all block weights are zero; "
                "left alone: %s", 100 * share, 100 * sparsity["all_block_weights"], left)


def run(config: RunConfig, progress: bool = True, workspace: Workspace | None = None) -> RunResult:
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
    resolve_data_dir(config.data_dir)  # a wrong folder stops the run before the model loads
    if workspace is None:
        workspace = Workspace(config.model, config.data_dir, offload_mode=config.offload)
    elif (workspace.model_config, workspace.data_dir) != (config.model, config.data_dir):
        raise ZprunerError("this run's model or data directory differs from its workspace's")
    native.reset_used()
    return _Run(config, workspace, progress).run()


class _Run:
    """One run's steps, in order: prepare (load and check everything), measure the dense
    model if asked, prune, measure, count, write."""

    def __init__(self, config: RunConfig, workspace: Workspace, progress: bool):
        self.config, self.workspace, self.progress = config, workspace, progress
        self.timer = Timer()
        self.result = RunResult(config.to_dict(), versions())
        self.work: WorkDir | None = None

    def run(self) -> RunResult:
        config, result = self.config, self.result
        calibration = self.prepare()
        if config.prune is None or config.dense_baseline:
            measured = self.measure()
            if config.prune is None:
                result.measured = measured
            else:
                result.dense = measured
        report = None
        if config.prune is not None:
            report = self.prune(calibration)
            result.measured = self.measure()
        self.count(report)
        result.timings_s = {k: self.timer.get(k, 0.0) for k in ("load", "calibration", "pruning", "eval", "zero_shot")}
        result.offload = self.workspace.mode
        # the process's own high-water mark (Linux reports KiB): what this run needed, measured not estimated
        result.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.native_kernels = native.used()
        return self.write()

    def prepare(self):
        """The model, the checks that need it, the work folder, the calibration windows and
        the evaluation tokens; returns the calibration token ids (None for a data-free method)."""
        config, workspace, timer = self.config, self.workspace, self.timer
        with timer.phase("zero_shot"):
            self.tasks = workspace.zero_shot_tasks(config.zero_shot)
        with timer.phase("load"):
            self.model, self.tokenizer = workspace.dense_model()
        _check_model(self.model, self.tokenizer, config, workspace.streamed)
        self.stored = save_dtype(config.save_dtype, workspace.own_dtype)
        streamed = config.prune is not None and workspace.streamed
        if config.resume and not streamed:
            raise ZprunerError(f"--resume: this run is not streamed (offload {workspace.mode}); only --offload disk "
                               "keeps checkpoints")
        work_path = None
        if streamed:
            work_path = (Path(config.work_dir).expanduser() if config.work_dir else
                         default_work_dir(config.save, config.output_json, config.model.name))
        check_free_space(space_needed(config, self.model, workspace.dtype, self.stored, work_path))
        if streamed:
            self.work = WorkDir(work_path, run_key(config), checkpoint_options(config), config.resume,
                                len(find_blocks(self.model)), config.prune.needs_calibration, self.stored)
        calibration = None
        if config.prune is not None:
            with timer.phase("calibration"):
                calibration = workspace.calibration(config.prune)
            if calibration is not None:
                self.result.calibration_sha256_16 = token_digest(calibration)
        self.tokens = None
        if config.eval is not None:
            with timer.phase("eval"):
                self.tokens, self.digest = workspace.eval_tokens(config.eval.dataset)
            check_eval_length(self.tokens, eval_seqlen(self.model, config.eval), config.eval.dataset)
        return calibration

    def measure(self) -> Measurement:
        """Every requested measurement of the model as it is now."""
        config, measured = self.config, Measurement()
        if self.tokens is not None:
            with self.timer.phase("eval"):
                value = perplexity(self.model, self.tokens, eval_seqlen(self.model, config.eval), config.eval.windows,
                                   config.eval.batch_size, self.progress, self.workspace.blocks)
            measured.perplexity = {"value": value.value, "windows": value.windows, "seqlen": value.seqlen,
                                   "predicted_tokens": value.tokens, "data_sha256_16": self.digest}
            measured.dataset = config.eval.dataset
        if self.tasks is not None:
            zs = config.zero_shot
            with self.timer.phase("zero_shot"):
                measured.zero_shot = run_tasks(self.model, self.tokenizer, self.tasks, zs.limit, zs.batch_size,
                                               self.progress)
        return measured

    def prune(self, calibration) -> PruneReport:
        config, result = self.config, self.result
        with self.timer.phase("pruning"):
            spill = None
            if config.activations == "disk":
                spill = str(self.work.path / "state") if self.work is not None else tempfile.gettempdir()
            report = self.workspace.prune(config.prune, calibration, self.progress, self.work, spill)
        result.layer_time_s = report.layer_time_s
        if config.prune.reallocate:
            result.reallocated = report.reallocated
        if report.block_sparsity:
            result.block_sparsity = report.block_sparsity
        if report.selection:
            result.selection = report.selection
        return report

    def count(self, report: PruneReport | None) -> None:
        """Sparsity counted from the weights: as each block was pruned (or read) when
        streamed, else from the model in memory; with experts removed, the share of the
        blocks' original weights gone."""
        result = self.result
        if self.workspace.streamed:
            result.sparsity = sparsity_of(*((report.sparsity, report.counts) if report
                                            else self.workspace.blocks.counted()))
        else:
            result.sparsity = measure_sparsity(self.model)
        if report is not None and report.experts:
            result.experts = report.experts
            removed = sum(entry.get("removed_weights", 0) for entry in report.experts.values())
            if removed:  # zeros and removed experts together, of the blocks' weights before
                s = result.sparsity
                total = s["all_block_weights_total"] + removed
                s["removed_with_experts"] = (s["all_block_weights"] * s["all_block_weights_total"] + removed) / total
        if report is not None:
            warn_partial(result.sparsity)

    def write(self) -> RunResult:
        """The saved model and the results file, each swapped in when complete; the results
        as written (a non-finite number is null there, and listed under ``non_finite``)."""
        config = self.config
        payload = self.result.to_dict()
        replace_non_finite(payload)
        manifest = {"config": payload["config"], "versions": payload["versions"]}
        if config.save is not None and self.work is not None:
            save_streamed(config.save, self.model, self.tokenizer, self.work, self.workspace.blocks, manifest,
                          config.overwrite, self.stored)
        elif config.save is not None:
            save_model(config.save, self.model, self.tokenizer, manifest, config.overwrite, self.stored)
        if config.output_json is not None:
            write_json_atomic(config.output_json, payload)
        if self.work is not None:
            self.work.remove()
        return RunResult.from_dict(payload)
