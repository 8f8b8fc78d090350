"""What a run checks before its first long phase: every output can be written where it goes
(and none lands in another), the disk has room for them, the model suits the options
(pattern, context, zero-shot), the evaluation text holds a window. A mistake costs seconds,
not a pruning run."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import STREAMED_ZERO_SHOT, EvalConfig, RunConfig
from .errors import ZprunerError
from .heldout import ONE_BATCH, STREAMED_GENERATION
from .io import check_model_target, check_output_file, check_output_folder, is_results_file, same_file_system
from .layers import check_pattern, find_blocks
from .registry import get_selection


def check_output_paths(config: RunConfig) -> None:
    """Refuse before any work when an output could not be written at the end, or one output
    would land in another (which replaces or removes it whole)."""
    outputs = {}
    if config.output_json is not None:
        outputs["--output-json"] = check_output_file("--output-json", config.output_json, own=is_results_file)
    if config.save is not None:
        outputs["--save"] = check_model_target(config.save, config.overwrite)
    if config.work_dir is not None:
        outputs["--work-dir"] = check_output_folder("--work-dir", config.work_dir)
    _check_apart(outputs)


# (inner, outer): why ``inner`` cannot be ``outer`` or inside it
_APART = {
    ("--output-json", "--save"): "the saved model takes that folder's place whole",
    ("--work-dir", "--save"): "the saved model takes that folder's place whole",
    ("--save", "--work-dir"): "the work folder is removed when the run ends",
    ("--output-json", "--work-dir"): "the work folder is removed when the run ends",
}


def _check_apart(outputs: dict[str, Path]) -> None:
    for (inner, outer), why in _APART.items():
        if inner in outputs and outer in outputs and outputs[inner].is_relative_to(outputs[outer]):
            where = "is" if outputs[inner] == outputs[outer] else "is inside"
            raise ZprunerError(f"{inner} {outputs[inner]} {where} {outer} {outputs[outer]}: {why}; "
                               f"give {inner} a place of its own, beside it")


# An estimate's margin (safetensors headers, the index, state files), and beside a saved
# model's weights its config, tokenizer (tens of MB for some vocabularies) and manifest
SPACE_MARGIN, SPACE_RESERVE_BYTES = 1.05, 32 << 20


def space_needed(config: RunConfig, model: nn.Module, compute: torch.dtype, stored: torch.dtype,
                 work: Path | None) -> list[tuple[str, Path, int]]:
    """What the run will write to disk, (what, where, bytes), estimated from the number of
    weights: ``--save`` in the ``stored`` dtype; for a streamed run (``work``) the block shards
    (in ``stored`` when pruning only masks, see WorkDir) and the activations entering a block
    (two blocks' worth at a step; less what a resumed run's work folder holds already);
    ``--activations disk`` files."""
    if config.prune is None:
        return []

    def size(numel: int, dtype: torch.dtype) -> int:
        return numel * torch.empty((), dtype=dtype).element_size()

    everything = sum(p.numel() for p in model.parameters())
    inside = sum(p.numel() for p in find_blocks(model).parameters())
    shards = compute if config.prune.changes_kept_weights else stored
    hidden = getattr(model.config, "hidden_size", 0) or 0
    activations = size(config.prune.nsamples * config.prune.seqlen * hidden, compute) \
        if config.prune.needs_calibration else 0
    spilled = activations if config.activations == "disk" else 0
    needs = []
    if work is not None:
        done = sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) if work.is_dir() else 0
        needs.append((f"the work folder {work}", work,
                      int(max(0, size(inside, shards) + 2 * activations + spilled - done) * SPACE_MARGIN)))
    elif spilled:
        needs.append(("the activations on disk", Path(tempfile.gettempdir()), int(spilled * SPACE_MARGIN)))
    if config.save is not None:
        target = Path(config.save).expanduser().resolve()
        linked = work is not None and shards == stored and same_file_system(work, target.parent)
        blocks = 0 if linked else size(inside, stored)  # hard links to the work folder's shards take no space
        weights = size(everything - inside, stored) + blocks
        needs.append((f"--save {target}", target.parent, int(weights * SPACE_MARGIN) + SPACE_RESERVE_BYTES))
    return needs


def check_context(model: nn.Module, seqlen: int, option: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ZprunerError(f"{option} {seqlen} exceeds the model's context of {limit} tokens; lower {option}")


def eval_seqlen(model: nn.Module, config: EvalConfig) -> int:
    """The asked window, else the model's context capped at 2048 (the papers' setting)."""
    if config.seqlen is not None:
        return config.seqlen
    return min(2048, getattr(model.config, "max_position_embeddings", 2048) or 2048)


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
        _check_heldout(config.prune, streamed)
    if config.eval is not None:
        check_context(model, eval_seqlen(model, config.eval), "--eval-seqlen")


def _check_heldout(prune, streamed: bool) -> None:
    """--select heldout: two calibration parts, or text the dense model generates (the whole
    model in memory; its windows are --seqlen long, checked with the calibration's), known
    before the model is calibrated."""
    if not get_selection(prune.select).needs_split:
        return
    if prune.heldout_texts == 0 and -(-prune.nsamples // prune.calib_batch_size) < 2:
        raise ZprunerError(ONE_BATCH)
    if prune.heldout_texts > 0 and streamed:
        raise ZprunerError(STREAMED_GENERATION)


def check_eval_length(tokens: torch.Tensor, seqlen: int, dataset: str) -> None:
    """Before pruning: the evaluation text must hold one window."""
    if tokens.shape[1] < seqlen:
        raise ZprunerError(f"evaluation text '{dataset}' has {tokens.shape[1]} tokens, fewer than one window of "
                           f"{seqlen}; lower --eval-seqlen or give a longer --eval-dataset")
