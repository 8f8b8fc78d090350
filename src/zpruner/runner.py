"""One ``zpruner prune`` / ``zpruner eval`` run: load, calibrate, prune, evaluate, write.

Outputs are written to a temporary path and renamed when complete, so a failed run never
leaves a half-written model or results file behind.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .config import EvalConfig, ModelConfig, PruneConfig, RunConfig, ZeroShotConfig
from .data import calibration as calibration_of
from .data import eval_tokens, load_texts, token_digest
from .errors import ZprunerError
from .evaluate import perplexity
from .io import check_model_target, check_output_file, save_folder_atomic, write_json_atomic
from .layers import check_pattern, find_blocks, measure_sparsity
from .models import load_model
from .pruning import prune
from .results import replace_non_finite
from .zeroshot import LoadedTasks, load_tasks, run_tasks

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


def _perplexity_entry(model, tokens: torch.Tensor, config: EvalConfig, progress: bool) -> dict:
    result = perplexity(model, tokens, eval_seqlen(model, config), config.windows, config.batch_size, progress)
    return {"value": result.value, "windows": result.windows, "seqlen": result.seqlen, "predicted_tokens": result.tokens}


def _check_model(model: nn.Module, tokenizer, config: RunConfig) -> None:
    if config.zero_shot is not None and tokenizer.eos_token_id is None:
        raise ZprunerError(f"the tokenizer of '{config.model.name}' has no end-of-sequence token, which lm-eval "
                           "needs for zero-shot tasks; set eos_token in its tokenizer_config.json or drop --tasks")
    find_blocks(model)  # results count sparsity over the blocks, pruned or not
    if config.prune is not None:
        check_pattern(model, config.prune.parsed_pattern)
        check_context(model, config.prune.seqlen, "--seqlen")
    if config.eval is not None:
        check_context(model, eval_seqlen(model, config.eval), "--eval-seqlen")


def check_eval_length(tokens: torch.Tensor, seqlen: int, dataset: str) -> None:
    """Before pruning: the evaluation text must hold one window."""
    if tokens.shape[1] < seqlen:
        raise ZprunerError(f"evaluation text '{dataset}' has {tokens.shape[1]} tokens, fewer than one window of "
                           f"{seqlen}; lower --eval-seqlen or give a longer --eval-dataset")


class Workspace:
    """One model and everything derived from it that runs can share: the tokenizer, the
    calibration windows, the evaluation tokens and the zero-shot task data, each built once.

    With ``keep_dense`` the dense weights of the decoder blocks (all that pruning edits,
    reallocation's permuted producers included) are copied to CPU memory after loading,
    and every run after a pruned one starts from them instead of reloading the model.
    """

    def __init__(self, model: ModelConfig, data_dir: str | None = None, keep_dense: bool = False):
        self.model_config, self.data_dir, self.keep_dense = model, data_dir, keep_dense
        self.model: nn.Module | None = None
        self.tokenizer = None
        self._dense: list[dict[str, torch.Tensor]] | None = None
        self._pruned = False
        self._cache: dict[tuple, object] = {}

    def _cached(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def dense_model(self):
        """(model, tokenizer), with the dense weights."""
        if self.model is None:
            self.model, self.tokenizer = load_model(self.model_config)
            if self.keep_dense:
                self._dense = [{n: p.detach().to("cpu", copy=True) for n, p in block.named_parameters()}
                               for block in find_blocks(self.model)]
        elif self._pruned:
            if self._dense is None:
                raise ZprunerError("this workspace's model was pruned and its dense weights were not kept; "
                                   "create the Workspace with keep_dense=True to run several configurations")
            with torch.no_grad():
                for block, saved in zip(find_blocks(self.model), self._dense):
                    for n, p in block.named_parameters():
                        p.copy_(saved[n])
        self._pruned = False
        return self.model, self.tokenizer

    def prune(self, config: PruneConfig, calibration: torch.Tensor | None, progress: bool):
        self._pruned = True
        return prune(self.model, config, calibration, progress)

    def calibration(self, config: PruneConfig) -> torch.Tensor | None:
        if not config.needs_calibration:
            return None
        key = ("calibration", config.calibration, config.nsamples, config.seqlen, config.seed)
        return self._cached(key, lambda: calibration_of(self.tokenizer, config, self.data_dir))

    def eval_tokens(self, dataset: str) -> tuple[torch.Tensor, str]:
        def build():
            tokens = eval_tokens(self.tokenizer, load_texts(dataset, self.data_dir))
            return tokens, token_digest(tokens)

        return self._cached(("eval", dataset), build)

    def zero_shot_tasks(self, config: ZeroShotConfig | None) -> LoadedTasks | None:
        """The tasks with their data, read before the model so bad input stops the run early."""
        if config is None:
            return None

        def build():
            tasks = load_tasks(config.tasks, self.data_dir)
            for name, reason in tasks.skipped.items():
                log.warning("zero-shot task %s skipped: %s", name, reason)
            return tasks

        return self._cached(("tasks", tuple(config.tasks)), build)


def run(config: RunConfig, progress: bool = True, workspace: Workspace | None = None) -> dict:
    """Run ``config`` (prune when ``config.prune`` is set, else evaluate as is); returns the results.

    Every input is checked (options, model, calibration text, zero-shot task data) before
    the first long phase. Perplexity and zero-shot accuracy measure the model in memory:
    after pruning, the pruned one (and with ``dense_baseline`` the dense one first).
    ``workspace`` lets consecutive runs on one model share its loading and data (zpruner.sweep).
    """
    check_output_paths(config)
    if config.prune is None and config.save is not None:
        raise ZprunerError("--save needs pruning; 'zpruner eval' only measures a model")
    if workspace is None:
        workspace = Workspace(config.model, config.data_dir)
    elif (workspace.model_config, workspace.data_dir) != (config.model, config.data_dir):
        raise ZprunerError("this run's model or data directory differs from its workspace's")
    timer = Timer()
    results: dict = {"config": config.to_dict(), "versions": versions()}
    with timer.phase("zero_shot"):
        zero_shot_tasks = workspace.zero_shot_tasks(config.zero_shot)
    with timer.phase("load"):
        model, tokenizer = workspace.dense_model()
    _check_model(model, tokenizer, config)
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
                entry = {**_perplexity_entry(model, tokens, config.eval, progress), "data_sha256_16": digest}
            results[prefix + "perplexity"] = {config.eval.dataset: entry["value"]}
            results[prefix + "perplexity_protocol"] = entry
        if zero_shot_tasks is not None:
            zs = config.zero_shot
            with timer.phase("zero_shot"):
                results[prefix + "zero_shot"] = run_tasks(model, tokenizer, zero_shot_tasks, zs.limit,
                                                          zs.batch_size, progress)

    if config.prune is None or config.dense_baseline:
        measure("" if config.prune is None else "dense_")
    if config.prune is not None:
        with timer.phase("pruning"):
            report = workspace.prune(config.prune, calibration, progress)
        results["layer_time_s"] = report.layer_time_s
        if config.prune.reallocate:
            results["reallocated"] = report.reallocated
        measure("")
    results["sparsity"] = measure_sparsity(model)
    results["timings_s"] = {k: timer.get(k, 0.0) for k in ("load", "calibration", "pruning", "eval", "zero_shot")}
    replace_non_finite(results)
    if config.save is not None:
        save_model(config.save, model, tokenizer, {"config": results["config"], "versions": results["versions"]},
                   config.overwrite)
    if config.output_json is not None:
        write_json_atomic(config.output_json, results)
    return results
