"""A model and everything runs on it can share: weights (in memory or streamed), tokenizer,
calibration windows, evaluation tokens and zero-shot task data, each built once."""
from __future__ import annotations

import logging

import torch
from torch import nn

from . import offload
from .checkpoint import WorkDir
from .config import ModelConfig, PruneConfig, ZeroShotConfig
from .data import calibration as calibration_of
from .data import eval_tokens, load_texts, token_digest
from .errors import ZprunerError
from .layers import find_blocks
from .models import (load_model, load_skeleton, local_weights, model_source, resolve_device, resolve_dtype,
                     source_dtype)
from .pruning import PruneReport, prune
from .weights import WeightSource
from .zeroshot import LoadedTasks, load_tasks

log = logging.getLogger(__name__)


class Workspace:
    """One model and everything derived from it that runs can share: the tokenizer, the
    calibration windows, the evaluation tokens and the zero-shot task data, each built once.

    With ``keep_dense`` the dense weights of the decoder blocks (all that pruning edits,
    reallocation's permuted producers included) are copied to CPU memory after loading,
    and every run after a pruned one starts from them instead of reloading the model
    (a run that removed experts changed the model's shape: the next one reloads it).

    ``offload`` (``zpruner.offload``) decides where the weights live; under 'disk' the
    model is built without weights and ``blocks`` streams them from the model's files
    (dense) or from the run's work folder (pruned), so nothing needs keeping.
    """

    def __init__(self, model: ModelConfig, data_dir: str | None = None, keep_dense: bool = False,
                 offload_mode: str = "auto"):
        self.model_config, self.data_dir, self.keep_dense = model, data_dir, keep_dense
        self.requested = offload_mode
        self.mode: str | None = None  # chosen when the model is first needed
        self.model: nn.Module | None = None
        self.own_dtype: torch.dtype | None = None  # the stored weights' dtype (models.source_dtype)
        self.tokenizer = None
        self.blocks: offload.Blocks | None = None  # None: the model runs whole
        self._dense_blocks: offload.Blocks | None = None
        self._dense: list[dict[str, torch.Tensor]] | None = None
        self._pruned = False
        self._reshaped = False  # experts were removed: the model's modules and config changed
        self._cache: dict[tuple, object] = {}

    def _cached(self, key: tuple, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def streamed(self) -> bool:
        return self.mode == "disk"

    def _load(self) -> None:
        device = resolve_device(self.model_config.device)
        skeleton, tokenizer, source = (None, None, None)
        mode = self.requested
        if mode in ("auto", "disk"):
            skeleton, tokenizer, source = load_skeleton(self.model_config)
            self.own_dtype = source_dtype(source)
            dtype = resolve_dtype(self.model_config.dtype, device, self.own_dtype)
            mode = offload.choose(mode, offload.weight_bytes(skeleton, dtype), device)
        else:
            self.own_dtype = source_dtype(model_source(self.model_config))
        if mode == "disk":
            self.model, self.tokenizer = skeleton, tokenizer
            prefix = getattr(skeleton, "base_model_prefix", "")
            self._dense_blocks = offload.StreamedBlocks(
                skeleton, device, WeightSource(local_weights(source), prefix, skeleton), dtype)
        else:
            del skeleton
            if mode == "cpu" and device.type != "cpu":
                # held in CPU memory in the dtype its blocks compute in on the GPU
                compute = str(resolve_dtype(self.model_config.dtype, device, self.own_dtype)).removeprefix("torch.")
                self.model, self.tokenizer = load_model(ModelConfig(self.model_config.name, compute, "cpu",
                                                                    self.model_config.trust_remote_code))
                self._dense_blocks = offload.MovedBlocks(self.model, device)
            else:
                mode = "none" if mode == "cpu" else mode  # no GPU: the model is in CPU memory either way
                self.model, self.tokenizer = load_model(self.model_config)
            if self.keep_dense:
                self._dense = [{n: p.detach().to("cpu", copy=True) for n, p in block.named_parameters()}
                               for block in find_blocks(self.model)]
        self.mode = mode

    def dense_model(self):
        """(model, tokenizer), with the dense weights."""
        if self.model is None or self._reshaped:
            # after --prune-experts the kept dense weights no longer fit the shrunk modules
            # (nor, streamed, the skeleton): only a fresh load is the dense model again
            self.model = self._dense = None
            self._reshaped = False
            self._load()
        elif self._pruned and not self.streamed:
            if self._dense is None:
                raise ZprunerError("this workspace's model was pruned and its dense weights were not kept; "
                                   "create the Workspace with keep_dense=True to run several configurations")
            with torch.no_grad():
                for block, saved in zip(find_blocks(self.model), self._dense):
                    for n, p in block.named_parameters():
                        p.copy_(saved[n])
        self._pruned = False
        self.blocks = self._dense_blocks
        return self.model, self.tokenizer

    def prune(self, config: PruneConfig, calibration: torch.Tensor | None, progress: bool,
              work: WorkDir | None = None, spill: str | None = None) -> PruneReport:
        self._pruned = True
        self._reshaped = self._reshaped or config.prune_experts > 0
        report = prune(self.model, config, calibration, progress, self.blocks, work, spill)
        if self.streamed:
            dense = self._dense_blocks
            self.blocks = offload.StreamedBlocks(self.model, dense.device, dense.source, dense.dtype,
                                                 block_source=WeightSource(work.path, model=self.model))
        return report

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

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
