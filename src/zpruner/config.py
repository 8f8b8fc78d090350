"""Dataclass configurations: validated on construction, serialised into every result.

The CLI is a thin layer that fills these; the Python API takes them directly.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .checks import check_bool, check_choice, check_fraction, check_int, check_str
from .errors import ZprunerError
from .heldout import check_config as check_selection
from .masks import Pattern, check_sparsity
from .protocols import check_protocol, expand
from .registry import UPDATES, Method, constants, get_allocation, get_method, get_selection, get_update
from .zeroshot import parse_tasks

SCHEMA_VERSION = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")
GROUPS = ("row", "layer")
EXPERT_SCORES = ("reap", "frequency", "random")  # zpruner.experts.ExpertTally.score
EXPERT_STATS = ("own", "pooled")
OFFLOAD_MODES = ("auto", "none", "cpu", "disk")
CALIB_BATCH_TOKENS = 4096


def _check_group(name: str, value) -> None:
    if value not in GROUPS:
        raise ZprunerError(f"group '{value}' is unknown; choose one of {', '.join(GROUPS)}")


# Each core PruneConfig field alone (combinations are PruneConfig.__post_init__'s, the
# methods' constants the registry's); the sweep checks a grid's values with these before it
# builds any combination.
PRUNE_FIELD_CHECKS = {
    "method": lambda n, v: (check_str(n, v), get_method(v)),
    "update": lambda n, v: (check_str(n, v), get_update(v)),
    "pattern": lambda n, v: (check_str(n, v), Pattern.parse(v)),
    "group": _check_group, "calibration": check_str,
    "nsamples": check_int, "seqlen": check_int, "calib_batch_size": check_int,
    "seed": lambda n, v: check_int(n, v, minimum=None),
    "reallocate": check_bool,
    "allocation": lambda n, v: (check_str(n, v), get_allocation(v)),
    "select": lambda n, v: (check_str(n, v), get_selection(v)),
    "sparsity": lambda n, v: check_sparsity(v),
    "prune_experts": check_fraction,
    "expert_score": lambda n, v: check_choice(n, v, EXPERT_SCORES),
    "expert_stats": lambda n, v: check_choice(n, v, EXPERT_STATS),
}


def check_prune_field(name: str, value) -> None:
    """One PruneConfig field's or registered constant's type and range; None (the default)
    always passes."""
    if value is None:
        return
    if name in PRUNE_FIELD_CHECKS:
        PRUNE_FIELD_CHECKS[name](name, value)
    elif name in constants():
        constants()[name].validate(value)


@dataclass(init=False)
class PruneConfig:
    """What to prune and how, and the calibration data that drives it.

    ``method`` is a score (zpruner.scores) or a solver that chooses its mask inside a
    reconstruction (sparsegpt). ``pattern`` is 'unstructured' or 'N:M'. ``sparsity`` None
    means 0.5 for unstructured and N/M for N:M (where any other value is an error).
    ``group`` ('row' or 'layer') is the comparison group of unstructured masks; None takes
    the method's default. ``calibration`` is 'c4' or a path to a .txt/.jsonl file.
    ``update`` corrects the kept weights after the mask: 'none', 'ec' (column then row
    energy compensation), 'ec-col', 'ec-row', or 'sparsegpt' (reconstruct with the inverse
    Hessian, keeping the method's mask), or 'admm' (solve the kept weights by ADMM).
    ``allocation`` shares the sparsity out among the blocks: 'uniform' or 'owl'
    (zpruner.allocation). ``prune_experts`` removes that fraction of the routed experts of
    every MoE block, ranked by ``expert_score`` ('reap', 'frequency' or 'random');
    ``expert_stats`` 'own' gives each expert the statistics of the tokens routed to it,
    'pooled' those of every token its block's experts saw (zpruner.experts). ``select``: zpruner.heldout.

    The methods' constants (``ria_exponent``, ``cvr_alpha``, ``ec_clamp``, ``damp`` ...:
    ``zpruner.registry.constants()``) are keyword arguments too; they are kept in
    ``constants`` (every registered one, defaults filled in), read as attributes
    (``config.cvr_alpha``) and stored flat beside the fields in results.
    """

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    group: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calibration: str = "c4"
    update: str = "none"
    reallocate: bool = False  # RIA channel reallocation + linear-sum assignment (N:M only)
    # Calibration samples per block forward; None = as many as make ~4096 tokens (8 x 512,
    # 2 x 2048): large enough for efficient matrix products, small enough for eager attention.
    calib_batch_size: int | None = None
    allocation: str = "uniform"
    # mixture-of-experts models: the fraction of routed experts removed in every MoE block,
    # chosen by ``expert_score``, before the kept ones are pruned; and whether an expert's
    # statistics are its own routed tokens or pooled over every token of its block
    prune_experts: float = 0.0
    expert_score: str = "reap"
    expert_stats: str = "own"
    select: str = "none"
    constants: dict[str, Any] = field(default_factory=dict)

    def __init__(self, *args, **kwargs) -> None:
        names = [f.name for f in dataclasses.fields(self) if f.name != "constants"]
        if len(args) > len(names):
            raise TypeError(f"PruneConfig takes at most {len(names)} positional arguments ({', '.join(names)})")
        given = dict(zip(names, args))
        for name in set(given) & set(kwargs):
            raise TypeError(f"PruneConfig got two values for {name}")
        given.update(kwargs)
        known = constants()
        given_constants = dict(given.pop("constants", None) or {})
        for name in list(given):
            if name not in names:
                if name not in known:
                    raise ZprunerError(f"'{name}' is neither a pruning option nor a registered method's constant; "
                                       f"constants: {', '.join(known) or 'none'}")
                given_constants[name] = given.pop(name)
        for f in dataclasses.fields(self):
            if f.name != "constants":
                setattr(self, f.name, given.get(f.name, f.default))
        self.constants = {name: given_constants.get(name, c.default) for name, c in known.items()}
        for name in set(given_constants) - set(known):
            raise ZprunerError(f"constant '{name}' belongs to no registered method; known: {', '.join(known)}")
        self.__post_init__()

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: the registered constants read as attributes
        constants_ = self.__dict__.get("constants", {})
        if name in constants_:
            return constants_[name]
        raise AttributeError(f"'PruneConfig' has no attribute '{name}'")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "constants":
                check_prune_field(f.name, getattr(self, f.name))
        known = constants()
        self.constants = {name: known[name].validate(value) for name, value in self.constants.items()}
        method, update = get_method(self.method), get_update(self.update)
        if method.kind == "solver":
            if update.needs_hessian:
                others = [name for name, u in UPDATES.items() if not u.needs_hessian]
                choices = ", ".join(others[:-1]) + " or " + others[-1] if len(others) > 1 else others[0]
                raise ZprunerError(f"method {self.method} already reconstructs; use --update {choices}")
            if self.group is not None and method.default_group is None:
                raise ZprunerError(f"--group does not apply to method {self.method}: it chooses its mask in its solver")
        pattern = self.parsed_pattern
        if pattern.is_nm:
            nm_sparsity = pattern.n / pattern.m
            if self.sparsity is not None and not math.isclose(self.sparsity, nm_sparsity):
                raise ZprunerError(
                    f"pattern {pattern} fixes sparsity at {nm_sparsity:g}, but sparsity {self.sparsity} "
                    "was given; drop --sparsity or make it equal N/M"
                )
            self.sparsity = nm_sparsity
        elif self.sparsity is None:
            self.sparsity = 0.5
        check_sparsity(self.sparsity)
        self.sparsity = float(self.sparsity)  # 0.5 from anywhere, one run key
        self.prune_experts = float(self.prune_experts)
        check_selection(self, method, update, CALIB_BATCH_TOKENS)
        if self.calib_batch_size is None:
            self.calib_batch_size = max(1, CALIB_BATCH_TOKENS // self.seqlen)
        if self.reallocate and (not pattern.is_nm or method.kind != "score"):
            raise ZprunerError("--reallocate needs an N:M --pattern and a score-based method (not a solver)")

    @property
    def method_entry(self) -> Method:
        return get_method(self.method)

    @property
    def update_entry(self) -> Method:
        return get_update(self.update)

    @property
    def allocation_entry(self) -> Method:
        return get_allocation(self.allocation)

    @property
    def uses_hessian(self) -> bool:
        return self.method_entry.needs_hessian or self.update_entry.needs_hessian

    @property
    def needs_calibration(self) -> bool:
        # reallocation checks each permutation on a calibration sample
        return (self.uses_hessian or self.reallocate or self.method_entry.needs_activations
                or self.allocation_entry.needs_activations or self.prune_experts > 0)

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    def used_constants(self) -> dict[str, Any]:
        """The constants of the method, the update and the allocation this configuration uses."""
        entries = (self.method_entry, self.update_entry, self.allocation_entry, get_selection(self.select))
        used = [f.name for entry in entries for f in entry.constant_fields]
        return {name: self.constants[name] for name in used}

    def for_block(self, sparsity: float) -> "PruneConfig":
        """This configuration at one block's share of a non-uniform allocation: ``sparsity``,
        and for N:M the pattern N_b:M it stands for (already checked by the allocation)."""
        block = copy.copy(self)
        block.sparsity = sparsity
        pattern = self.parsed_pattern
        if pattern.is_nm:
            block.pattern = f"{round(sparsity * pattern.m)}:{pattern.m}"
        return block

    def identity(self) -> dict[str, Any]:
        """The fields that decide this configuration's pruned weights: the constants of
        methods and updates it does not use, calibration settings of a data-free method and
        execution details (calib_batch_size) are left out, so equal results get equal keys."""
        used = {"method", "sparsity", "pattern", "group", "update", "reallocate"}
        # absent from results written before allocations and selections, which were uniform and none
        used |= {name for name, off in (("allocation", "uniform"), ("select", "none")) if getattr(self, name) != off}
        if self.prune_experts > 0:  # likewise for the MoE options, at their defaults before them
            used |= {"prune_experts", "expert_score"}
        if self.expert_stats != "own":
            used.add("expert_stats")
        if self.needs_calibration:
            used |= {"nsamples", "seqlen", "seed", "calibration"}
        return {**{k: v for k, v in self.to_dict().items() if k in used}, **self.used_constants()}

    def to_dict(self) -> dict[str, Any]:
        """The fields, then every constant, flat (the results files' ``config.prune``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "constants"}
        return {**d, **self.constants}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneConfig":
        """From a results file's ``config.prune``. Fields a newer zpruner added take their
        defaults; of the stored constants only those of the stored method and update are
        read: the others never touched the weights, and files from before a default changed
        may hold values that today's checks refuse (EC's clamp was once 0,inf)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"constants"}
        used: set[str] = set()
        for lookup, key in ((get_method, "method"), (get_update, "update"), (get_allocation, "allocation"),
                            (get_selection, "select")):
            try:
                used |= {f.name for f in lookup(d.get(key, getattr(cls, key))).constant_fields}
            except ZprunerError:
                pass  # the constructor names the unknown method or update
        return cls(**{k: v for k, v in d.items() if k in names or k in used})


@dataclass
class EvalConfig:
    """Perplexity protocol: non-overlapping windows of ``seqlen`` tokens (None = the model's
    context capped at 2048), the first ``windows`` of them (None = all)."""

    dataset: str = "wikitext2"
    seqlen: int | None = None
    windows: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        check_str("eval_dataset", self.dataset)
        if self.seqlen is not None:
            check_int("eval_seqlen", self.seqlen, minimum=2)  # a window of one token predicts nothing
        if self.windows is not None:
            check_int("eval_windows", self.windows)
        check_int("eval_batch_size", self.batch_size)


@dataclass
class ZeroShotConfig:
    """Zero-shot accuracy with lm-evaluation-harness: ``tasks`` (names and/or the set 'paper',
    as a list or a comma-separated string; stored expanded), the first ``limit`` items of each
    (None = all), ``batch_size`` requests per forward."""

    tasks: list[str] = field(default_factory=lambda: ["paper"])
    limit: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, (str, list, tuple)):
            raise ZprunerError(f"tasks (--tasks) must be task names such as arc_easy,boolq, got {self.tasks!r}")
        self.tasks = list(parse_tasks(self.tasks))
        if self.limit is not None:
            check_int("limit", self.limit)
        check_int("batch_size", self.batch_size)


@dataclass
class ModelConfig:
    """``name``: a hub id, a local directory, a .gguf file or a built-in alias."""

    name: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_str("model", self.name)
        check_str("device", self.device)
        check_bool("trust_remote_code", self.trust_remote_code)
        if self.dtype not in DTYPES:
            raise ZprunerError(f"dtype '{self.dtype}' is unknown; choose one of {', '.join(DTYPES)}")


@dataclass
class RunConfig:
    """Everything one ``zpruner prune`` or ``zpruner eval`` run does."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig | None = None
    eval: EvalConfig | None = field(default_factory=EvalConfig)
    data_dir: str | None = None
    dense_baseline: bool = False
    save: str | None = None
    output_json: str | None = None
    zero_shot: ZeroShotConfig | None = None
    protocol: str | None = None  # the preset the options were expanded from (zpruner.protocols), for the record
    overwrite: bool = False  # let ``save`` replace a previous zpruner output (never any other folder)
    # Where the weights live (zpruner.offload): auto, none, cpu or disk; execution details,
    # like the three below, that never change a result (they are not part of run keys).
    offload: str = "auto"
    resume: bool = False  # continue the unfinished streamed run of the same options in ``work_dir``
    work_dir: str | None = None  # a streamed run's checkpoints; None: beside ``save``, else in the temp folder
    activations: str = "memory"  # 'disk': the calibration activations in a memory-mapped file (work folder or temp)
    recipe: dict[str, Any] | None = None  # --recipe's choices, for the record (zpruner.recipes.run_config)

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        if self.offload not in OFFLOAD_MODES:
            raise ZprunerError(f"offload '{self.offload}' is unknown; choose one of {', '.join(OFFLOAD_MODES)}")
        check_bool("resume", self.resume)
        if self.activations not in ("memory", "disk"):
            raise ZprunerError(f"activations '{self.activations}' is unknown; choose memory or disk")
        if self.work_dir is not None:
            check_str("work_dir", self.work_dir)
        if self.resume and self.prune is None:
            raise ZprunerError("--resume continues an unfinished pruning run; 'zpruner eval' has nothing to resume")
        if self.zero_shot is not None and self.offload == "disk":
            raise ZprunerError(STREAMED_ZERO_SHOT)
        if self.resume and self.offload != "disk":
            raise ZprunerError("--resume needs --offload disk: only a run streamed from disk keeps checkpoints")

    @classmethod
    def from_options(cls, protocol: str | None = None, *, prune: bool = True, **options) -> "RunConfig":
        """A run from flat options, as the CLI and the sweep name them (``--eval-seqlen`` is
        ``eval_seqlen``, a method's constant its own name). None means "not given": the
        ``protocol``'s value where it has one, else the dataclass default. Without ``prune``
        the pruning options are ignored (a dense measurement of the same protocol)."""
        prune_names = {f.name for f in dataclasses.fields(PruneConfig) if f.name != "constants"} | set(constants())
        unknown = set(options) - prune_names - set(MODEL_OPTIONS) - set(EVAL_OPTIONS) - set(ZERO_SHOT_OPTIONS) \
            - set(RUN_OPTIONS) - set(PROTOCOL_OPTIONS) - {"no_eval"}
        if unknown:
            raise ZprunerError(f"unknown option(s) {', '.join(sorted(unknown))}")
        given = {k: v for k, v in options.items() if v is not None}
        chosen = expand(protocol, {k: given.pop(k, None) for k in PROTOCOL_OPTIONS})

        def take(table: dict[str, str]) -> dict[str, Any]:
            return {field_name: given.pop(option) for option, field_name in table.items() if option in given}

        model = ModelConfig(**take(MODEL_OPTIONS))
        evaluation = take(EVAL_OPTIONS)
        evaluation = None if given.pop("no_eval", False) else EvalConfig(
            **evaluation, seqlen=chosen["eval_seqlen"], windows=chosen["eval_windows"])
        zero_shot = take(ZERO_SHOT_OPTIONS)
        if zero_shot and "tasks" not in zero_shot:
            raise ZprunerError("--limit and --batch-size set up zero-shot tasks; add --tasks (e.g. --tasks paper)")
        zero_shot = ZeroShotConfig(**zero_shot) if zero_shot else None
        run = {name: given.pop(name) for name in RUN_OPTIONS if name in given}
        pruning = None
        if prune:
            pruning = PruneConfig(nsamples=chosen["nsamples"], seqlen=chosen["seqlen"],
                                  **{k: v for k, v in given.items() if k in prune_names})
        return cls(model, pruning, evaluation, zero_shot=zero_shot, protocol=protocol, **run)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.prune is not None:
            d["prune"] = self.prune.to_dict()
        return {"schema_version": SCHEMA_VERSION, **d}


# Flat option name -> field, per section (RunConfig.from_options).
MODEL_OPTIONS = {"model": "name", "dtype": "dtype", "device": "device", "trust_remote_code": "trust_remote_code"}
EVAL_OPTIONS = {"eval_dataset": "dataset", "eval_batch_size": "batch_size"}  # seqlen, windows: the protocol's
ZERO_SHOT_OPTIONS = {"tasks": "tasks", "limit": "limit", "batch_size": "batch_size"}
PROTOCOL_OPTIONS = ("nsamples", "seqlen", "eval_seqlen", "eval_windows")  # a --protocol's, unless given
RUN_OPTIONS = ("data_dir", "dense_baseline", "save", "output_json", "overwrite", "offload", "resume", "work_dir",
               "activations")
EXECUTION_OPTIONS = ("offload", "resume", "work_dir", "activations")  # never part of a run key
STREAMED_ZERO_SHOT = ("zero-shot tasks (--tasks) run through lm-eval on the whole model in memory, and this model "
                      "is streamed from disk (--offload disk); measure the saved pruned model with 'zpruner eval "
                      "--tasks ...' on a machine it fits, or drop --tasks")
